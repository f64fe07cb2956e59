"""The operator's own informers (operator/informer.py) against a real API server: what they
list and watch, what a relist reports as deleted, a kind that is not installed, and a stop."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from modelship.operator.apply import CONFIG_MAP, MD_LABEL, Kind, Kube
from modelship.operator.informer import Informer, Store

from tests.servers.kubeplane import ControlPlane, wait_for

pytestmark = pytest.mark.integration


class Seen:
    """What an informer handed over, from its thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str | None, str]] = []
        self.lock = threading.Lock()

    def __call__(self, event: str | None, body: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((event, body["metadata"]["name"]))

    def of(self, name: str) -> list[str | None]:
        with self.lock:
            return [event for event, seen in self.events if seen == name]


def config_map(kube: Kube, ns: str, name: str, labelled: bool = True) -> None:
    labels = {MD_LABEL: "owner"} if labelled else {}
    body = {"metadata": {"name": name, "labels": labels}, "data": {"n": "0"}}
    kube.request("POST", CONFIG_MAP.path(ns), body=body)


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> Kube:
    return control_plane.kube()


def test_lists_then_watches_only_labelled_objects(control_plane: ControlPlane, kube: Kube) -> None:
    ns = "informer-a"
    control_plane.ensure_namespace(ns, {})
    config_map(kube, ns, "before")
    config_map(kube, ns, "stranger", labelled=False)
    seen = Seen()
    informer = Informer(kube, CONFIG_MAP, MD_LABEL, seen, ns).start()
    try:
        assert informer.synced.wait(10)
        assert seen.of("before") == [None]  # the first listing, as kopf's on.event says
        config_map(kube, ns, "after")
        kube.merge_patch(CONFIG_MAP, ns, "after", {"data": {"n": "1"}})
        kube.delete(CONFIG_MAP, ns, "before")
        wait_for("the deletion", lambda: seen.of("before") == [None, "DELETED"])
        wait_for("the change", lambda: seen.of("after") == ["ADDED", "MODIFIED"])
        assert seen.of("stranger") == []  # filtered by the server, never sent
    finally:
        informer.stop()


def test_a_relist_reports_what_went_meanwhile_as_deleted(
    control_plane: ControlPlane, kube: Kube
) -> None:
    """After a watch gap too long to resume (410 Gone), the informer lists again: an object
    deleted in the gap must still reach the handler, or its owner never hears of it."""
    ns = "informer-b"
    control_plane.ensure_namespace(ns, {})
    config_map(kube, ns, "stays")
    config_map(kube, ns, "goes")
    seen = Seen()
    informer = Informer(kube, CONFIG_MAP, MD_LABEL, seen, ns)  # its thread is not started
    informer._list()
    kube.delete(CONFIG_MAP, ns, "goes")
    config_map(kube, ns, "new")
    informer._list()
    assert seen.of("goes") == [None, "DELETED"]
    assert seen.of("stays") == [None, "MODIFIED"]
    assert seen.of("new") == ["ADDED"]


def test_a_kind_that_is_not_installed_is_waited_for_quietly(
    kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    missing = Kind("example.com/v1", "Missing", "missings", True)
    informer = Informer(kube, missing, MD_LABEL, Seen()).start()
    try:
        time.sleep(1.5)
        assert not informer.synced.is_set()
        assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    finally:
        informer.stop()


def test_stop_ends_an_idle_watch_at_once(control_plane: ControlPlane, kube: Kube) -> None:
    ns = "informer-c"
    control_plane.ensure_namespace(ns, {})
    informer = Informer(kube, CONFIG_MAP, MD_LABEL, Seen(), ns).start()
    assert informer.synced.wait(10)
    time.sleep(0.5)  # the watch is open and waiting
    started = time.monotonic()
    informer.stop()
    informer._thread.join(5)
    assert not informer._thread.is_alive()
    assert time.monotonic() - started < 2


def test_store_reads_values_by_key() -> None:
    store = Store()
    store.put("k", "uid-1", {"n": 1})
    store.put("k", "uid-2", {"n": 2})
    store.remove("k", "uid-1")
    assert store.get("k") == [{"n": 2}]
    store.remove("k", "uid-2")
    assert store.get("k") == [] and store.get("other", [1]) == [1]
