"""`modelship-runtime --compile-only` (the operator's Neuron compile Job) and
`--neuron-cache-required` (a serving pod that must not compile) against SeaweedFS (`s3_env`):
the model and the compile cache are real S3 objects, the runtime a real subprocess.

Without Neuron hardware nothing here compiles: the tests cover what runs on a CPU — the cache
lookup with the runtime's own key, the exit at once when a compile Job finds the artifacts
published, the publish-then-restore path between two pods, and a serving pod that refuses to
compile on a miss (before vLLM starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from modelship.operator.source import parse_source
from modelship.runtime.fetch import fetch_model
from modelship.runtime.neuron_cache import NeuronCache, cache_key_for
from modelship.runtime.tinymodel import build_tiny_model

from tests.servers.seaweed import S3Server

pytestmark = pytest.mark.integration

ENGINE_ARGS = ["--tensor-parallel-size", "2", "--max-model-len", "1024", "--max-num-seqs", "4"]
SDK = {"NEURON_SDK_VERSION": "2.29.0-test"}


def _upload_model(s3: S3Server, tmp_path: Path) -> str:
    model = build_tiny_model(tmp_path / "source")
    prefix = f"compile-{uuid.uuid4().hex[:8]}"
    client = s3.client()
    for path in model.iterdir():
        client.upload_file(str(path), s3.bucket, f"{prefix}/{path.name}")
    return f"s3://{s3.bucket}/{prefix}"


def _runtime(
    s3: S3Server, tmp_path: Path, source: str, cache_uri: str, *flags: str, name: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, object], float]:
    """Run the runtime as the compile Job or a serving pod would; (result, status, seconds)."""
    status_path = tmp_path / f"{name}-status.json"
    command = [
        sys.executable, "-m", "modelship.runtime.main",
        "--source", source,
        "--model-dir", str(tmp_path / f"{name}-model"),
        "--device", "neuron",
        "--neuron-cache", cache_uri,
        "--neuron-artifacts-dir", str(tmp_path / f"{name}-artifacts"),
        "--s3-endpoint-url", s3.endpoint_url,
        "--metrics-host", "127.0.0.1",
        "--metrics-port", "0",
        "--status-file", str(status_path),
        *flags,
        "--", *ENGINE_ARGS,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command,
        env={**os.environ, **s3.env, **SDK},
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    return result, status, seconds


def _key_of(s3: S3Server, tmp_path: Path, source: str) -> object:
    """The cache key the runtime computes for `source` (the same fetch, ETags and SDK)."""
    report = fetch_model(
        parse_source(source, field="uri"), tmp_path / "keyed", endpoint_url=s3.endpoint_url
    )
    return cache_key_for(report.model_dir, ENGINE_ARGS, etags=report.file_etags, env=SDK)


def test_compile_only_exits_at_once_when_the_cache_holds_the_model(
    s3_env: S3Server, tmp_path: Path
) -> None:
    source = _upload_model(s3_env, tmp_path)
    cache_uri = f"s3://{s3_env.bucket}/neuron-cache-{uuid.uuid4().hex[:8]}"
    cache = NeuronCache(cache_uri, endpoint_url=s3_env.endpoint_url)
    key = _key_of(s3_env, tmp_path, source)
    # What an earlier compile published (the artifact bytes are opaque to the cache).
    artifacts = tmp_path / "published"
    (artifacts / "graphs").mkdir(parents=True)
    (artifacts / "graphs" / "model.neff").write_bytes(b"neff" * 1024)
    assert cache.publish(key, artifacts)  # type: ignore[arg-type]

    result, status, seconds = _runtime(
        s3_env, tmp_path, source, cache_uri, "--compile-only", name="job"
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to compile" in result.stderr
    assert status["phase"] == "compiled"
    assert status["neuron_cache"] == cache.location(key)  # type: ignore[arg-type]
    assert "vllm_pid" not in status  # vLLM never started
    assert seconds < 60

    # The serving pod (on a node too small to compile) restores what the Job left.
    serve_artifacts = tmp_path / "serve-artifacts"
    assert cache.restore(key, serve_artifacts)  # type: ignore[arg-type]
    assert (serve_artifacts / "graphs" / "model.neff").read_bytes() == b"neff" * 1024


def test_serving_pod_that_must_not_compile_fails_on_a_miss(
    s3_env: S3Server, tmp_path: Path
) -> None:
    source = _upload_model(s3_env, tmp_path)
    cache_uri = f"s3://{s3_env.bucket}/neuron-cache-{uuid.uuid4().hex[:8]}"
    result, status, _ = _runtime(
        s3_env, tmp_path, source, cache_uri, "--neuron-cache-required", name="serve"
    )
    assert result.returncode == 1
    assert status["phase"] == "failed"
    assert "no compiled artifacts at s3://" in str(status["error"])
    assert "modelship.dev/neuron-compiled" in str(status["error"])
    assert "vllm_pid" not in status  # refused before vLLM could start compiling
    # Nothing was published by the failed pod.
    listing = s3_env.client().list_objects_v2(
        Bucket=s3_env.bucket, Prefix=cache_uri.split("/", 3)[3]
    )
    assert listing.get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compile-only"], "--compile-only needs --device neuron and --neuron-cache"),
        (
            ["--compile-only", "--device", "neuron", "--neuron-cache", "s3://c/p", "--role",
             "leader", "--nodes", "2"],
            "--compile-only compiles on one node",
        ),
        (["--neuron-cache-required", "--device", "cuda"], "--neuron-cache-required needs"),
    ],
)  # fmt: skip
def test_compile_flags_need_neuron_and_a_cache(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modelship.runtime.main", "--source", "s3://b/m",
         "--model-dir", "/tmp/m", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
