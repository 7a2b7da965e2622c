"""Wire format of a bus message: two frames, topic and an orjson payload."""

from __future__ import annotations

import time
from typing import Any

import orjson


class BadMessage(ValueError):
    """A frame set that is not a bus message (the peer's error, not ours)."""


def encode(topic: str, data: Any, source: str, seq: int) -> list[bytes]:
    payload = {"type": topic, "data": data, "ts": time.time(), "source": source, "seq": seq}
    return [topic.encode(), orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)]


def decode(frames: list[bytes]) -> dict[str, Any]:
    if len(frames) != 2:
        raise BadMessage(f"expected 2 frames, got {len(frames)}")
    try:
        msg = orjson.loads(frames[1])
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"payload is not JSON: {exc}") from None
    if not isinstance(msg, dict) or "type" not in msg or "data" not in msg:
        raise BadMessage("payload lacks type/data")
    return msg
