"""The runtime's --weights option: when it streams, and the vLLM command line it streams with."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from modelship.runtime.checksums import Checksum, crc, crc_combine_all
from modelship.runtime.launch import LaunchError, LaunchSpec, build_command
from modelship.runtime.main import parse_args, stream_command, stream_environment, weights_mode


def _args(*extra: str) -> object:
    args, _ = parse_args(["--source", "s3://models/llama", "--model-dir", "/m", *extra], env={})
    return args


def test_land_is_the_default_and_auto_streams_only_s3_without_a_node_cache() -> None:
    assert weights_mode(_args()) == "land"
    assert weights_mode(_args("--weights", "stream")) == "stream"
    assert weights_mode(_args("--weights", "auto")) == "stream"
    cached, _ = parse_args(
        ["--source", "s3://models/llama", "--node-cache", "/cache", "--weights", "auto"], env={}
    )
    assert weights_mode(cached) == "land"
    volume, _ = parse_args(
        ["--source", "efs://claim/llama", "--model-dir", "/m", "--weights", "auto"], env={}
    )
    assert weights_mode(volume) == "land"
    from_env, _ = parse_args(
        ["--source", "s3://models/llama", "--model-dir", "/m"],
        env={"MODELSHIP_RUNTIME_WEIGHTS": "stream"},
    )
    assert weights_mode(from_env) == "stream"


def test_stream_command_points_vllm_at_s3_and_the_local_tokenizer() -> None:
    spec = LaunchSpec(
        model_dir=Path("/m"), served_model_name="llama", engine_args=["--dtype", "bf16"]
    )
    command = stream_command(build_command(spec), "s3://models/llama/", Path("/m"))
    assert command[command.index("--model") + 1] == "s3://models/llama/"
    assert command[-4:] == ["--load-format", "runai_streamer", "--tokenizer", "/m"]
    assert "--dtype" in command


def test_stream_command_refuses_a_load_format_in_the_engine_args() -> None:
    spec = LaunchSpec(
        model_dir=Path("/m"), served_model_name="llama", engine_args=["--load-format=safetensors"]
    )
    with pytest.raises(LaunchError, match="--load-format is set by the runtime"):
        stream_command(build_command(spec), "s3://models/llama/", Path("/m"))


def test_stream_environment_addresses_a_custom_endpoint_by_path() -> None:
    env = stream_environment({"AWS_REGION": "us-east-1"}, "http://127.0.0.1:8333")
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert stream_environment({}, None) == {}


def test_crcs_combined_from_parts_equal_the_whole() -> None:
    data = bytes(range(256)) * 4099
    cuts = [0, 1000, 65536, 300000, len(data)]
    for algorithm in ("crc32", "crc32c", "crc64nvme"):
        pieces = [(crc(algorithm, data[a:b]), b - a) for a, b in itertools.pairwise(cuts)]
        assert crc_combine_all(algorithm, pieces) == crc(algorithm, data)


def test_composite_crc_is_the_crc_of_the_part_crcs() -> None:
    # As S3 computes it: CRC over the big-endian part CRCs, base64, then "-<parts>".
    checksum = Checksum("crc32c-composite", "", 4)
    text = checksum.combine_crcs([1, 2])
    assert text.endswith("-2")
    assert text.split("-")[0] == Checksum("crc32c", "", 8).combine_crcs(
        [crc("crc32c", (1).to_bytes(4, "big") + (2).to_bytes(4, "big"))]
    )
