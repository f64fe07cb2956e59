"""The runtime's fetch from mounted volumes (fsx://, efs://) and local directories, with a real
directory tree standing in for the PersistentVolumeClaim mount."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from modelship.operator.source import parse_source
from modelship.runtime.checksums import crc
from modelship.runtime.fetch import PARTIAL_SUFFIX, FetchError, fetch_model
from modelship.runtime.metrics import RuntimeMetrics
from modelship.runtime.selection import SelectionError

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def make_model(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True)
    files = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "model-00001-of-00002.safetensors": os.urandom(3 * MIB + 17),
        "model-00002-of-00002.safetensors": os.urandom(MIB),
    }
    for name, body in files.items():
        (root / name).write_bytes(body)
    (root / "README.md").write_text("# model")
    (root / "optimizer.pt").write_bytes(b"state")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")
    return files


def test_efs_model_is_served_in_place(tmp_path: Path) -> None:
    mount_root = tmp_path / "mnt"
    files = make_model(mount_root / "models" / "llama")
    metrics = RuntimeMetrics()
    report = fetch_model(
        parse_source("efs://shared-models/models/llama"),
        tmp_path / "unused",
        mount_root=mount_root,
        metrics=metrics,
    )
    assert report.served_in_place
    assert report.model_dir == mount_root / "models" / "llama"
    assert {f.key for f in report.files} == set(files)
    assert {(s.key, s.reason) for s in report.skipped} == {
        ("README.md", "unrelated"),
        ("optimizer.pt", "training_state"),
        (".git/", "hidden"),
    }
    assert report.bytes_fetched == 0
    assert not (tmp_path / "unused").exists()
    value = metrics.registry.get_sample_value(
        "modelship_runtime_fetch_files_skipped_total", {"reason": "training_state"}
    )
    assert value == 1


def test_fsx_model_is_copied_to_local_disk_and_reused(tmp_path: Path) -> None:
    mount_root = tmp_path / "mnt"
    files = make_model(mount_root / "llama")
    dest = tmp_path / "local"
    source = parse_source("fsx://lustre-claim/llama")
    report = fetch_model(
        source, dest, mount_root=mount_root, copy_to_local=True, part_size_bytes=MIB
    )
    assert not report.served_in_place
    assert report.model_dir == dest.resolve()
    assert set(report.fetched_files) == set(files)
    for name, body in files.items():
        assert (dest / name).read_bytes() == body
    assert not (dest / "README.md").exists() and not (dest / "optimizer.pt").exists()
    assert set(report.verification.values()) == {"size"}
    assert report.bytes_fetched == sum(len(body) for body in files.values())

    again = fetch_model(source, dest, mount_root=mount_root, copy_to_local=True)
    assert again.bytes_fetched == 0 and again.cache_hits == len(files)

    # A file rewritten on the volume (new mtime) is copied again.
    changed = os.urandom(2 * MIB)
    (mount_root / "llama" / "model-00002-of-00002.safetensors").write_bytes(changed)
    os.utime(mount_root / "llama" / "model-00002-of-00002.safetensors", ns=(1, 1))
    third = fetch_model(source, dest, mount_root=mount_root, copy_to_local=True)
    assert third.fetched_files == ("model-00002-of-00002.safetensors",)
    assert (dest / "model-00002-of-00002.safetensors").read_bytes() == changed


def test_copy_resumes_from_a_partial_file(tmp_path: Path) -> None:
    mount_root = tmp_path / "mnt"
    files = make_model(mount_root / "llama")
    dest = tmp_path / "local"
    source = parse_source("efs://claim/llama")
    fetch_model(source, dest, mount_root=mount_root, copy_to_local=True, part_size_bytes=MIB)
    # Turn a finished file back into an interrupted copy: partial file plus a journal with the
    # first two of its four 1 MiB parts done.
    name = "model-00001-of-00002.safetensors"
    final = dest / name
    partial = dest / (name + PARTIAL_SUFFIX)
    os.replace(final, partial)
    stat = (mount_root / "llama" / name).stat()
    header = {
        "journal": 2,
        "size_bytes": stat.st_size,
        "version": f"mtime_ns:{stat.st_mtime_ns}",
        "part_size_bytes": MIB,
        "segment_bytes": stat.st_size,
        "part_crc": "crc32c",
    }
    # Each journal line is a commit record: the part's index and the CRC32C of its bytes.
    lines = [
        f"{index} {crc('crc32c', files[name][index * MIB : (index + 1) * MIB])}" for index in (0, 1)
    ]
    (dest / (name + ".partial.journal")).write_text(
        json.dumps(header) + "\n" + "\n".join(lines) + "\n"
    )
    report = fetch_model(
        source, dest, mount_root=mount_root, copy_to_local=True, part_size_bytes=MIB
    )
    assert report.fetched_files == (name,)
    assert report.bytes_fetched == len(files[name]) - 2 * MIB
    assert final.read_bytes() == files[name]


def test_missing_mount_and_unloadable_volume_are_explained(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"PersistentVolumeClaim 'claim' is mounted at"):
        fetch_model(parse_source("efs://claim/nowhere"), tmp_path, mount_root=tmp_path / "mnt")
    (tmp_path / "mnt" / "pickled").mkdir(parents=True)
    (tmp_path / "mnt" / "pickled" / "config.json").write_text("{}")
    (tmp_path / "mnt" / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SelectionError, match="only pickle weights"):
        fetch_model(parse_source("efs://claim/pickled"), tmp_path, mount_root=tmp_path / "mnt")


def test_local_directory_is_served_in_place(tmp_path: Path) -> None:
    files = make_model(tmp_path / "model")
    report = fetch_model(parse_source(f"file://{tmp_path / 'model'}"), tmp_path / "unused")
    assert report.served_in_place and report.model_dir == tmp_path / "model"
    assert {f.key for f in report.files} == set(files)
