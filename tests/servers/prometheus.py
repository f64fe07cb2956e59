"""A real Prometheus (Debian's package) on 127.0.0.1, once per test session.

It scrapes, every 2 s:
- the operator's metrics registry (modelship_operator_*), served here the way handlers.py serves
  it (`METRICS.serve`), so the operator a test runs in-process (KopfRunner) is what is scraped;
- vLLM's /metrics and the runtime's /metrics of the `runtime_vllm` fixture, with the target labels
  a PodMonitor gives them in a cluster (namespace, pod, and the pod label
  modelship.dev/model-deployment as `modelship_dev_model_deployment`).

The chart's rules (helm/modelship/rules/modelship.rules.yaml) are loaded with their group
intervals shortened to 2 s, so recording rules have data within seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelship.runtime.demo import free_port

RULES = (
    Path(__file__).resolve().parents[2] / "helm" / "modelship" / "rules" / "modelship.rules.yaml"
)
SCRAPE_INTERVAL = "2s"
NAMESPACE = "default"
MODEL_DEPLOYMENT = "tiny-llama"  # the ModelDeployment the observability test creates
POD = "tiny-llama-0"


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus and the operator metrics port it scrapes."""

    url: str
    operator_metrics_port: int
    log_path: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (or [] when empty); raises on a PromQL error."""
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body}")
        result = body["data"]["result"]
        return result if isinstance(result, list) else [result]

    def targets_up(self) -> dict[str, str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            active = json.loads(response.read())["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}


def _config(operator_port: int, vllm_address: str, runtime_address: str) -> dict[str, Any]:
    pod_labels = {
        "namespace": NAMESPACE,
        "pod": POD,
        "modelship_dev_model_deployment": MODEL_DEPLOYMENT,
    }
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                "job_name": "modelship-operator",
                "honor_labels": True,  # as the chart's ServiceMonitor: keep the MD's namespace
                "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}],
            },
            {
                "job_name": "vllm",
                "static_configs": [{"targets": [vllm_address], "labels": pod_labels}],
            },
            {
                "job_name": "runtime",
                "static_configs": [{"targets": [runtime_address], "labels": pod_labels}],
            },
        ],
    }


@pytest.fixture(scope="session")
def prometheus(runtime_vllm: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus scraping the operator, vLLM and the runtime; stopped at the end of the session."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed: run scripts/install-prometheus.sh")
    workdir = tmp_path_factory.mktemp("prometheus")
    # The operator a test starts (a process: `modelship operator --metrics-port`) serves here.
    operator_port, port = free_port(), free_port()
    vllm_address = urllib.parse.urlparse(runtime_vllm.base_url).netloc
    runtime_address = urllib.parse.urlparse(runtime_vllm.metrics_url).netloc
    (workdir / "prometheus.yml").write_text(
        yaml.safe_dump(_config(operator_port, vllm_address, runtime_address))
    )
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = SCRAPE_INTERVAL
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
    log_path = workdir / "prometheus.log"
    command = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in 30 s: {log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Prometheus(url=url, operator_metrics_port=operator_port, log_path=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
