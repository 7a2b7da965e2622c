"""/ws events: which events a connection wants, its bounded queue, and the hub feeding them from the bus.

One bus subscriber task (the bridge) receives every public event once, encodes it once, and
offers it to each connection's bounded queue. A connection that cannot keep up loses events
for itself alone: they are counted and reported as `{"type":"dropped","count":n}` at the
place of the gap, so memory stays flat whatever the clients do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from bus import topics
from bus.pubsub import Subscriber
from greyproxy.timeutil import rfc3339

if TYPE_CHECKING:
    from ..context import ApiContext

log = logging.getLogger("greyproxy.api.ws")

QUEUE_SIZE = 1000  # events buffered per connection before its own events are dropped
BRIDGE_RCVHWM = 20_000  # the bridge's own bus buffer: bounded, so a burst cannot grow memory
YIELD_EVERY = 256  # a burst of ready bus messages must not starve the connections' writers
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

    def subscribe(self, pattern: object) -> None:
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

    def unsubscribe(self, pattern: object) -> None:
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


class Client(Protocol):
    """What the hub needs of a connection (services.api.ws.resource.Connection)."""

    filter: EventFilter

    def offer(self, text: str) -> None: ...


class Hub:
    """The API process's connections, their notification claims, and the bus bridge feeding them."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.connections: set[Client] = set()
        self.claimants: set[Client] = set()
        self._sub: Subscriber | None = None
        # Connections held per key by each proxy process (the `source` of its waiters.changed):
        # /ws clients get the totals over the processes (`totals`).
        self._held: dict[tuple[Any, Any, Any], dict[str, int]] = {}
        # The name each held key's connections were judged under (waiters.changed's
        # resolved_hostname): another IP of a host counts for the entry of that name (`_entry_held`).
        self._held_names: dict[tuple[Any, Any, Any], str] = {}

    def add(self, conn: Client) -> bool:
        """Register a client; True when that turned the busy topics on (the caller should let the
        subscription settle before greeting)."""
        first = not self.connections
        self.connections.add(conn)
        if first and self._sub is not None:
            for t in BUSY_TOPICS:
                self._sub.subscribe(t)
            return True
        return False

    def remove(self, conn: Client) -> None:
        self.connections.discard(conn)
        if not self.connections and self._sub is not None:
            for t in BUSY_TOPICS:
                self._sub.unsubscribe(t)
        if conn in self.claimants:
            self.claimants.discard(conn)
            self._claims_changed()

    def claim(self, conn: Client) -> int:
        """A connection claims OS notifications (idempotent); the count of claims now."""
        if conn not in self.claimants:
            self.claimants.add(conn)
            self._claims_changed()
        return len(self.claimants)

    def _claims_changed(self) -> None:
        self.ctx.notification_claims = len(self.claimants)
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

    def totals(self, topic: str, data: Any, source: Any) -> Any:
        """What /ws clients get of a bus event. With proxy workers each worker publishes the
        connections *it* holds for a key (`waiters.changed`, and `waiting` in the pending records it
        journals): /ws gets the counts over every process instead (SPEC §3.1, §15), kept here from
        each process's latest waiters.changed. A key first seen before this API started keeps the
        worker's own figure until its next waiters.changed from each worker."""
        if not isinstance(data, dict):
            return data
        if topic == topics.WAITERS_CHANGED:
            key = (data.get("container_name"), data.get("host"), data.get("port"))
            current = data.get("current_count")
            if not isinstance(current, int) or not isinstance(source, str):
                return data
            per = self._held.setdefault(key, {})
            before = sum(per.values()) if per else data.get("previous_count", 0)
            if current > 0:
                per[source] = current
            else:
                per.pop(source, None)
            name = data.get("resolved_hostname")
            if isinstance(name, str) and name:
                self._held_names[key] = name
            after = sum(per.values())
            if not per:
                del self._held[key]
                self._held_names.pop(key, None)
            return {**data, "previous_count": before, "current_count": after}
        if topic in (topics.PENDING_CREATED, topics.PENDING_UPDATED):
            if self._held and isinstance(data.get("waiting"), int):
                held = self._entry_held(data)
                if held:
                    return {**data, "waiting": max(data["waiting"], held)}
        return data

    def _entry_held(self, entry: dict[str, Any]) -> int:
        """The connections held over every process for a pending entry: for its key, and for
        another host of its container and port judged under the entry's (resolved-or-raw) host
        (another IP of the same host bumps the entry, SPEC §3.1: its key has no entry of its own)."""
        container, port = entry.get("container_name"), entry.get("destination_port")
        own = entry.get("destination_host")
        group = entry.get("resolved_hostname") or own
        names = self._held_names
        return sum(
            sum(per.values())
            for key, per in self._held.items()
            if key[0] == container and key[2] == port and (key[1] == own or key[1] == group or names.get(key) == group)
        )

    def forget_source(self, source: str) -> None:
        """A proxy process ended (a new one took its name): the connections it held are gone, and
        /ws clients are told so (a `waiters.changed` with the new total per key it held)."""
        for key in [k for k, per in self._held.items() if source in per]:
            per = self._held[key]
            before = sum(per.values())
            del per[source]
            after = sum(per.values())
            name = self._held_names.get(key)
            if not per:
                del self._held[key]
                self._held_names.pop(key, None)
            container, host, port = key
            self.dispatch(
                topics.WAITERS_CHANGED,
                {
                    "container_name": container,
                    "host": host,
                    "port": port,
                    "resolved_hostname": name,
                    "previous_count": before,
                    "current_count": after,
                },
            )

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
                        self.dispatch(topic, self.totals(topic, msg.get("data"), msg.get("source")))
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
