"""The API's HTTP/1.1 front door: uvicorn's httptools protocol with the request-line checks Falcon
never sees.

- More than one `Host` field → 400 (RFC 9112 §3.2: which one would the Host check judge?).
- An absolute-form target (`GET http://name:port/path`) → its authority replaces the Host field
  (RFC 9112 §3.2.2: the server uses the target's host), so the Host check judges the host the
  request actually names.
- A request line without a version (HTTP/0.9) or any version but 1.0/1.1 → 400; it never
  reaches the application (Falcon cannot serve it and used to answer 500 with a traceback).

Refusals go through uvicorn's own `400 Invalid HTTP request` path (one warning line, no trace).

Bounds uvicorn does not set (a local client could otherwise hold the API's descriptors):

- A request must arrive whole (head and body) within REQUEST_DEADLINE seconds of its first byte,
  the first one within as long of the connection's start; else the connection is closed.
- Past MAX_CONNECTIONS open connections (/ws ones included) a new one is dropped at accept.
- /ws (`WebSocketProtocol`): a close to a client whose socket takes nothing (its buffer full)
  ends the TCP connection at once; uvicorn's close waited for that buffer to empty, which it never
  does for a client that stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from greyproxy.throttle import Throttle

log = logging.getLogger("greyproxy.api")

VERSIONS = ("1.0", "1.1")
REQUEST_DEADLINE = 30.0  # seconds from a request's first byte (a connection's start) to its last
MAX_CONNECTIONS = 1000  # open API connections, /ws included; past it a new one is dropped at accept
SAY_EVERY = 60.0  # seconds between log lines about dropped or timed-out connections


class _Said:
    """A warning at most every SAY_EVERY seconds, with the count since the last one."""

    def __init__(self, text: str) -> None:
        self.text, self.throttle = text, Throttle(SAY_EVERY)

    def __call__(self) -> None:
        tail = self.throttle.since()
        if tail is not None:
            log.warning("%s%s", self.text, tail)


_TOO_MANY = _Said(f"API: a connection dropped at accept, {MAX_CONNECTIONS} open already (MAX_CONNECTIONS)")
_TOO_SLOW = _Said(f"API: a connection closed, its request not all there {REQUEST_DEADLINE:g} s after it began")


class BadRequestLine(httptools.HttpParserError):
    """The request is malformed in a way the parser accepts; uvicorn answers it with a 400."""


def absolute_authority(target: bytes) -> bytes | None:
    """The host[:port] of an absolute-form request target, None for origin-form ('/path')."""
    if target.startswith(b"/") or b"://" not in target[:16]:
        return None
    url = httptools.parse_url(target)
    if not url.host:
        raise BadRequestLine("absolute-form request target without a host")
    host = url.host if b":" not in url.host else b"[" + url.host + b"]"
    return host + (b":%d" % url.port if url.port is not None else b"")


class StrictHttpProtocol(HttpToolsProtocol):
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= MAX_CONNECTIONS:
            self.transport = transport
            _TOO_MANY()
            transport.abort()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(REQUEST_DEADLINE, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            _TOO_SLOW()
            self.transport.close()

    def on_message_begin(self) -> None:
        self._arm()
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the transport is the WebSocket protocol's from now on
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        self._refusal: str | None = None
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's 400, as JSON `{"error": ...}` naming what was wrong (SPEC conventions)."""
        body = orjson.dumps({"error": getattr(self, "_refusal", None) or "invalid HTTP request"})
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    def on_headers_complete(self) -> None:
        try:
            self._check()
        except BadRequestLine as exc:
            self._refusal = str(exc)
            raise
        super().on_headers_complete()

    def _check(self) -> None:
        version = self.parser.get_http_version()
        if version not in VERSIONS:
            raise BadRequestLine(f"unsupported HTTP version {version!r}")
        hosts = [i for i, (name, _v) in enumerate(self.headers) if name == b"host"]
        if len(hosts) > 1:
            raise BadRequestLine("more than one Host header")
        authority = absolute_authority(self.url)
        if authority is not None:
            if hosts:
                self.headers[hosts[0]] = (b"host", authority)
            else:
                self.headers.append((b"host", authority))


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, with a close that reaches a client that stopped
    reading: its TCP connection ends (abort) instead of waiting for a send buffer that never empties."""

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.close" and not self.writable.is_set() and not self.disconnected:
            # Nothing can be sent to it (the buffer is over its high mark): no close frame either.
            self.close_sent = True
            self._reset()
            return
        await super().send(message)
        if message["type"] == "websocket.close" and self.close_timer is not None:
            # uvicorn's timer for the client's close frame closes the transport, which first waits
            # for its buffer to empty: abort instead.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._reset)

    def _reset(self) -> None:
        """End the TCP connection now, what the kernel still holds for it dropped (SO_LINGER 0: a
        reset). A plain close or abort let the kernel go on sending the megabytes queued for a slow
        client, which then read stale events for minutes without learning it was dropped."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
