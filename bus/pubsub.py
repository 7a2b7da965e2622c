"""Publisher and subscriber helpers (zmq.asyncio on the subscriber side)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import zmq
import zmq.asyncio

from . import curve, message

log = logging.getLogger("greyproxy.bus")
# ZMQ_EVENTS is a plain int; `& zmq.POLLIN` (an IntFlag) would go through enum.Flag.__and__ (~3 µs).
_POLLIN = int(zmq.POLLIN)


class Publisher:
    """Publishes events; never blocks: a full queue drops the event (pub/sub is lossy by design).

    It also knows which topic prefixes someone on the bus subscribes to: its socket is an XPUB,
    and the broker forwards every subscriber's (un)subscriptions to it (the ones current when it
    connects, then each change). `wanted(topic)` says whether an event on `topic` would reach
    anyone, so a caller can skip building a payload nobody subscribes to; `publish` skips
    encoding such an event. Both mirror the socket's own filter, which drops such an event
    anyway: libzmq updates that filter and hands us the (un)subscription in the same step, and
    `wanted` takes in every one that has arrived before answering. While unsure (before the first
    subscription arrives, for `settle` seconds after connecting) it answers yes.

    Not thread-safe: use it from one thread (the event loop's, or the one writer thread).
    """

    SETTLE = 1.0  # seconds after connecting during which, with no subscription seen yet, all is wanted

    def __init__(self, endpoint: str, source: str, ctx: zmq.Context | None = None, settle: float = SETTLE) -> None:
        self.source = source
        self.seq = 0
        self.dropped = 0
        self.skipped = 0  # events nobody subscribed to, not sent
        self._ctx = ctx or zmq.Context.instance()
        self._endpoint = endpoint
        self._settle = settle
        self._open()

    def _open(self) -> None:
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._prefixes: set[bytes] = set()  # subscribed prefixes (b"" = everything)
        self._cache: dict[str, bool] = {}  # topic -> wanted, for the current prefixes
        self._unsure_until: float | None = time.monotonic() + self._settle
        curve.secure(self._sock, self._endpoint, server=False)
        # tcp:// with CURVE: watch the handshakes, since a refused key is never retried (below).
        self._monitor: zmq.Socket | None = None
        if self._endpoint.startswith("tcp://") and curve.configured():
            self._monitor = self._sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
            )
        self._sock.connect(self._endpoint)

    def refused(self) -> bool | None:
        """tcp:// only, non-blocking: True when the bus's last handshake refused this host's key,
        False when the last one succeeded, None when none happened since the last look."""
        if self._monitor is None:
            return None
        from zmq.utils.monitor import recv_monitor_message

        seen: bool | None = None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            seen = event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        return seen

    def reconnect(self) -> None:
        """Connect again on a fresh socket. libzmq gives up on a tcp:// endpoint for good once its
        CURVE server refused this host's key (the refusal ends the session as a protocol error,
        which is never retried): the heartbeat loop (greyproxy/runtime.py) calls this, backing
        off, while `refused()` says so, and a proxy that waited for its key to be allowed too."""
        self._close_socket(linger=0)
        self._open()

    def _close_socket(self, linger: int | None = None) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._sock.close(linger=linger)

    def _take_subscriptions(self) -> None:
        """Take in the (un)subscriptions that arrived; non-blocking."""
        sock = self._sock
        # ZMQ_EVENTS also makes the socket process what its I/O thread delivered (new
        # subscriptions included), so afterwards the pending ones are all readable.
        if not cast(int, sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            return
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            # b"\x01prefix" subscribes, b"\x00prefix" unsubscribes; anything else is not ours.
            # Without XPUB_VERBOSE libzmq passes a prefix's first subscription and its last
            # unsubscription only, so a set (not a count) mirrors its filter.
            if not msg or msg[0] > 1:
                continue
            if msg[0] == 1:
                self._prefixes.add(msg[1:])
            else:
                self._prefixes.discard(msg[1:])
            self._cache.clear()
            self._unsure_until = None

    def wanted(self, topic: str) -> bool:
        """Whether some subscriber's prefix matches `topic` (in doubt: True)."""
        self._take_subscriptions()
        if self._unsure_until is not None:
            if time.monotonic() < self._unsure_until:
                return True
            self._unsure_until = None
        hit = self._cache.get(topic)
        if hit is None:
            t = topic.encode()
            hit = self._cache[topic] = any(t.startswith(p) for p in self._prefixes)
        return hit

    def publish(self, topic: str, data: Any, *, check: bool = True) -> None:
        """Send one event; with check=False the caller has just asked `wanted(topic)` itself."""
        self.seq += 1
        if check and not self.wanted(topic):
            self.skipped += 1  # the socket would drop it: no subscriber matches
            return
        try:
            self._sock.send_multipart(message.encode(topic, data, self.source, self.seq), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def skip(self, n: int = 1) -> None:
        """Count n events not built because `wanted` said no one wants them (keeps `seq` as if sent)."""
        self.seq += n
        self.skipped += n

    def close(self) -> None:
        self._close_socket()  # (the socket's own linger: what was published last still leaves)


class Subscriber:
    """Receives events for the given topic prefixes ('' = everything); detects per-source gaps."""

    def __init__(
        self,
        endpoint: str,
        prefixes: Iterable[str] = ("",),
        ctx: zmq.asyncio.Context | None = None,
        rcvhwm: int = 100_000,
    ) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        curve.secure(self._sock, endpoint, server=False)
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
