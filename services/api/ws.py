"""/ws: the control WebSocket (SPEC §8) and the bridge that feeds it from the bus.

One bus subscriber task (the bridge) receives every public event once, encodes it once, and
offers it to each connection's bounded queue. A connection that cannot keep up loses events
for itself alone: they are counted and reported as `{"type":"dropped","count":n}` at the
place of the gap, so memory stays flat whatever the clients do. Commands (allow, deny,
dismiss) go through the same functions as REST, so effects and events are identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import falcon
import falcon.asgi
import orjson

from bus import topics
from bus.pubsub import Subscriber
from greyproxy.timeutil import rfc3339

from . import origin, pending
from .app import ROUTE_PROVIDERS
from .context import ApiContext
from .errors import ApiError
from .util import MAX_ID

log = logging.getLogger("greyproxy.api.ws")

QUEUE_SIZE = 1000  # events buffered per connection before its own events are dropped
REPLY_QUEUE_SIZE = 64  # command replies waiting to be sent; past this we stop reading the client
SEND_TIMEOUT = 10.0  # a client whose socket accepts nothing for this long is disconnected
WATCH_INTERVAL = 1.0  # how often a connection checks its own send for that timeout
BRIDGE_RCVHWM = 20_000  # the bridge's own bus buffer: bounded, so a burst cannot grow memory
YIELD_EVERY = 256  # a burst of ready bus messages must not starve the connections' writers
MAX_COMMAND_BYTES = 64 * 1024
CLOSE_FORBIDDEN = 3403  # Falcon's convention: 3000 + HTTP status; before accept it becomes a 403
CLOSE_TOO_SLOW = 1008
CLOSE_INTERNAL_ERROR = 1011
CREATED_BY = "ws"
PUBLIC = frozenset(topics.PUBLIC)
# One event per proxied request: the bridge subscribes to these only while a /ws client is
# connected, so an API with nobody watching does not receive (and decode) every request's event.
BUSY_TOPICS = (topics.LOG_NEW, topics.TRANSACTION_NEW)
# After the first client turns those on, the subscription takes a moment to reach the publishers
# through the broker; the greeting waits this long so that nothing after it is missed.
SUBSCRIBE_SETTLE = 0.05
WILDCARD = "*"


def now_ts() -> str:
    return rfc3339(time.time()) or ""


def encode(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()


def reply(type_: str, **fields: Any) -> dict[str, Any]:
    """A flat reply object; every reply carries a timestamp."""
    return {"type": type_, **fields, "timestamp": now_ts()}


# ----------------------------------------------------------------------------- pure parts

def parse_pattern(pattern: Any) -> tuple[str, bool]:
    """('topic', False) for an exact public type, ('prefix.', True) for 'family.*' or '*'; ValueError otherwise."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("event_type must be a non-empty string")
    pattern = pattern.strip()
    if pattern == WILDCARD:
        return "", True
    if pattern.endswith(".*"):
        prefix = pattern[:-1]
        if not any(t.startswith(prefix) for t in PUBLIC):
            raise ValueError(f"unknown event family: {pattern}")
        return prefix, True
    if pattern not in PUBLIC:
        raise ValueError(f"unknown event type: {pattern}")
    return pattern, False


class EventFilter:
    """Which public events one connection wants.

    Fresh: everything. The first subscribe narrows to the subscribed types; unsubscribing the
    last one leaves nothing (never back to everything). Unsubscribing one type of a family (or
    of the fresh "everything") excludes just that type.
    """

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.families: set[str] = {""}  # "" is the prefix of every topic
        self.excluded: set[str] = set()
        self.narrowed = False

    def subscribe(self, pattern: str) -> None:
        key, family = parse_pattern(pattern)
        if not self.narrowed:
            self.families.clear()
            self.excluded.clear()
            self.narrowed = True
        if family:
            self.families.add(key)
            self.excluded = {t for t in self.excluded if not t.startswith(key)}
        else:
            self.exact.add(key)
            self.excluded.discard(key)

    def unsubscribe(self, pattern: str) -> None:
        key, family = parse_pattern(pattern)
        if family:
            self.families.discard(key)
            self.exact = {t for t in self.exact if not t.startswith(key)}
            self.excluded = {t for t in self.excluded if not t.startswith(key)}
        else:
            self.exact.discard(key)
            if any(key.startswith(f) for f in self.families):
                self.excluded.add(key)

    def matches(self, topic: str) -> bool:
        if topic in self.excluded:
            return False
        return topic in self.exact or any(topic.startswith(f) for f in self.families)


@dataclass(frozen=True)
class Dropped:
    """Marks a gap in one connection's stream: `count` events were dropped here."""
    count: int


class EventQueue:
    """A bounded queue of encoded events; overflow is dropped and counted, never buffered.

    The drop notice takes the place of the gap: it is queued before the first event accepted
    after it, or handed out when the queue drains with no event after it.
    """

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        if maxsize < 2:
            raise ValueError("maxsize must be at least 2 (an event and a drop notice)")
        self.maxsize = maxsize
        self._items: deque[str | Dropped] = deque()
        self.unreported = 0  # dropped since the last notice was queued
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: str) -> bool:
        """Queue an event; False (and counted) when this queue is full."""
        if self.unreported:
            if len(self._items) + 2 > self.maxsize:
                return self._drop()
            self._items.append(Dropped(self.unreported))
            self.unreported = 0
        elif len(self._items) >= self.maxsize:
            return self._drop()
        self._items.append(item)
        return True

    def _drop(self) -> bool:
        self.unreported += 1
        self.dropped_total += 1
        return False

    def pop(self) -> str | Dropped | None:
        if self._items:
            return self._items.popleft()
        if self.unreported:
            n, self.unreported = self.unreported, 0
            return Dropped(n)
        return None


# ----------------------------------------------------------------------------- connections

class Socket(Protocol):
    """The part of falcon.asgi.WebSocket a connection uses (a fake one in unit tests)."""

    async def send_text(self, payload: str) -> None: ...
    async def receive_text(self) -> str: ...
    async def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Connection:
    """One accepted /ws client: its filter, its queues, a writer task and the command reader."""

    def __init__(self, hub: Hub, ws: Socket, peer: str = "?", queue_size: int = QUEUE_SIZE,
                 send_timeout: float = SEND_TIMEOUT) -> None:
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
        greeting = reply("connected", message="greyproxy control WebSocket: commands are JSON objects with "
                                              "a 'command' (see docs/events.md)")
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
                done, _ = await asyncio.wait({writer, reader}, timeout=min(WATCH_INTERVAL, self.send_timeout / 2),
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
        if not done:
            self.too_slow = True
            log.info("ws %s: a send blocked for over %.0f s; disconnecting", self.peer, self.send_timeout)
        for task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not _is_disconnect(exc):
                log.warning("ws %s: ended by %r", self.peer, exc)

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
        if len(text) > MAX_COMMAND_BYTES:
            return reply("error", error=f"message larger than {MAX_COMMAND_BYTES} bytes")
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            return reply("error", error="invalid JSON")
        if not isinstance(msg, dict):
            return reply("error", error="message must be a JSON object")
        command = msg.get("command")
        if command is None:
            return reply("error", error="missing command")
        handler = COMMANDS.get(command) if isinstance(command, str) else None
        if handler is None:
            return reply("error", error=f"unknown command: {command}")
        try:
            return await handler(self, msg)
        except ApiError as exc:  # the same 400/404 messages REST gives
            return _command_error(str(command), msg, exc.message)
        except falcon.HTTPError as exc:
            return _command_error(str(command), msg, exc.description or exc.title or "error")
        except Exception:  # a failing command must not end the connection
            log.exception("ws %s: command %s failed", self.peer, command)
            return _command_error(str(command), msg, "internal error")


def _command_error(command: str, msg: dict[str, Any], error: str) -> dict[str, Any]:
    extra = {"pending_id": msg.get("pending_id")} if "pending_id" in msg else {}
    return reply("error", error=error, command=command, **extra)


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, (falcon.errors.WebSocketDisconnected, ConnectionError, OSError))


def _pending_id(msg: dict[str, Any]) -> int:
    pid = msg.get("pending_id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ApiError(400, "pending_id must be an integer")
    if not 1 <= pid <= MAX_ID:  # no row has it (and SQLite could not even look a bigger one up)
        raise ApiError(404, f"pending request {pid} not found")
    return pid


async def _cmd_ping(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    return reply("pong")


async def _cmd_subscribe(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    try:
        conn.filter.subscribe(msg.get("event_type"))
    except ValueError as exc:
        return reply("error", error=str(exc), command="subscribe")
    return reply("subscribed", event_type=msg["event_type"].strip())


async def _cmd_unsubscribe(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    try:
        conn.filter.unsubscribe(msg.get("event_type"))
    except ValueError as exc:
        return reply("error", error=str(exc), command="unsubscribe")
    return reply("unsubscribed", event_type=msg["event_type"].strip())


def _decision_command(action: str) -> Callable[[Connection, dict[str, Any]], Any]:
    async def run(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
        pid = _pending_id(msg)
        body = {k: msg[k] for k in ("scope", "duration", "notes") if k in msg}
        result = await pending.decide(conn.hub.ctx, pid, action, body, created_by=CREATED_BY)
        return reply("command_success", command=action, pending_id=pid, rule_id=result["rule"]["id"])
    return run


async def _cmd_dismiss(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    pid = _pending_id(msg)
    if not await pending.dismiss(conn.hub.ctx, pid):
        raise ApiError(404, f"pending request {pid} not found")  # → an `error` reply naming the command
    return reply("command_success", command="dismiss", pending_id=pid, removed=True)


async def _cmd_claim(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    return reply("notification_claimed", active_claims=conn.hub.claim(conn))


COMMANDS: dict[str, Callable[[Connection, dict[str, Any]], Any]] = {
    "ping": _cmd_ping,
    "subscribe": _cmd_subscribe,
    "unsubscribe": _cmd_unsubscribe,
    "allow": _decision_command("allow"),
    "deny": _decision_command("deny"),
    "dismiss": _cmd_dismiss,
    "claim_notifications": _cmd_claim,
}


# ----------------------------------------------------------------------------- the hub and the bridge

class Hub:
    """The API process's connections, their notification claims, and the bus bridge feeding them."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.connections: set[Connection] = set()
        self.claimants: set[Connection] = set()
        self._sub: Subscriber | None = None

    def add(self, conn: Connection) -> bool:
        """Register a client; True when that turned the busy topics on (the caller should let the
        subscription settle before greeting)."""
        first = not self.connections
        self.connections.add(conn)
        if first and self._sub is not None:
            for t in BUSY_TOPICS:
                self._sub.subscribe(t)
            return True
        return False

    def remove(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._sub is not None:
            for t in BUSY_TOPICS:
                self._sub.unsubscribe(t)
        if conn in self.claimants:
            self.claimants.discard(conn)
            self._claims_changed()

    def claim(self, conn: Connection) -> int:
        """A connection claims OS notifications (idempotent); the count of claims now."""
        if conn not in self.claimants:
            self.claimants.add(conn)
            self._claims_changed()
        return len(self.claimants)

    def _claims_changed(self) -> None:
        self.ctx.notification_claims = len(self.claimants)  # type: ignore[attr-defined]
        # Through the bus: other processes and every /ws client (via the bridge) learn of it.
        self.ctx.publish(topics.NOTIFICATION_CLAIMS_CHANGED, {"active_claims": len(self.claimants)})

    def dispatch(self, topic: str, data: Any) -> None:
        """Offer one bus event to every connection; encoded once, only if someone wants it."""
        if topic not in PUBLIC or not self.connections:
            return
        text: str | None = None
        for conn in tuple(self.connections):
            if conn.filter.matches(topic):
                if text is None:
                    text = encode({"type": topic, "data": data})
                conn.offer(text)

    async def run_bridge(self, subscriber_factory: Callable[[], Subscriber] | None = None) -> None:
        """The single bus subscriber of this process for /ws, until cancelled."""
        sub = (subscriber_factory or self._subscriber)()
        self._sub = sub
        if self.connections:
            for t in BUSY_TOPICS:
                sub.subscribe(t)
        try:
            n = 0
            while True:
                msg = await sub.recv()
                topic = msg.get("type")
                try:
                    if isinstance(topic, str):
                        self.dispatch(topic, msg.get("data"))
                except Exception:  # one odd event must not stop the stream for everyone
                    log.exception("ws bridge: dispatching %r failed", topic)
                n += 1
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a ready message does not yield by itself
        finally:
            self._sub = None
            sub.close()

    def _subscriber(self) -> Subscriber:
        quiet = [t for t in topics.PUBLIC if t not in BUSY_TOPICS]
        return Subscriber(self.ctx.cfg.bus["sub"], quiet, rcvhwm=BRIDGE_RCVHWM)


class WebSocketResource:
    def __init__(self, hub: Hub, local_only: origin.LocalOnly) -> None:
        self.hub = hub
        self.local_only = local_only

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        """A plain HTTP GET (no upgrade): say what this route is instead of a bare 405."""
        raise falcon.HTTPError(falcon.HTTP_426, description="this is a WebSocket endpoint: connect with an"
                               " Upgrade: websocket request", headers={"Upgrade": "websocket"})

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


def hub_of(ctx: ApiContext) -> Hub:
    """The context's hub, made on first use (registration and the service share it)."""
    hub = getattr(ctx, "ws_hub", None)
    if hub is None:
        hub = Hub(ctx)
        ctx.ws_hub = hub  # type: ignore[attr-defined]
        ctx.notification_claims = 0  # type: ignore[attr-defined]
    return hub


async def run_bridge(ctx: ApiContext) -> None:
    """Entry point for the service: feed every /ws connection from the bus."""
    await hub_of(ctx).run_bridge()


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/ws"), WebSocketResource(hub_of(ctx), origin.LocalOnly.from_config(ctx.cfg)))


ROUTE_PROVIDERS.append(register)
