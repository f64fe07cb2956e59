"""One download per node: pods of the same model on one node share its weights.

On a node with instance-store NVMe, eight one-GPU replicas of a model (a p5.48xlarge holds eight)
would otherwise download eight copies of the same weights. The node pool prepares a cache root
(a hostPath, see operator/nodepool.py); every model gets one directory under it, named from its
source URL and the identity that reads it (namespace and service account, so two tenants never
share a directory), with two locks inside (flock, so they die with the process that holds them):

    ROOT/<model>/                         the weights, fetched by runtime/fetch.py
    ROOT/<model>/.modelship-locks/fetch   exclusive while one pod fetches; the others wait
    ROOT/<model>/.modelship-locks/use     shared by every pod serving the model

A runtime pod mounts only its own model's directory, never ROOT: another namespace's weights are
neither readable nor writable from it. A small init container of the operator's own runtime image
(never the user's spec.serving.image) mounts ROOT to create the pod's directory and to remove
models whose locks are both free (no pod on the node serves or fetches them), oldest first, until
the new model fits: `python -m modelship.runtime.nodecache --root ROOT --key <model> --needed-bytes N`.

Before reusing what another pod fetched, the pod proves it may read the source with its own
credentials: a HEAD of every object the directory's manifest lists, ETags compared (prove_access).
A pod whose role cannot read the prefix gets an error, not the cached weights.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import ClientError

from ..operator.nodepool import node_cache_key
from .fetch import MANIFEST_NAME

LOCKS = ".modelship-locks"
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")
# A directory touched this recently is about to be used (its pod's init container just made it):
# never evicted, even with free locks.
RECENT_SECONDS = 600.0


class NodeCacheError(RuntimeError):
    """The node cache cannot be used as asked; the message names the cause and the fix."""


class NodeCacheAccessError(NodeCacheError):
    """The pod's own credentials cannot read the source whose weights are cached."""


# A directory name for a source URL read by an identity (the same function render uses).
model_key = node_cache_key


def check_key(key: str) -> str:
    """`key` if it is a plain directory name (no '/', no '..', not hidden)."""
    if not _KEY.match(key) or ".." in key:
        raise NodeCacheError(
            f"node cache key {key!r} is not a plain directory name; pass the key render wrote."
        )
    return key


def _open_lock(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+b")  # the open handle is the lock; callers close it


def _try_lock(handle: IO[bytes], mode: int) -> bool:
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@dataclass
class NodeCache:
    """The node's shared model directory (a hostPath on the instance store)."""

    root: Path
    log: Callable[[str], None] = print
    wait_log_seconds: float = 30.0
    # The directory name under root (render passes it); None: derived from the source alone.
    key: str | None = None
    recent_seconds: float = RECENT_SECONDS
    _held: list[IO[bytes]] = field(default_factory=list)

    def model_dir(self, source: str) -> Path:
        return self.root / (check_key(self.key) if self.key else model_key(source))

    def _lock_path(self, model_dir: Path, kind: str) -> Path:
        return model_dir / LOCKS / kind

    @contextmanager
    def fetching(self, source: str) -> Iterator[Path]:
        """Hold the model's fetch lock (waiting for another pod's fetch to finish) around a
        fetch into the yielded directory; on success, keep a shared `use` lock until exit."""
        model_dir = self.model_dir(source)
        fetch_lock = _open_lock(self._lock_path(model_dir, "fetch"))
        try:
            self._wait_exclusive(fetch_lock, model_dir)
            yield model_dir
            use_lock = _open_lock(self._lock_path(model_dir, "use"))
            fcntl.flock(use_lock, fcntl.LOCK_SH)  # never blocks: only eviction takes it EX, NB
            self._held.append(use_lock)
        finally:
            fetch_lock.close()  # closing the descriptor releases the flock

    def _wait_exclusive(self, handle: IO[bytes], model_dir: Path) -> None:
        if _try_lock(handle, fcntl.LOCK_EX):
            return
        self.log(
            f"another pod on this node is fetching {model_dir.name}; waiting to share its download"
        )
        started = time.monotonic()
        next_log = started + self.wait_log_seconds
        while not _try_lock(handle, fcntl.LOCK_EX):
            time.sleep(0.2)
            if time.monotonic() >= next_log:
                self.log(f"still waiting for {model_dir.name} ({time.monotonic() - started:.0f} s)")
                next_log += self.wait_log_seconds
        self.log(f"{model_dir.name}: the other pod's fetch ended; checking what is on disk")

    def release(self) -> None:
        """Let go of the `use` locks (the process exiting does the same)."""
        for handle in self._held:
            handle.close()
        self._held.clear()

    def evict_unused(self, keep: Path, needed_bytes: int) -> list[str]:
        """Remove models no pod on the node serves or fetches, least recently used first, until
        `needed_bytes` are free under the root. Returns the names removed."""
        removed: list[str] = []
        now = time.time()
        candidates = sorted(
            (
                entry
                for entry in self.root.iterdir()
                if entry.is_dir() and not entry.is_symlink()
                if not entry.name.startswith(".") and entry.name != keep.name
            ),
            key=lambda entry: entry.stat().st_mtime,
        )
        for entry in candidates:
            if shutil.disk_usage(self.root).free >= needed_bytes:
                break
            if now - entry.stat().st_mtime < self.recent_seconds:
                continue  # just prepared for a pod that has not started yet
            if self._remove_if_unused(entry):
                removed.append(entry.name)
                self.log(f"node cache: removed {entry.name}, which no pod on this node uses")
        return removed

    def _remove_if_unused(self, model_dir: Path) -> bool:
        handles = [_open_lock(self._lock_path(model_dir, kind)) for kind in ("fetch", "use")]
        try:
            if not all(_try_lock(handle, fcntl.LOCK_EX) for handle in handles):
                return False
            # Weights first, the locks (held by us) last: a pod that waits on the fetch lock
            # meanwhile finds its directory gone and fails, and its init container makes a new one.
            for entry in model_dir.iterdir():
                if entry.name != LOCKS:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            shutil.rmtree(model_dir)
            return True
        finally:
            for handle in handles:
                handle.close()


def prepare(root: Path, key: str, needed_bytes: int, log: Callable[[str], None] = print) -> Path:
    """Create (or touch) ROOT/<key> for a pod about to start, after making room for
    `needed_bytes` (less what the directory already holds) by evicting unused models."""
    cache = NodeCache(root, log=log, key=check_key(key))
    model_dir = root / key
    model_dir.mkdir(mode=0o750, exist_ok=True)
    os.utime(model_dir)  # recently prepared: not evicted before its pod starts
    present = sum(path.stat().st_size for path in model_dir.rglob("*") if path.is_file())
    missing = max(0, needed_bytes - present)
    if shutil.disk_usage(root).free < missing:
        cache.evict_unused(keep=model_dir, needed_bytes=missing)
    return model_dir


def prove_access(
    client: Any, bucket: str, prefix: str, model_dir: Path, log: Callable[[str], None] = print
) -> int:
    """HEAD every object the directory's fetch manifest lists, with the pod's own client, and
    compare ETags; returns the number of objects proven. Raises NodeCacheAccessError when the
    pod may not read one: the cached copy must never stand in for the pod's own permission."""
    manifest_path = model_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return 0  # nothing cached yet: the fetch itself reads with the pod's credentials
    try:
        entries = json.loads(manifest_path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return 0  # an unreadable manifest is not trusted by the fetch either
    proven = 0
    for key, entry in sorted(entries.items()):
        try:
            head = client.head_object(Bucket=bucket, Key=prefix + key)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status in (401, 403) or code in ("AccessDenied", "403", "Forbidden"):
                raise NodeCacheAccessError(
                    f"s3://{bucket}/{prefix}{key}: this pod's credentials may not read it "
                    f"({code or status}), so the copy another pod cached on this node is not used. "
                    "Grant the runtime's service account s3:GetObject on the model prefix "
                    "(IRSA or EKS Pod Identity)."
                ) from None
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                log(f"node cache: {key} is gone from the source; the fetch will drop it")
                continue
            raise
        etag = str(head.get("ETag", "")).strip('"')
        if isinstance(entry, dict) and entry.get("version") != etag:
            log(f"node cache: {key} changed at the source (ETag {etag}); the fetch renews it")
        proven += 1
    return proven


def main(argv: list[str] | None = None) -> int:
    """The init container: prepare the pod's directory under the node cache root."""
    parser = argparse.ArgumentParser(
        prog="python -m modelship.runtime.nodecache",
        description="Create a model's node-cache directory, evicting unused models for room.",
    )
    parser.add_argument("--root", type=Path, required=True, help="The node cache root (hostPath).")
    parser.add_argument("--key", required=True, help="The model's directory name (from render).")
    parser.add_argument("--needed-bytes", type=int, default=0, help="Bytes the model needs.")
    args = parser.parse_args(argv)
    try:
        model_dir = prepare(args.root, args.key, args.needed_bytes)
    except (NodeCacheError, OSError) as error:
        print(f"node cache: {error}", file=sys.stderr)
        return 1
    print(f"node cache: {model_dir} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
