"""One real vLLM (CPU build) per test session, started through the runtime's entry point.

The tiny model is built offline, uploaded to the SeaweedFS of `s3_server`, and served by
`python -m modelship.runtime.main --source s3://... --device cpu`: the fetch, the verification,
the launch and the supervision all run for real. vLLM takes ~70 s to start on a 2-core machine,
so the readiness timeout is generous and the server is shared by every test that asks for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from modelship.runtime.demo import free_port
from modelship.runtime.main import local_command
from modelship.runtime.tinymodel import build_tiny_model

READY_TIMEOUT_SECONDS = 240.0
BUCKET = "runtime-e2e"
PREFIX = "tiny-llama"
SERVED_MODEL_NAME = "tiny-llama"
PREDICTED_KV_CACHE_TOKENS = 123456  # stands in for the plan's figure; exported as-is


@dataclass(frozen=True)
class RuntimeVllm:
    """The runtime + vLLM under test, all on 127.0.0.1."""

    base_url: str  # vLLM's OpenAI API (and its /metrics)
    metrics_url: str  # the runtime's Prometheus endpoint
    served_model_name: str
    status_path: Path
    log_path: Path
    model_dir: Path
    source_dir: Path

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.status_path.read_text())
        return result


def _wait_ready(process: subprocess.Popen[bytes], status_path: Path, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"runtime exited with {process.returncode}:\n{tail}")
        if status_path.exists():
            try:
                phase = json.loads(status_path.read_text()).get("phase")
            except json.JSONDecodeError:
                phase = None
            if phase == "ready":
                return
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"runtime not ready within {READY_TIMEOUT_SECONDS:.0f} s:\n{tail}")


def upload_model(s3_server: Any, source_dir: Path, bucket: str, prefix: str) -> None:
    """Every file under `source_dir` to s3://bucket/prefix/ (a new bucket), keeping its path."""
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    for path in sorted(source_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(source_dir)}")


@contextlib.contextmanager
def running_runtime(
    command: list[str], s3_server: Any, status_path: Path, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The runtime command (`local_command`) running against the test S3 server with vLLM's
    CPU settings, ready on entry, stopped (SIGTERM, which it forwards to vLLM) on exit."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_ready(process, status_path, log_path)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the runtime forwards it to vLLM
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="session")
def runtime_vllm(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeVllm]:
    """Start the runtime (and through it vLLM) once; stop both at the end of the session."""
    workdir = tmp_path_factory.mktemp("runtime-vllm")
    source_dir = build_tiny_model(workdir / "source")
    upload_model(s3_server, source_dir, BUCKET, PREFIX)

    port, metrics_port = free_port(), free_port()
    status_path = workdir / "status.json"
    log_path = workdir / "runtime.log"
    model_dir = workdir / "pod" / "model"
    command = local_command(
        source=f"s3://{BUCKET}/{PREFIX}",
        model_dir=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        port=port,
        metrics_port=metrics_port,
        status_file=status_path,
        engine_args=["--dtype", "bfloat16", "--max-model-len", "1024"],
        s3_endpoint_url=s3_server.endpoint_url,
        predicted_kv_cache_tokens=PREDICTED_KV_CACHE_TOKENS,
        ready_timeout_seconds=READY_TIMEOUT_SECONDS,
    )
    with running_runtime(command, s3_server, status_path, log_path):
        yield RuntimeVllm(
            base_url=f"http://127.0.0.1:{port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            served_model_name=SERVED_MODEL_NAME,
            status_path=status_path,
            log_path=log_path,
            model_dir=model_dir,
            source_dir=source_dir,
        )
