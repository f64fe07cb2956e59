"""Fetch a model's files to where the engine reads them.

    s3://bucket/prefix    parallel ranged GETs written straight into place (O_DIRECT pwrites,
                          no page-cache copy, into a preallocated `<name>.partial`; the engine
                          then reads the weights from disk), resumable from a per-file journal of
                          completed parts, verified against the store's checksum, renamed into
                          place when complete; a file already complete is never fetched again.
    fsx:// and efs://     the PersistentVolumeClaim is mounted at `mount_root`; the model is
                          served in place, or copied to `dest` (same rules, size-verified).
    file:///dir           served in place.

Only the files the engine needs are taken (see `selection`); the rest are reported with a
reason. Nothing is ever written outside `dest`, and never through a symlink.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import mmap
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..operator.modelinfo import ModelInfoError, read_safetensors_header
from ..operator.source import LocalSource, ModelSource, S3Source, VolumeSource
from .checksums import (
    CRC_FIELDS,
    SIZE_ONLY,
    Checksum,
    VerifyMethod,
    crc,
    crc_combine_all,
    is_md5_hex,
)
from .metrics import RuntimeMetrics
from .selection import (
    SelectedFile,
    Selection,
    SelectionError,
    SkippedFile,
    UnsafeKeyError,
    relative_key,
    safe_destination,
    select_files,
)

MIB = 1024 * 1024
# Parts of an MD5/SHA-256 file downloaded ahead of its in-order hash, in all (spare buffers).
HASH_AHEAD_BYTES = 128 * MIB
# O_DIRECT needs the buffer's address, the file offset and the length aligned to the device's
# logical block; 4 KiB covers 512-byte and 4K-native devices.
DIRECT_ALIGN = 4096
MANIFEST_NAME = ".modelship-fetch.json"
PARTIAL_SUFFIX = ".partial"
JOURNAL_SUFFIX = ".partial.journal"
# 2: each line is "<part index> <crc of the part's bytes>", written only after the part's bytes
# were flushed to disk (fdatasync): a line is a commit record, never a promise.
_JOURNAL_VERSION = 2
# Error codes S3 (and S3-compatible stores) use for "try again later".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    HTTPClientError,  # read timeouts, connections closed mid-body, streaming errors
    BotoConnectionError,
    IncompleteReadError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)

log_ = logging.getLogger("modelship.runtime.fetch")


class FetchError(RuntimeError):
    """The model could not be fetched; the message names the object, the cause and what to check."""


class DiskSpaceError(FetchError):
    """The listed sizes do not fit in the free space (found before any download)."""

    def __init__(self, message: str, needed_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes


@dataclass(frozen=True)
class FetchReport:
    """What a fetch did. `model_dir` is the directory to serve from."""

    source_uri: str
    model_dir: Path
    served_in_place: bool
    files: tuple[SelectedFile, ...]
    fetched_files: tuple[str, ...]
    skipped: tuple[SkippedFile, ...]
    bytes_total: int
    bytes_fetched: int
    bytes_reused: int
    seconds: float
    rate_bytes_per_second: float
    retries: int
    cache_hits: int
    verification_failures: int
    verification: dict[str, VerifyMethod] = field(default_factory=dict)
    # Each selected file's version: the S3 ETag (no quotes), or "mtime_ns:<n>" for a file on a
    # volume (its size is in `files`); keys the Neuron compile cache by checkpoint.
    file_etags: dict[str, str] = field(default_factory=dict)


def fetch_model(
    source: ModelSource,
    dest: Path,
    *,
    trust_pickle: bool = False,
    copy_to_local: bool = False,
    mount_root: Path = Path("/mnt/model-source"),
    endpoint_url: str | None = None,
    max_connections: int = 16,
    part_size_bytes: int = 16 * MIB,
    progress_interval_seconds: float = 5.0,
    metrics: RuntimeMetrics | None = None,
    log: Callable[[str], None] = log_.info,
    retry_attempts: int = 8,
    retry_base_seconds: float = 0.2,
    verify_checksums: bool = True,
) -> FetchReport:
    """Make the model at `source` available locally and return where to serve it from.

    S3 objects are downloaded into `dest`; volume sources are served in place under
    `mount_root` (or copied into `dest` with `copy_to_local`); file:// is served in place.
    `endpoint_url` overrides the S3 endpoint (AWS_ENDPOINT_URL is honoured by boto3 too).
    `verify_checksums=False` checks sizes only (no MD5/SHA-256 pass: saves CPU on small nodes,
    like s5cmd and boto3, which do not verify downloads either).
    Raises FetchError (or SelectionError for a source with nothing loadable) with a message
    that names the object and the fix.
    """
    if max_connections < 1 or part_size_bytes < 1:
        raise ValueError("max_connections and part_size_bytes must be positive.")
    started = time.monotonic()
    retry = _RetryPolicy(attempts=max(1, retry_attempts), base_seconds=retry_base_seconds)
    if isinstance(source, S3Source):
        return _fetch_s3(
            source,
            Path(dest),
            trust_pickle=trust_pickle,
            endpoint_url=endpoint_url,
            max_connections=max_connections,
            part_size_bytes=part_size_bytes,
            progress_interval_seconds=progress_interval_seconds,
            metrics=metrics,
            log=log,
            retry=retry,
            started=started,
            verify_checksums=verify_checksums,
        )
    if isinstance(source, VolumeSource):
        root = Path(mount_root) / source.path if source.path else Path(mount_root)
        if not root.is_dir():
            raise FetchError(
                f"{source.uri}: {root} is not a directory. Check that the PersistentVolumeClaim "
                f"{source.claim!r} is mounted at {mount_root} and holds the path {source.path!r}."
            )
        if copy_to_local:
            return _copy_volume(
                source.uri,
                root,
                Path(dest),
                trust_pickle=trust_pickle,
                max_connections=max_connections,
                part_size_bytes=part_size_bytes,
                progress_interval_seconds=progress_interval_seconds,
                metrics=metrics,
                log=log,
                started=started,
            )
        return _serve_in_place(source.uri, root, trust_pickle, metrics, log, started)
    if isinstance(source, LocalSource):
        root = Path(source.path)
        if not root.is_dir():
            raise FetchError(f"{source.uri}: {root} is not a directory; check the model URI.")
        return _serve_in_place(source.uri, root, trust_pickle, metrics, log, started)
    raise TypeError(f"unsupported model source {source!r}")


# --- listing and selection -------------------------------------------------------------------


@dataclass(frozen=True)
class _Remote:
    """One selected object: its key relative to the model root, size and version tag."""

    key: str
    size_bytes: int
    version: str  # S3 ETag without quotes, or "mtime_ns:<n>" for a file on a volume


def _walk_volume(root: Path) -> tuple[list[tuple[str, int]], list[SkippedFile]]:
    listing: list[tuple[str, int]] = []
    pruned: list[SkippedFile] = []
    for directory, dirnames, filenames in os.walk(root):
        base = Path(directory)
        for name in list(dirnames):
            if name.startswith("."):
                # .git and caches can hold thousands of objects; do not walk them.
                dirnames.remove(name)
                key = (base / name).relative_to(root).as_posix() + "/"
                pruned.append(SkippedFile(key, 0, "hidden", "hidden or version-control directory"))
        for name in filenames:
            path = base / name
            try:
                size_bytes = path.stat().st_size
            except OSError as error:
                raise FetchError(f"{path}: cannot be read ({error}); check the volume.") from None
            listing.append((path.relative_to(root).as_posix(), size_bytes))
    return listing, pruned


def _select_volume(root: Path, trust_pickle: bool) -> Selection:
    """What the engine needs of a mounted model, with the hidden directories reported as skipped."""
    listing, pruned = _walk_volume(root)
    selection = select_files(listing, trust_pickle=trust_pickle)
    return Selection(selection.files, selection.skipped + tuple(pruned))


def _volume_version(stat: os.stat_result) -> str:
    """A file's version on a volume (where S3 has an ETag): its modification time."""
    return f"mtime_ns:{stat.st_mtime_ns}"


def _record_skips(selection: Selection, metrics: RuntimeMetrics | None) -> None:
    if metrics is None:
        return
    for skipped in selection.skipped:
        metrics.fetch_files_skipped.labels(reason=skipped.reason).inc()


def _serve_in_place(
    uri: str,
    root: Path,
    trust_pickle: bool,
    metrics: RuntimeMetrics | None,
    log: Callable[[str], None],
    started: float,
) -> FetchReport:
    selection = _select_volume(root, trust_pickle)
    _record_skips(selection, metrics)
    file_etags = {
        selected.key: _volume_version((root / selected.key).stat()) for selected in selection.files
    }
    seconds = time.monotonic() - started
    if metrics is not None:
        metrics.fetch_expected_bytes.set(selection.total_bytes)
        metrics.fetch_seconds.set(seconds)
    log(
        f"serving {uri} in place from {root}: {len(selection.files)} files, "
        f"{_fmt_bytes(selection.total_bytes)}; {_fmt_skipped(selection.skipped)}"
    )
    return FetchReport(
        source_uri=uri,
        model_dir=root,
        served_in_place=True,
        files=selection.files,
        fetched_files=(),
        skipped=selection.skipped,
        bytes_total=selection.total_bytes,
        bytes_fetched=0,
        bytes_reused=0,
        seconds=seconds,
        rate_bytes_per_second=0.0,
        retries=0,
        cache_hits=0,
        verification_failures=0,
        file_etags=file_etags,
    )


# --- the manifest of completed files -------------------------------------------------------


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable (the directory entry is its own write)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Manifest:
    """`dest/.modelship-fetch.json`: key -> size, version, how it was verified, and `committed`.

    An entry is written only after its file's bytes were flushed (fdatasync), the file renamed
    into place and the directory flushed; the manifest itself is flushed before it is renamed
    over the old one. So after a node crash an entry never names a file of preallocated zeros.
    Entries without `committed` (written by a runtime that did not flush) are not trusted.
    """

    def __init__(self, dest: Path) -> None:
        self.path = dest / MANIFEST_NAME
        self.lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_symlink():
            raise FetchError(f"{self.path}: is a symlink; remove it (modelship never follows one).")
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                if isinstance(loaded, dict) and isinstance(loaded.get("files"), dict):
                    self.entries = loaded["files"]
            except (OSError, ValueError):
                # An unreadable manifest only costs a re-download; never trust it partially.
                self.entries = {}

    def is_complete(self, remote: _Remote, path: Path) -> bool:
        """Whether `path` holds this exact object, committed to disk by an earlier fetch."""
        entry = self.entries.get(remote.key)
        if not isinstance(entry, dict) or entry.get("committed") is not True:
            return False
        if entry.get("size_bytes") != remote.size_bytes or entry.get("version") != remote.version:
            return False
        try:
            stat = os.lstat(path)
        except FileNotFoundError:
            return False
        return (stat.st_mode & 0o170000) == 0o100000 and stat.st_size == remote.size_bytes

    def record(self, remote: _Remote, verified: VerifyMethod) -> None:
        """Record a file whose bytes and directory entry are already on disk."""
        with self.lock:
            self.entries[remote.key] = {
                "size_bytes": remote.size_bytes,
                "version": remote.version,
                "verified": verified,
                "committed": True,
            }
            self._write()

    def forget(self, key: str) -> None:
        with self.lock:
            if self.entries.pop(key, None) is not None:
                self._write()

    def _write(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"files": self.entries}, indent=1, sort_keys=True).encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        fsync_directory(self.path.parent)


# --- S3 ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RetryPolicy:
    attempts: int
    base_seconds: float
    cap_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        # Exponential backoff with jitter: spreads retries of many threads after a throttle.
        ceiling = min(self.cap_seconds, self.base_seconds * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)


def _client_error_parts(error: ClientError) -> tuple[str, int]:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, ClientError):
        code, status = _client_error_parts(error)
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES
    return isinstance(error, (*_TRANSIENT_ERRORS, _ShortRead))


class _ShortRead(Exception):
    """The response body ended before the requested range did."""


def _explain(error: BaseException, what: str, bucket: str, key: str) -> str:
    """A sentence for people: what failed and what to check."""
    if isinstance(error, NoCredentialsError):
        return (
            f"{what}: no AWS credentials. The runtime uses the standard chain only: give the "
            "pod's ServiceAccount an IAM role (IRSA or EKS Pod Identity), or set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for a local run."
        )
    if isinstance(error, ClientError):
        code, status = _client_error_parts(error)
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return (
                f"{what}: access denied ({code}). The pod's IAM role needs s3:ListBucket on "
                f"arn:aws:s3:::{bucket} and s3:GetObject on arn:aws:s3:::{bucket}/{key}*; "
                "for SSE-KMS objects also kms:Decrypt on the key."
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"{what}: the credentials were rejected ({code}); check the pod's IAM role."
        if code == "NoSuchBucket":
            return f"{what}: bucket {bucket!r} does not exist; check spec.model.uri."
        if code in ("NoSuchKey", "404"):
            return f"{what}: the object disappeared after it was listed; re-run the fetch."
        if code == "PreconditionFailed" or status == 412:
            return (
                f"{what}: the object changed while it was being fetched (its ETag no longer "
                "matches); wait for the upload to finish, then re-run."
            )
        return f"{what}: the store answered {status} {code}: {error}"
    return f"{what}: {type(error).__name__}: {error}"


def _make_client(endpoint_url: str | None, max_connections: int) -> Any:
    config = Config(
        max_pool_connections=max_connections + 2,
        # Some stores send the whole object's CRC on ranged GETs; we verify whole files ourselves.
        response_checksum_validation="when_required",
        request_checksum_calculation="when_required",
        retries={"total_max_attempts": 1, "mode": "standard"},  # we retry with our own backoff
        tcp_keepalive=True,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


class _Counters:
    """Thread-safe tallies shared by the workers."""

    def __init__(self, metrics: RuntimeMetrics | None) -> None:
        self.lock = threading.Lock()
        self.metrics = metrics
        self.bytes_fetched = 0
        self.bytes_reused = 0
        self.retries = 0
        self.verification_failures = 0

    def add_bytes(self, count: int) -> None:
        with self.lock:
            self.bytes_fetched += count
        if self.metrics is not None:
            self.metrics.fetch_bytes.inc(count)

    def add_reused(self, count: int) -> None:
        with self.lock:
            self.bytes_reused += count

    def add_retry(self) -> None:
        with self.lock:
            self.retries += 1
        if self.metrics is not None:
            self.metrics.fetch_retries.inc()

    def add_verification_failure(self) -> None:
        with self.lock:
            self.verification_failures += 1
        if self.metrics is not None:
            self.metrics.fetch_verification_failures.inc()


class _Reader(Protocol):
    """Reads bytes [start, end) of one remote file into `buffer`."""

    def read_into(self, remote: _Remote, start: int, buffer: memoryview) -> None: ...


def _direct_reader(
    body: Any,
) -> tuple[Callable[[memoryview], int], Callable[[], None] | None]:
    """The fastest way to read `body` into our buffer, and how to hand its connection back.

    urllib3's readinto() reads into a fresh bytes object and copies it (two extra copies and
    page faults per part, a third of the CPU on a small node); the http.client response under
    it reads from the socket straight into the buffer. Falls back to the public readinto()
    when botocore or urllib3 change shape.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        raw is None
        or fp is None
        or not hasattr(fp, "readinto")
        or not hasattr(raw, "release_conn")
        or raw.headers.get("content-encoding")
        or raw.headers.get("transfer-encoding")
    ):
        return body.readinto, None

    def release() -> None:
        # Hand the connection back only if http.client saw the whole body; else close it.
        if fp.isclosed():
            raw.release_conn()
        else:
            body.close()

    return fp.readinto, release


class _S3Reader:
    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        retry: _RetryPolicy,
        counters: _Counters,
        abort: threading.Event,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.retry = retry
        self.counters = counters
        self.abort = abort

    def call(self, what: str, key: str, operation: Callable[[], Any]) -> Any:
        """Run `operation`, retrying transient errors with backoff; FetchError when it gives up."""
        last: BaseException | None = None
        for attempt in range(self.retry.attempts):
            if self.abort.is_set():
                raise _Aborted()
            try:
                return operation()
            except (
                ClientError,
                BotoCoreError,
                urllib3.exceptions.HTTPError,
                OSError,
                _ShortRead,
            ) as error:
                if not _is_transient(error):
                    raise FetchError(
                        _explain(error, what, self.bucket, self.prefix + key)
                    ) from None
                last = error
                if attempt + 1 < self.retry.attempts:
                    self.counters.add_retry()
                    time.sleep(self.retry.delay(attempt))
        assert last is not None
        raise FetchError(
            f"{what}: still failing after {self.retry.attempts} attempts "
            f"({type(last).__name__}: {last}). Check the endpoint, the network path to the store "
            "and the store's health (throttling: spread the load or raise the request rate limit)."
        ) from None

    def read_into(self, remote: _Remote, start: int, buffer: memoryview) -> None:
        end = start + len(buffer)
        key = self.prefix + remote.key

        def get() -> None:
            response = self.client.get_object(
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{end - 1}",
                IfMatch=f'"{remote.version}"',
            )
            body = response["Body"]
            readinto, release = _direct_reader(body)
            reusable = False
            try:
                filled = 0
                while filled < len(buffer):
                    count = readinto(buffer[filled:])
                    if not count:
                        raise _ShortRead(
                            f"body ended at {start + filled} of bytes {start}-{end - 1}"
                        )
                    filled += count
                reusable = release is not None
            finally:
                if reusable and release is not None:
                    release()
                else:
                    body.close()

        self.call(f"s3://{self.bucket}/{key} bytes {start}-{end - 1}", remote.key, get)


class _VolumeReader:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read_into(self, remote: _Remote, start: int, buffer: memoryview) -> None:
        path = self.root / remote.key
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                filled = 0
                while filled < len(buffer):
                    count = os.preadv(fd, [buffer[filled:]], start + filled)
                    if not count:
                        raise FetchError(
                            f"{path}: ended at byte {start + filled}, shorter than the "
                            f"{remote.size_bytes} bytes listed; is it being rewritten?"
                        )
                    filled += count
            finally:
                os.close(fd)
        except OSError as error:
            raise FetchError(f"{path}: cannot be read ({error}); check the volume mount.") from None


class _Aborted(Exception):
    """Another worker failed; stop quietly."""


# --- one file's download -----------------------------------------------------------------------


@dataclass
class _Segment:
    """A stretch of the file checked as one (the whole file, or one upload part)."""

    parts: list[int]
    hasher: Any
    cursor: int = 0
    digest: bytes | None = None
    # Guards everything below; workers wait on it for their part to be hashed.
    turn: threading.Condition = field(default_factory=threading.Condition)
    # Parts received and not hashed yet: index -> (data, the parked buffer to recycle or None).
    ready: dict[int, tuple[memoryview, mmap.mmap | None]] = field(default_factory=dict)
    hashing: bool = False  # a thread is running the chain (hashing from the cursor on)
    position: dict[int, int] = field(default_factory=dict)  # part index -> place in `parts`


def _aligned(data: memoryview, offset: int) -> bool:
    """Whether O_DIRECT may transfer `data` at `offset` (buffer address and offset aligned)."""
    if offset % DIRECT_ALIGN:
        return False
    address = _buffer_address(data)
    return address is not None and address % DIRECT_ALIGN == 0


def _buffer_address(data: memoryview) -> int | None:
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):  # read-only or empty buffers
        return None


class _FileJob:
    """Download of one file into `<name>.partial`, with its journal of committed parts.

    A part goes through three states: written (its bytes handed to the disk with O_DIRECT, or to
    the page cache, neither flushed), committed (a flush covered it and its journal line, with
    the part's CRC, was written) and, when every part is committed and the file verifies, the
    file is renamed into place.
    """

    def __init__(
        self,
        remote: _Remote,
        final_path: Path,
        checksum: Checksum,
        part_size_bytes: int,
        attempt: int = 0,
    ) -> None:
        self.remote = remote
        self.final_path = final_path
        self.partial_path = final_path.with_name(final_path.name + PARTIAL_SUFFIX)
        self.journal_path = final_path.with_name(final_path.name + JOURNAL_SUFFIX)
        self.checksum = checksum
        self.part_size_bytes = part_size_bytes
        self.attempt = attempt
        self.lock = threading.Lock()
        self.parts: list[tuple[int, int]] = []
        self.segment_of_part: list[int] = []
        self.segments: list[_Segment] = []
        segment_bytes = checksum.segment_bytes if checksum.segment_bytes > 0 else remote.size_bytes
        segment_start = 0
        while segment_start < remote.size_bytes or not self.segments:
            segment_end = min(remote.size_bytes, segment_start + max(1, segment_bytes))
            hasher = checksum.new_hasher() if checksum.hashed_in_order else None
            segment = _Segment(parts=[], hasher=hasher)
            start = segment_start
            while start < segment_end:
                end = min(segment_end, start + part_size_bytes)
                segment.parts.append(len(self.parts))
                self.parts.append((start, end))
                self.segment_of_part.append(len(self.segments))
                start = end
            segment.position = {index: place for place, index in enumerate(segment.parts)}
            self.segments.append(segment)
            segment_start = segment_end
            if remote.size_bytes == 0:
                break
        self.part_crcs: list[int | None] = [None] * len(self.parts)
        self.written: set[int] = set()
        self.committed: set[int] = set()
        # Parts an earlier run's journal claims, with their CRCs: checked against the disk
        # before they are trusted (`check_resumed`).
        self.claimed: dict[int, int] = {}
        self.resumed_bytes = 0
        # Parts on disk from an earlier run, checked: the in-order hash reads these back.
        self.resumed_parts: set[int] = set()
        self.fd: int | None = None
        # The same file opened with O_DIRECT (None where the file system refuses it): aligned
        # part bytes go from our buffer to the disk without a copy into the page cache.
        self.direct_fd: int | None = None
        self.journal_fd: int | None = None
        self.finished = False

    def header(self) -> dict[str, Any]:
        return {
            "journal": _JOURNAL_VERSION,
            "size_bytes": self.remote.size_bytes,
            "version": self.remote.version,
            "part_size_bytes": self.part_size_bytes,
            "segment_bytes": self.checksum.segment_bytes,
            "part_crc": self.checksum.part_crc,
        }

    def load_journal(self) -> None:
        """Read which parts a previous, interrupted run committed (same object, same layout)."""
        try:
            if self.partial_path.is_symlink() or self.journal_path.is_symlink():
                raise UnsafeKeyError(
                    f"{self.partial_path}: symlink in the model directory; refused."
                )
            if os.stat(self.partial_path).st_size != self.remote.size_bytes:
                return
            lines = self.journal_path.read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return
        if not lines:
            return
        try:
            if json.loads(lines[0]) != self.header():
                return
        except ValueError:
            return
        claimed: dict[int, int] = {}
        for line in lines[1:]:
            fields = line.split()
            # A torn last line (crash mid-write) is skipped, never half-trusted.
            if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
                continue
            index = int(fields[0])
            if 0 <= index < len(self.parts):
                claimed[index] = int(fields[1])
        self.claimed = claimed
        self.resumed_bytes = sum(self.parts[i][1] - self.parts[i][0] for i in claimed)

    def check_resumed(self, buffer: Callable[[int], memoryview]) -> int:
        """Trust a claimed part only if the bytes on disk still have its journalled CRC; return
        how many claimed parts failed (re-fetched)."""
        assert self.fd is not None
        rejected = 0
        for index, expected in sorted(self.claimed.items()):
            start, end = self.parts[index]
            data = buffer(end - start)
            filled = self.read(data, start)
            value = crc(self.checksum.part_crc, data[:filled])
            if filled == len(data) and value == expected:
                self.part_crcs[index] = value
                self.written.add(index)
                self.committed.add(index)
                self.resumed_parts.add(index)
            else:
                rejected += 1
        self.resumed_bytes = sum(self.parts[i][1] - self.parts[i][0] for i in self.committed)
        self.claimed = {}
        return rejected

    def reserved_bytes(self) -> int:
        """Disk bytes this file still needs."""
        return self.remote.size_bytes - (self.resumed_bytes if self.claimed else 0)

    def open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if not self.claimed:
            flags |= os.O_TRUNC
        self.fd = os.open(self.partial_path, flags, 0o644)
        if not self.claimed:
            try:
                os.posix_fallocate(self.fd, 0, max(1, self.remote.size_bytes))
            except OSError as error:
                if error.errno == 28:  # ENOSPC
                    raise FetchError(
                        f"{self.partial_path}: no space left to allocate "
                        f"{self.remote.size_bytes} bytes; give the pod a larger volume."
                    ) from None
                # File systems without fallocate (some network ones): a sparse file will do.
            os.ftruncate(self.fd, self.remote.size_bytes)
            journal_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            self.journal_fd = os.open(self.journal_path, journal_flags, 0o644)
            os.write(self.journal_fd, (json.dumps(self.header()) + "\n").encode())
            os.close(self.journal_fd)
        self.journal_fd = os.open(
            self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        direct = getattr(os, "O_DIRECT", 0)
        if direct:
            with contextlib.suppress(OSError):  # EINVAL: the file system has no O_DIRECT
                self.direct_fd = os.open(
                    self.partial_path, os.O_RDWR | direct | os.O_NOFOLLOW | os.O_CLOEXEC
                )

    def write(self, data: memoryview, offset: int) -> None:
        """Write `data` at `offset`: the aligned head straight to the disk (O_DIRECT), the rest,
        and everything where direct I/O is refused, through the page cache. Either way the bytes
        are durable only after the committer's fdatasync (the device's cache is flushed there)."""
        assert self.fd is not None
        written = 0
        direct_fd = self.direct_fd
        if direct_fd is not None and _aligned(data, offset):
            head = len(data) - len(data) % DIRECT_ALIGN
            try:
                while written < head:
                    count = os.pwrite(direct_fd, data[written:head], offset + written)
                    written += count
                    if count % DIRECT_ALIGN:
                        break  # a short, unaligned write: finish through the page cache
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.direct_fd = None  # refused after all: buffered from now on
                os.close(direct_fd)
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)

    def read(self, data: memoryview, offset: int) -> int:
        """Read into `data` from `offset` (O_DIRECT when aligned: no page cache filled); returns
        how many bytes were read, fewer only at the end of the file."""
        assert self.fd is not None
        filled = 0
        direct_fd = self.direct_fd
        if direct_fd is not None and _aligned(data, offset):
            head = len(data) - len(data) % DIRECT_ALIGN
            with contextlib.suppress(OSError):  # refused: read through the page cache
                while filled < head:
                    count = os.preadv(direct_fd, [data[filled:head]], offset + filled)
                    filled += count
                    if not count or count % DIRECT_ALIGN:
                        break
        while filled < len(data):
            count = os.preadv(self.fd, [data[filled:]], offset + filled)
            if not count:
                break
            filled += count
        return filled

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd, self.journal_fd):
            if fd is not None:
                os.close(fd)
        self.fd = None
        self.direct_fd = None
        self.journal_fd = None

    def discard(self) -> None:
        self.close()
        for path in (self.partial_path, self.journal_path):
            path.unlink(missing_ok=True)


class _Committer:
    """One thread that makes written parts durable: flush the file (fdatasync), then journal the
    parts the flush covered. Batching is natural: while one flush runs, the workers keep
    writing, and the next flush takes everything written meanwhile; so the disk is written
    back during the download instead of all at the end, and no worker waits on a flush."""

    def __init__(
        self, on_committed: Callable[[_FileJob], None], fail: Callable[[BaseException], None]
    ) -> None:
        self.on_committed = on_committed
        self.fail = fail
        self.condition = threading.Condition()
        self.pending: list[tuple[_FileJob, int]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fetch-commit", daemon=True)
        self.thread.start()

    def add(self, job: _FileJob, index: int) -> None:
        with self.condition:
            self.pending.append((job, index))
            self.condition.notify()

    def stop(self) -> None:
        """Commit what is pending, then end the thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.stopping:
                    self.condition.wait()
                batch, self.pending = self.pending, []
                stopping = self.stopping
            if batch:
                try:
                    self._commit(batch)
                except BaseException as error:  # an I/O error on flush: the fetch fails
                    self.fail(error)
            if stopping and not batch:
                return

    def _commit(self, batch: list[tuple[_FileJob, int]]) -> None:
        by_job: dict[int, tuple[_FileJob, list[int]]] = {}
        for job, index in batch:
            by_job.setdefault(id(job), (job, []))[1].append(index)
        for job, indices in by_job.values():
            if job.fd is None or job.journal_fd is None:
                continue  # discarded after a failed verification
            os.fdatasync(job.fd)
            lines = "".join(f"{index} {job.part_crcs[index]}\n" for index in indices)
            os.write(job.journal_fd, lines.encode())
            with job.lock:
                job.committed.update(indices)
        for job, _ in by_job.values():
            self.on_committed(job)


# --- the parallel engine -----------------------------------------------------------------------


class _Engine:
    """Runs the parts of many files on one bounded pool of workers (one connection each)."""

    def __init__(
        self,
        reader: _Reader,
        manifest: _Manifest,
        counters: _Counters,
        abort: threading.Event,
        workers: int,
        part_size_bytes: int,
        uri: str,
    ) -> None:
        self.uri = uri
        self.reader = reader
        self.manifest = manifest
        self.counters = counters
        self.abort = abort
        self.part_size_bytes = part_size_bytes
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        self.condition = threading.Condition()
        self.pending_files = 0
        self.error: BaseException | None = None
        self.local = threading.local()
        # Spare buffers a worker swaps its own for when its part must wait to be hashed in
        # order (MD5, SHA-256): it goes on downloading instead of waiting for the hash.
        self.spares: list[mmap.mmap] = []
        self.spare_budget = max(2, HASH_AHEAD_BYTES // max(part_size_bytes, 1))
        self.spare_lock = threading.Lock()
        self.fetched: list[str] = []
        self.jobs: list[_FileJob] = []
        self.committer = _Committer(self._maybe_finish_guarded, self._fail)

    def buffer(self, size: int, name: str = "buffer") -> memoryview:
        """A reusable, page-aligned (O_DIRECT-ready) buffer per worker and `name`: no per-part
        allocation of part-sized bytes."""
        current: mmap.mmap | None = getattr(self.local, name, None)
        if current is None or len(current) < size:
            current = mmap.mmap(-1, max(size, self.part_size_bytes, 1))
            setattr(self.local, name, current)
        return memoryview(current)[:size]

    def submit(self, jobs: list[_FileJob]) -> None:
        """Open the files and queue their parts: file by file, except that the parts of files
        hashed in order (MD5, SHA-256) are queued round-robin across those files, so their
        hashes (one core each, serial within a file) run side by side instead of one file at a
        time. Either way each file's parts are queued in order, which `_advance` relies on."""
        todos = [self._open(job) for job in jobs]
        for job, todo in zip(jobs, todos, strict=True):
            if not job.checksum.hashed_in_order:
                for index in todo:
                    self.pool.submit(self._guard, self._part, job, index)
        in_order = [
            (job, todo)
            for job, todo in zip(jobs, todos, strict=True)
            if job.checksum.hashed_in_order
        ]
        if len(in_order) >= self.workers:
            # Round-robin over at least as many files as workers: no two parts of one file are
            # in flight together, so no part waits for an earlier one and nothing is parked
            # (measured: spares there only cost, 655 vs 717 MB/s on 16 x 256 MiB).
            self.spare_budget = 0
        for position in range(max((len(todo) for _, todo in in_order), default=0)):
            for job, todo in in_order:
                if position < len(todo):
                    self.pool.submit(self._guard, self._part, job, todo[position])

    def _open(self, job: _FileJob) -> list[int]:
        """Open one file, check what an earlier run left; return the parts still to fetch."""
        with self.condition:
            self.pending_files += 1
            self.jobs.append(job)
        job.open()
        if job.claimed and job.check_resumed(self.buffer):
            # Bytes on disk differ from what the journal recorded: those parts are fetched again.
            self.counters.add_verification_failure()
            log_.warning(
                "%s: resumed parts did not match their journalled CRC; fetching them again",
                job.remote.key,
            )
        if job.committed:
            self.counters.add_reused(job.resumed_bytes)
        todo = [index for index in range(len(job.parts)) if index not in job.committed]
        if job.committed or not todo:
            # Parts on disk from an earlier run (or none at all): hash them, finish if complete.
            self.pool.submit(self._guard, self._advance_all, job)
        return todo

    def _fail(self, error: BaseException) -> None:
        with self.condition:
            if self.error is None:
                self.error = error
            self.abort.set()
            self.condition.notify_all()

    def _guard(self, function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except _Aborted:
            pass
        except BaseException as error:
            self._fail(error)

    def _maybe_finish_guarded(self, job: _FileJob) -> None:
        self._guard(self._maybe_finish, job)

    def _part(self, job: _FileJob, index: int) -> None:
        if self.abort.is_set():
            raise _Aborted()
        start, end = job.parts[index]
        buffer = self.buffer(end - start)
        if end > start:
            self.reader.read_into(job.remote, start, buffer)
            job.write(buffer, start)
            self.counters.add_bytes(end - start)
        # While the part is still in our buffer: its CRC, for the journal and CRC verification.
        job.part_crcs[index] = crc(job.checksum.part_crc, buffer)
        with job.lock:
            job.written.add(index)
        self._advance(job, job.segment_of_part[index], index, buffer)
        # Journalled only after a flush covers it: see _Committer.
        self.committer.add(job, index)

    def _advance_all(self, job: _FileJob) -> None:
        for segment_index in range(len(job.segments)):
            self._advance(job, segment_index, -1, None)
        self._maybe_finish(job)

    def _park(self) -> mmap.mmap | None:
        """Swap this worker's buffer for a spare; return the worker's (now parked) buffer, or
        None when every spare is in use (the caller waits for its hash instead)."""
        own: mmap.mmap | None = getattr(self.local, "buffer", None)
        if own is None:
            return None
        with self.spare_lock:
            if self.spares:
                spare = self.spares.pop()
            elif self.spare_budget > 0:  # spares are made as they are first needed
                self.spare_budget -= 1
                spare = mmap.mmap(-1, len(own))
            else:
                return None
        self.local.buffer = spare
        return own

    def _recycle(self, parked: mmap.mmap) -> None:
        with self.spare_lock:
            self.spares.append(parked)

    def _advance(
        self, job: _FileJob, segment_index: int, own_index: int, own_data: memoryview | None
    ) -> None:
        """Hash the segment's parts in order (MD5 and SHA-256 cannot be combined from parts).

        One thread at a time runs the chain: it hashes from the cursor on while the next part
        has arrived (the lock is not held while hashing). A worker whose part arrived early
        parks its buffer with the part (taking a spare, HASH_AHEAD_BYTES in all) and goes on
        downloading: the hash never waits for a download that a waiting worker could have
        started. With no spare left it waits for its part to be hashed, which is the
        backpressure. Parts resumed from an earlier run (no worker holds them) are read back
        by the chain. Parts are queued in order, so every part before ours is held by a worker
        that got it earlier, parked, or resumed: the chain reaches ours (or the fetch aborts)."""
        if not job.checksum.hashed_in_order:
            return
        segment = job.segments[segment_index]
        with segment.turn:
            if own_data is not None:
                segment.ready[own_index] = (own_data, None)
            own_place = segment.position.get(own_index, -1) if own_data is not None else -1
            while True:
                if not segment.hashing and self._next_hashable(job, segment):
                    self._run_chain(job, segment)
                if segment.cursor > own_place:
                    break  # ours is hashed (or we had none)
                if own_index in segment.ready and segment.ready[own_index][1] is None:
                    # Not taken by the chain yet (another thread runs it, or an earlier part
                    # is still downloading): leave it with its buffer and go on downloading.
                    parked = self._park()
                    if parked is not None:
                        segment.ready[own_index] = (segment.ready[own_index][0], parked)
                        return  # the chain hashes it and recycles the buffer
                if self.abort.is_set():
                    raise _Aborted()
                segment.turn.wait(timeout=0.5)
            done = segment.cursor == len(segment.parts)
            if done and segment.digest is None:
                segment.digest = segment.hasher.digest()
        if done:
            self._maybe_finish(job)

    def _next_hashable(self, job: _FileJob, segment: _Segment) -> bool:
        if segment.cursor >= len(segment.parts):
            return False
        index = segment.parts[segment.cursor]
        return index in segment.ready or index in job.resumed_parts

    def _run_chain(self, job: _FileJob, segment: _Segment) -> None:
        """Hash from the cursor while the next part is there; called and returns with the
        segment's lock held, which it lets go of while hashing."""
        segment.hashing = True
        try:
            while self._next_hashable(job, segment):
                index = segment.parts[segment.cursor]
                data, parked = segment.ready.pop(index, (None, None))
                segment.turn.release()
                try:
                    if data is None:  # resumed from an earlier run: read it back
                        start, end = job.parts[index]
                        data = self.buffer(end - start, "scratch")
                        if job.read(data, start) != end - start:
                            raise FetchError(f"{job.partial_path}: shorter than written")
                    segment.hasher.update(data)
                finally:
                    segment.turn.acquire()
                segment.cursor += 1
                if parked is not None:
                    self._recycle(parked)
                segment.turn.notify_all()
        finally:
            segment.hashing = False
            segment.turn.notify_all()

    def _maybe_finish(self, job: _FileJob) -> None:
        with job.lock:
            if job.finished or len(job.committed) != len(job.parts):
                return
            if job.checksum.hashed_in_order and any(s.digest is None for s in job.segments):
                return
            job.finished = True
        self._finish(job)

    def _actual_checksum(self, job: _FileJob) -> str:
        if job.checksum.hashed_in_order:
            return job.checksum.combine_digests([s.digest for s in job.segments if s.digest])
        algorithm = job.checksum.part_crc
        segments = [
            crc_combine_all(
                algorithm,
                [
                    (cast(int, job.part_crcs[i]), job.parts[i][1] - job.parts[i][0])
                    for i in segment.parts
                ],
            )
            for segment in job.segments
        ]
        return job.checksum.combine_crcs(segments)

    def _finish(self, job: _FileJob) -> None:
        assert job.fd is not None
        actual_size = os.fstat(job.fd).st_size
        problem = None
        if actual_size != job.remote.size_bytes:
            problem = f"{actual_size} bytes on disk, {job.remote.size_bytes} expected"
        elif job.checksum.method != SIZE_ONLY:
            actual = self._actual_checksum(job)
            if actual != job.checksum.expected:
                problem = f"{job.checksum.method} {actual}, the store says {job.checksum.expected}"
        if problem is not None:
            job.discard()
            self.counters.add_verification_failure()
            if job.attempt == 0:
                log_.warning(
                    "%s failed verification (%s); fetching it again", job.remote.key, problem
                )
                retry = _FileJob(
                    job.remote, job.final_path, job.checksum, job.part_size_bytes, attempt=1
                )
                self.submit([retry])
                self._file_done()
                return
            raise FetchError(
                f"{self.uri}{job.remote.key}: failed verification twice ({problem}). The object in the "
                "store may be corrupt or being rewritten, or something between the pod and the "
                "store alters data; re-upload the file and check proxies."
            )
        # Every part was flushed by the committer; this one also covers a file with no parts.
        os.fdatasync(job.fd)
        job.close()
        os.replace(job.partial_path, job.final_path)
        fsync_directory(job.final_path.parent)
        job.journal_path.unlink(missing_ok=True)
        # Only now, with bytes and name on disk, may the manifest vouch for the file.
        self.manifest.record(job.remote, job.checksum.method)
        with self.condition:
            self.fetched.append(job.remote.key)
        self._file_done()

    def _file_done(self) -> None:
        with self.condition:
            self.pending_files -= 1
            self.condition.notify_all()

    def shutdown(self) -> None:
        """Stop the workers, commit what they wrote (a resumed run reuses it), close the files."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.committer.stop()
        for job in self.jobs:
            job.close()  # after a failure; the partial files stay for the next run

    def wait(self, tick: Callable[[], None], interval_seconds: float) -> None:
        """Block until every file is done or one failed; call `tick` every interval."""
        next_tick = time.monotonic() + interval_seconds
        try:
            while True:
                with self.condition:
                    if self.error is not None or self.pending_files == 0:
                        break
                    self.condition.wait(timeout=max(0.0, min(0.5, next_tick - time.monotonic())))
                if time.monotonic() >= next_tick:
                    tick()
                    next_tick = time.monotonic() + interval_seconds
        except BaseException:
            self.abort.set()
            raise
        finally:
            self.shutdown()
        if self.error is not None:
            raise self.error


# --- progress ----------------------------------------------------------------------------------


def _fmt_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def _fmt_skipped(skipped: tuple[SkippedFile, ...]) -> str:
    if not skipped:
        return "nothing skipped"
    reasons: dict[str, int] = {}
    for item in skipped:
        reasons[item.reason] = reasons.get(item.reason, 0) + 1
    return (
        f"{len(skipped)} skipped ("
        + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        + ")"
    )


class _Progress:
    def __init__(
        self,
        uri: str,
        total_bytes: int,
        counters: _Counters,
        metrics: RuntimeMetrics | None,
        log: Callable[[str], None],
    ) -> None:
        self.uri = uri
        self.total_bytes = total_bytes
        self.counters = counters
        self.metrics = metrics
        self.log = log
        self.last_time = time.monotonic()
        self.last_bytes = 0

    def tick(self) -> None:
        now = time.monotonic()
        fetched = self.counters.bytes_fetched
        rate = (fetched - self.last_bytes) / max(1e-9, now - self.last_time)
        self.last_time, self.last_bytes = now, fetched
        done = fetched + self.counters.bytes_reused
        remaining = max(0, self.total_bytes - done)
        eta = f"{remaining / rate:.0f} s" if rate > 0 else "unknown"
        if self.metrics is not None:
            self.metrics.fetch_rate_bytes_per_second.set(rate)
        percent = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        self.log(
            f"fetching {self.uri}: {_fmt_bytes(done)} / {_fmt_bytes(self.total_bytes)} "
            f"({percent:.1f}%), {rate / 1e6:.1f} MB/s, ETA {eta}, {self.counters.retries} retries"
        )


# --- S3 fetch ----------------------------------------------------------------------------------


def _list_s3(reader: _S3Reader, source: S3Source) -> list[_Remote]:
    remotes: list[_Remote] = []
    paginator = reader.client.get_paginator("list_objects_v2")

    def pages() -> Iterator[dict[str, Any]]:
        yield from paginator.paginate(Bucket=source.bucket, Prefix=source.prefix)

    for page in reader.call(f"listing {source.uri}", "", lambda: list(pages())):
        for item in page.get("Contents", []):
            key = relative_key(item["Key"], source.prefix)
            if not key:
                continue  # the prefix's own "folder" placeholder
            remotes.append(_Remote(key, int(item["Size"]), str(item.get("ETag", "")).strip('"')))
    if not remotes:
        raise FetchError(
            f"{source.uri}: no objects under this prefix. Check spec.model.uri (bucket and "
            "prefix) and that the pod's role may s3:ListBucket on it."
        )
    return remotes


def _plan_checksum(
    reader: _S3Reader, source: S3Source, remote: _Remote, verify_checksums: bool = True
) -> tuple[_Remote, Checksum]:
    """Ask the store how the object can be verified: the cheapest checksum it keeps (a CRC, then
    SHA-256), else the MD5 ETag, else the size alone."""
    key = source.prefix + remote.key
    head = reader.call(
        f"HEAD s3://{source.bucket}/{key}",
        remote.key,
        lambda: reader.client.head_object(Bucket=source.bucket, Key=key, ChecksumMode="ENABLED"),
    )
    etag = str(head.get("ETag", "")).strip('"')
    size_bytes = int(head["ContentLength"])
    current = _Remote(remote.key, size_bytes, etag)
    if etag != remote.version or size_bytes != remote.size_bytes:
        raise FetchError(
            f"s3://{source.bucket}/{key}: changed between listing and fetch (ETag or size); "
            "wait for the upload to finish, then re-run."
        )
    if not verify_checksums:
        return current, Checksum(SIZE_ONLY, "", size_bytes)
    sha256 = head.get("ChecksumSHA256")
    etag_is_md5 = head.get("ServerSideEncryption") not in (
        "aws:kms",
        "aws:kms:dsse",
    ) and not head.get("SSECustomerAlgorithm")

    def upload_part_bytes() -> int | None:
        """The store's upload part size, when every part but the last has it (as boto3, the
        AWS CLI and s5cmd upload); else None, and the file is checked by size only."""
        try:
            first = reader.client.head_object(Bucket=source.bucket, Key=key, PartNumber=1)
            part_bytes = int(first["ContentLength"])
            parts = int(first.get("PartsCount") or etag.rsplit("-", 1)[-1])
            if part_bytes <= 0 or parts < 1 or (parts - 1) * part_bytes >= size_bytes:
                return None
            if parts > 1:
                last = reader.client.head_object(Bucket=source.bucket, Key=key, PartNumber=parts)
                if int(last["ContentLength"]) != size_bytes - (parts - 1) * part_bytes:
                    return None
        except (ClientError, ValueError, KeyError):
            return None
        return part_bytes

    # A CRC first: computed per part in parallel and combined, ~100x cheaper than MD5.
    for field_name, algorithm in CRC_FIELDS:
        value = head.get(field_name)
        if not isinstance(value, str) or not value:
            continue
        if "-" not in value and head.get("ChecksumType") != "COMPOSITE":
            return current, Checksum(algorithm, value, size_bytes)
        if "-" in value:
            part_bytes = upload_part_bytes()
            if part_bytes:
                return current, Checksum(f"{algorithm}-composite", value, part_bytes)  # type: ignore[arg-type]
    if isinstance(sha256, str) and "-" not in sha256 and head.get("ChecksumType") != "COMPOSITE":
        return current, Checksum("sha256", sha256, size_bytes)
    if etag_is_md5 and is_md5_hex(etag):
        return current, Checksum("md5", etag.lower(), size_bytes)
    if etag_is_md5 and "-" in etag and is_md5_hex(etag.split("-")[0]):
        part_bytes = upload_part_bytes()
        if part_bytes:
            return current, Checksum("md5-multipart", etag.lower(), part_bytes)
    if isinstance(sha256, str) and "-" in sha256:
        part_bytes = upload_part_bytes()
        if part_bytes:
            return current, Checksum("sha256-composite", sha256, part_bytes)
    # SSE-KMS ETags are not MD5s and no checksum is stored: the size is all we can check.
    return current, Checksum(SIZE_ONLY, "", size_bytes)


def _check_disk_space(dest: Path, jobs: list[_FileJob]) -> None:
    needed_bytes = sum(job.reserved_bytes() for job in jobs)
    free_bytes = shutil.disk_usage(dest).free
    if needed_bytes > free_bytes:
        raise DiskSpaceError(
            f"{dest}: not enough free space: {len(jobs)} files need {needed_bytes} more bytes "
            f"({_fmt_bytes(needed_bytes)}) but {free_bytes} bytes ({_fmt_bytes(free_bytes)}) are "
            "free. Give the pod a larger volume (local NVMe or a bigger emptyDir sizeLimit) or "
            "free space in it.",
            needed_bytes,
        )


def _prepare_dest(dest: Path) -> Path:
    if dest.is_symlink():
        raise FetchError(f"{dest}: the model directory is a symlink; use a real directory.")
    dest.mkdir(parents=True, exist_ok=True)
    return dest.resolve()


def _remove_stale(dest: Path, manifest: _Manifest, selected: set[str]) -> None:
    """Delete files an earlier fetch wrote that the model no longer has (a new model version);
    left in place, vLLM would load stray shards."""
    for key in [key for key in manifest.entries if key not in selected]:
        with contextlib.suppress(UnsafeKeyError):
            safe_destination(dest, key).unlink(missing_ok=True)
        manifest.forget(key)


def _run_transfer(
    uri: str,
    dest: Path,
    remotes: list[_Remote],
    selection: Selection,
    reader: _Reader,
    plan: Callable[[_Remote], tuple[_Remote, Checksum]],
    counters: _Counters,
    abort: threading.Event,
    *,
    max_connections: int,
    part_size_bytes: int,
    progress_interval_seconds: float,
    metrics: RuntimeMetrics | None,
    log: Callable[[str], None],
    started: float,
) -> FetchReport:
    """Shared by S3 and volume copies: cache check, space check, parallel transfer, report."""
    _record_skips(selection, metrics)
    if metrics is not None:
        metrics.fetch_expected_bytes.set(selection.total_bytes)
    manifest = _Manifest(dest)
    _remove_stale(dest, manifest, {remote.key for remote in remotes})
    cache_hits = 0
    verification: dict[str, VerifyMethod] = {}
    to_fetch: list[tuple[_Remote, Path]] = []
    for remote in remotes:
        path = safe_destination(dest, remote.key)
        if manifest.is_complete(remote, path):
            cache_hits += 1
            counters.add_reused(remote.size_bytes)
            verification[remote.key] = cast(
                VerifyMethod, manifest.entries[remote.key].get("verified", SIZE_ONLY)
            )
        else:
            to_fetch.append((remote, path))
    if metrics is not None and cache_hits:
        metrics.fetch_cache_hits.inc(cache_hits)

    engine: _Engine | None = None
    if to_fetch:
        workers = min(max_connections, 64)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch-head") as pool:
            planned = list(pool.map(lambda item: plan(item[0]), to_fetch))
        jobs = []
        for (remote, path), (current, checksum) in zip(to_fetch, planned, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            safe_destination(dest, remote.key)  # re-check: the parent now exists
            job = _FileJob(current, path, checksum, part_size_bytes)
            job.load_journal()
            jobs.append(job)
            verification[remote.key] = checksum.method
        _check_disk_space(dest, jobs)
        engine = _Engine(reader, manifest, counters, abort, workers, part_size_bytes, uri)
        progress = _Progress(uri, selection.total_bytes, counters, metrics, log)
        try:
            engine.submit(jobs)
        except BaseException:
            abort.set()
            engine.shutdown()
            raise
        engine.wait(progress.tick, progress_interval_seconds)

    seconds = time.monotonic() - started
    rate = counters.bytes_fetched / seconds if seconds > 0 else 0.0
    if metrics is not None:
        metrics.fetch_seconds.set(seconds)
        metrics.fetch_rate_bytes_per_second.set(rate)
    fetched = tuple(sorted(engine.fetched)) if engine else ()
    log(
        f"fetched {uri} into {dest}: {len(fetched)} files, {_fmt_bytes(counters.bytes_fetched)} "
        f"in {seconds:.1f} s ({rate / 1e6:.1f} MB/s); {cache_hits} cache hits, "
        f"{_fmt_bytes(counters.bytes_reused)} reused; {counters.retries} retries, "
        f"{counters.verification_failures} verification failures; {_fmt_skipped(selection.skipped)}"
    )
    return FetchReport(
        source_uri=uri,
        model_dir=dest,
        served_in_place=False,
        files=selection.files,
        fetched_files=fetched,
        skipped=selection.skipped,
        bytes_total=selection.total_bytes,
        bytes_fetched=counters.bytes_fetched,
        bytes_reused=counters.bytes_reused,
        seconds=seconds,
        rate_bytes_per_second=rate,
        retries=counters.retries,
        cache_hits=cache_hits,
        verification_failures=counters.verification_failures,
        verification=verification,
        file_etags={remote.key: remote.version for remote in remotes},
    )


def _fetch_s3(
    source: S3Source,
    dest: Path,
    *,
    trust_pickle: bool,
    endpoint_url: str | None,
    max_connections: int,
    part_size_bytes: int,
    progress_interval_seconds: float,
    metrics: RuntimeMetrics | None,
    log: Callable[[str], None],
    retry: _RetryPolicy,
    started: float,
    verify_checksums: bool,
) -> FetchReport:
    counters = _Counters(metrics)
    abort = threading.Event()
    client = _make_client(endpoint_url, max_connections)
    reader = _S3Reader(client, source.bucket, source.prefix, retry, counters, abort)
    listed = _list_s3(reader, source)
    selection = select_files([(r.key, r.size_bytes) for r in listed], trust_pickle=trust_pickle)
    by_key = {remote.key: remote for remote in listed}
    remotes = [by_key[selected.key] for selected in selection.files]
    dest = _prepare_dest(dest)
    log(
        f"fetching {source.uri} into {dest}: {len(remotes)} files, "
        f"{_fmt_bytes(selection.total_bytes)}; {_fmt_skipped(selection.skipped)}"
    )
    return _run_transfer(
        source.uri,
        dest,
        remotes,
        selection,
        reader,
        lambda remote: _plan_checksum(reader, source, remote, verify_checksums),
        counters,
        abort,
        max_connections=max_connections,
        part_size_bytes=part_size_bytes,
        progress_interval_seconds=progress_interval_seconds,
        metrics=metrics,
        log=log,
        started=started,
    )


@dataclass(frozen=True)
class StreamReport:
    """What `prepare_stream` checked: the engine streams `weights` from `model_uri` itself."""

    model_uri: str
    local: FetchReport  # config, tokenizer and index files, fetched into the model directory
    weights: tuple[SelectedFile, ...]
    weight_etags: dict[str, str]
    tensor_bytes: int
    seconds: float


def prepare_stream(
    source: ModelSource,
    dest: Path,
    *,
    endpoint_url: str | None = None,
    max_connections: int = 16,
    metrics: RuntimeMetrics | None = None,
    log: Callable[[str], None] = log_.info,
    retry_attempts: int = 8,
    retry_base_seconds: float = 0.2,
) -> StreamReport:
    """Get an S3 model ready for the engine to stream its weights (vLLM's runai_streamer):
    the same selection as a fetch (safetensors only: the streamer loads nothing else), every
    other selected file (config, tokenizer, index) fetched into `dest` and checksum-verified as
    usual, and every weight shard's safetensors header read with a ranged GET and checked to
    describe exactly the object's bytes. The weights' bytes go straight into the engine, so
    their checksums are not recomputed: the store's checksum covers them at rest, TLS in
    transit. Raises FetchError with the fix when the model cannot be streamed.
    """
    if not isinstance(source, S3Source):
        raise FetchError(
            f"{source.uri}: only s3:// models can be streamed into the engine; use "
            "--weights land (the default) for volumes and local directories."
        )
    started = time.monotonic()
    connections = max_connections
    retry = _RetryPolicy(attempts=max(1, retry_attempts), base_seconds=retry_base_seconds)
    counters = _Counters(metrics)
    reader = _S3Reader(
        _make_client(endpoint_url, connections),
        source.bucket,
        source.prefix,
        retry,
        counters,
        threading.Event(),
    )
    listed = _list_s3(reader, source)
    selection = select_files([(r.key, r.size_bytes) for r in listed], trust_pickle=False)
    weights = tuple(f for f in selection.files if f.key.endswith(".safetensors"))
    if not weights:
        raise FetchError(
            f"{source.uri}: no *.safetensors weights to stream (the streamer loads safetensors "
            "only). Convert the model to safetensors, or use --weights land."
        )
    keys = {f.key for f in selection.files}
    if "config.json" not in keys:
        raise FetchError(
            f"{source.uri}: no config.json; upload the model's config.json next to its weights."
        )
    if "tokenizer.json" not in keys and not {"tokenizer.model", "tokenizer_config.json"} <= keys:
        raise FetchError(
            f"{source.uri}: no tokenizer (tokenizer.json, or tokenizer.model with "
            "tokenizer_config.json); upload the tokenizer files with the model."
        )
    by_key = {remote.key: remote for remote in listed}
    tensor_bytes = 0
    for weight in weights:
        tensor_bytes += _check_remote_safetensors(reader, source, by_key[weight.key])
    others = [f for f in selection.files if not f.key.endswith(".safetensors")]
    dest = _prepare_dest(dest)
    local = _run_transfer(
        source.uri,
        dest,
        [by_key[f.key] for f in others],
        Selection(tuple(others), selection.skipped),
        reader,
        lambda remote: _plan_checksum(reader, source, remote, True),
        counters,
        threading.Event(),
        max_connections=connections,
        part_size_bytes=16 * MIB,
        progress_interval_seconds=60.0,
        metrics=metrics,
        log=log,
        started=started,
    )
    seconds = time.monotonic() - started
    log(
        f"streaming {source.uri}: {len(weights)} safetensors shards, "
        f"{_fmt_bytes(sum(w.size_bytes for w in weights))}, headers checked in {seconds:.2f} s; "
        f"{len(others)} other files in {dest}"
    )
    return StreamReport(
        model_uri=source.uri,
        local=local,
        weights=weights,
        weight_etags={w.key: by_key[w.key].version for w in weights},
        tensor_bytes=tensor_bytes,
        seconds=seconds,
    )


def _check_remote_safetensors(reader: _S3Reader, source: S3Source, remote: _Remote) -> int:
    """Read one shard's header with ranged GETs; check its tensors fill the object exactly."""
    key = source.prefix + remote.key
    uri = f"s3://{source.bucket}/{key}"

    def read_range(offset: int, length: int) -> bytes:
        length = max(0, min(length, remote.size_bytes - offset))
        if length == 0:
            return b""
        buffer = bytearray(length)
        reader.read_into(remote, offset, memoryview(buffer))
        return bytes(buffer)

    try:
        header = read_safetensors_header(read_range, name=uri)
    except ModelInfoError as error:
        raise FetchError(str(error)) from None
    header_bytes = int.from_bytes(read_range(0, 8), "little")
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    data_bytes = remote.size_bytes - 8 - header_bytes
    if max(ends, default=0) != data_bytes:
        raise FetchError(
            f"{uri}: its safetensors header describes {max(ends, default=0)} bytes of tensors "
            f"but the object holds {data_bytes}; re-upload the shard."
        )
    return data_bytes


def _copy_volume(
    uri: str,
    root: Path,
    dest: Path,
    *,
    trust_pickle: bool,
    max_connections: int,
    part_size_bytes: int,
    progress_interval_seconds: float,
    metrics: RuntimeMetrics | None,
    log: Callable[[str], None],
    started: float,
) -> FetchReport:
    selection = _select_volume(root, trust_pickle)
    dest = _prepare_dest(dest)
    if dest == root.resolve() or root.resolve().is_relative_to(dest):
        raise FetchError(f"{dest}: copying {root} into itself; choose another local directory.")
    remotes = []
    for selected in selection.files:
        stat = (root / selected.key).stat()
        remotes.append(_Remote(selected.key, stat.st_size, _volume_version(stat)))
    log(
        f"copying {uri} from {root} into {dest}: {len(remotes)} files, "
        f"{_fmt_bytes(selection.total_bytes)}; {_fmt_skipped(selection.skipped)}"
    )
    counters = _Counters(metrics)
    return _run_transfer(
        uri,
        dest,
        remotes,
        selection,
        _VolumeReader(root),
        lambda remote: (remote, Checksum(SIZE_ONLY, "", remote.size_bytes)),
        counters,
        threading.Event(),
        max_connections=max_connections,
        part_size_bytes=part_size_bytes,
        progress_interval_seconds=progress_interval_seconds,
        metrics=metrics,
        log=log,
        started=started,
    )


__all__ = [
    "DiskSpaceError",
    "FetchError",
    "FetchReport",
    "SelectionError",
    "StreamReport",
    "UnsafeKeyError",
    "fetch_model",
    "prepare_stream",
]
