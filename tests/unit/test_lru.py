"""The operator's least-recently-used map (operator/lru.py)."""

from __future__ import annotations

import threading

from modelship.operator.lru import Lru


def test_the_least_recently_used_goes_first() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    cache.put("a", 10)  # a new value for a key in place
    cache.put("d", 4)
    assert (cache.get("a"), cache.get("c"), cache.get("d")) == (10, None, 4)


def test_it_holds_its_size_under_threads() -> None:
    cache: Lru[int, int] = Lru(50)

    def fill(start: int) -> None:
        for n in range(start, start + 1000):
            cache.put(n, n)
            cache.get(n - 7)

    threads = [threading.Thread(target=fill, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [n for n in range(4000) if cache.get(n) is not None]
    assert len(held) == 50
    assert all(cache.get(n) == n for n in held)
