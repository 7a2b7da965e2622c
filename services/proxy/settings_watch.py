"""The settings table as the proxy sees it: loaded in a worker thread, kept current by the
`settings.changed` event and, to heal a missed event, a periodic look at `meta.settings_version`.

Consumers read `watch.get(key, default)` (stored values, JSON-decoded; defaults are theirs) and may
register callbacks that run on the event loop after each change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from bus import topics
from bus.pubsub import Subscriber

from .store_view import LocalView, RecorderView, log_failure

log = logging.getLogger("greyproxy.proxy")

CHECK_EVERY = 2.0  # seconds between version checks

Callback = Callable[[dict[str, Any]], None]


def _read_all(view: LocalView | RecorderView) -> tuple[int, dict[str, Any]]:
    """(settings_version, {key: decoded value}) in one read transaction; undecodable values skipped."""
    return view.settings()


class SettingsWatch:
    def __init__(
        self,
        sub_endpoint: str,
        executor: Executor,
        check_every: float = CHECK_EVERY,
        view: LocalView | RecorderView | None = None,
    ) -> None:
        self.sub_endpoint = sub_endpoint
        self.view = view or LocalView()
        self.executor = executor
        self.check_every = check_every
        self.values: dict[str, Any] = {}
        self.version = -1
        self._callbacks: list[Callback] = []
        self._lock = asyncio.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def on_change(self, fn: Callback) -> None:
        """Call fn(values) after every reload that changed something (and once now if loaded)."""
        self._callbacks.append(fn)
        if self.version >= 0:
            fn(self.values)

    async def load(self, force: bool = False) -> bool:
        """Re-read when the version moved (always with force). True when the values changed (or first load)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if not force and self.version >= 0:
                if await loop.run_in_executor(self.executor, self.view.settings_version) == self.version:
                    return False
            version, values = await loop.run_in_executor(self.executor, _read_all, self.view)
            first, self.version = self.version < 0, version
            if values == self.values and not first:
                return False
            self.values = values
        for fn in list(self._callbacks):
            try:
                fn(values)
            except Exception:
                log.exception("settings callback failed")
        return True

    async def run(self) -> None:
        """Forever: reload on settings.changed and on a version check every few seconds."""
        await asyncio.gather(self._listen(), self._poll())

    async def _listen(self) -> None:
        sub = Subscriber(self.sub_endpoint, (topics.SETTINGS_CHANGED,))
        try:
            while True:
                await sub.recv()
                try:
                    await self.load(force=True)
                except Exception:
                    log_failure(log, "settings reload failed")
        finally:
            sub.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            try:
                await self.load()
            except Exception:
                log_failure(log, "settings version check failed")
