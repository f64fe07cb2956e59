"""The real operator (kopf's KopfRunner) against KMock's Kubernetes API emulator on 127.0.0.1.

Models are a tiny Llama written to a temporary directory (file://) or described in the spec
(fsx:// with parameters and architecture), so no network is needed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest
from modelship.operator.apply import (
    DEPLOYMENT,
    EC2_NODE_CLASS,
    NODE_POOL,
    POD,
    SCALED_OBJECT,
    SERVICE,
    Kind,
    Kube,
    apply_children,
    apply_node_pool,
    pool_users,
)
from modelship.runtime.demo import free_port
from modelship.runtime.tinymodel import build_tiny_model

from tests.servers.kube import KubeApi, ensure_cluster_peering

pytestmark = pytest.mark.integration

MD = Kind("modelship.dev/v1alpha1", "ModelDeployment", "modeldeployments", True)
EVENT = Kind("v1", "Event", "events", True)
T = TypeVar("T")

ACTIVATOR_PORT = free_port()
ACTIVATOR_URL = f"http://127.0.0.1:{ACTIVATOR_PORT}"
OPERATOR_ENV = {
    "MODELSHIP_CLUSTER_NAME": "kmock",
    "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-kmock",
    "MODELSHIP_RESYNC_SECONDS": "2",
    "MODELSHIP_ACTIVATOR_PORT": str(ACTIVATOR_PORT),
    "MODELSHIP_ACTIVATOR_URL": ACTIVATOR_URL,
    # The tests serve a tiny model from a temporary directory (file://), off by default.
    "MODELSHIP_ALLOW_FILE_SOURCES": "true",
}


def wait_for(what: str, probe: Callable[[], T | None], timeout_seconds: float = 20) -> T:
    """Poll until `probe` returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout_seconds
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


@pytest.fixture(scope="module")
def kube(kubeconfig: Path) -> Kube:
    return Kube(kubernetes.config.new_client_from_config(str(kubeconfig)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def operator(kubeconfig: Path, kube: Kube, kube_api: KubeApi) -> Iterator[Any]:
    """kopf running modelship's handlers in a thread, with peering `modelship`."""
    from kopf.testing import KopfRunner

    saved = {key: os.environ.get(key) for key in OPERATOR_ENV}
    os.environ.update(OPERATOR_ENV)
    ensure_cluster_peering(kube)
    args = ["run", "--all-namespaces", "--verbose", "-m", "modelship.operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    assert runner.exception is None, runner.output[-3000:]
    assert runner.exit_code == 0, runner.output[-3000:]


def create_md(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return dict(kube.request("POST", MD.path(namespace), body=body))


def condition(md: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for item in ((md or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    return {}


def status_where(
    kube: Kube, namespace: str, name: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        md = kube.get(MD, namespace, name)
        return md if md and check(md) else None

    return wait_for(f"{namespace}/{name} status", probe)


def runtime_args(deployment: dict[str, Any]) -> list[str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return [str(a) for a in container.get("args", []) + container.get("command", [])]


def test_create_applies_children_and_reports_status(
    operator: Any, kube: Kube, tiny_model: Path
) -> None:
    created = create_md(kube, "team-a", "chat", {"model": {"uri": f"file://{tiny_model}"}})
    md = status_where(
        kube, "team-a", "chat", lambda md: condition(md, "Planned").get("status") == "True"
    )

    for kind in (DEPLOYMENT, SERVICE):
        child = kube.get(kind, "team-a", "chat")
        assert child is not None, f"{kind.kind} team-a/chat was not applied"
        owners = child["metadata"]["ownerReferences"]
        assert owners[0]["uid"] == created["metadata"]["uid"]
        assert child["metadata"]["labels"]["modelship.dev/model-deployment"] == "chat"
    pool = kube.get(NODE_POOL, None, md["status"]["plan"]["nodePool"])
    assert pool is not None and pool_users(pool) == ["team-a/chat"]
    assert kube.get(EC2_NODE_CLASS, None, md["status"]["plan"]["nodePool"]) is not None

    status = md["status"]
    assert condition(md, "Validated")["status"] == "True"
    assert condition(md, "Validated")["observedGeneration"] == 1
    assert status["plan"]["instanceType"] == "g4dn.xlarge"
    assert status["plan"]["kvCacheTokens"] > 0
    assert status["endpoint"] == "http://chat.team-a.svc.cluster.local:8000/v1"
    assert status["phase"] == "Pending"  # no pod exists in KMock until the test makes one
    assert not any(key.startswith("kopf") for key in status), "kopf progress leaked into status"


def test_scale_to_zero_is_served_through_the_operators_activator(
    operator: Any, kube: Kube, tiny_model: Path
) -> None:
    spec = {"model": {"uri": f"file://{tiny_model}"}, "replicas": {"min": 0, "max": 2}}
    create_md(kube, "team-a", "idle", spec)
    md = status_where(kube, "team-a", "idle", lambda md: bool((md.get("status") or {}).get("plan")))
    endpoint = md["status"]["endpoint"]
    assert endpoint == f"{ACTIVATOR_URL}/models/team-a/idle/v1"
    scaled = wait_for("ScaledObject", lambda: kube.get(SCALED_OBJECT, "team-a", "idle"))
    wake = [t for t in scaled["spec"]["triggers"] if t["name"] == "activator"]
    assert 'model_deployment="idle"' in wake[0]["metadata"]["query"]
    # The operator process serves that endpoint. There is no cluster DNS here, so the model's
    # Service does not resolve: the activator says which ModelDeployment it could not find.
    with urllib.request.urlopen(f"{ACTIVATOR_URL}/healthz", timeout=5) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{endpoint}/models", timeout=30)
    assert error.value.code == 404
    assert "team-a/idle" in json.loads(error.value.read())["error"]["message"]


def test_phase_follows_pods(operator: Any, kube: Kube, tiny_model: Path) -> None:
    create_md(kube, "team-a", "phases", {"model": {"uri": f"file://{tiny_model}"}})
    status_where(kube, "team-a", "phases", lambda md: bool(md.get("status", {}).get("plan")))
    labels = {
        "modelship.dev/model-deployment": "phases",
        "app.kubernetes.io/name": "modelship-runtime",
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "phases-abc", "namespace": "team-a", "labels": labels},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }
    kube.request("POST", POD.path("team-a"), body=pod)
    md = status_where(
        kube, "team-a", "phases", lambda md: md["status"].get("phase") == "NodeProvisioning"
    )
    assert condition(md, "CapacityReady")["reason"] == "NodeProvisioning"

    running = {
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
            "containerStatuses": [
                {
                    "name": "runtime",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}},
                }
            ],
        }
    }
    kube.merge_patch(POD, "team-a", "phases-abc", running, subresource="status")
    kube.merge_patch(
        DEPLOYMENT, "team-a", "phases", {"status": {"replicas": 1, "readyReplicas": 1}}, "status"
    )
    md = status_where(kube, "team-a", "phases", lambda md: md["status"].get("phase") == "Ready")
    assert condition(md, "Available")["status"] == "True"
    assert condition(md, "CapacityReady")["status"] == "True"
    assert md["status"]["readyReplicas"] == 1


def test_spec_edit_replans_and_rolls_the_workload(
    operator: Any, kube: Kube, tiny_model: Path
) -> None:
    create_md(
        kube,
        "team-a",
        "edit",
        {"model": {"uri": f"file://{tiny_model}"}, "serving": {"maxModelLen": 1024}},
    )
    status_where(kube, "team-a", "edit", lambda md: bool(md.get("status", {}).get("plan")))
    before = kube.get(DEPLOYMENT, "team-a", "edit")
    assert before is not None and "1024" in runtime_args(before)

    kube.merge_patch(
        MD, "team-a", "edit", {"spec": {"serving": {"maxModelLen": 512, "concurrency": 4}}}
    )
    md = status_where(
        kube, "team-a", "edit", lambda md: md["status"].get("observedGeneration") == 2
    )
    after = kube.get(DEPLOYMENT, "team-a", "edit")
    assert after is not None
    args = runtime_args(after)
    assert "512" in args and "1024" not in args, args
    assert condition(md, "Planned")["observedGeneration"] == 2


def test_deleted_child_is_restored(operator: Any, kube: Kube, tiny_model: Path) -> None:
    create_md(kube, "team-a", "restore", {"model": {"uri": f"file://{tiny_model}"}})
    wait_for("the Service", lambda: kube.get(SERVICE, "team-a", "restore"))
    assert kube.delete(SERVICE, "team-a", "restore")
    assert kube.get(SERVICE, "team-a", "restore") is None
    restored = wait_for("the Service restored", lambda: kube.get(SERVICE, "team-a", "restore"))
    assert restored["metadata"]["labels"]["modelship.dev/model-deployment"] == "restore"


def test_bad_edit_keeps_the_last_good_workload(operator: Any, kube: Kube, tiny_model: Path) -> None:
    create_md(kube, "team-a", "keep", {"model": {"uri": f"file://{tiny_model}"}})
    status_where(kube, "team-a", "keep", lambda md: bool(md.get("status", {}).get("plan")))
    good = kube.get(DEPLOYMENT, "team-a", "keep")
    assert good is not None

    kube.merge_patch(MD, "team-a", "keep", {"spec": {"serving": {"concurrency": 0}}})
    md = status_where(
        kube, "team-a", "keep", lambda md: condition(md, "Validated").get("status") == "False"
    )
    validated = condition(md, "Validated")
    assert validated["reason"] == "InvalidSpec"
    assert "spec.serving.concurrency" in validated["message"]
    assert md["status"]["phase"] == "Degraded"
    assert condition(md, "Degraded")["reason"] == "SpecRejected"
    assert md["status"]["plan"]["instanceType"] == "g4dn.xlarge"  # the running plan, kept

    time.sleep(4.5)  # two resync periods: the timer must not touch the workload either
    still = kube.get(DEPLOYMENT, "team-a", "keep")
    assert still is not None and still["spec"] == good["spec"]
    events = kube.list(EVENT, "team-a")
    assert any(
        e.get("reason") == "InvalidSpec"
        and e.get("type") == "Warning"
        and "keep" in str(e.get("involvedObject"))
        for e in events
    ), [e.get("reason") for e in events]
    assert operator.is_alive if hasattr(operator, "is_alive") else True


def test_unsatisfiable_plan_is_reported(operator: Any, kube: Kube) -> None:
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
    create_md(kube, "team-a", "huge", spec)
    md = status_where(
        kube, "team-a", "huge", lambda md: condition(md, "Planned").get("status") == "False"
    )
    planned = condition(md, "Planned")
    assert planned["reason"] == "NoPlacement"
    assert (
        "spec.model.quantization" in planned["message"] or "spec.accelerator" in planned["message"]
    )
    assert md["status"]["phase"] == "Failed"
    assert kube.get(DEPLOYMENT, "team-a", "huge") is None


def test_delete_cleans_up_and_keeps_a_shared_pool(
    operator: Any, kube: Kube, tiny_model: Path
) -> None:
    create_md(kube, "team-b", "one", {"model": {"uri": f"file://{tiny_model}"}})
    create_md(kube, "team-c", "two", {"model": {"uri": f"file://{tiny_model}"}})
    md = status_where(kube, "team-c", "two", lambda md: bool(md.get("status", {}).get("plan")))
    status_where(kube, "team-b", "one", lambda md: bool(md.get("status", {}).get("plan")))
    pool_name = md["status"]["plan"]["nodePool"]
    wait_for(
        "both users on the pool",
        lambda: (
            {"team-b/one", "team-c/two"}
            <= set(pool_users(kube.get(NODE_POOL, None, pool_name) or {}))
        ),
    )

    kube.delete(MD, "team-b", "one")
    wait_for("team-b/one gone", lambda: kube.get(MD, "team-b", "one") is None)
    assert kube.get(DEPLOYMENT, "team-b", "one") is None
    assert kube.get(SERVICE, "team-b", "one") is None
    pool = kube.get(NODE_POOL, None, pool_name)
    assert pool is not None, "the shared pool was deleted while team-c/two still uses it"
    assert "team-b/one" not in pool_users(pool)
    assert kube.get(DEPLOYMENT, "team-c", "two") is not None


def test_last_user_deletes_the_pool(operator: Any, kube: Kube, tiny_model: Path) -> None:
    # Every ModelDeployment of this module on the tiny model shares one pool; delete them all.
    for md in kube.list(MD):
        kube.delete(MD, md["metadata"]["namespace"], md["metadata"]["name"])
    wait_for("all ModelDeployments gone", lambda: not kube.list(MD), timeout_seconds=30)
    assert kube.list(DEPLOYMENT) == []
    assert wait_for(
        "pools gone", lambda: kube.list(NODE_POOL) == [] and kube.list(EC2_NODE_CLASS) == []
    )


def test_apply_is_idempotent_and_prunes(kube: Kube) -> None:
    owner = {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "direct",
        "uid": "u-1",
    }
    meta = {
        "namespace": "team-z",
        "labels": {"modelship.dev/model-deployment": "direct"},
        "ownerReferences": [owner],
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "direct", **meta},
        "spec": {"ports": [{"port": 8000}]},
    }
    extra = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "direct-extra", **meta},
        "data": {"a": "b"},
    }

    first = apply_children(kube, "direct", "team-z", [service, extra])
    assert first.changed == ["Service team-z/direct", "ConfigMap team-z/direct-extra"]
    again = apply_children(kube, "direct", "team-z", [service, extra])
    assert again.changed == [] and again.pruned == []
    only_service = apply_children(kube, "direct", "team-z", [service])
    assert only_service.pruned == ["ConfigMap team-z/direct-extra"]
    assert kube.get(Kind("v1", "ConfigMap", "configmaps", True), "team-z", "direct-extra") is None


def test_concurrent_users_of_one_pool_all_count(kube: Kube) -> None:
    """Eight ModelDeployments join (then leave) one shared pool at the same instant: the pool's
    limits end up the sum of their shares, and it goes with the last of them."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from modelship.operator.apply import release_node_pools
    from modelship.operator.nodepool import karpenter_objects

    from tests.unit.test_render import CONFIG, LLAMA_8B_L4

    objects = karpenter_objects(LLAMA_8B_L4, CONFIG, 3)
    pool = objects[-1]
    ((resource, share),) = pool["spec"]["limits"].items()
    users = [f"md-{i}" for i in range(8)]
    barrier = Barrier(len(users))

    def join(name: str) -> None:
        barrier.wait()
        apply_node_pool(kube, "team-pool", name, objects)

    with ThreadPoolExecutor(len(users)) as pool_threads:
        list(pool_threads.map(join, users))
    live = kube.get(NODE_POOL, None, pool["metadata"]["name"])
    assert live is not None
    assert sorted(pool_users(live)) == sorted(f"team-pool/{name}" for name in users)
    assert live["spec"]["limits"][resource] == str(int(share) * len(users))

    def leave(name: str) -> None:
        barrier.wait()
        release_node_pools(kube, "team-pool", name)

    with ThreadPoolExecutor(len(users)) as pool_threads:
        list(pool_threads.map(leave, users))
    assert kube.get(NODE_POOL, None, pool["metadata"]["name"]) is None
