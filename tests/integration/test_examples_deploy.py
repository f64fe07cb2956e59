"""Every example in manifests/examples/ is applied with the real kubectl to the real control plane
(tests/servers/kubeplane.py) with `modelship operator` running, and reaches its planned hardware
and its children.

The examples' S3 models live on SeaweedFS (tests/servers/seaweed.py) as their published
config.json (operator/data/known_models.yaml) without weights: each example states its parameter
count, so the operator reads config.json over S3, plans, and renders, exactly as it would for the
full checkpoint. The FSx and EFS examples name their known model and are planned from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelship.operator.apply import (
    DEPLOYMENT,
    EC2_NODE_CLASS,
    LEADER_WORKER_SET,
    NODE_POOL,
    PDB,
    POD_MONITOR,
    SCALED_OBJECT,
    SERVICE,
    Kind,
    Kube,
)
from modelship.operator.knownmodels import match_known_model

from tests.servers.kubeplane import (
    ControlPlane,
    OperatorProcess,
    ensure_runtime_service_account,
    start_operator,
    wait_for,
)
from tests.servers.seaweed import S3Server

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "examples").glob("*.yaml"))
MD = Kind("modelship.dev/v1alpha1", "ModelDeployment", "modeldeployments", True)
NAMESPACE = "examples"


def planned_instance_type(path: Path) -> str:
    """The instance type an example's header promises (`# plan: g6e.xlarge x1 ...`)."""
    for line in path.read_text().splitlines():
        if line.startswith("# plan:"):
            return line.split()[2]
    raise AssertionError(f"{path.name} has no '# plan:' line")


@pytest.fixture(scope="module")
def example_models(s3_server: S3Server) -> S3Server:
    """Each S3 example's model prefix holds its published config.json and a tokenizer."""
    client = s3_server.client()
    buckets = set()
    for path in EXAMPLES:
        uri = yaml.safe_load(path.read_text())["spec"]["model"]["uri"]
        if not uri.startswith("s3://"):
            continue
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if bucket not in buckets:
            if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=bucket)
            buckets.add(bucket)
        known = match_known_model(uri)
        assert known is not None, f"{path.name}: no known model matches {uri}"
        client.put_object(
            Bucket=bucket, Key=f"{prefix}/config.json", Body=json.dumps(known.config).encode()
        )
        client.put_object(Bucket=bucket, Key=f"{prefix}/tokenizer.json", Body=b"{}")
    return s3_server


@pytest.fixture(scope="module")
def operator(
    modelship_installed: ControlPlane,
    operator_kubeconfig: Path,
    example_models: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    env = {
        "MODELSHIP_CLUSTER_NAME": "test-cluster",
        "MODELSHIP_NODE_ROLE": "KarpenterNodeRole-test",
        "MODELSHIP_LEASE_SECONDS": "3",
        "MODELSHIP_ACTIVATOR_PORT": "0",
        "MODELSHIP_S3_ENDPOINT_URL": example_models.endpoint_url,
        **example_models.env,
    }
    log = tmp_path_factory.mktemp("examples") / "operator.log"
    process = start_operator(operator_kubeconfig, env, log, identity="operator-examples")
    wait_for("the operator to lead", lambda: (process.healthz() or {}).get("leader"))
    modelship_installed.ensure_namespace(NAMESPACE)
    ensure_runtime_service_account(modelship_installed, NAMESPACE)
    yield process
    # Leave the session's plane as found: other modules' operators and pools must not meet
    # these ModelDeployments (their pods would take those modules' nodes).
    kube = modelship_installed.kube()
    for md in kube.list(MD, NAMESPACE):
        kube.delete(MD, NAMESPACE, md["metadata"]["name"])
    wait_for("the examples deleted", lambda: not kube.list(MD, NAMESPACE), timeout_seconds=60)
    assert process.stop() == 0, process.log()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_deploys_to_its_planned_hardware(
    path: Path, operator: OperatorProcess, modelship_installed: ControlPlane
) -> None:
    kube: Kube = modelship_installed.kube()
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    name = document["metadata"]["name"]
    modelship_installed.kubectl("apply", "-n", NAMESPACE, "-f", str(path))

    def planned() -> dict[str, Any] | None:
        md = kube.get(MD, NAMESPACE, name) or {}
        return md if (md.get("status") or {}).get("plan") else None

    try:
        md = wait_for(f"{name} planned", planned, timeout_seconds=60)
    except AssertionError:
        md = kube.get(MD, NAMESPACE, name) or {}
        raise AssertionError(f"{name}: {md.get('status')}\n{operator.log()}") from None
    plan = md["status"]["plan"]
    assert plan["instanceType"] == planned_instance_type(path), plan

    workload = LEADER_WORKER_SET if plan["nodes"] > 1 else DEPLOYMENT
    workload_name = f"{name}-lws" if plan["nodes"] > 1 else name
    wait_for(f"{name}'s {workload.kind}", lambda: kube.get(workload, NAMESPACE, workload_name))
    replicas = document["spec"].get("replicas") or {}
    most = replicas.get("max", max(replicas.get("min", 1), 1))
    # A PodDisruptionBudget only where there can be more than one replica (render.py).
    for kind in (SERVICE, POD_MONITOR, *([PDB] if most > 1 else [])):
        wait_for(f"{name}'s {kind.kind}", lambda kind=kind: kube.get(kind, NAMESPACE, name))
    if most <= 1:
        assert kube.get(PDB, NAMESPACE, name) is None
    if replicas.get("max", replicas.get("min", 1)) > replicas.get("min", 1):
        wait_for(f"{name}'s ScaledObject", lambda: kube.get(SCALED_OBJECT, NAMESPACE, name))
    pool = plan["nodePool"]
    # Pools are applied from the operator's pool queue once its index holds the plan.
    wait_for(f"{name}'s NodePool", lambda: kube.get(NODE_POOL, None, pool))
    assert kube.get(EC2_NODE_CLASS, None, pool) is not None
