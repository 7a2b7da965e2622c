"""When to log a line that repeats (a refused peer retrying, a client dropped at accept, a job that
cannot do its work): the first of each key at once, then at most one every `every` seconds, saying
how many went unsaid since. One for the whole project: bus/curve.py, services/api/server.py and
services/maintenance/jobs.py use it."""

from __future__ import annotations

import time
from typing import Any

KEYS = 1024  # keys remembered at most (keys may come from peers): past it, all are forgotten


class Throttle:
    def __init__(self, every: float) -> None:
        self.every = every
        self._told: dict[Any, tuple[float, int]] = {}  # key -> (last logged, lines not logged since)

    def since(self, key: Any = None) -> str | None:
        """None: do not log this one; else the text to end its line with ("" or the count since)."""
        now = time.monotonic()
        last, unsaid = self._told.get(key, (-self.every, 0))
        if now - last < self.every:
            self._told[key] = (last, unsaid + 1)
            return None
        if len(self._told) >= KEYS:
            self._told.clear()
        self._told[key] = (now, 0)
        return f" (and {unsaid} more times since the last such line)" if unsaid else ""
