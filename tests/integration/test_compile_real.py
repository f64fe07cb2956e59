"""The Neuron compile step on a real Kubernetes control plane (tests/servers/kubeplane.py).

An 8B bf16 model pinned to inf2.xlarge (16 GiB host: enough to serve precompiled artifacts, not
to compile) with a shared s3:// compile cache: the operator (its own process, the chart's RBAC)
runs a compile Job on a temporary inf2.8xlarge pool and holds the serving workload. The test plays
Karpenter (a Node for the compile pool) and the kubelet (the Job's pod runs and exits 0); the real
Job controller marks the Job Complete; then the operator records the compile, deletes the compile
pool and applies the serving Deployment on the inf2.xlarge pool.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modelship.operator.apply import DEPLOYMENT, EC2_NODE_CLASS, JOB, NODE_POOL, Kind, Kube
from modelship.operator.compilejob import COMPILED_ANNOTATION

from tests.integration.test_operator_real import (
    MD,
    OPERATOR_ENV,
    condition,
    create_md,
    md_where,
    namespace,
    phase_is,
)
from tests.servers.kubeplane import (
    POD,
    ControlPlane,
    Karpenter,
    Kubelet,
    OperatorProcess,
    start_operator,
    wait_for,
)
from tests.unit import configs

pytestmark = pytest.mark.integration

NODE = Kind("v1", "Node", "nodes", False)
NS = "team-compile"
NAME = "llama-inf2"
CACHE = "s3://compile-cache/neuron"


@pytest.fixture(scope="module")
def kube(modelship_installed: ControlPlane) -> Kube:
    return modelship_installed.kube()


@pytest.fixture(scope="module")
def operator(
    operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("compile-operator") / "operator.log"
    env = {**OPERATOR_ENV, "MODELSHIP_NEURON_CACHE_URI": CACHE}
    process = start_operator(operator_kubeconfig, env, log, identity="operator-compile")
    wait_for("the operator to lead", lambda: (process.healthz() or {}).get("leader"))
    yield process
    process.stop()
    text = log.read_text(errors="replace")
    denied = [
        line
        for line in text.splitlines()
        if "cannot" in line and "resource" in line and "system:serviceaccount" in line
    ]
    assert not denied, "\n".join(denied[:5])


@pytest.fixture(scope="module")
def kubelet(kube: Kube) -> Iterator[Kubelet]:
    kubelet = Kubelet(kube)
    kubelet.run_reaper()
    yield kubelet
    kubelet.stop()


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json of Llama-3-8B (the operator plans from it and spec.model.parameters)."""
    directory = tmp_path_factory.mktemp("models") / "llama-3-8b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(configs.LLAMA_3_8B))
    return directory


@pytest.fixture(scope="module")
def cleanup(kube: Kube, operator: OperatorProcess) -> Iterator[list[str]]:
    """Nodes the test launched; the ModelDeployment and those nodes go at module teardown (the
    control plane is shared by the session)."""
    nodes: list[str] = []
    yield nodes
    if kube.get(MD, NS, NAME) is not None:
        kube.delete(MD, NS, NAME)
        wait_for("the ModelDeployment to go", lambda: kube.get(MD, NS, NAME) is None, 60)
    for node in nodes:
        kube.delete(NODE, None, node)


def _compile_job(kube: Kube) -> dict[str, Any] | None:
    jobs = kube.list(JOB, NS, {"modelship.dev/model-deployment": NAME})
    return jobs[0] if jobs else None


def _job_pod(kube: Kube, job: dict[str, Any]) -> dict[str, Any] | None:
    pods = kube.list(POD, NS, {"batch.kubernetes.io/job-name": job["metadata"]["name"]})
    bound = [p for p in pods if p["spec"].get("nodeName")]
    return bound[0] if bound else None


def test_a_model_its_serving_node_cannot_compile_is_compiled_first(
    modelship_installed: ControlPlane,
    kube: Kube,
    operator: OperatorProcess,
    kubelet: Kubelet,
    llama_8b: Path,
    cleanup: list[str],
) -> None:
    namespace(modelship_installed, NS)
    spec = {
        "model": {"uri": f"file://{llama_8b}", "parameters": "8.03B"},
        "serving": {"maxModelLen": 4096, "concurrency": 10},
        "accelerator": {"instanceTypes": ["inf2.xlarge"]},
    }
    create_md(kube, NS, NAME, spec)

    # Step 1: a compile Job on its own inf2.8xlarge pool; no serving workload yet.
    job = wait_for("the compile Job", lambda: _compile_job(kube), 60)
    md = md_where(kube, NS, NAME, phase_is("Compiling"))
    compiled = condition(md, "Compiled")
    assert (compiled["status"], compiled["reason"]) == ("False", "Compiling")
    assert "compiling once on inf2.8xlarge" in compiled["message"]
    assert md["status"]["plan"]["instanceType"] == "inf2.xlarge"
    assert kube.get(DEPLOYMENT, NS, NAME) is None
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "--compile-only" in container["args"] and CACHE in container["args"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]
    pool_name = job["spec"]["template"]["spec"]["nodeSelector"]["modelship.dev/pool"]
    assert pool_name.startswith("modelship-compile-inf2-8xlarge-")
    pool = kube.get(NODE_POOL, None, pool_name)
    assert pool is not None and pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"

    # Karpenter launches the compile node; the scheduler binds the Job's pod to it (its host
    # memory request does not fit an inf2.xlarge); the pod compiles and exits 0.
    node = Karpenter(kube).launch(pool_name)
    cleanup.append(node)
    pod = wait_for("the compile pod to be bound", lambda: _job_pod(kube, job), 60)
    assert pod["spec"]["nodeName"] == node
    kubelet.start(NS, pod["metadata"]["name"])
    kubelet.finish(NS, pod["metadata"]["name"], exit_code=0)

    # Step 2: the real Job controller marks the Job Complete; the operator records the compile,
    # deletes the compile pool and applies the serving workload on the inf2.xlarge pool.
    deployment = wait_for("the serving Deployment", lambda: kube.get(DEPLOYMENT, NS, NAME), 90)
    template = deployment["spec"]["template"]["spec"]
    assert template["nodeSelector"] == {
        "node.kubernetes.io/instance-type": "inf2.xlarge",
        "modelship.dev/pool": "modelship-inf2-xlarge-od",
    }
    assert "--neuron-cache-required" in template["containers"][0]["args"]
    md = kube.get(MD, NS, NAME)
    assert md is not None and COMPILED_ANNOTATION in md["metadata"]["annotations"]
    wait_for("the compile pool to go", lambda: kube.get(NODE_POOL, None, pool_name) is None, 30)
    assert kube.get(EC2_NODE_CLASS, None, pool_name) is None
    wait_for("the serving pool", lambda: kube.get(NODE_POOL, None, "modelship-inf2-xlarge-od"))
    md = md_where(kube, NS, NAME, lambda md: condition(md, "Compiled").get("status") == "True")
    assert md["status"]["phase"] != "Compiling"

    # The serving pod starts on an inf2.xlarge node and becomes ready.
    serving_node = Karpenter(kube).launch("modelship-inf2-xlarge-od")
    cleanup.append(serving_node)

    def serving_pod() -> dict[str, Any] | None:
        pods = kube.list(POD, NS, {"modelship.dev/model-deployment": NAME})
        return next((p for p in pods if p["spec"].get("nodeName")), None)

    pod = wait_for("the serving pod to be bound", serving_pod, 60)
    assert pod["spec"]["nodeName"] == serving_node
    kubelet.ready(NS, pod["metadata"]["name"])
    md_where(kube, NS, NAME, phase_is("Ready"), timeout=60)
    # A restart (here: a resync) reads the record back: no second Job for the same key.
    assert len(kube.list(JOB, NS, {"modelship.dev/model-deployment": NAME})) == 1
