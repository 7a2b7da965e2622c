"""Publisher and subscriber helpers (zmq.asyncio on the subscriber side)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import zmq
import zmq.asyncio

from . import message

log = logging.getLogger("greyproxy.bus")


class Publisher:
    """Publishes events; never blocks: a full queue drops the event (pub/sub is lossy by design).

    Not thread-safe: use it from one thread (the event loop's, or the one writer thread).
    """

    def __init__(self, endpoint: str, source: str, ctx: zmq.Context | None = None) -> None:
        self.source = source
        self.seq = 0
        self.dropped = 0
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.connect(endpoint)

    def publish(self, topic: str, data: Any) -> None:
        self.seq += 1
        try:
            self._sock.send_multipart(message.encode(topic, data, self.source, self.seq), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self._sock.close()


class Subscriber:
    """Receives events for the given topic prefixes ('' = everything); detects per-source gaps."""

    def __init__(self, endpoint: str, prefixes: Iterable[str] = ("",), ctx: zmq.asyncio.Context | None = None,
                 rcvhwm: int = 100_000) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.connect(endpoint)
        for p in prefixes:
            self._sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        self._last_seq: dict[str, int] = {}
        self.gaps = 0

    def subscribe(self, prefix: str) -> None:
        self._sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    def unsubscribe(self, prefix: str) -> None:
        self._sock.setsockopt(zmq.UNSUBSCRIBE, prefix.encode())

    async def recv(self) -> dict[str, Any]:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                msg = message.decode(frames)
            except message.BadMessage as exc:
                log.warning("dropping bad bus message: %s", exc)
                continue
            self._note_seq(msg)
            return msg

    def _note_seq(self, msg: dict[str, Any]) -> None:
        src, seq = msg.get("source"), msg.get("seq")
        if not isinstance(src, str) or not isinstance(seq, int):
            return
        last = self._last_seq.get(src)
        # A lower seq means the publisher restarted: not a gap.
        if last is not None and seq > last + 1:
            self.gaps += 1
            msg["_gap"] = True
        self._last_seq[src] = seq

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.recv()

    def close(self) -> None:
        self._sock.close()


async def wait_connected(delay: float = 0.05) -> None:
    """Give a fresh PUB/SUB pair a moment to finish connecting (zmq's slow joiner)."""
    await asyncio.sleep(delay)
