"""The runtime's S3 fetch against a real SeaweedFS server on 127.0.0.1 (tests/servers/seaweed.py),
with faults injected by a real proxy in front of it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from modelship.operator.source import parse_source
from modelship.runtime.checksums import crc
from modelship.runtime.fetch import JOURNAL_SUFFIX, PARTIAL_SUFFIX, FetchError, fetch_model
from modelship.runtime.metrics import RuntimeMetrics
from modelship.runtime.selection import UnsafeKeyError

from tests.servers.seaweed import FaultProxy, S3Server

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()


def new_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}/"


def upload(client: Any, prefix: str, files: dict[str, bytes], **extra: Any) -> None:
    for name, body in files.items():
        client.put_object(Bucket="models", Key=prefix + name, Body=body, **extra)


def upload_repeated(client: Any, key: str, part: bytes, parts: int) -> None:
    """A multipart object made of `parts` copies of `part` (fast to make, AWS-style ETag)."""
    upload_id = client.create_multipart_upload(Bucket="models", Key=key)["UploadId"]
    etags = []
    for number in range(1, parts + 1):
        response = client.upload_part(
            Bucket="models", Key=key, UploadId=upload_id, PartNumber=number, Body=part
        )
        etags.append({"PartNumber": number, "ETag": response["ETag"]})
    client.complete_multipart_upload(
        Bucket="models", Key=key, UploadId=upload_id, MultipartUpload={"Parts": etags}
    )


def small_model(shards: int = 2, shard_bytes: int = 256 * 1024) -> dict[str, bytes]:
    files = {
        f"model-{i:05d}-of-{shards:05d}.safetensors": os.urandom(shard_bytes) for i in range(shards)
    }
    files.update(
        {
            "config.json": CONFIG,
            "tokenizer.json": b'{"version": "1.0"}',
            "README.md": b"# a model",
            "optimizer.pt": os.urandom(1000),
        }
    )
    return files


def fetch(
    server: S3Server, prefix: str, dest: Path, endpoint_url: str | None = None, **options: Any
) -> Any:
    options.setdefault("retry_base_seconds", 0.01)
    options.setdefault("progress_interval_seconds", 0.5)
    return fetch_model(
        parse_source(f"s3://models/{prefix}"),
        dest,
        endpoint_url=endpoint_url or server.endpoint_url,
        **options,
    )


def sample(metrics: RuntimeMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_many_shards_are_fetched_verified_and_counted(s3_env: S3Server, tmp_path: Path) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    files = small_model(shards=40)
    upload(client, prefix, files)
    metrics = RuntimeMetrics()
    report = fetch(s3_env, prefix, tmp_path / "model", metrics=metrics, part_size_bytes=64 * 1024)

    expected = {name for name in files if name not in ("README.md", "optimizer.pt")}
    assert {f.key for f in report.files} == expected
    assert set(report.fetched_files) == expected
    for name in expected:
        assert (tmp_path / "model" / name).read_bytes() == files[name]
    assert not (tmp_path / "model" / "README.md").exists()
    assert {(s.key, s.reason) for s in report.skipped} == {
        ("README.md", "unrelated"),
        ("optimizer.pt", "training_state"),
    }
    assert set(report.verification.values()) == {"md5"}
    total = sum(len(files[name]) for name in expected)
    assert report.bytes_fetched == report.bytes_total == total
    assert report.model_dir == (tmp_path / "model").resolve()
    assert not list((tmp_path / "model").glob("*" + PARTIAL_SUFFIX + "*"))
    assert sample(metrics, "modelship_runtime_fetch_bytes_total") == total
    assert sample(metrics, "modelship_runtime_fetch_expected_bytes") == total
    assert sample(metrics, "modelship_runtime_fetch_files_skipped_total", reason="unrelated") == 1
    assert sample(metrics, "modelship_runtime_fetch_seconds") > 0


def test_second_fetch_is_all_cache_hits_and_a_changed_object_is_fetched_again(
    s3_env: S3Server, tmp_path: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    files = small_model(shards=3)
    upload(client, prefix, files)
    first = fetch(s3_env, prefix, tmp_path / "model")
    metrics = RuntimeMetrics()
    second = fetch(s3_env, prefix, tmp_path / "model", metrics=metrics)
    assert second.bytes_fetched == 0
    assert second.cache_hits == len(first.files) == 5
    assert second.bytes_reused == first.bytes_total
    assert second.fetched_files == ()
    assert sample(metrics, "modelship_runtime_fetch_cache_hits_total") == 5

    changed = os.urandom(300 * 1024)
    upload(client, prefix, {"model-00001-of-00003.safetensors": changed})
    third = fetch(s3_env, prefix, tmp_path / "model")
    assert third.fetched_files == ("model-00001-of-00003.safetensors",)
    assert third.bytes_fetched == len(changed)
    assert (tmp_path / "model" / "model-00001-of-00003.safetensors").read_bytes() == changed


def test_sha256_checksum_is_used_when_the_store_keeps_one(s3_env: S3Server, tmp_path: Path) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    upload(client, prefix, small_model(shards=1), ChecksumAlgorithm="SHA256")
    report = fetch(s3_env, prefix, tmp_path / "model")
    assert set(report.verification.values()) == {"sha256"}
    unverified = fetch(s3_env, prefix, tmp_path / "other", verify_checksums=False)
    assert set(unverified.verification.values()) == {"size"}


def test_large_multipart_object_resumes_after_a_killed_fetch(
    s3_env: S3Server, tmp_path: Path
) -> None:
    """2 GiB of 32 x 64 MiB parts: a fetch killed mid-way resumes from its journal."""
    client = s3_env.client()
    prefix = new_prefix()
    part = os.urandom(MIB) * 64
    parts = 32
    upload(client, prefix, {"config.json": CONFIG})
    upload_repeated(client, prefix + "model.safetensors", part, parts)
    size = len(part) * parts
    dest = tmp_path / "model"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from modelship.operator.source import parse_source\n"
        "from modelship.runtime.fetch import fetch_model\n"
        f"fetch_model(parse_source('s3://models/{prefix}'), Path({str(dest)!r}), "
        f"endpoint_url={s3_env.endpoint_url!r}, max_connections=2, part_size_bytes=16 * 2**20)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    journal = dest / ("model.safetensors" + JOURNAL_SUFFIX)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the fetch finished before it could be killed"
            if journal.exists() and len(journal.read_text().splitlines()) > 1 + 40:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert (dest / ("model.safetensors" + PARTIAL_SUFFIX)).exists()
    assert not (dest / "model.safetensors").exists()

    report = fetch(s3_env, prefix, dest, max_connections=8, part_size_bytes=16 * MIB)
    path = dest / "model.safetensors"
    assert path.stat().st_size == size
    assert report.verification["model.safetensors"] == "md5-multipart"
    assert report.verification_failures == 0
    assert report.bytes_reused >= 40 * 16 * MIB
    assert report.bytes_fetched <= size - 40 * 16 * MIB
    # The fetch checked the store's multipart ETag; check sampled ranges independently too.
    with path.open("rb") as file:
        for index in (0, 7, 19, 31):
            file.seek(index * len(part) + 12345)
            assert file.read(MIB) == part[12345 : 12345 + MIB]
    assert not journal.exists()


def test_corrupted_partial_is_detected_and_fetched_again(
    s3_env: S3Server, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    blob = os.urandom(32 * MIB)
    upload(client, prefix, {"config.json": CONFIG, "model.safetensors": blob})
    dest = tmp_path / "model"
    # First run: every GET of the weights fails, leaving a preallocated partial and a journal.
    s3_proxy.inject("status", 1000, match=f"GET /models/{prefix}model.safetensors", status=503)
    with pytest.raises(FetchError):
        fetch(
            s3_env,
            prefix,
            dest,
            endpoint_url=s3_proxy.endpoint_url,
            retry_attempts=2,
            part_size_bytes=4 * MIB,
            max_connections=1,
        )
    s3_proxy.clear()
    partial = dest / ("model.safetensors" + PARTIAL_SUFFIX)
    journal = dest / ("model.safetensors" + JOURNAL_SUFFIX)
    assert partial.exists() and journal.exists()
    header = json.loads(journal.read_text().splitlines()[0])
    # The journal says parts 0 and 1 were committed, with the right CRCs, but the disk holds the
    # preallocated zeros: what a crash leaves if a journal line ever got ahead of its data.
    with journal.open("a") as file:
        for index in (0, 1):
            part = blob[index * 4 * MIB : (index + 1) * 4 * MIB]
            file.write(f"{index} {crc(header['part_crc'], part)}\n")
    assert header["size_bytes"] == len(blob)
    assert partial.read_bytes()[: 8 * MIB] == b"\x00" * (8 * MIB)

    metrics = RuntimeMetrics()
    # Size-only verification: the journal's CRCs alone must catch the zeros.
    report = fetch(
        s3_env, prefix, dest, metrics=metrics, part_size_bytes=4 * MIB, verify_checksums=False
    )
    assert report.verification_failures == 1
    assert report.bytes_reused == len(CONFIG) and report.bytes_fetched == len(blob)
    assert sample(metrics, "modelship_runtime_fetch_verification_failures_total") == 1
    assert (dest / "model.safetensors").read_bytes() == blob


def test_data_altered_on_the_wire_fails_verification_twice(
    s3_env: S3Server, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    upload(client, prefix, {"config.json": CONFIG, "model.safetensors": os.urandom(3 * MIB)})
    s3_proxy.inject("corrupt", 1000, match=f"GET /models/{prefix}model.safetensors")
    with pytest.raises(FetchError, match=r"model.safetensors: failed verification twice.*md5"):
        fetch(s3_env, prefix, tmp_path / "model", endpoint_url=s3_proxy.endpoint_url)
    assert s3_proxy.served_faults["corrupt"] >= 2
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_throttling_and_server_errors_are_retried(
    s3_env: S3Server, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    blob = os.urandom(8 * MIB)
    upload(client, prefix, {"config.json": CONFIG, "model.safetensors": blob})
    match = f"GET /models/{prefix}model.safetensors"
    s3_proxy.inject("status", 3, match=match, status=503)
    s3_proxy.inject("status", 2, match=match, status=500)
    s3_proxy.inject("status", 1, match="list-type=2", status=503)
    metrics = RuntimeMetrics()
    report = fetch(
        s3_env, prefix, tmp_path / "model", endpoint_url=s3_proxy.endpoint_url, metrics=metrics
    )
    assert s3_proxy.served_faults == {"status": 6}
    assert report.retries == 6
    assert sample(metrics, "modelship_runtime_fetch_retries_total") == 6
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == blob


def test_connections_reset_mid_body_are_retried(
    s3_env: S3Server, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    blob = os.urandom(12 * MIB)
    upload(client, prefix, {"config.json": CONFIG, "model.safetensors": blob})
    s3_proxy.inject("reset", 3, match=f"GET /models/{prefix}model.safetensors")
    report = fetch(
        s3_env,
        prefix,
        tmp_path / "model",
        endpoint_url=s3_proxy.endpoint_url,
        part_size_bytes=4 * MIB,
    )
    assert s3_proxy.served_faults == {"reset": 3}
    assert report.retries == 3
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == blob


def test_persistent_errors_give_up_with_a_clear_message(
    s3_env: S3Server, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    upload(client, prefix, {"config.json": CONFIG, "model.safetensors": os.urandom(MIB)})
    s3_proxy.inject("status", 1000, match=f"GET /models/{prefix}model.safetensors", status=503)
    with pytest.raises(FetchError) as raised:
        fetch(s3_env, prefix, tmp_path / "m", endpoint_url=s3_proxy.endpoint_url, retry_attempts=3)
    message = str(raised.value)
    assert f"s3://models/{prefix}model.safetensors" in message
    assert "still failing after 3 attempts" in message and "SlowDown" in message


def test_wrong_credentials_and_missing_prefix_are_explained(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FetchError, match="no objects under this prefix"):
        fetch(s3_env, new_prefix(), tmp_path / "m")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(FetchError, match=r"credentials were rejected|access denied"):
        fetch(s3_env, new_prefix(), tmp_path / "m")


def test_keys_escaping_the_directory_and_symlinks_are_refused(
    s3_env: S3Server, tmp_path: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    # SeaweedFS itself refuses '..' keys (the selection layer is unit-tested for them).
    with pytest.raises(ClientError):
        client.put_object(Bucket="models", Key=prefix + "../escape.safetensors", Body=b"x")
    upload(client, prefix, small_model(shards=1))
    outside = tmp_path / "outside.json"
    outside.write_text("untouched")
    dest = tmp_path / "model"
    dest.mkdir()
    os.symlink(outside, dest / "config.json")
    with pytest.raises(UnsafeKeyError, match="symlink"):
        fetch(s3_env, prefix, dest)
    assert outside.read_text() == "untouched"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 20 MiB tmpfs here ({result.stderr.strip()}); needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_is_detected_before_downloading(
    s3_env: S3Server, s3_proxy: FaultProxy, tiny_tmpfs: Path
) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    upload(client, prefix, {"config.json": CONFIG, "model.safetensors": os.urandom(30 * MIB)})
    with pytest.raises(FetchError, match=r"not enough free space: 2 files need 3145\d+ more bytes"):
        fetch(s3_env, prefix, tiny_tmpfs / "model", endpoint_url=s3_proxy.endpoint_url)
    assert any(line.startswith("HEAD") for line in s3_proxy.request_lines)
    assert not any(
        line.startswith("GET /models/" + prefix + "model") for line in s3_proxy.request_lines
    )
    assert not list((tiny_tmpfs / "model").iterdir())


def test_manifest_digest_matches_the_files(s3_env: S3Server, tmp_path: Path) -> None:
    client = s3_env.client()
    prefix = new_prefix()
    files = small_model(shards=2)
    upload(client, prefix, files)
    fetch(s3_env, prefix, tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / ".modelship-fetch.json").read_text())["files"]
    for name, entry in manifest.items():
        assert entry["version"] == hashlib.md5(files[name]).hexdigest()
        assert entry["size_bytes"] == len(files[name])
