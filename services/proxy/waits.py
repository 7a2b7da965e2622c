"""Futures waiting on keys, woken by whoever learns something about a key (pure asyncio, no I/O).

Used for names: a connection to an unnamed IP waiting for its name (`Gate.learn` wakes it), and a
DNS answer waiting for the bus to echo its names back (`DnsProxy.echoed`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable
from typing import Any


class KeyedWaits:
    """`wait` for keys until `wake` gives them a value, or a timeout."""

    def __init__(self) -> None:
        self._waits: dict[Hashable, list[asyncio.Future]] = {}

    def __len__(self) -> int:
        return len(self._waits)

    async def wait(self, keys: Iterable[Hashable], timeout: float) -> dict[Hashable, Any]:
        """Wait until every key is woken, or `timeout`: {key: value} of those woken."""
        loop = asyncio.get_running_loop()
        futures = []
        for key in keys:
            fut = loop.create_future()
            self._waits.setdefault(key, []).append(fut)
            futures.append((key, fut))
        try:
            await asyncio.wait([f for _k, f in futures], timeout=timeout)
        finally:
            for key, fut in futures:
                waits = self._waits.get(key)
                if waits is not None:
                    if fut in waits:
                        waits.remove(fut)
                    if not waits:
                        del self._waits[key]
        return {key: fut.result() for key, fut in futures if fut.done() and not fut.cancelled()}

    def wake(self, key: Hashable, value: Any = None) -> None:
        """Give `key` its value: every wait on it ends (when it waits for no other key)."""
        for fut in self._waits.pop(key, ()):
            if not fut.done():
                fut.set_result(value)
