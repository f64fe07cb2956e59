"""The activator learns the ModelDeployments it may route to from the Kubernetes API (KMock's
emulator, `kubeconfig`), and runs as its own process: `modelship activator`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from modelship.operator.activator import ModelRegistry, list_model_deployments
from modelship.operator.apply import Kube
from modelship.runtime.demo import free_port

pytestmark = pytest.mark.integration


def md_object(namespace: str, name: str, replicas_min: int) -> dict[str, Any]:
    return {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"model": {"uri": "s3://models/m/"}, "replicas": {"min": replicas_min}},
    }


@pytest.fixture(scope="module")
def kube(kubeconfig: Path) -> Kube:
    kube = Kube(kubernetes.config.new_client_from_config(str(kubeconfig)))
    for namespace, name, replicas_min in (
        ("act-a", "sleepy", 0),
        ("act-a", "busy", 2),
        ("act-b", "sleepy", 0),
    ):
        kube.request(
            "POST",
            f"/apis/modelship.dev/v1alpha1/namespaces/{namespace}/modeldeployments",
            body=md_object(namespace, name, replicas_min),
        )
    return kube


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
