"""Crash safety and store checksums of the runtime's S3 fetch, against a real SeaweedFS server on
127.0.0.1 (tests/servers/seaweed.py).

A node crash can leave a file whose size is right but whose bytes never reached the disk
(preallocated blocks read back as zeros). The fetch flushes before it renames or records, and
trusts only what it recorded as committed; these tests build the states a crash leaves and check
that none of them is served.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from awscrt import checksums as crt
from modelship.operator.source import parse_source
from modelship.runtime.fetch import MANIFEST_NAME, fetch_model

from tests.servers.seaweed import S3Server

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()


def new_prefix() -> str:
    return f"durable-{uuid.uuid4().hex[:10]}/"


def fetch(server: S3Server, prefix: str, dest: Path, **options: Any) -> Any:
    options.setdefault("progress_interval_seconds", 0.5)
    return fetch_model(
        parse_source(f"s3://models/{prefix}"), dest, endpoint_url=server.endpoint_url, **options
    )


def test_a_manifest_entry_that_was_never_committed_is_not_trusted(
    s3_env: S3Server, tmp_path: Path
) -> None:
    """The state an unflushed rename leaves after a crash: manifest entry, right size, zeros."""
    client = s3_env.client()
    prefix = new_prefix()
    blob = os.urandom(6 * MIB)
    client.put_object(Bucket="models", Key=prefix + "config.json", Body=CONFIG)
    client.put_object(Bucket="models", Key=prefix + "model.safetensors", Body=blob)
    dest = tmp_path / "model"
    fetch(s3_env, prefix, dest, verify_checksums=False)
    manifest_path = dest / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    assert manifest["files"]["model.safetensors"]["committed"] is True

    # As a runtime that renamed without flushing recorded it; the crash zeroed the bytes.
    for entry in manifest["files"].values():
        del entry["committed"]
    manifest_path.write_text(json.dumps(manifest))
    (dest / "model.safetensors").write_bytes(b"\0" * len(blob))

    report = fetch(s3_env, prefix, dest, verify_checksums=False)
    assert report.cache_hits == 0
    assert set(report.fetched_files) == {"config.json", "model.safetensors"}
    assert (dest / "model.safetensors").read_bytes() == blob
    # Committed now: the next fetch trusts it without a byte transferred.
    again = fetch(s3_env, prefix, dest, verify_checksums=False)
    assert again.cache_hits == 2 and again.bytes_fetched == 0


def _b64(value: int, width: int) -> str:
    return base64.b64encode(value.to_bytes(width, "big")).decode()


def _upload_full_object_crc(client: Any, key: str, blob: bytes, algorithm: str) -> None:
    """Multipart upload (5 MiB parts) with a FULL_OBJECT CRC, as current AWS SDKs upload."""
    compute, width = {"CRC64NVME": (crt.crc64nvme, 8), "CRC32C": (crt.crc32c, 4)}[algorithm]
    upload_id = client.create_multipart_upload(
        Bucket="models", Key=key, ChecksumAlgorithm=algorithm, ChecksumType="FULL_OBJECT"
    )["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(blob), 5 * MIB), start=1):
        body = blob[start : start + 5 * MIB]
        response = client.upload_part(
            Bucket="models",
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            **{"ChecksumAlgorithm": algorithm, f"Checksum{algorithm}": _b64(compute(body), width)},
        )
        parts.append(
            {
                "PartNumber": number,
                "ETag": response["ETag"],
                f"Checksum{algorithm}": response[f"Checksum{algorithm}"],
            }
        )
    client.complete_multipart_upload(
        Bucket="models",
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": parts},
        ChecksumType="FULL_OBJECT",
        **{f"Checksum{algorithm}": _b64(compute(blob), width)},
    )


def test_store_crcs_are_used_instead_of_md5(s3_env: S3Server, tmp_path: Path) -> None:
    """Full-object CRC64NVME and CRC32C, a single-part CRC32C and boto3's composite CRC32 are
    each verified from per-part CRCs; an object with no checksum keeps its MD5 ETag."""
    client = s3_env.client()
    prefix = new_prefix()
    blobs = {name: os.urandom(13 * MIB + 77) for name in ("a", "b", "c", "d", "e")}
    client.put_object(Bucket="models", Key=prefix + "config.json", Body=CONFIG)
    _upload_full_object_crc(client, prefix + "a.safetensors", blobs["a"], "CRC64NVME")
    _upload_full_object_crc(client, prefix + "b.safetensors", blobs["b"], "CRC32C")
    client.put_object(
        Bucket="models", Key=prefix + "c.safetensors", Body=blobs["c"], ChecksumAlgorithm="CRC32C"
    )
    source = tmp_path / "d.safetensors"
    source.write_bytes(blobs["d"])
    # boto3's managed upload (8 MiB parts) with its default checksum: a COMPOSITE CRC32 here.
    uploader = s3_env.client()
    uploader.meta.config.request_checksum_calculation = "when_supported"
    uploader.upload_file(str(source), "models", prefix + "d.safetensors")
    client.put_object(Bucket="models", Key=prefix + "e.safetensors", Body=blobs["e"])
    head = client.head_object(Bucket="models", Key=prefix + "d.safetensors", ChecksumMode="ENABLED")
    assert head.get("ChecksumType") == "COMPOSITE" and "ChecksumCRC32" in head

    report = fetch(s3_env, prefix, tmp_path / "model", part_size_bytes=3 * MIB)
    assert report.verification == {
        "config.json": "md5",
        "a.safetensors": "crc64nvme",
        "b.safetensors": "crc32c",
        "c.safetensors": "crc32c",
        "d.safetensors": "crc32-composite",
        "e.safetensors": "md5",
    }
    assert report.verification_failures == 0
    for name, blob in blobs.items():
        assert (tmp_path / "model" / f"{name}.safetensors").read_bytes() == blob
