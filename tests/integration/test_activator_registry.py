"""The activator learns the ModelDeployments it may route to from the real Kubernetes control
plane (tests/servers/kubeplane.py, manifests/install.yaml applied), with the token of the chart's
own activator ServiceAccount: it can list ModelDeployments and write nothing. It runs as its own
process: `modelship activator`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modelship.operator.activator import ModelRegistry, list_model_deployments
from modelship.operator.apply import Kube, KubeApiError
from modelship.runtime.demo import free_port

from tests.servers.kubeplane import OPERATOR_NAMESPACE, ControlPlane

ACTIVATOR_SERVICE_ACCOUNT = "modelship-activator"  # templates/activator.yaml, release `modelship`

pytestmark = pytest.mark.integration


def md_object(namespace: str, name: str, replicas_min: int) -> dict[str, Any]:
    return {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"model": {"uri": "s3://models/m/"}, "replicas": {"min": replicas_min}},
    }


@pytest.fixture(scope="module")
def kubeconfig(
    modelship_installed: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The activator's own credentials: a token of the chart's activator ServiceAccount."""
    admin = modelship_installed.kube()
    for namespace in ("act-a", "act-b"):
        admin.request(
            "POST",
            "/api/v1/namespaces",
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )
    created = (("act-a", "sleepy", 0), ("act-a", "busy", 2), ("act-b", "sleepy", 0))
    for namespace, name, replicas_min in created:
        admin.request(
            "POST",
            f"/apis/modelship.dev/v1alpha1/namespaces/{namespace}/modeldeployments",
            body=md_object(namespace, name, replicas_min),
        )
    path = tmp_path_factory.mktemp("activator") / "kubeconfig"
    yield modelship_installed.token_kubeconfig(OPERATOR_NAMESPACE, ACTIVATOR_SERVICE_ACCOUNT, path)
    # Other modules' operators share this plane: leave no ModelDeployment of ours for them.
    for namespace, name, _ in created:
        admin.request(
            "DELETE", f"/apis/modelship.dev/v1alpha1/namespaces/{namespace}/modeldeployments/{name}"
        )


@pytest.fixture(scope="module")
def kube(kubeconfig: Path, modelship_installed: ControlPlane) -> Kube:
    return modelship_installed.kube(kubeconfig)


def test_the_activator_may_read_but_never_write(kube: Kube) -> None:
    assert kube.request("GET", "/apis/modelship.dev/v1alpha1/modeldeployments")["items"]
    writes = [
        (
            "POST",
            "/apis/modelship.dev/v1alpha1/namespaces/act-a/modeldeployments",
            md_object("act-a", "x", 0),
        ),
        ("DELETE", "/apis/modelship.dev/v1alpha1/namespaces/act-a/modeldeployments/sleepy", None),
        (
            "POST",
            "/api/v1/namespaces/act-a/services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"ports": [{"port": 1}]},
            },
        ),
    ]
    for method, path, body in writes:
        with pytest.raises(KubeApiError) as refused:
            kube.request(method, path, body=body)
        assert refused.value.status == 403, (method, path)
    with pytest.raises(KubeApiError) as secrets:
        kube.request("GET", "/api/v1/namespaces/act-a/secrets")
    assert secrets.value.status == 403


def test_the_registry_lists_model_deployments_from_the_api(kube: Kube) -> None:
    registry = ModelRegistry()
    registry.update(list_model_deployments(kube))
    assert {("act-a", "sleepy"), ("act-b", "sleepy")} <= registry.known()
    assert ("act-a", "busy") not in registry.known()
    # Watching some namespaces only: the others are unknown.
    registry.update(list_model_deployments(kube, ["act-b"]))
    assert registry.known() == {("act-b", "sleepy")}
    with pytest.raises(LookupError):
        registry.resolve("act-a", "sleepy")
    assert registry.resolve("act-b", "sleepy").host == "sleepy.act-b.svc.cluster.local"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_modelship_activator_runs_as_its_own_process(kube: Kube, kubeconfig: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "MODELSHIP_ACTIVATOR_PORT": str(port),
        "MODELSHIP_ACTIVATOR_SYNC_SECONDS": "0.5",
        "MODELSHIP_ACTIVATOR_HOLD_SECONDS": "2",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelship.operator.cli",
            "activator",
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if _get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the activator did not start"
            time.sleep(0.2)
        base = f"http://127.0.0.1:{port}/models"
        # Known and scaling to zero: forwarded to its Service, which this machine cannot resolve.
        deadline = time.monotonic() + 10
        while "no Service" not in (answer := _get(f"{base}/act-a/sleepy/v1/models"))[1]:
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)
        assert answer[0] == 404
        # Not scaling to zero: never forwarded.
        status, body = _get(f"{base}/act-a/busy/v1/models")
        assert status == 404
        assert json.loads(body)["error"]["message"] == "no ModelDeployment act-a/busy"
        # Its own metrics port, for KEDA's Prometheus trigger.
        status, metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "modelship_activator_pending_requests" in metrics
    finally:
        process.terminate()
        process.wait(timeout=10)
