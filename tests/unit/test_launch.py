"""The vLLM command line, checked with vLLM's own argument parser, and the supervisor."""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from modelship.operator.engine import EngineArgs
from modelship.runtime.launch import (
    KV_CACHE_TOKENS_METRIC,
    VLLM_MODULE,
    KvCacheGauge,
    LaunchError,
    LaunchSpec,
    VllmProcess,
    build_command,
    build_environment,
    parse_kv_cache_line,
)
from prometheus_client import CollectorRegistry

GPU_PLAN = EngineArgs(
    device="cuda",
    tensor_parallel_size=4,
    pipeline_parallel_size=2,
    max_model_len=32768,
    max_num_seqs=64,
    max_num_batched_tokens=8192,
    gpu_memory_utilization=0.9,
    dtype="bfloat16",
    quantization="fp8",
    kv_cache_dtype="fp8",
    generation_defaults={"temperature": 0.6, "top_p": 0.9, "max_tokens": 512},
)
INFERENTIA2_PLAN = EngineArgs(
    device="neuron",
    tensor_parallel_size=2,
    max_model_len=4096,
    max_num_seqs=8,
    max_num_batched_tokens=4096,
    dtype="bfloat16",
)
TRAINIUM_PLAN = EngineArgs(
    device="neuron",
    tensor_parallel_size=32,
    max_model_len=8192,
    max_num_seqs=16,
    dtype="bfloat16",
    runner="pooling",
    generation_defaults={"temperature": 0.0},
)


@pytest.fixture(scope="module")
def vllm_parser() -> argparse.ArgumentParser:
    """vLLM's own `vllm serve` / api_server parser (importing vLLM takes ~15 s)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def _argv_after_program(command: list[str]) -> list[str]:
    assert command[:3] == [sys.executable, "-m", VLLM_MODULE]
    return command[3:]


def _spec(plan: EngineArgs, **extra: object) -> LaunchSpec:
    return LaunchSpec(
        model_dir=Path("/models/m"),
        served_model_name="llama",
        engine_args=plan.to_argv(),
        device=plan.device,
        port=8000,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.slow
def test_gpu_plan_parses(vllm_parser: argparse.ArgumentParser) -> None:
    args = vllm_parser.parse_args(_argv_after_program(build_command(_spec(GPU_PLAN))))
    assert args.model == "/models/m"
    assert args.served_model_name == ["llama"]
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert args.tensor_parallel_size == 4
    assert args.pipeline_parallel_size == 2
    assert args.max_model_len == 32768
    assert args.max_num_seqs == 64
    assert args.max_num_batched_tokens == 8192
    assert args.gpu_memory_utilization == 0.9
    assert args.dtype == "bfloat16"
    assert args.quantization == "fp8"
    assert args.kv_cache_dtype == "fp8"
    assert args.override_generation_config == {"max_tokens": 512, "temperature": 0.6, "top_p": 0.9}


@pytest.mark.slow
def test_inferentia2_plan_parses(vllm_parser: argparse.ArgumentParser) -> None:
    spec = _spec(INFERENTIA2_PLAN, neuron_compiled_artifacts=Path("/var/cache/neuron"))
    args = vllm_parser.parse_args(_argv_after_program(build_command(spec)))
    assert args.tensor_parallel_size == 2
    assert args.pipeline_parallel_size == 1
    assert args.max_model_len == 4096
    assert args.max_num_seqs == 8
    assert args.max_num_batched_tokens == 4096
    assert args.dtype == "bfloat16"
    assert args.quantization is None
    assert args.kv_cache_dtype == "auto"


@pytest.mark.slow
def test_trainium_plan_parses(vllm_parser: argparse.ArgumentParser) -> None:
    spec = _spec(TRAINIUM_PLAN, neuron_compiled_artifacts=Path("/var/cache/neuron"))
    args = vllm_parser.parse_args(_argv_after_program(build_command(spec)))
    assert args.tensor_parallel_size == 32
    assert args.max_model_len == 8192
    assert args.max_num_seqs == 16
    assert args.runner == "pooling"
    assert args.override_generation_config == {"temperature": 0.0}


@pytest.mark.slow
def test_unknown_flag_fails_the_parser(vllm_parser: argparse.ArgumentParser) -> None:
    plan = GPU_PLAN.model_copy(update={"extra_args": ("--no-such-flag", "1")})
    with pytest.raises(SystemExit):
        vllm_parser.parse_args(_argv_after_program(build_command(_spec(plan))))


@pytest.mark.slow
def test_malformed_value_fails_the_parser(vllm_parser: argparse.ArgumentParser) -> None:
    with pytest.raises(SystemExit):
        vllm_parser.parse_args(["--model", "/m", "--max-num-seqs", "many"])


def test_command_layout() -> None:
    command = build_command(_spec(INFERENTIA2_PLAN), python="/usr/bin/python3")
    assert command[:3] == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"]
    # The pod's flags last: vLLM keeps the last value of a repeated option.
    assert command[-8:] == [
        "--model",
        "/models/m",
        "--served-model-name",
        "llama",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert command[3:-8] == INFERENTIA2_PLAN.to_argv()


@pytest.mark.parametrize(
    "flag",
    [
        "--model",
        "--port=9000",
        "--served-model-name",
        "--host",
        "--served_model_name",
        "--served-model",
        "--hos",
    ],
)
def test_pod_flags_in_engine_args_are_rejected(flag: str) -> None:
    spec = LaunchSpec(Path("/m"), "m", engine_args=[flag, "x"])
    with pytest.raises(LaunchError, match="set by the runtime"):
        build_command(spec)


def test_neuron_environment() -> None:
    spec = _spec(
        INFERENTIA2_PLAN,
        neuron_compiled_artifacts=Path("/var/cache/neuron"),
        neuron_visible_cores="0-1",
    )
    env = build_environment(spec, {"PATH": "/bin"})
    assert env["NEURON_COMPILED_ARTIFACTS"] == "/var/cache/neuron"
    assert env["NEURON_RT_VISIBLE_CORES"] == "0-1"
    assert env["VLLM_NEURON_FRAMEWORK"] == "neuronx-distributed-inference"
    assert env["PATH"] == "/bin"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    with pytest.raises(LaunchError, match="compiled-artifacts"):
        build_environment(_spec(INFERENTIA2_PLAN), {})


def test_cpu_environment_keeps_pod_values() -> None:
    spec = LaunchSpec(Path("/m"), "m", engine_args=[], device="cpu", cpu_kv_cache_gib=2)
    env = build_environment(spec, {})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    env = build_environment(spec, {"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_gpu_environment_adds_nothing_device_specific() -> None:
    env = build_environment(_spec(GPU_PLAN), {})
    assert set(env) == {
        "PYTHONUNBUFFERED",
        "VLLM_NO_USAGE_STATS",
        "VLLM_DO_NOT_TRACK",
        "DO_NOT_TRACK",
    }


def test_usage_statistics_are_off_whatever_the_pod_says() -> None:
    env = build_environment(_spec(GPU_PLAN), {"VLLM_NO_USAGE_STATS": "0", "DO_NOT_TRACK": "0"})
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["DO_NOT_TRACK"] == "1"
    assert env["VLLM_DO_NOT_TRACK"] == "1"


def test_a_bare_value_in_engine_args_is_refused() -> None:
    # vLLM reads a stray positional as the model to serve (its model_tag argument).
    spec = LaunchSpec(Path("/m"), "m", engine_args=["--enable-prefix-caching", "/other/model"])
    with pytest.raises(LaunchError, match="set by the runtime"):
        build_command(spec)


@pytest.mark.parametrize(
    ("line", "pool", "tokens", "concurrency"),
    [
        (
            "INFO 11-23 09:41:02 [kv_cache_utils.py:1087] CPU KV cache size: 2,097,152 tokens, "
            "Maximum concurrency for 1,024 tokens per request: 2048.00x",
            "CPU",
            2097152,
            2048.0,
        ),
        ("(EngineCore pid=12) INFO GPU KV cache size: 31,232 tokens", "GPU", 31232, None),
        (
            "NEURON KV cache size: 40,960 tokens, Maximum concurrency for 4,096 tokens per "
            "request: 10.00x",
            "NEURON",
            40960,
            10.0,
        ),
    ],
)
def test_kv_cache_line(line: str, pool: str, tokens: int, concurrency: float | None) -> None:
    capacity = parse_kv_cache_line(line)
    assert capacity is not None
    assert (capacity.pool, capacity.tokens, capacity.max_concurrency) == (pool, tokens, concurrency)


def test_other_lines_are_not_kv_lines() -> None:
    assert parse_kv_cache_line("INFO Loading weights took 0.02 GiB") is None


_FAKE_ENGINE = textwrap.dedent(
    """
    import signal, sys, time
    def on_term(signum, frame):
        print("got SIGTERM", flush=True)
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)
    print("INFO CPU KV cache size: 12,345 tokens, Maximum concurrency for 1,024 tokens per "
          "request: 12.06x", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def test_supervisor_reads_kv_line_and_forwards_sigterm() -> None:
    registry = CollectorRegistry()
    gauge = KvCacheGauge(registry)
    gauge.set_plan(10000)
    log = io.StringIO()
    spec = LaunchSpec(Path("/m"), "m", engine_args=[], device="cpu")
    process = VllmProcess(
        spec,
        log=log,
        on_kv_cache=lambda capacity: gauge.set_engine(capacity.tokens),
        command=[sys.executable, "-c", _FAKE_ENGINE],
    )
    process.start()
    for _ in range(200):
        if process.kv_cache is not None:
            break
        time.sleep(0.05)
    assert process.kv_cache is not None and process.kv_cache.tokens == 12345
    assert registry.get_sample_value(KV_CACHE_TOKENS_METRIC, {"source": "engine"}) == 12345
    assert registry.get_sample_value(KV_CACHE_TOKENS_METRIC, {"source": "plan"}) == 10000
    assert process.stop(grace_seconds=10) == 7
    assert "got SIGTERM" in log.getvalue()


def test_supervisor_kills_a_child_that_ignores_sigterm() -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + (
        "print('up', flush=True)\nwhile True: time.sleep(0.05)\n"
    )
    process = VllmProcess(
        LaunchSpec(Path("/m"), "m", engine_args=[]),
        log=io.StringIO(),
        command=[sys.executable, "-c", stubborn],
    )
    process.start()
    time.sleep(0.5)
    assert process.stop(grace_seconds=0.5) == -signal.SIGKILL


def test_wait_until_healthy_reports_an_early_exit() -> None:
    process = VllmProcess(
        LaunchSpec(Path("/m"), "m", engine_args=[], port=1),
        log=io.StringIO(),
        command=[sys.executable, "-c", "print('ValueError: bad model'); raise SystemExit(3)"],
    )
    process.start()
    with pytest.raises(LaunchError, match=r"(?s)exited with code 3.*ValueError: bad model"):
        process.wait_until_healthy(30, interval_seconds=0.1)
    assert json.dumps(process.tail)  # the tail is plain text, ready for the status file


# The entry point's options (runtime/main.py), which end up in LaunchSpec.


def test_entry_point_options_from_argv_and_env() -> None:
    from modelship.runtime.main import parse_args

    env = {
        "MODELSHIP_RUNTIME_SOURCE": "s3://models/llama-3-8b/",
        "MODELSHIP_RUNTIME_MODEL_DIR": "/models/m",
        "MODELSHIP_RUNTIME_TRUST_PICKLE": "true",
        "MODELSHIP_RUNTIME_PORT": "8080",
        "MODELSHIP_RUNTIME_ENGINE_ARGS": '["--max-model-len", "4096", "--max-num-seqs", "8"]',
    }
    args, engine_args = parse_args([], env)
    assert args.source == "s3://models/llama-3-8b/"
    assert str(args.model_dir) == "/models/m"
    assert args.served_model_name == "llama-3-8b"
    assert args.trust_pickle is True
    assert args.port == 8080
    assert args.device == "cuda"
    assert engine_args == ["--max-model-len", "4096", "--max-num-seqs", "8"]

    args, engine_args = parse_args(
        ["--port", "9000", "--device", "cpu", "--", "--dtype", "bf16"], env
    )
    assert (args.port, args.device) == (9000, "cpu")  # the command line wins
    assert engine_args == ["--dtype", "bf16"]

    env["MODELSHIP_RUNTIME_ENGINE_ARGS"] = "--max-model-len 2048 --enforce-eager"
    assert parse_args([], env)[1] == ["--max-model-len", "2048", "--enforce-eager"]


def test_entry_point_requires_a_source() -> None:
    from modelship.runtime.main import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model-dir", "/m"], {})


def test_stop_during_startup_is_enforced_after_the_grace() -> None:
    # vLLM ignores SIGTERM while its engine starts; the supervisor must not wait forever.
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + (
        "print('starting', flush=True)\nwhile True: time.sleep(0.05)\n"
    )
    process = VllmProcess(
        LaunchSpec(Path("/m"), "m", engine_args=[], port=1),
        log=io.StringIO(),
        command=[sys.executable, "-c", stubborn],
    )
    process.start()
    time.sleep(0.3)
    process.request_stop(signal.SIGTERM)
    with pytest.raises(LaunchError, match="stop requested"):
        process.wait_until_healthy(30, interval_seconds=0.1)
    started = time.monotonic()
    assert process.wait_after_stop(grace_seconds=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_options_unknown_to_modelship_are_left_to_vllm_but_pod_flags_are_not() -> None:
    # An image's vLLM may know options modelship's table does not: vLLM judges those itself.
    unknown = LaunchSpec(Path("/m"), "m", engine_args=["--some-newer-option", "1"])
    assert build_command(unknown)[3:5] == ["--some-newer-option", "1"]
    for flag in ("--served_model_name", "--mod", "--port=1"):
        spec = LaunchSpec(Path("/m"), "m", engine_args=["--some-newer-option", "1", flag, "x"])
        with pytest.raises(LaunchError, match="set by the runtime"):
            build_command(spec)
