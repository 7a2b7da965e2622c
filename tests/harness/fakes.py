"""In-memory stand-ins for the bus pieces a `Gate` writes to, for tests without a stack."""

from __future__ import annotations

from typing import Any


class Journal:
    """The journal writer's `append`: every record kept, in order (its id: its position)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def append(self, kind: str, data: Any) -> str:
        self.records.append((kind, data))
        return str(len(self.records))


class Publisher:
    """The event publisher, dropping every event."""

    def publish(self, topic: str, data: Any) -> None:
        pass
