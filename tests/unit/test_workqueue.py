"""The refresh queue: requests for a key within its delay fold into one run; a key never runs
twice at once; one asked for while running runs again afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

from modelship.operator.workqueue import Resyncer, WorkQueue


def wait_idle(queue: WorkQueue, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not queue.idle():
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.01)


def test_requests_within_the_delay_fold_into_one_run() -> None:
    runs: list[Hashable] = []
    queue = WorkQueue(runs.append, delay=0.2, workers=2)
    try:
        started = time.monotonic()
        for _ in range(50):
            queue.add("a")
        queue.add("b")
        assert runs == []  # nothing before the delay
        wait_idle(queue)
        assert sorted(runs) == ["a", "b"]
        assert time.monotonic() - started >= 0.2
    finally:
        queue.close()


def test_a_key_asked_for_while_running_runs_again_after_and_never_twice_at_once() -> None:
    running = threading.Event()
    release = threading.Event()
    active: list[int] = [0]
    overlaps: list[int] = []
    runs: list[Hashable] = []

    def run(key: Hashable) -> None:
        active[0] += 1
        overlaps.append(active[0])
        runs.append(key)
        running.set()
        release.wait(5)
        active[0] -= 1

    queue = WorkQueue(run, delay=0.01, workers=4)
    try:
        queue.add("a")
        assert running.wait(5)
        queue.add("a")  # while it runs: once more afterwards, not now
        queue.add("a")
        time.sleep(0.1)
        assert runs == ["a"]
        release.set()
        wait_idle(queue)
        assert runs == ["a", "a"]
        assert max(overlaps) == 1
    finally:
        queue.close()


def test_a_failing_run_does_not_stop_the_queue() -> None:
    runs: list[Hashable] = []

    def run(key: Hashable) -> None:
        runs.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    queue = WorkQueue(run, delay=0.0, workers=1)
    try:
        queue.add("bad")
        wait_idle(queue)
        queue.add("good")
        wait_idle(queue)
        assert runs == ["bad", "good"]
    finally:
        queue.close()


def test_a_request_with_its_own_delay_waits_that_long_and_an_earlier_one_moves_it_forward() -> None:
    """A retry waits out its backoff, but a new request for the same key (a spec edit) does not
    wait behind it; a later request never delays a key already due sooner."""
    runs: list[tuple[Hashable, float]] = []
    queue = WorkQueue(lambda key: runs.append((key, time.monotonic())), delay=0.0, workers=1)
    try:
        started = time.monotonic()
        queue.add("retry", delay=0.3)
        queue.add("moved", delay=5.0)
        queue.add("moved", delay=0.1)  # earlier: runs at 0.1 s, once
        queue.add("moved", delay=2.0)  # later: changes nothing
        wait_idle(queue)
        at = {key: moment - started for key, moment in runs}
        assert [key for key, _ in runs] == ["moved", "retry"]
        assert 0.1 <= at["moved"] < 0.3 <= at["retry"] < 1.0
    finally:
        queue.close()


def test_a_key_asked_for_while_running_keeps_the_delay_it_asked_for() -> None:
    running = threading.Event()
    release = threading.Event()
    runs: list[float] = []

    def run(key: Hashable) -> None:
        runs.append(time.monotonic())
        running.set()
        if len(runs) == 1:
            release.wait(5)

    queue = WorkQueue(run, delay=0.0, workers=2)
    try:
        queue.add("a")
        assert running.wait(5)
        queue.add("a", delay=0.3)  # a retry asked for from inside the run
        finished = time.monotonic()
        release.set()
        wait_idle(queue)
        assert len(runs) == 2 and runs[1] - finished >= 0.3
    finally:
        queue.close()


def test_closed_queue_takes_no_work() -> None:
    runs: list[Hashable] = []
    queue = WorkQueue(runs.append, delay=0.0, workers=1)
    queue.close()
    queue.add("a")
    time.sleep(0.05)
    assert runs == [] and queue.idle()


def test_runs_see_the_context_variables_of_the_creator() -> None:
    """kopf.event() reads kopf's settings from a context variable: the refresh threads must see
    the ones kopf set where the queue was made."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    var.set("kopf's settings")
    seen: list[str] = []
    queue = WorkQueue(
        lambda key: seen.append(var.get("missing")),
        delay=0.0,
        workers=2,
        context=contextvars.copy_context(),
    )
    try:
        queue.add("a")
        queue.add("b")
        wait_idle(queue)
        assert seen == ["kopf's settings"] * 2
    finally:
        queue.close()


def test_resync_spreads_every_key_over_the_period_and_survives_a_failing_run() -> None:
    period = 0.6
    keys: list[Hashable] = ["a", "b", "c"]
    runs: list[tuple[Hashable, float]] = []

    def run(key: Hashable) -> None:
        runs.append((key, time.monotonic()))
        if key == "b":
            raise RuntimeError("one key's bug must not stop the others")

    started = time.monotonic()
    resyncer = Resyncer(run, lambda: list(keys), period)

    def wait_runs(count: int) -> None:
        deadline = time.monotonic() + 5
        while len(runs) < count:
            assert time.monotonic() < deadline, f"only {len(runs)} runs"
            time.sleep(0.01)

    try:
        time.sleep(period * 0.9)
        assert runs == []  # the first pass starts one period after start-up
        wait_runs(4)
        keys.append("d")  # the keys are read at the start of each pass: "d" joins the third
        wait_runs(10)
    finally:
        resyncer.stop()
    assert [key for key, _ in runs[:10]] == ["a", "b", "c"] * 2 + ["a", "b", "c", "d"]
    at = [moment - started for _, moment in runs]
    assert at[0] >= period
    # one key every period / 3, not all at once; each pass a period after the one before
    assert abs((at[1] - at[0]) - period / 3) < 0.15
    assert abs((at[2] - at[1]) - period / 3) < 0.15
    assert abs((at[3] - at[0]) - period) < 0.15
    assert abs((at[7] - at[6]) - period / 4) < 0.15


def test_resync_stops_between_keys() -> None:
    runs: list[Hashable] = []
    resyncer = Resyncer(runs.append, lambda: ["a", "b"], 0.2)
    time.sleep(0.25)  # first key ran at 0.2 s, the second is due at 0.3 s
    resyncer.stop()
    time.sleep(0.3)
    assert runs == ["a"]
