"""The runtime end to end against real servers: SeaweedFS (`s3_server`) holds the tiny model,
the runtime fetches it, verifies it and serves it with the real vLLM CPU build
(`runtime_vllm`, tests/servers/vllm_server.py)."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import pytest

from tests.servers.vllm_server import PREDICTED_KV_CACHE_TOKENS, RuntimeVllm

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return str(response.read().decode())


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        result: dict[str, Any] = json.load(response)
        return result


def _sample(metrics_text: str, name: str, labels: str = "") -> float:
    """The value of one Prometheus sample, e.g. _sample(text, 'x_total', '{a="b"}')."""
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    match = pattern.search(metrics_text)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def test_models_lists_the_served_name(runtime_vllm: RuntimeVllm) -> None:
    models = json.loads(_get(f"{runtime_vllm.base_url}/v1/models"))
    assert [m["id"] for m in models["data"]] == [runtime_vllm.served_model_name]
    assert models["data"][0]["max_model_len"] == 1024


def test_completion(runtime_vllm: RuntimeVllm) -> None:
    answer = _post(
        f"{runtime_vllm.base_url}/v1/completions",
        {
            "model": runtime_vllm.served_model_name,
            "prompt": "The capital of France is",
            "max_tokens": 12,
            "min_tokens": 12,  # random weights may pick EOS early; the test wants text
            "temperature": 0.0,
        },
    )
    assert answer["choices"][0]["text"].strip()
    usage = answer["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] > 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completion_uses_the_chat_template(runtime_vllm: RuntimeVllm) -> None:
    answer = _post(
        f"{runtime_vllm.base_url}/v1/chat/completions",
        {
            "model": runtime_vllm.served_model_name,
            "messages": [{"role": "user", "content": "Hello, how are you today?"}],
            "max_tokens": 10,
            "min_tokens": 10,
            "temperature": 0.0,
        },
    )
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"].strip()
    # The template adds role headers and BOS around the 7-ish tokens of the question.
    assert answer["usage"]["prompt_tokens"] > 8
    assert answer["usage"]["completion_tokens"] == 10


def test_vllm_metrics(runtime_vllm: RuntimeVllm) -> None:
    _post(
        f"{runtime_vllm.base_url}/v1/completions",
        {"model": runtime_vllm.served_model_name, "prompt": "Hi", "max_tokens": 4, "min_tokens": 4},
    )
    text = _get(f"{runtime_vllm.base_url}/metrics")
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert re.search(rf"^{re.escape(name)}\{{", text, re.M), name
    assert _sample(text, "vllm:generation_tokens_total") >= 4


def test_runtime_metrics(runtime_vllm: RuntimeVllm) -> None:
    text = _get(runtime_vllm.metrics_url)
    source_bytes = sum(p.stat().st_size for p in runtime_vllm.source_dir.iterdir())
    assert _sample(text, "modelship_runtime_fetch_bytes_total") == source_bytes
    assert _sample(text, "modelship_runtime_phase", '{phase="ready"}') == 1
    assert _sample(text, "modelship_runtime_phase", '{phase="fetching"}') == 0
    assert _sample(text, "modelship_runtime_time_to_ready_seconds") > 0
    # vLLM's own KV-cache line, read from its log, next to the plan's prediction.
    engine_tokens = _sample(text, "modelship_runtime_kv_cache_tokens", '{source="engine"}')
    assert engine_tokens > 1024
    plan_tokens = _sample(text, "modelship_runtime_kv_cache_tokens", '{source="plan"}')
    assert plan_tokens == PREDICTED_KV_CACHE_TOKENS


def test_status_file_and_fetched_files(runtime_vllm: RuntimeVllm) -> None:
    status = runtime_vllm.status()
    assert status["phase"] == "ready"
    assert status["time_to_ready_seconds"] > 0
    assert status["fetch"]["bytes_fetched"] > 1_000_000
    assert status["kv_cache_tokens"] > 1024
    for path in runtime_vllm.source_dir.iterdir():
        fetched = runtime_vllm.model_dir / path.name
        assert fetched.read_bytes() == path.read_bytes(), path.name
