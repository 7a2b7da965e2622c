"""/ws: the control WebSocket (SPEC §8): one resource, and one Connection per accepted client.

A connection greets, then runs a writer (its replies first, then its events from the hub) and
a reader (commands, see commands.py) until either side ends or a send stays blocked too long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import falcon
import falcon.asgi

from .. import origin
from ..context import ApiContext
from . import commands
from .hub import QUEUE_SIZE, SUBSCRIBE_SETTLE, Dropped, EventFilter, EventQueue, Hub, encode, reply

log = logging.getLogger("greyproxy.api.ws")

REPLY_QUEUE_SIZE = 64  # command replies waiting to be sent; past this we stop reading the client
SEND_TIMEOUT = 10.0  # a client whose socket accepts nothing for this long is disconnected
WATCH_INTERVAL = 1.0  # how often a connection checks its own send for that timeout
CLOSE_FORBIDDEN = 3403  # Falcon's convention: 3000 + HTTP status; before accept it becomes a 403
CLOSE_TOO_SLOW = 1008
CLOSE_INTERNAL_ERROR = 1011


class Socket(Protocol):
    """The part of falcon.asgi.WebSocket a connection uses (a fake one in unit tests)."""

    async def send_text(self, payload: str) -> None: ...
    async def receive_text(self) -> str: ...
    async def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Connection:
    """One accepted /ws client: its filter, its queues, a writer task and the command reader."""

    def __init__(
        self, hub: Hub, ws: Socket, peer: str = "?", queue_size: int = QUEUE_SIZE, send_timeout: float = SEND_TIMEOUT
    ) -> None:
        self.hub = hub
        self.ws = ws
        self.peer = peer
        self.filter = EventFilter()
        self.events = EventQueue(queue_size)
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue(REPLY_QUEUE_SIZE)
        self.send_timeout = send_timeout
        self.too_slow = False
        self._wake = asyncio.Event()
        self._send_started: float | None = None  # loop time when the send in progress began

    def offer(self, text: str) -> None:
        """Queue one encoded event (the bridge has checked the filter)."""
        self.events.offer(text)
        self._wake.set()

    async def send_reply(self, obj: dict[str, Any]) -> None:
        # Awaiting a full reply queue stops us reading commands: a client cannot pile up replies.
        await self.replies.put(obj)
        self._wake.set()

    async def run(self) -> None:
        """Greet, then read commands and write events until either side ends."""
        greeting = reply(
            "connected",
            message="greyproxy control WebSocket: commands are JSON objects with a 'command' (see docs/events.md)",
        )
        try:
            await asyncio.wait_for(self.ws.send_text(encode(greeting)), self.send_timeout)
        except TimeoutError:
            self.too_slow = True
            return
        except Exception as exc:
            if _is_disconnect(exc):
                return
            raise
        writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.peer}")
        reader = asyncio.create_task(self._read_loop(), name=f"ws-reader-{self.peer}")
        done: set[asyncio.Task[None]] = set()
        try:
            while not done and not self._send_stuck():
                done, _ = await asyncio.wait(
                    {writer, reader},
                    timeout=min(WATCH_INTERVAL, self.send_timeout / 2),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
        if not done:
            self.too_slow = True
            log.info("ws %s: a send blocked for over %.0f s; disconnecting", self.peer, self.send_timeout)
        for task in done:
            err = None if task.cancelled() else task.exception()
            if err is not None and not _is_disconnect(err):
                log.warning("ws %s: ended by %r", self.peer, err)

    def _send_stuck(self) -> bool:
        started = self._send_started
        return started is not None and asyncio.get_running_loop().time() - started > self.send_timeout

    async def _send(self, text: str) -> None:
        # A timestamp, not wait_for: a task per frame would cost more than the send itself.
        self._send_started = asyncio.get_running_loop().time()
        try:
            await self.ws.send_text(text)
        finally:
            self._send_started = None

    async def _write_loop(self) -> None:
        while True:
            if not self.replies.empty():
                await self._send(encode(self.replies.get_nowait()))
                continue
            item = self.events.pop()
            if item is None:
                self._wake.clear()
                await self._wake.wait()
            elif isinstance(item, Dropped):
                await self._send(encode(reply("dropped", count=item.count)))
            else:
                await self._send(item)

    async def _read_loop(self) -> None:
        while True:
            try:
                text = await self.ws.receive_text()
            except falcon.errors.PayloadTypeError:
                await self.send_reply(reply("error", error="invalid JSON"))  # binary frames are not commands
                continue
            await self.send_reply(await self.handle_text(text))

    async def handle_text(self, text: str) -> dict[str, Any]:
        """One client message to its reply (never raises for the client's mistakes)."""
        return await commands.handle_text(self, text)


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, (falcon.errors.WebSocketDisconnected, ConnectionError, OSError))


class WebSocketResource:
    def __init__(self, hub: Hub, local_only: origin.LocalOnly) -> None:
        self.hub = hub
        self.local_only = local_only

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        """A plain HTTP GET (no upgrade): say what this route is instead of a bare 405."""
        raise falcon.HTTPError(
            falcon.HTTP_426,
            description="this is a WebSocket endpoint: connect with an Upgrade: websocket request",
            headers={"Upgrade": "websocket"},
        )

    async def on_websocket(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket) -> None:
        # The LocalOnly middleware has refused foreign Hosts and Origins already; the same check
        # again here keeps this resource safe in an app built without it.
        refused = self.local_only.refusal_for(req, "WEBSOCKET")
        if refused is not None:
            log.warning("ws: refused upgrade from %s: %s", req.remote_addr, refused.message)
            await ws.close(CLOSE_FORBIDDEN)  # before accept: the client gets HTTP 403
            return
        conn = Connection(self.hub, ws, peer=f"{req.remote_addr}")
        if self.hub.add(conn):
            await asyncio.sleep(SUBSCRIBE_SETTLE)
        try:
            await ws.accept()
        except BaseException:
            self.hub.remove(conn)
            raise
        close: tuple[int, str] | None = None
        try:
            await conn.run()
            if conn.too_slow:
                close = (CLOSE_TOO_SLOW, "too slow")
        except Exception:  # the app's HTTP error handlers cannot render on a socket: close it here
            log.exception("ws %s: connection failed", conn.peer)
            close = (CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self.hub.remove(conn)
        if close is not None:
            with contextlib.suppress(Exception):  # the peer may be gone or stuck: bounded by the close timeout
                await asyncio.wait_for(ws.close(*close), 15)


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/ws"), WebSocketResource(ctx.ws_hub, origin.LocalOnly.from_config(ctx.cfg)))
