"""A delaying, de-duplicating work queue (reconciles, the status refreshes that watch events ask
for, pool applies), and the periodic resync.

A new ModelDeployment brings a burst of watch events (its Deployment, pod, Service and
PodMonitor each change several times within a second or two), and every one of them asks for
its owner's status to be recomputed. Run at once, each recomputation could find a short-lived
state ("waiting for the scheduler") and write it, only for the next event to write the state
after it: under load, ~3.7 status writes and their Events per new ModelDeployment. Like
controller-runtime's rate-limited queue, this one holds a key for `delay` seconds from the first
request, folds every request meanwhile into that one, and then runs it on one of a few threads
of its own, so kopf's handler threads never wait on it. A key is never run twice at once; one
asked for while it runs is run again after it. A request may name its own delay (a retry's
backoff); a key already waiting runs at the earlier of the two times.
"""

from __future__ import annotations

import contextvars
import heapq
import logging
import threading
import time
from collections.abc import Callable, Hashable

logger = logging.getLogger("modelship.operator")


class WorkQueue:
    def __init__(
        self,
        run: Callable[[Hashable], None],
        delay: float,
        workers: int,
        context: contextvars.Context | None = None,
        name: str = "refresh",
    ) -> None:
        """`context`: the context variables each run sees (kopf's Events need its settings and
        event queue, which kopf sets in its own tasks and handler threads only)."""
        self._run = run
        self._name = name
        self.context = context
        self._delay = delay
        # heap of (when, order, key); an entry whose time is not the key's in _waiting is stale
        self._due: list[tuple[float, int, Hashable]] = []
        self._waiting: dict[Hashable, float] = {}  # key -> when it runs
        self._running: set[Hashable] = set()
        self._again: dict[Hashable, float] = {}  # asked for while running -> its delay
        self._order = 0
        self._closed = False
        self._condition = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def add(self, key: Hashable, delay: float | None = None) -> None:
        """Run `key` once, `delay` seconds from now (the queue's delay if None), however often it
        is asked for meanwhile; a key already waiting runs at the earlier time."""
        delay = self._delay if delay is None else delay
        with self._condition:
            if self._closed:
                return
            if key in self._running:
                self._again[key] = min(delay, self._again.get(key, delay))
            else:
                self._push(key, delay)

    def _push(self, key: Hashable, delay: float) -> None:
        when = time.monotonic() + delay
        if key in self._waiting and self._waiting[key] <= when:
            return
        self._order += 1
        heapq.heappush(self._due, (when, self._order, key))
        self._waiting[key] = when
        self._condition.notify()

    def idle(self) -> bool:
        """Nothing waiting or running (the tests wait for it)."""
        with self._condition:
            return not self._waiting and not self._running

    def close(self) -> None:
        """Stop taking work; the threads end after what they are running."""
        with self._condition:
            self._closed = True
            self._due.clear()
            self._waiting.clear()
            self._condition.notify_all()

    def _next(self) -> Hashable | None:
        with self._condition:
            while not self._closed:
                if self._due:
                    when, _, key = self._due[0]
                    if self._waiting.get(key) != when:  # moved earlier, or run already
                        heapq.heappop(self._due)
                        continue
                    wait = when - time.monotonic()
                    if wait <= 0:
                        heapq.heappop(self._due)
                        del self._waiting[key]
                        self._running.add(key)
                        return key
                    self._condition.wait(wait)
                else:
                    self._condition.wait()
            return None

    def _work(self) -> None:
        while (key := self._next()) is not None:
            try:
                if self.context is not None:
                    self.context.copy().run(self._run, key)
                else:
                    self._run(key)
            except Exception:  # a run logs its own API errors; anything else is a bug
                logger.exception("%s of %s failed", self._name, key)
            finally:
                with self._condition:
                    self._running.discard(key)
                    again = self._again.pop(key, None)
                    if again is not None and not self._closed:
                        self._push(key, again)


class Resyncer:
    """One thread runs `run(key)` for every key once per `period`, spread evenly over it.

    kopf's per-object timers (what this replaced) keep an asyncio task, its coroutines and a
    fresh copy of the whole object for every ModelDeployment for as long as it exists, and fire
    in waves: objects created together are resynced together. Here the keys are read at the
    start of each pass and taken one at a time, so an idle cluster sees a steady trickle, and a
    pass that overruns (a slow API server) only delays the next one. The first pass starts one
    period after start-up: the resume handlers have just reconciled everything."""

    def __init__(
        self, run: Callable[[Hashable], None], keys: Callable[[], list[Hashable]], period: float
    ) -> None:
        self._run = run
        self._keys = keys
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        if self._stop.wait(self._period):
            return
        while True:
            started = time.monotonic()
            keys = self._keys()
            for position, key in enumerate(keys):
                due = started + self._period * position / len(keys)
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                try:
                    self._run(key)
                except Exception:  # resync logs its own API errors; anything else is a bug
                    logger.exception("resync of %s failed", key)
            if self._stop.wait(max(0.0, started + self._period - time.monotonic())):
                return
