"""FetchReport.file_etags from SeaweedFS (`s3_server`): each object's ETag as the store reports
it, so two checkpoints with the same shapes never share a Neuron compile-cache key."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from modelship.operator.source import parse_source
from modelship.runtime.fetch import fetch_model
from modelship.runtime.neuron_cache import cache_key_for
from modelship.runtime.tinymodel import build_tiny_model

from tests.servers.seaweed import S3Server

pytestmark = pytest.mark.integration

ENGINE_ARGS = ["--tensor-parallel-size", "2", "--max-model-len", "1024", "--max-num-seqs", "4"]
ENV = {"NEURON_SDK_VERSION": "2.29.0"}


def test_s3_etags_reach_the_cache_key(s3_env: S3Server, tmp_path: Path) -> None:
    client = s3_env.client()
    digests, without_etags = [], []
    for seed in (0, 1):
        model = build_tiny_model(tmp_path / f"src-{seed}", seed=seed)
        prefix = f"etags-{uuid.uuid4().hex[:8]}/"
        for path in model.iterdir():
            client.put_object(Bucket=s3_env.bucket, Key=prefix + path.name, Body=path.read_bytes())
        report = fetch_model(
            parse_source(f"s3://{s3_env.bucket}/{prefix}", field="uri"),
            tmp_path / f"dest-{seed}",
            endpoint_url=s3_env.endpoint_url,
        )
        head = client.head_object(Bucket=s3_env.bucket, Key=prefix + "model.safetensors")
        assert report.file_etags["model.safetensors"] == head["ETag"].strip('"')
        assert set(report.file_etags) == {selected.key for selected in report.files}
        without_etags.append(cache_key_for(report.model_dir, ENGINE_ARGS, env=ENV).digest)
        digests.append(
            cache_key_for(report.model_dir, ENGINE_ARGS, etags=report.file_etags, env=ENV).digest
        )
    assert without_etags[0] == without_etags[1]  # same shapes: only the ETags tell them apart
    assert digests[0] != digests[1]
