"""Model inspection over S3 against a real SeaweedFS server (tests/servers/seaweed.py) on
127.0.0.1: the same ModelInfo as a local read, from header bytes only.

Bytes are counted where they arrive: botocore's `after-call.s3.GetObject` event hands over
each HTTP response, whose Content-Length is what the server sent for that GetObject.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import torch
from modelship.operator.modelinfo import HEADER_PROBE_BYTES, ModelInfoError, inspect_model
from modelship.operator.source import parse_source
from safetensors.torch import save_file

from tests.servers.seaweed import S3Server
from tests.unit.configs import LLAMA_3_8B

pytestmark = pytest.mark.integration

BIG_SHARD_DATA_BYTES = 200_000_000
TINY = {
    **LLAMA_3_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
}


def write_sparse_shard(path: Path, tensor: str, data_bytes: int) -> None:
    """A valid safetensors file of one F16 tensor whose data is a sparse hole of zeros."""
    header = {tensor: {"dtype": "F16", "shape": [data_bytes // 2], "data_offsets": [0, data_bytes]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(raw)) + raw)
        file.truncate(8 + len(raw) + data_bytes)


def build_package(root: Path) -> Path:
    """A two-shard package: small real tensors, and a 200 MB shard that must not be fetched."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(TINY))
    (root / "tokenizer.json").write_text("{}")
    h, vocab = TINY["hidden_size"], TINY["vocab_size"]
    small = {
        "model.embed_tokens.weight": torch.zeros(vocab, h, dtype=torch.bfloat16),
        "model.norm.weight": torch.zeros(h, dtype=torch.bfloat16),
        "lm_head.weight": torch.zeros(vocab, h, dtype=torch.bfloat16),
    }
    save_file(small, str(root / "model-00001-of-00002.safetensors"))
    big = "model.layers.0.mlp.experts.weight"
    write_sparse_shard(root / "model-00002-of-00002.safetensors", big, BIG_SHARD_DATA_BYTES)
    weight_map = dict.fromkeys(small, "model-00001-of-00002.safetensors")
    weight_map[big] = "model-00002-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


class GetObjectLog:
    """Every GetObject response: key, HTTP status, bytes sent (Content-Length)."""

    def __init__(self) -> None:
        self.responses: list[tuple[str, int, int]] = []

    def __call__(self, http_response: Any, **_: Any) -> None:
        key = unquote(urlparse(http_response.url).path).split("/", 2)[2]
        length = int(http_response.headers.get("content-length", 0))
        self.responses.append((key, http_response.status_code, length))

    def bytes_for(self, suffix: str) -> int:
        return sum(length for key, _, length in self.responses if key.endswith(suffix))


@pytest.fixture(scope="module")
def uploaded(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_package(tmp_path_factory.mktemp("modelinfo") / "tiny")
    client = s3_server.client()
    for path in sorted(root.iterdir()):
        client.upload_file(str(path), s3_server.bucket, f"inspect/tiny/{path.name}")
    return root


def test_s3_inspection_matches_local_and_reads_only_headers(
    s3_server: S3Server, uploaded: Path
) -> None:
    client = s3_server.client()
    log = GetObjectLog()
    client.meta.events.register("after-call.s3.GetObject", log)

    over_s3 = inspect_model(parse_source(f"s3://{s3_server.bucket}/inspect/tiny"), client=client)
    local = inspect_model(parse_source(f"file://{uploaded}"))

    assert over_s3 == local
    assert over_s3.parameters == BIG_SHARD_DATA_BYTES // 2 + 2 * 256 * 64 + 64
    shard_bytes = sum(p.stat().st_size for p in uploaded.glob("*.safetensors"))
    assert over_s3.checkpoint_bytes is not None and over_s3.checkpoint_bytes > BIG_SHARD_DATA_BYTES
    # Shards were read only with ranged GETs (206), one probe each: never the weights.
    shard_responses = [r for r in log.responses if r[0].endswith(".safetensors")]
    assert sorted(key for key, _, _ in shard_responses) == [
        "inspect/tiny/model-00001-of-00002.safetensors",
        "inspect/tiny/model-00002-of-00002.safetensors",
    ]
    assert all(status == 206 for _, status, _ in shard_responses)
    big_shard_read = log.bytes_for("model-00002-of-00002.safetensors")
    assert big_shard_read <= HEADER_PROBE_BYTES
    total_read = sum(length for _, _, length in log.responses)
    assert total_read < 2 * HEADER_PROBE_BYTES + 10_000
    assert total_read < shard_bytes / 100
    print(f"read {total_read} bytes over S3 for a {shard_bytes}-byte checkpoint")


def test_an_unchanged_package_is_read_once_and_a_rewritten_one_again(
    s3_server: S3Server, uploaded: Path
) -> None:
    """A thousand ModelDeployments of one model read its headers once; a file rewritten in
    place (a new ETag, whatever its size) is read again."""
    client = s3_server.client()
    prefix = "inspect/cached"
    for path in sorted(uploaded.iterdir()):
        client.upload_file(str(path), s3_server.bucket, f"{prefix}/{path.name}")
    log = GetObjectLog()
    client.meta.events.register("after-call.s3.GetObject", log)
    source = parse_source(f"s3://{s3_server.bucket}/{prefix}")

    first = inspect_model(source, client=client)
    read_first = len(log.responses)
    assert read_first >= 3  # config.json and a header probe per shard
    assert inspect_model(source, client=client) == first
    assert len(log.responses) == read_first  # the listing alone

    # The same length, another value: only the ETag tells.
    config = json.loads((uploaded / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    text = json.dumps({**config, "num_hidden_layers": 3})
    assert len(text) == len((uploaded / "config.json").read_text())
    client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/config.json", Body=text.encode())
    changed = inspect_model(source, client=client)
    assert len(log.responses) == 2 * read_first
    assert changed.num_layers == 3 and first.num_layers == 2


def test_s3_endpoint_from_environment(
    s3_env: S3Server, uploaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    info = inspect_model(parse_source(f"s3://{s3_env.bucket}/inspect/tiny/"))
    assert info == inspect_model(parse_source(f"file://{uploaded}"))


def test_s3_errors_name_the_uri_and_fix(s3_env: S3Server, uploaded: Path) -> None:
    endpoint = s3_env.endpoint_url
    with pytest.raises(ModelInfoError, match=r"s3://no-such-bucket-here/x/: .*NoSuchBucket"):
        inspect_model(parse_source("s3://no-such-bucket-here/x"), endpoint_url=endpoint)
    with pytest.raises(ModelInfoError, match=r"s3://models/inspect/none/: holds no files"):
        inspect_model(parse_source("s3://models/inspect/none"), endpoint_url=endpoint)


def test_an_operator_without_aws_credentials_is_told_what_to_do(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import boto3

    # boto3's default session keeps the credentials it resolved for earlier tests: start afresh.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    with pytest.raises(ModelInfoError) as error:
        inspect_model(parse_source("s3://models/any/"), endpoint_url=s3_server.endpoint_url)
    message = str(error.value)
    assert "no AWS credentials" in message
    assert "serviceAccount.annotations" in message and "Pod Identity" in message
    assert not error.value.transient


def test_a_store_that_does_not_answer_is_transient(tmp_path: Path) -> None:
    from modelship.runtime.demo import free_port

    with pytest.raises(ModelInfoError) as error:
        inspect_model(
            parse_source("s3://models/any/"), endpoint_url=f"http://127.0.0.1:{free_port()}"
        )
    assert error.value.transient, str(error.value)
    assert "retrying" in str(error.value)
