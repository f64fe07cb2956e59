"""The operator on a real Kubernetes control plane (tests/servers/kubeplane.py).

manifests/install.yaml is applied with the real kubectl in one go, and `modelship operator` runs
as its own process with a token of the chart's ServiceAccount, so a missing RBAC rule fails a
test. The real scheduler binds runtime pods to Nodes the test creates the way Karpenter would
from the operator's NodePool, and the test writes pod status as a kubelet would.
"""

from __future__ import annotations

import collections
import datetime
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from modelship.operator import handlers
from modelship.operator.apply import (
    DEPLOYMENT,
    EC2_NODE_CLASS,
    NODE_POOL,
    SCALED_OBJECT,
    SERVICE,
    Kind,
    Kube,
    KubeApiError,
    prune_children,
)
from modelship.operator.leader import LEASE
from modelship.runtime.tinymodel import build_tiny_model

from tests.servers.kubeplane import (
    OPERATOR_NAMESPACE,
    OPERATOR_USER,
    POD,
    ControlPlane,
    Karpenter,
    Kubelet,
    OperatorProcess,
    audit_events,
    ensure_runtime_service_account,
    free_port,
    start_operator,
    wait_for,
)

pytestmark = pytest.mark.integration

MD = Kind("modelship.dev/v1alpha1", "ModelDeployment", "modeldeployments", True)
REPLICA_SET = Kind("apps/v1", "ReplicaSet", "replicasets", True)
EVENT = Kind("v1", "Event", "events", True)
# Short enough for quick takeovers, long enough that a busy API server does not cost the Lease.
LEASE_SECONDS = 6
OPERATOR_ENV = {
    "MODELSHIP_CLUSTER_NAME": "test-cluster",
    "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-test",
    "MODELSHIP_RESYNC_SECONDS": "30",
    "MODELSHIP_LEASE_SECONDS": str(LEASE_SECONDS),
    "MODELSHIP_ACTIVATOR_PORT": "0",
    "MODELSHIP_ACTIVATOR_URL": "http://127.0.0.1:1",
    "MODELSHIP_ALLOW_FILE_SOURCES": "true",
    # s3:// models in this module point at a port nobody listens on: the store is down.
    "MODELSHIP_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def installed(modelship_installed: ControlPlane) -> ControlPlane:
    return modelship_installed


@pytest.fixture(scope="module")
def kube(installed: ControlPlane) -> Kube:
    return installed.kube()


@pytest.fixture(scope="module")
def operator(
    operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator-log") / "operator.log"
    process = start_operator(operator_kubeconfig, OPERATOR_ENV, log, identity="operator-a")
    wait_for("the operator to lead", lambda: (process.healthz() or {}).get("leader"))
    yield process
    code = process.stop()
    text = log.read_text(errors="replace")
    # The chart's RBAC covers every call: the API server's denial says "cannot <verb> resource".
    denied = [
        line
        for line in text.splitlines()
        if "cannot" in line and "resource" in line and "system:serviceaccount" in line
    ]
    assert not denied, "\n".join(denied[:5])
    assert code in (0, -signal.SIGKILL), text[-4000:]  # the takeover test kills it


@pytest.fixture(scope="module")
def karpenter(kube: Kube) -> Karpenter:
    return Karpenter(kube)


@pytest.fixture(scope="module")
def kubelet(kube: Kube) -> Iterator[Kubelet]:
    kubelet = Kubelet(kube)
    kubelet.run_reaper()
    yield kubelet
    kubelet.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def namespace(plane: ControlPlane, name: str, runtime_sa: bool = True, **labels: str) -> str:
    """A team namespace; with the runtime ServiceAccount the chart creates in watched ones."""
    plane.ensure_namespace(name, labels)
    if runtime_sa:
        ensure_runtime_service_account(plane, name)
    return name


def create_md(kube: Kube, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    return dict(kube.request("POST", MD.path(ns), body=body))


def condition(md: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for item in ((md or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    return {}


def md_where(
    kube: Kube, ns: str, name: str, check: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        md = kube.get(MD, ns, name)
        return md if md and md.get("status") and check(md) else None

    try:
        return wait_for(f"{ns}/{name}", probe, timeout_seconds=timeout)
    except AssertionError:
        md = kube.get(MD, ns, name) or {}
        raise AssertionError(
            f"{ns}/{name} never matched; status: {json.dumps(md.get('status'), indent=1)}"
        ) from None


def phase_is(phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda md: (md.get("status") or {}).get("phase") == phase


def pods_of(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return [
        p
        for p in kube.list(POD, ns, {"modelship.dev/model-deployment": name})
        if not p["metadata"].get("deletionTimestamp")
    ]


def bound_pods(kube: Kube, ns: str, name: str, node_prefix: str = "") -> list[dict[str, Any]]:
    """The pods the scheduler bound (to a node whose name starts with `node_prefix`); fails with
    the scheduler's own message when it would not bind them."""

    def probe() -> list[dict[str, Any]]:
        return [
            p
            for p in pods_of(kube, ns, name)
            if p["spec"].get("nodeName", "").startswith(node_prefix) and p["spec"].get("nodeName")
        ]

    try:
        return wait_for(f"pods of {ns}/{name} bound", probe)
    except AssertionError:
        why = [
            (p["metadata"]["name"], p.get("status", {}).get("conditions"))
            for p in pods_of(kube, ns, name)
        ]
        raise AssertionError(f"the scheduler did not bind {ns}/{name}: {why}") from None


def tiny(tiny_model: Path, **spec: Any) -> dict[str, Any]:
    return {"model": {"uri": f"file://{tiny_model}"}, **spec}


def test_one_operator_leads(operator: OperatorProcess, kube: Kube) -> None:
    lease = kube.get(LEASE, OPERATOR_NAMESPACE, "modelship-operator")
    assert lease is not None and lease["spec"]["holderIdentity"] == "operator-a"


def test_the_operator_watches_only_its_own_objects(
    operator: OperatorProcess, installed: ControlPlane
) -> None:
    """Every watch but the ModelDeployments' asks the API server for modelship's objects only
    (a label selector), so unrelated pods, Deployments, Services and Jobs of the cluster never
    reach the operator."""
    log = installed.audit_log
    assert log is not None

    def watched() -> dict[str, list[str]]:
        uris: dict[str, list[str]] = {}
        for event in audit_events(log, OPERATOR_USER):
            if event["verb"] == "watch":
                uris.setdefault(event["objectRef"]["resource"], []).append(event["requestURI"])
        return uris

    expected = {"pods", "deployments", "services", "jobs", "nodepools", "podmonitors"}
    uris = wait_for("the operator's watches", lambda: (w := watched()) and expected <= set(w) and w)
    unfiltered = {
        resource: uri
        for resource, found in uris.items()
        # kopf's own observation of CRDs and namespaces, and the Lease, are not workloads
        if resource not in ("modeldeployments", "customresourcedefinitions", "namespaces", "leases")
        for uri in found
        if "labelSelector=" not in uri
    }
    assert not unfiltered, unfiltered
    assert all("labelSelector=" not in uri for uri in uris.get("modeldeployments", []))


def test_create_runs_through_every_phase_on_real_objects(
    operator: OperatorProcess,
    installed: ControlPlane,
    kube: Kube,
    karpenter: Karpenter,
    kubelet: Kubelet,
    tiny_model: Path,
) -> None:
    ns = namespace(installed, "team-a")
    created = create_md(kube, ns, "chat", tiny(tiny_model))
    md = md_where(kube, ns, "chat", lambda md: condition(md, "Planned").get("status") == "True")
    pool = md["status"]["plan"]["nodePool"]
    for kind in (DEPLOYMENT, SERVICE):
        child = wait_for(f"{kind.kind}", lambda kind=kind: kube.get(kind, ns, "chat"))
        assert child["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    # The pool follows from the pool queue once the index holds the plan (a second or two).
    wait_for("the NodePool", lambda: kube.get(NODE_POOL, None, pool))
    assert kube.get(EC2_NODE_CLASS, None, pool) is not None

    # No node exists: the real scheduler says so; then Karpenter's NodeClaim appears.
    md_where(kube, ns, "chat", phase_is("Scheduling"))
    claim = karpenter.claim(pool)
    md = md_where(kube, ns, "chat", phase_is("NodeProvisioning"))
    assert condition(md, "CapacityReady")["reason"] == "NodeProvisioning"

    # The Node Karpenter launches from the pool: the scheduler must bind the pod to it, which
    # proves selectors, tolerations and requests (GPU, CPU, memory, disk) match the pool.
    node = karpenter.launch(pool, claim)
    (pod,) = bound_pods(kube, ns, "chat")
    assert pod["spec"]["nodeName"] == node
    md = md_where(kube, ns, "chat", lambda md: "containers starting" in md["status"]["message"])
    assert md["status"]["phase"] == "Scheduling"

    kubelet.start(ns, pod["metadata"]["name"])
    md_where(kube, ns, "chat", phase_is("WeightsLoading"))
    kubelet.ready(ns, pod["metadata"]["name"])
    md = md_where(kube, ns, "chat", phase_is("Ready"))
    assert condition(md, "Available")["status"] == "True"
    assert condition(md, "CapacityReady")["status"] == "True"
    assert md["status"]["readyReplicas"] == 1
    # Every phase change seen by a refresh (the watch-driven queue, on threads of its own) is an
    # Event on the ModelDeployment, posted through kopf, and none restates another.
    reasons = wait_for(
        "the PhaseReady Event",
        lambda: (
            (
                r := [
                    e.get("reason")
                    for e in kube.list(EVENT, ns)
                    if (e.get("involvedObject") or {}).get("name") == "chat"
                ]
            )
            and "PhaseReady" in r
            and r
        ),
    )
    assert {"PlacementChosen", "PhaseScheduling", "PhaseNodeProvisioning"} <= set(reasons), reasons
    # Validated=True is where it starts; Available=True comes with phase Ready in one write.
    assert not {"SpecValid", "ReplicasReady"} & set(reasons), reasons


def test_hand_edited_service_is_restored_exactly(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-b")
    create_md(kube, ns, "svc", tiny(tiny_model))
    wanted = wait_for("the Service", lambda: kube.get(SERVICE, ns, "svc"))
    ports = wanted["spec"]["ports"]
    # kubectl edit changes the port: server-side apply alone would merge 8000 back in beside
    # 9000, both named http, and every later apply would fail with 422.
    installed.kubectl(
        "patch", "service", "svc", "-n", ns, "--type=json", "--field-manager=kubectl-edit",
        "-p", json.dumps([{"op": "replace", "path": "/spec/ports/0/port", "value": 9000}]),
    )  # fmt: skip
    restored = wait_for(
        "the Service restored",
        lambda: (s := kube.get(SERVICE, ns, "svc")) and s["spec"]["ports"] == ports and s,
    )
    assert restored["spec"]["clusterIP"] == wanted["spec"]["clusterIP"]
    # And a port someone adds is removed again.
    installed.kubectl(
        "patch", "service", "svc", "-n", ns, "--type=json", "--field-manager=kubectl-edit",
        "-p", json.dumps([{"op": "add", "path": "/spec/ports/-", "value": {"name": "debug", "port": 9999}}]),
    )  # fmt: skip
    wait_for(
        "the extra port removed",
        lambda: (s := kube.get(SERVICE, ns, "svc")) and s["spec"]["ports"] == ports,
    )
    events = kube.list(EVENT, ns)
    assert any(e.get("reason") == "ChildRestored" for e in events), [
        e.get("reason") for e in events
    ]


def test_deleted_child_is_restored(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-b")
    create_md(kube, ns, "restore", tiny(tiny_model))
    md_where(kube, ns, "restore", lambda md: bool((md.get("status") or {}).get("plan")))
    assert kube.delete(SERVICE, ns, "restore")
    restored = wait_for("the Service restored", lambda: kube.get(SERVICE, ns, "restore"))
    assert restored["metadata"]["labels"]["modelship.dev/model-deployment"] == "restore"


def test_child_deleted_during_its_first_reconcile_is_restored(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    """Deleted the moment it appears, while the first reconcile still writes status and has not
    recorded its plan: the deletion is acted on when that reconcile ends, not at the next resync
    (CI once lost this race)."""
    ns = namespace(installed, "team-b")
    create_md(kube, ns, "restore-early", tiny(tiny_model))
    wait_for("the Service", lambda: kube.get(SERVICE, ns, "restore-early"), every=0.005)
    assert kube.delete(SERVICE, ns, "restore-early")
    md = md_where(kube, ns, "restore-early", lambda md: bool((md.get("status") or {}).get("plan")))
    restored = wait_for("the Service restored", lambda: kube.get(SERVICE, ns, "restore-early"))
    assert restored["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]


def test_edit_replans_and_a_bad_edit_keeps_the_last_good_workload(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-c")
    create_md(kube, ns, "edit", tiny(tiny_model, serving={"maxModelLen": 1024}))
    md_where(kube, ns, "edit", lambda md: bool((md.get("status") or {}).get("plan")))
    kube.merge_patch(MD, ns, "edit", {"spec": {"serving": {"maxModelLen": 512}}})
    md_where(kube, ns, "edit", lambda md: md["status"].get("observedGeneration") == 2)
    good = wait_for(
        "the re-planned Deployment",
        lambda: (
            (d := kube.get(DEPLOYMENT, ns, "edit"))
            and "512" in json.dumps(d["spec"]["template"])
            and d
        ),
    )

    # Valid to the API server's schema, refused by the operator: the plan owns parallelism.
    bad = {"spec": {"serving": {"engineArgs": ["--tensor-parallel-size=4"]}}}
    kube.merge_patch(MD, ns, "edit", bad)
    md = md_where(kube, ns, "edit", lambda md: condition(md, "Validated").get("status") == "False")
    assert "spec.serving.engineArgs" in condition(md, "Validated")["message"]
    assert md["status"]["phase"] == "Degraded"
    assert condition(md, "Degraded")["reason"] == "SpecRejected"
    time.sleep(2)
    still = kube.get(DEPLOYMENT, ns, "edit")
    assert still is not None and still["spec"]["template"] == good["spec"]["template"]


def test_no_placement_is_reported(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube
) -> None:
    ns = namespace(installed, "team-c")
    spec = {
        "model": {
            "uri": "fsx://weights/llama-70b",
            "parameters": "70B",
            "architecture": {
                "numLayers": 80,
                "hiddenSize": 8192,
                "numAttentionHeads": 64,
                "numKeyValueHeads": 8,
                "vocabSize": 128256,
                "maxPositionEmbeddings": 131072,
            },
        },
        "accelerator": {"maxAccelerators": 1},
    }
    create_md(kube, ns, "huge", spec)
    md = md_where(kube, ns, "huge", lambda md: condition(md, "Planned").get("status") == "False")
    assert condition(md, "Planned")["reason"] == "NoPlacement"
    assert md["status"]["phase"] == "Failed"
    assert kube.get(DEPLOYMENT, ns, "huge") is None


def test_a_name_too_long_for_a_service_is_refused_up_front(
    installed: ControlPlane, kube: Kube
) -> None:
    ns = namespace(installed, "team-d")
    long_name = "m" * 64
    with pytest.raises(KubeApiError) as error:
        create_md(kube, ns, long_name, {"model": {"uri": "s3://bucket/model"}})
    assert "metadata.name must be at most 63 characters" in str(error.value)
    # Cleanup never depends on a label list such a name would make fail (HTTP 400).
    assert prune_children(kube, long_name, ns) == []


def test_missing_service_account_reaches_status(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-no-sa", runtime_sa=False)
    create_md(kube, ns, "nosa", tiny(tiny_model))
    md = md_where(
        kube, ns, "nosa", lambda md: condition(md, "Degraded").get("reason") == "PodCreationFailed"
    )
    assert "modelship-runtime" in md["status"]["message"]
    assert md["status"]["phase"] == "Failed"


def test_pod_security_rejection_reaches_status(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(
        installed, "team-restricted", **{"pod-security.kubernetes.io/enforce": "restricted"}
    )
    create_md(kube, ns, "psa", tiny(tiny_model))
    md = md_where(
        kube, ns, "psa", lambda md: condition(md, "Degraded").get("reason") == "PodCreationFailed"
    )
    assert "hostPath" in md["status"]["message"] or "restricted" in md["status"]["message"]


def test_kubectl_scale_works_without_replicas_in_the_spec(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-e")
    create_md(kube, ns, "scale", tiny(tiny_model))
    md_where(kube, ns, "scale", lambda md: bool((md.get("status") or {}).get("plan")))
    installed.kubectl("scale", "modeldeployment", "scale", "-n", ns, "--replicas=2")
    md = kube.get(MD, ns, "scale")
    assert md is not None and md["spec"]["replicas"]["min"] == 2
    wait_for(
        "2 replicas",
        lambda: (d := kube.get(DEPLOYMENT, ns, "scale")) and d["spec"]["replicas"] == 2,
    )


def test_switching_to_autoscaling_keeps_the_replica_count(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-e")
    create_md(kube, ns, "auto", tiny(tiny_model, replicas={"min": 3}))
    wait_for(
        "3 replicas", lambda: (d := kube.get(DEPLOYMENT, ns, "auto")) and d["spec"]["replicas"] == 3
    )
    kube.merge_patch(MD, ns, "auto", {"spec": {"replicas": {"min": 1, "max": 4}}})
    wait_for("the ScaledObject", lambda: kube.get(SCALED_OBJECT, ns, "auto"))
    md_where(kube, ns, "auto", lambda md: md["status"].get("observedGeneration") == 2)
    deployment = kube.get(DEPLOYMENT, ns, "auto")
    assert deployment is not None and deployment["spec"]["replicas"] == 3, (
        "handed over without a dip"
    )


def test_store_outage_is_retried_and_shown(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube
) -> None:
    ns = namespace(installed, "team-f")
    create_md(kube, ns, "s3down", {"model": {"uri": "s3://models/llama"}})
    md = md_where(
        kube,
        ns,
        "s3down",
        lambda md: condition(md, "Degraded").get("reason") == "ModelUnreachable",
        timeout=60,
    )
    assert "retrying" in md["status"]["message"]
    assert md["status"]["phase"] == "Pending"
    assert condition(md, "Validated")["status"] == "Unknown"


def test_shared_pool_is_an_aggregate_and_comes_back(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns_one, ns_two = namespace(installed, "team-g"), namespace(installed, "team-h")
    spec = tiny(
        tiny_model, accelerator={"instanceTypes": ["g6.xlarge"]}, replicas={"min": 1, "max": 2}
    )
    started = datetime.datetime.now(datetime.UTC)
    create_md(kube, ns_one, "one", spec)
    md = md_where(kube, ns_one, "one", lambda md: bool((md.get("status") or {}).get("plan")))
    pool = md["status"]["plan"]["nodePool"]

    def limit() -> str | None:
        live = kube.get(NODE_POOL, None, pool) or {}
        return ((live.get("spec") or {}).get("limits") or {}).get("nvidia.com/gpu")

    wait_for("the first user's limits", lambda: limit() == "3")  # 2 max + 1 surge
    create_md(kube, ns_two, "two", spec)
    both = wait_for("both users' limits", lambda: limit() == "6" and limit())
    # A new user moves the NodePool's limits, never the EC2NodeClass: sent once, not per user.
    assert installed.audit_log is not None
    patches = collections.Counter(
        event["objectRef"]["resource"]
        for event in audit_events(installed.audit_log, OPERATOR_USER)
        if event["stage"] == "ResponseComplete"
        and event["verb"] == "patch"
        and event["objectRef"].get("name") == pool
        and datetime.datetime.fromisoformat(event["requestReceivedTimestamp"]) >= started
    )
    assert patches["ec2nodeclasses"] == 1 < patches["nodepools"], patches
    assert not any(
        k.startswith("users.modelship.dev")
        for k in (kube.get(NODE_POOL, None, pool) or {})["metadata"].get("annotations", {})
    )
    assert both == "6"
    kube.delete(NODE_POOL, None, pool)
    wait_for("the NodePool back", lambda: limit() == "6")

    kube.delete(MD, ns_one, "one")
    wait_for("team-g/one gone", lambda: kube.get(MD, ns_one, "one") is None)
    wait_for("the pool shrunk to one user", lambda: limit() == "3")
    assert kube.get(DEPLOYMENT, ns_two, "two") is not None
    started = time.monotonic()
    kube.delete(MD, ns_two, "two")
    wait_for("team-h/two gone", lambda: kube.get(MD, ns_two, "two") is None)
    assert time.monotonic() - started < 15, "deletion waited for a timer"
    wait_for(
        "the pool gone",
        lambda: (
            kube.get(NODE_POOL, None, pool) is None and kube.get(EC2_NODE_CLASS, None, pool) is None
        ),
    )


def test_hardware_change_keeps_the_old_pool_until_the_new_pods_are_ready(
    operator: OperatorProcess,
    installed: ControlPlane,
    kube: Kube,
    karpenter: Karpenter,
    kubelet: Kubelet,
    tiny_model: Path,
) -> None:
    ns = namespace(installed, "team-i")
    create_md(kube, ns, "move", tiny(tiny_model, accelerator={"instanceTypes": ["g5.xlarge"]}))
    md = md_where(kube, ns, "move", lambda md: bool((md.get("status") or {}).get("plan")))
    old_pool = md["status"]["plan"]["nodePool"]
    karpenter.launch(old_pool)
    (pod,) = bound_pods(kube, ns, "move")
    kubelet.ready(ns, pod["metadata"]["name"])
    md_where(kube, ns, "move", phase_is("Ready"))

    kube.merge_patch(MD, ns, "move", {"spec": {"accelerator": {"instanceTypes": ["g6e.xlarge"]}}})
    md = md_where(kube, ns, "move", lambda md: md["status"]["plan"]["instanceType"] == "g6e.xlarge")
    new_pool = md["status"]["plan"]["nodePool"]
    assert new_pool != old_pool
    wait_for("the new pool", lambda: kube.get(NODE_POOL, None, new_pool))
    time.sleep(2)
    assert kube.get(NODE_POOL, None, old_pool) is not None, (
        "the old pool went before the new pods serve"
    )

    karpenter.launch(new_pool)
    new_pod = bound_pods(kube, ns, "move", node_prefix=new_pool)[0]
    kubelet.ready(ns, new_pod["metadata"]["name"])
    wait_for(
        "the old pool released",
        lambda: kube.get(NODE_POOL, None, old_pool) is None,
        timeout_seconds=30,
    )


def test_prune_deletes_only_what_the_model_deployment_owns(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-k")
    create_md(kube, ns, "owned", tiny(tiny_model))
    wait_for("the Service", lambda: kube.get(SERVICE, ns, "owned"))
    # Someone else's Service that happens to carry the label: not the operator's to delete.
    stranger = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "owned-debug", "labels": {"modelship.dev/model-deployment": "owned"}},
        "spec": {"ports": [{"port": 9999}]},
    }
    kube.request("POST", SERVICE.path(ns), body=stranger)
    kube.merge_patch(MD, ns, "owned", {"spec": {"serving": {"maxModelLen": 512}}})
    md_where(kube, ns, "owned", lambda md: md["status"].get("observedGeneration") == 2)
    assert kube.get(SERVICE, ns, "owned-debug") is not None
    kube.delete(MD, ns, "owned")
    wait_for("owned gone", lambda: kube.get(MD, ns, "owned") is None)
    assert kube.get(SERVICE, ns, "owned") is None
    assert kube.get(SERVICE, ns, "owned-debug") is not None


def events_since(kube: Kube, kind: Kind, namespace: str, version: str) -> list[tuple[str, str]]:
    """(type, name) of the watch events of `kind` in `namespace` after resourceVersion `version`:
    a watch from there replays them, and ends after a second."""
    query = [("watch", "1"), ("resourceVersion", version), ("timeoutSeconds", "1")]
    params = kube.api_client.param_serialize(
        "GET", kind.path(namespace), query_params=query, auth_settings=["BearerToken"]
    )
    lines = kube.api_client.call_api(*params).read().splitlines()
    return [(e["type"], e["object"]["metadata"]["name"]) for e in map(json.loads, lines)]


def test_apply_failures_reach_status(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    ns = namespace(installed, "team-quota")
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-services"},
        "spec": {"hard": {"services": "0"}},
    }
    kube.request("POST", f"/api/v1/namespaces/{ns}/resourcequotas", body=quota)
    wait_for(
        "the quota counted",
        lambda: (
            kube.request("GET", f"/api/v1/namespaces/{ns}/resourcequotas/no-services")
            .get("status", {})
            .get("hard")
        ),
    )
    for name in ("quota", "quota-gone"):
        create_md(kube, ns, name, tiny(tiny_model))
    for name in ("quota", "quota-gone"):
        md = md_where(
            kube, ns, name, lambda md: condition(md, "Degraded").get("reason") == "ApplyFailed"
        )
        assert "exceeded quota" in md["status"]["message"]
        assert "retrying" in md["status"]["message"]
    # Deleted while a retry is queued: the retry must not bring its children back.
    assert kube.delete(MD, ns, "quota-gone")
    wait_for("quota-gone gone", lambda: kube.get(MD, ns, "quota-gone") is None)
    deleted = time.monotonic()
    since = {
        kind: kube.request("GET", kind.path(ns))["metadata"]["resourceVersion"]
        for kind in (DEPLOYMENT, SERVICE)
    }

    # The failure was transient: once the quota is lifted, a retry (after its backoff) applies.
    kube.request("DELETE", f"/api/v1/namespaces/{ns}/resourcequotas/no-services")
    wait_for("the Service, on a retry", lambda: kube.get(SERVICE, ns, "quota"), timeout_seconds=60)
    md = md_where(kube, ns, "quota", lambda md: condition(md, "Planned").get("status") == "True")
    assert condition(md, "Degraded").get("reason") != "ApplyFailed", md["status"]
    # Every retry queued before the deletion is due by now (backoffs of 10 s, then 20 s).
    # (The garbage collector would delete a child made for the deleted owner at once: the watch
    # replays what happened since the deletion, so such a child cannot hide.)
    time.sleep(max(0.0, deleted + 2.2 * handlers.RETRY_SECONDS - time.monotonic()))
    for kind, version in since.items():
        assert ("ADDED", "quota-gone") not in events_since(kube, kind, ns, version), kind.kind


def test_the_operator_refuses_to_start_without_a_cluster_name(
    operator_kubeconfig: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    env = {**OPERATOR_ENV, "MODELSHIP_CLUSTER_NAME": "", "KUBECONFIG": str(operator_kubeconfig)}
    binary = Path(sys.executable).parent / "modelship"
    result = subprocess.run(
        [str(binary), "operator", "--metrics-port", "0", "--health-port", "0"],
        env={**__import__("os").environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MODELSHIP_CLUSTER_NAME (Helm: nodePools.clusterName)" in result.stderr


def put_spec(kube: Kube, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Replace the spec as `kubectl replace` would (strict field validation), retrying while the
    operator's own writes move the resourceVersion."""
    for _ in range(10):
        live = kube.get(MD, ns, name)
        assert live is not None
        try:
            return dict(
                kube.request(
                    "PUT",
                    MD.path(ns, name),
                    query=[("fieldValidation", "Strict")],
                    body={**live, "spec": spec},
                )
            )
        except KubeApiError as error:
            if error.status != 409:
                raise
    raise AssertionError(f"{ns}/{name}: conflicts kept coming")


def test_the_bad_input_corpus_is_refused_naming_its_field_and_touches_nothing(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    """tests/unit/bad_inputs.py against the API server and the running operator, as edits of a
    ModelDeployment that serves: each is refused by the API server (schema, CEL) or reported by
    the operator, naming its field, and the running workload never changes."""
    from tests.unit.bad_inputs import BAD_INPUTS, apply_patch, base_manifest

    ns = namespace(installed, "team-corpus")
    good = base_manifest(f"file://{tiny_model}")
    good["metadata"]["namespace"] = ns
    kube.request("POST", MD.path(ns), body=good)
    md_where(kube, ns, "corpus", lambda md: condition(md, "Planned").get("status") == "True")
    workload = wait_for("the Deployment", lambda: kube.get(DEPLOYMENT, ns, "corpus"))
    template = workload["spec"]["template"]
    refused_by = {"api server": 0, "operator": 0}
    for entry in BAD_INPUTS:
        if set(entry.patch) != {"spec"} or entry.stage == "operator":
            continue  # kind/apiVersion/name are not edits; the file:// policy is off here
        bad = apply_patch(good, entry.patch)
        try:
            updated = put_spec(kube, ns, "corpus", bad["spec"])
        except KubeApiError as error:
            assert error.status in (400, 422), (entry.id, str(error))  # 400: unknown field
            assert entry.field in error.message or entry.field.removeprefix("spec.") in (
                error.message
            ), (entry.id, error.message)
            refused_by["api server"] += 1
            continue
        generation = updated["metadata"]["generation"]

        def reported(md: dict[str, Any], generation: int = generation) -> bool:
            for type_ in ("Validated", "Planned"):
                found = condition(md, type_)
                if found.get("observedGeneration") == generation and found["status"] == "False":
                    return True
            return False

        md = md_where(kube, ns, "corpus", reported)
        message = " ".join(
            condition(md, type_).get("message", "") for type_ in ("Validated", "Planned")
        )
        assert entry.field in message, (entry.id, message)
        assert md["status"]["phase"] == "Degraded", (entry.id, md["status"]["phase"])
        refused_by["operator"] += 1
    assert refused_by["api server"] >= 20 and refused_by["operator"] >= 10, refused_by
    still = kube.get(DEPLOYMENT, ns, "corpus")
    assert still is not None and still["spec"]["template"] == template


def test_the_leader_rides_out_an_api_server_outage(
    operator: OperatorProcess, installed: ControlPlane, kube: Kube, tiny_model: Path
) -> None:
    apiserver = installed.processes["kube-apiserver"]
    apiserver.send_signal(signal.SIGSTOP)  # hangs every request, as an overloaded server does
    try:
        time.sleep(LEASE_SECONDS * 4)
        assert operator.process.poll() is None, operator.log()
        assert (operator.healthz() or {}).get("leader") is False, "kept reconciling blind"
    finally:
        apiserver.send_signal(signal.SIGCONT)
    wait_for("leading again", lambda: (operator.healthz() or {}).get("leader"), timeout_seconds=30)
    ns = namespace(installed, "team-l")
    create_md(kube, ns, "later", tiny(tiny_model))
    md_where(kube, ns, "later", lambda md: condition(md, "Planned").get("status") == "True")


def test_a_standby_takes_over_when_the_leader_dies(
    operator: OperatorProcess,
    operator_kubeconfig: Path,
    installed: ControlPlane,
    kube: Kube,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    standby = start_operator(
        operator_kubeconfig, OPERATOR_ENV, tmp_path / "standby.log", identity="operator-b"
    )
    try:
        time.sleep(LEASE_SECONDS)
        assert (standby.healthz() or {}).get("leader") is False, "two leaders"
        operator.stop(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            "the standby to lead",
            lambda: (standby.healthz() or {}).get("leader"),
            timeout_seconds=LEASE_SECONDS * 4,
        )
        assert time.monotonic() - killed < LEASE_SECONDS * 3
        ns = namespace(installed, "team-j")
        create_md(kube, ns, "after", tiny(tiny_model))
        md_where(kube, ns, "after", lambda md: condition(md, "Planned").get("status") == "True")
    finally:
        assert standby.stop() == 0, standby.log()


def test_a_restart_while_the_model_cannot_be_read_keeps_restoring_children(
    operator_kubeconfig: Path, installed: ControlPlane, kube: Kube, tiny_model: Path, tmp_path: Path
) -> None:
    """The last good plan lives in the cluster: a restarted operator restores children without
    reading the model again, even while its store fails."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = start_operator(operator_kubeconfig, OPERATOR_ENV, tmp_path / "first.log", "operator-c")
    try:
        wait_for("leading", lambda: (first.healthz() or {}).get("leader"), timeout_seconds=20)
        ns = namespace(installed, "team-m")
        create_md(kube, ns, "hiccup", {"model": {"uri": f"file://{model}"}})
        md_where(kube, ns, "hiccup", lambda md: condition(md, "Planned").get("status") == "True")
        wait_for("the Service", lambda: kube.get(SERVICE, ns, "hiccup"))
    finally:
        assert first.stop() == 0, first.log()
    model.rename(tmp_path / "moved")  # the store fails: nothing there to read
    second = start_operator(
        operator_kubeconfig, OPERATOR_ENV, tmp_path / "second.log", "operator-d"
    )
    try:
        wait_for("leading", lambda: (second.healthz() or {}).get("leader"), timeout_seconds=20)
        assert kube.delete(SERVICE, ns, "hiccup")
        wait_for("the Service restored", lambda: kube.get(SERVICE, ns, "hiccup"))
        md = kube.get(MD, ns, "hiccup")
        assert condition(md, "Validated")["status"] == "True", md and md.get("status")
    finally:
        assert second.stop() == 0, second.log()
