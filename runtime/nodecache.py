"""One download per node: pods of the same model on one node share its weights.

On a node with instance-store NVMe, eight one-GPU replicas of a model (a p5.48xlarge holds eight)
would otherwise download eight copies of the same weights. With `--node-cache DIR` (a hostPath the
node pool prepares, see operator/nodepool.py) every pod of a model uses one directory, named from
its source URL, and two locks per directory (flock, so they die with the process that holds them):

    DIR/<model>/                 the weights, fetched by runtime/fetch.py (manifest and resume)
    DIR/.locks/<model>.fetch     exclusive while one pod fetches; the others wait their turn
    DIR/.locks/<model>.use       shared by every pod serving the model, for its whole life

The first pod downloads; the next ones take the fetch lock after it, find every file in the
manifest and fetch nothing. A pod takes its shared `use` lock before it lets go of the fetch lock,
so the directory is never seen unused between fetching and serving. When the disk is short, model
directories whose `use` and `fetch` locks are both free (no pod on the node serves or fetches them)
are removed, oldest first, until the new model fits.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LOCKS = ".locks"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def model_key(source: str) -> str:
    """A directory name for a source URL: readable, and unique by a digest of the whole URL."""
    readable = _UNSAFE.sub("-", source.split("://", 1)[-1]).strip("-.")[-60:] or "model"
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return f"{readable.lstrip('-.')}-{digest}"


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
    _held: list[IO[bytes]] = field(default_factory=list)

    def model_dir(self, source: str) -> Path:
        return self.root / model_key(source)

    def _lock_path(self, model_dir: Path, kind: str) -> Path:
        return self.root / LOCKS / f"{model_dir.name}.{kind}"

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
        candidates = sorted(
            (
                entry
                for entry in self.root.iterdir()
                if entry.is_dir() and not entry.is_symlink()
                if entry.name != LOCKS and entry.name != keep.name
            ),
            key=lambda entry: entry.stat().st_mtime,
        )
        for entry in candidates:
            if shutil.disk_usage(self.root).free >= needed_bytes:
                break
            if self._remove_if_unused(entry):
                removed.append(entry.name)
                self.log(f"node cache: removed {entry.name}, which no pod on this node uses")
        return removed

    def _remove_if_unused(self, model_dir: Path) -> bool:
        handles = [_open_lock(self._lock_path(model_dir, kind)) for kind in ("fetch", "use")]
        try:
            if not all(_try_lock(handle, fcntl.LOCK_EX) for handle in handles):
                return False
            # The lock files stay: unlinking one while another pod waits on it would let a
            # third pod lock a new file of the same name and fetch at the same time.
            shutil.rmtree(model_dir)
            return True
        finally:
            for handle in handles:
                handle.close()
