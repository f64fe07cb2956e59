"""Threads (reconciles, the resync, the pool queue) read kopf's indexes while the event loop
changes them: a read overtaken by a change is read again, never fails."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from kopf._core.engines.indexing import Index
from modelship.operator.handlers import _index_list


class ChangesTheIndexWhenCopied(Mapping[str, Any]):
    """An index value whose first copy adds another user to the same pool, as the event loop
    does when a new ModelDeployment's plan is indexed while a thread copies the pool's users."""

    def __init__(self, index: Index[str, Any], data: dict[str, Any]) -> None:
        self.index, self.data, self.copies = index, data, 0

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def keys(self) -> Any:
        self.copies += 1
        if self.copies == 1:
            self.index._replace(("ns", "b", "uid-b"), {"pool": {"user": "ns/b"}})
        return self.data.keys()


def test_a_pool_read_while_a_user_is_indexed_is_read_again_with_every_user() -> None:
    index: Index[str, Any] = Index()
    first = ChangesTheIndexWhenCopied(index, {"user": "ns/a"})
    index._replace(("ns", "a", "uid-a"), {"pool": first})
    users = sorted(item["user"] for item in _index_list(index, "pool"))
    assert users == ["ns/a", "ns/b"]
    assert first.copies == 2  # the overtaken read was thrown away and done again


def test_a_missing_key_or_index_reads_as_nothing() -> None:
    index: Index[str, Any] = Index()
    assert _index_list(index, "pool") == []
    assert _index_list(None, "pool") == []
