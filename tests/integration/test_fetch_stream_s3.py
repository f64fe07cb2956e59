"""Preparing a model for streaming (`--weights stream`) against a real SeaweedFS server on
127.0.0.1 (tests/servers/seaweed.py): the same selection and verification as a fetch, without
landing the weights."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from modelship.operator.source import parse_source
from modelship.runtime.fetch import FetchError, prepare_stream
from modelship.runtime.tinymodel import build_tiny_model

from tests.servers.seaweed import S3Server

pytestmark = pytest.mark.integration


def _upload_dir(server: S3Server, directory: Path, prefix: str) -> None:
    client = server.client()
    for path in directory.iterdir():
        client.put_object(Bucket="models", Key=prefix + path.name, Body=path.read_bytes())


def test_stream_fetches_config_and_tokenizer_and_checks_every_shard(
    s3_env: S3Server, tmp_path: Path
) -> None:
    model = build_tiny_model(tmp_path / "tiny", num_shards=2)
    prefix = f"stream-{uuid.uuid4().hex[:8]}/"
    _upload_dir(s3_env, model, prefix)
    s3_env.client().put_object(Bucket="models", Key=prefix + "optimizer.pt", Body=b"pickle")
    report = prepare_stream(
        parse_source(f"s3://models/{prefix}"), tmp_path / "local", endpoint_url=s3_env.endpoint_url
    )
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert [w.key for w in report.weights] == shards
    assert set(report.weight_etags) == set(shards)
    local = tmp_path / "local"
    assert (local / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (local / "tokenizer.json").is_file()
    assert not list(local.glob("*.safetensors")) and not (local / "optimizer.pt").exists()
    assert report.local.verification["config.json"] == "md5"
    header_and_length = sum(
        8 + int.from_bytes((model / s).read_bytes()[:8], "little") for s in shards
    )
    total = sum((model / s).stat().st_size for s in shards)
    assert report.tensor_bytes == total - header_and_length


def test_stream_refuses_truncated_shards_pickles_and_missing_tokenizers(
    s3_env: S3Server, tmp_path: Path
) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    client = s3_env.client()
    source = parse_source

    truncated = f"stream-{uuid.uuid4().hex[:8]}/"
    _upload_dir(s3_env, model, truncated)
    whole = (model / "model.safetensors").read_bytes()
    client.put_object(Bucket="models", Key=truncated + "model.safetensors", Body=whole[:-100])
    with pytest.raises(FetchError, match=r"describes \d+ bytes of tensors but the object holds"):
        prepare_stream(
            source(f"s3://models/{truncated}"), tmp_path / "a", endpoint_url=s3_env.endpoint_url
        )

    pickled = f"stream-{uuid.uuid4().hex[:8]}/"
    for name in ("config.json", "tokenizer.json"):
        client.put_object(Bucket="models", Key=pickled + name, Body=(model / name).read_bytes())
    client.put_object(Bucket="models", Key=pickled + "pytorch_model.bin", Body=b"pickle")
    with pytest.raises(Exception, match=r"pickle|safetensors"):
        prepare_stream(
            source(f"s3://models/{pickled}"), tmp_path / "b", endpoint_url=s3_env.endpoint_url
        )

    no_tokenizer = f"stream-{uuid.uuid4().hex[:8]}/"
    for name in ("config.json", "model.safetensors"):
        client.put_object(
            Bucket="models", Key=no_tokenizer + name, Body=(model / name).read_bytes()
        )
    with pytest.raises(FetchError, match="no tokenizer"):
        prepare_stream(
            source(f"s3://models/{no_tokenizer}"), tmp_path / "c", endpoint_url=s3_env.endpoint_url
        )
    with pytest.raises(FetchError, match="only s3:// models can be streamed"):
        prepare_stream(source(f"file://{model}"), tmp_path / "d")
