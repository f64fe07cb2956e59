"""The fetch writes parts around the page cache (O_DIRECT) where it can, through it where it
cannot, and hashes MD5 in order from the buffers the parts arrived in, never reading a part back."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from modelship.runtime import fetch
from modelship.runtime.checksums import SIZE_ONLY, Checksum
from modelship.runtime.selection import SelectedFile, Selection

MIB = 1024 * 1024


def _job(tmp_path: Path, size: int) -> Any:
    remote = fetch._Remote("model.safetensors", size, "etag")
    job = fetch._FileJob(remote, tmp_path / "model.safetensors", Checksum(SIZE_ONLY, "", size), MIB)
    job.open()
    if job.direct_fd is None:
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    return job


def _aligned_copy(data: bytes) -> memoryview:
    buffer = mmap.mmap(-1, max(1, len(data)))
    buffer[: len(data)] = data
    return memoryview(buffer)[: len(data)]


def _recording_pwrite(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    calls: list[tuple[int, int, int]] = []
    original = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls.append((fd, offset, len(data)))
        return original(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return calls


def test_aligned_bytes_go_direct_and_the_rest_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(1).randbytes(20_000)
    job = _job(tmp_path, len(data))
    calls = _recording_pwrite(monkeypatch)
    job.write(_aligned_copy(data[:8192]), 0)  # aligned: all direct
    job.write(_aligned_copy(data[8192:13_000]), 8192)  # aligned start, unaligned tail
    job.write(_aligned_copy(data[13_000:]), 13_000)  # unaligned offset: page cache
    assert calls == [
        (job.direct_fd, 0, 8192),
        (job.direct_fd, 8192, 4096),
        (job.fd, 12_288, 712),
        (job.fd, 13_000, 7000),
    ]
    os.fdatasync(job.fd)
    assert job.partial_path.read_bytes() == data
    back = memoryview(mmap.mmap(-1, 16_384))[:12_000]
    assert job.read(back, 4096) == 12_000
    assert bytes(back) == data[4096:16_096]
    job.close()


def test_an_unaligned_buffer_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(2).randbytes(8192)
    job = _job(tmp_path, len(data))
    calls = _recording_pwrite(monkeypatch)
    unaligned = memoryview(bytearray(b"x" + data))[1:]
    job.write(unaligned, 0)
    assert [fd for fd, _, _ in calls] == [job.fd]
    assert job.partial_path.read_bytes() == data
    job.close()


def test_direct_io_refused_at_write_time_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(3).randbytes(3 * 4096)
    job = _job(tmp_path, len(data))
    direct_fd = job.direct_fd
    original = os.pwrite

    def pwrite(fd: int, buffer: Any, offset: int) -> int:
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return original(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    job.write(_aligned_copy(data[:4096]), 0)
    job.write(_aligned_copy(data[4096:]), 4096)
    assert job.direct_fd is None
    assert job.partial_path.read_bytes() == data
    job.close()


class _ShuffledReader:
    """Serves each key's bytes with random delays, so parts complete out of order."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.random = random.Random(4)
        self.lock = threading.Lock()

    def read_into(self, remote: Any, start: int, buffer: memoryview) -> None:
        with self.lock:
            delay = self.random.uniform(0, 0.02)
        time.sleep(delay)
        buffer[:] = self.files[remote.key][start : start + len(buffer)]


@pytest.mark.parametrize("hash_ahead_mib", [0, 3, 128])
def test_md5_is_hashed_in_order_from_the_workers_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hash_ahead_mib: int
) -> None:
    """One large file and three small ones (their parts are queued round-robin). Early parts
    are parked with spare buffers while the hash catches up; with few spares (or the minimum
    of two) workers also wait for their part's hash."""
    monkeypatch.setattr(fetch, "HASH_AHEAD_BYTES", hash_ahead_mib * MIB)
    generator = random.Random(5)
    files = {
        "model-00001.safetensors": generator.randbytes(24 * MIB + 12_345),
        **{f"model-0000{n}.safetensors": generator.randbytes(3 * MIB + n) for n in (2, 3, 4)},
    }
    reads: list[int] = []
    original_read = fetch._FileJob.read

    def read(self: Any, buffer: memoryview, offset: int) -> int:
        reads.append(offset)
        return int(original_read(self, buffer, offset))

    monkeypatch.setattr(fetch._FileJob, "read", read)
    remotes = [
        fetch._Remote(key, len(data), hashlib.md5(data).hexdigest()) for key, data in files.items()
    ]
    report = fetch._run_transfer(
        "test://model/",
        tmp_path,
        remotes,
        Selection(tuple(SelectedFile(r.key, r.size_bytes, "weights") for r in remotes), ()),
        _ShuffledReader(files),
        lambda item: (item, Checksum("md5", item.version, item.size_bytes)),
        fetch._Counters(None),
        threading.Event(),
        max_connections=8,
        part_size_bytes=MIB,
        progress_interval_seconds=60,
        metrics=None,
        log=lambda line: None,
        started=time.monotonic(),
    )
    assert report.verification == dict.fromkeys(files, "md5")
    assert report.verification_failures == 0
    for key, data in files.items():
        assert (tmp_path / key).read_bytes() == data
    assert reads == []  # every part was hashed from the buffer it arrived in
