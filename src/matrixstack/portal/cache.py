"""A small time-to-live cache for the portal's hot path: API keys, resolved entries, model lists.

`TtlCache.get_or_load(key, loader)` returns a cached value younger than `ttl_s`, else awaits `loader()` once
however many requests ask for the same key at the same time (they share the one load). Values (None included)
are kept `ttl_s` seconds; `clear()` drops everything at once (an admin change through this portal), `forget(key)`
one value (one that proved stale).
Runs on the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

MAX_ITEMS = 10_000  # past this many keys the cache starts over (bounds memory against random bad keys)


class TtlCache:
    """Values kept `ttl_s` seconds, loaded once per key however many callers wait (see the module docstring)."""

    def __init__(self, ttl_s: float, max_items: int = MAX_ITEMS, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._max_items = max_items
        self._clock = clock
        self._items: dict[Hashable, tuple[float, Any]] = {}
        self._loading: dict[Hashable, asyncio.Future] = {}
        self._generation = 0

    async def get_or_load(self, key: Hashable, loader: Callable[[], Awaitable[Any]]) -> Any:
        """Return the cached value of `key`, or what `loader()` returns (cached for `ttl_s` unless it raised)."""
        item = self._items.get(key)
        now_s = self._clock()
        if item is not None and item[0] > now_s:
            return item[1]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        generation = self._generation
        try:
            value = await loader()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters re-raise it; nobody left waiting must not log "never retrieved"
            raise
        else:
            future.set_result(value)
            if generation == self._generation:  # a clear() during the load makes this value stale already
                if len(self._items) >= self._max_items:
                    self._items.clear()
                self._items[key] = (self._clock() + self.ttl_s, value)
            return value
        finally:
            if self._loading.get(key) is future:
                del self._loading[key]

    def clear(self) -> None:
        """Drop every cached value; loads in progress are not cached when they finish."""
        self._items.clear()
        self._loading.clear()
        self._generation += 1

    def forget(self, key: Hashable) -> None:
        """Drop the cached value of `key`, if any (a load in progress still caches its value)."""
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)
