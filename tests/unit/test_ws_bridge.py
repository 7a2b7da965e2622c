"""The pure parts of /ws: event filters, the bounded per-client queue, the Host/Origin predicate,
and a connection driven through a fake socket (commands, claims, the send watchdog)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import topics
from services.api import origin
from services.api.ws import commands, resource
from services.api.ws import hub as ws_hub
from services.api.errors import not_found
from harness.fuzz import examples

# ----------------------------------------------------------------------------- filters


def test_fresh_filter_matches_every_public_event() -> None:
    f = ws_hub.EventFilter()
    assert all(f.matches(t) for t in topics.PUBLIC)


def test_first_subscribe_narrows_and_family_wildcard() -> None:
    f = ws_hub.EventFilter()
    f.subscribe("log.*")
    assert f.matches("log.new")
    assert not f.matches("rule.created") and not f.matches("pending_request.created")
    f.subscribe("rule.deleted")
    assert f.matches("rule.deleted") and not f.matches("rule.created")


def test_unsubscribing_the_last_type_leaves_nothing() -> None:
    f = ws_hub.EventFilter()
    f.subscribe("waiters.changed")
    f.unsubscribe("waiters.changed")
    assert not any(f.matches(t) for t in topics.PUBLIC)
    f.subscribe("pending_request.*")
    f.unsubscribe("pending_request.*")
    assert not any(f.matches(t) for t in topics.PUBLIC)


def test_unsubscribe_one_member_of_a_family_or_of_everything() -> None:
    f = ws_hub.EventFilter()
    f.unsubscribe("log.new")  # fresh: everything but log.new
    assert not f.matches("log.new") and f.matches("rule.created")
    f.subscribe("rule.*")  # the first subscribe narrows, whatever came before
    assert f.matches("rule.updated") and not f.matches("waiters.changed")
    f.unsubscribe("rule.updated")
    assert f.matches("rule.created") and not f.matches("rule.updated")
    f.subscribe("rule.updated")
    assert f.matches("rule.updated")


def test_star_is_everything_again() -> None:
    f = ws_hub.EventFilter()
    f.subscribe("log.new")
    f.subscribe("*")
    assert all(f.matches(t) for t in topics.PUBLIC)


@pytest.mark.parametrize("bad", ["", "  ", None, 3, "nope.never", "service.heartbeat", "nope.*", "log"])
def test_bad_patterns_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        ws_hub.EventFilter().subscribe(bad)


# ----------------------------------------------------------------------------- the bounded queue


def drain(q: ws_hub.EventQueue) -> list[str | ws_hub.Dropped]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_queue_drops_overflow_and_reports_the_gap_in_place() -> None:
    q = ws_hub.EventQueue(4)
    assert all(q.offer(f"e{i}") for i in range(4))
    assert not q.offer("e4") and not q.offer("e5")
    assert len(q) == 4 and q.dropped_total == 2
    assert q.pop() == "e0" and q.pop() == "e1"
    assert q.offer("e6")  # room for the notice and the event: the notice goes first
    assert drain(q) == ["e2", "e3", ws_hub.Dropped(2), "e6"]


def test_queue_reports_drops_when_it_drains_with_nothing_after() -> None:
    q = ws_hub.EventQueue(2)
    q.offer("a")
    q.offer("b")
    q.offer("c")
    assert drain(q) == ["a", "b", ws_hub.Dropped(1)]
    assert q.pop() is None and q.unreported == 0


def test_queue_needs_room_for_notice_and_event() -> None:
    q = ws_hub.EventQueue(3)
    for i in range(4):
        q.offer(str(i))
    q.pop()  # one free slot: not enough for notice + event, so "x" is dropped too
    assert not q.offer("x")
    assert drain(q) == ["1", "2", ws_hub.Dropped(2)]
    with pytest.raises(ValueError):
        ws_hub.EventQueue(1)


@settings(max_examples=examples(300), deadline=None)
@given(size=st.integers(2, 8), ops=st.lists(st.booleans(), max_size=200))
def test_queue_is_bounded_ordered_and_accounts_for_everything(size: int, ops: list[bool]) -> None:
    q = ws_hub.EventQueue(size)
    offered = 0
    out: list[str | ws_hub.Dropped] = []
    for is_offer in ops:
        if is_offer:
            q.offer(str(offered))
            offered += 1
        elif (item := q.pop()) is not None:
            out.append(item)
        assert len(q) <= size
    out += drain(q)
    events = [int(x) for x in out if isinstance(x, str)]
    notices = [x.count for x in out if isinstance(x, ws_hub.Dropped)]
    assert events == sorted(events)
    assert len(events) + sum(notices) == offered
    assert all(n > 0 for n in notices)
    # Each notice stands exactly where its events went missing.
    expected = 0
    for item in out:
        if isinstance(item, ws_hub.Dropped):
            expected += item.count
        else:
            assert int(item) == expected
            expected += 1


# ----------------------------------------------------------------------------- Host / Origin

ALLOWED = origin.normalize_allowed(["greyproxy.internal", "10.0.0.5", "[fd00::1]", "::2"])


@pytest.mark.parametrize(
    "host,ok",
    [
        ("127.0.0.1:43080", True),
        ("127.0.0.1", True),
        ("127.8.9.10:1", True),
        ("localhost:43080", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("app.localhost:80", True),
        ("[::1]:43080", True),
        ("[::1]", True),
        ("[::ffff:127.0.0.1]:80", True),
        ("greyproxy.internal:8080", True),
        ("10.0.0.5", True),
        ("[fd00::1]:1", True),
        ("[0::2]:9", True),
        ("evil.example", False),
        ("evil.example:43080", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("10.0.0.6", False),
        ("0.0.0.0:43080", False),
        ("::1", False),
        ("[::1]x", False),
        ("127.0.0.1:port", False),
        ("", False),
        (None, False),
        ("a b", False),
        ("user@localhost", False),
        ("localhost/x", False),
        ("[nonsense]:1", False),
        (":43080", False),
    ],
)
def test_host_table(host: str | None, ok: bool) -> None:
    assert origin.host_allowed(host, ALLOWED) is ok


@pytest.mark.parametrize(
    "org,ok",
    [
        (None, True),
        ("http://127.0.0.1:43080", True),
        ("http://localhost:3000", True),
        ("https://localhost", True),
        ("http://[::1]:43080", True),
        ("http://greyproxy.internal", True),
        ("http://10.0.0.5:9", True),
        ("http://evil.example", False),
        ("http://evil.example:43080", False),
        ("null", False),
        ("", False),
        ("file://", False),
        ("chrome-extension://abcdef", False),
        ("http://localhost.evil.example", False),
        ("http://user@localhost", False),
        ("http://localhost:99999", False),
        ("http://localhost/path", False),
        ("localhost", False),
    ],
)
def test_origin_table(org: str | None, ok: bool) -> None:
    assert origin.origin_allowed(org, ALLOWED) is ok


def test_request_needs_both() -> None:
    assert origin.request_allowed("localhost:1", None)
    assert not origin.request_allowed("localhost:1", "http://evil.example")
    assert not origin.request_allowed("evil.example", "http://localhost:1")


# ----------------------------------------------------------------------------- a connection on a fake socket


class FakeContext:
    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []
        self.notification_claims = 0

    def publish(self, topic: str, data: Any) -> None:
        self.published.append((topic, data))


class FakeSocket:
    """Feeds scripted client messages; records what the server sends; can stall sends."""

    def __init__(self, incoming: list[str] | None = None, stall: bool = False) -> None:
        self.incoming: asyncio.Queue[str | None] = asyncio.Queue()
        for text in incoming or []:
            self.incoming.put_nowait(text)
        self.sent: list[dict[str, Any]] = []
        self.stall = stall
        self.closed: int | None = None

    async def send_text(self, payload: str) -> None:
        if self.stall and self.sent:  # the greeting goes out, then the peer stops reading
            await asyncio.Event().wait()
        self.sent.append(orjson.loads(payload))

    async def receive_text(self) -> str:
        text = await self.incoming.get()
        if text is None:
            import falcon

            raise falcon.errors.WebSocketDisconnected(1000)
        return text

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = code


async def _wait_sent(sock: FakeSocket, n: int) -> None:
    for _ in range(200):
        if len(sock.sent) >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"only {sock.sent} sent")


def test_commands_and_claims_through_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_decide(ctx: Any, pid: int, action: str, body: Any, created_by: str = "api") -> dict[str, Any]:
        if pid != 7:
            raise not_found(f"pending request {pid} not found")
        assert created_by == "ws" and body == {"scope": "any_port"}
        return {"rule": {"id": 42}, "pending_removed": True}

    async def fake_dismiss(ctx: Any, pid: int) -> bool:
        return pid == 7

    monkeypatch.setattr(commands.pending, "decide", fake_decide)
    monkeypatch.setattr(commands.pending, "dismiss", fake_dismiss)

    async def scenario() -> tuple[FakeSocket, FakeContext]:
        ctx = FakeContext()
        hub = ws_hub.Hub(ctx)  # type: ignore[arg-type]
        script = [
            '{"command":"ping"}',
            "{oops",
            "[1]",
            '{"command":"dance"}',
            '{"nocommand":1}',
            '{"command":"allow","pending_id":7,"scope":"any_port"}',
            '{"command":"deny","pending_id":8}',
            '{"command":"dismiss","pending_id":7}',
            '{"command":"subscribe","event_type":"log.*"}',
            '{"command":"claim_notifications"}',
            '{"command":"claim_notifications"}',
        ]
        sock = FakeSocket(script)
        conn = resource.Connection(hub, sock)
        hub.add(conn)
        task = asyncio.create_task(conn.run())
        await _wait_sent(sock, 1 + len(script))
        hub.dispatch("rule.created", {"id": 1})  # filtered out: the client asked for log.* only
        hub.dispatch("service.heartbeat", {"service": "x"})  # internal: never forwarded
        hub.dispatch("log.new", {"id": 2})
        await _wait_sent(sock, 2 + len(script))
        sock.incoming.put_nowait(None)  # the client goes away
        await asyncio.wait_for(task, 2)
        hub.remove(conn)
        return sock, ctx

    sock, ctx = asyncio.run(scenario())
    types = [m["type"] for m in sock.sent]
    assert types == [
        "connected",
        "pong",
        "error",
        "error",
        "error",
        "error",
        "command_success",
        "error",
        "command_success",
        "subscribed",
        "notification_claimed",
        "notification_claimed",
        "log.new",
    ]
    assert all("timestamp" in m for m in sock.sent[:-1])
    assert sock.sent[2]["error"] == "invalid JSON"
    assert sock.sent[4]["error"] == "unknown command: dance"
    assert sock.sent[5]["error"] == "missing command"
    assert sock.sent[6] == {
        "type": "command_success",
        "command": "allow",
        "pending_id": 7,
        "rule_id": 42,
        "timestamp": sock.sent[6]["timestamp"],
    }
    assert sock.sent[7]["error"] == "pending request 8 not found"
    assert (sock.sent[7]["command"], sock.sent[7]["pending_id"]) == ("deny", 8)
    assert sock.sent[8]["removed"] is True
    assert sock.sent[10]["active_claims"] == 1 and sock.sent[11]["active_claims"] == 1
    assert sock.sent[12] == {"type": "log.new", "data": {"id": 2}}
    # One claim, then released with the connection: two changes, both published on the bus.
    assert ctx.published == [
        ("notification.claims_changed", {"active_claims": 1}),
        ("notification.claims_changed", {"active_claims": 0}),
    ]
    assert ctx.notification_claims == 0


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout() -> None:
    async def scenario() -> tuple[resource.Connection, int]:
        hub = ws_hub.Hub(FakeContext())  # type: ignore[arg-type]
        sock = FakeSocket(stall=True)
        conn = resource.Connection(hub, sock, queue_size=10, send_timeout=0.2)
        hub.add(conn)
        task = asyncio.create_task(conn.run())
        for i in range(50):
            hub.dispatch("log.new", {"seq": i})
        await asyncio.wait_for(task, 3)
        return conn, len(conn.events)

    conn, queued = asyncio.run(scenario())
    assert conn.too_slow
    assert queued <= 10 and conn.events.dropped_total >= 39  # bounded while it hung


def test_drop_notice_reaches_the_client_before_the_next_event() -> None:
    async def scenario() -> list[dict[str, Any]]:
        hub = ws_hub.Hub(FakeContext())  # type: ignore[arg-type]
        sock = FakeSocket()
        conn = resource.Connection(hub, sock, queue_size=3)
        hub.add(conn)
        for i in range(6):  # before the writer runs: 3 queued, 3 dropped
            hub.dispatch("log.new", {"seq": i})
        task = asyncio.create_task(conn.run())
        await _wait_sent(sock, 5)
        hub.dispatch("log.new", {"seq": 6})
        await _wait_sent(sock, 6)
        sock.incoming.put_nowait(None)
        await asyncio.wait_for(task, 2)
        return sock.sent

    sent = asyncio.run(scenario())
    assert [m["type"] for m in sent] == ["connected", "log.new", "log.new", "log.new", "dropped", "log.new"]
    assert sent[4]["count"] == 3 and "timestamp" in sent[4]
    assert [m["data"]["seq"] for m in sent if m["type"] == "log.new"] == [0, 1, 2, 6]


def test_busy_topics_are_received_only_while_a_client_is_connected() -> None:
    class RecordingSub:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []
            self.stop = asyncio.Event()

        def subscribe(self, t: str) -> None:
            self.calls.append(("+", t))

        def unsubscribe(self, t: str) -> None:
            self.calls.append(("-", t))

        async def recv(self) -> dict:
            await self.stop.wait()
            raise asyncio.CancelledError

        def close(self) -> None:
            pass

    async def scenario() -> list[tuple[str, str]]:
        hub = ws_hub.Hub(FakeContext())  # type: ignore[arg-type]
        sub = RecordingSub()
        task = asyncio.create_task(hub.run_bridge(lambda: sub))  # type: ignore[arg-type,return-value]
        await asyncio.sleep(0)
        a, b = resource.Connection(hub, FakeSocket()), resource.Connection(hub, FakeSocket())
        assert hub.add(a) is True  # the first client turns them on ...
        assert hub.add(b) is False
        hub.remove(a)
        assert sub.calls == [("+", "log.new"), ("+", "transaction.new")]
        hub.remove(b)  # ... the last one turns them off
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return sub.calls

    calls = asyncio.run(scenario())
    assert calls == [("+", "log.new"), ("+", "transaction.new"), ("-", "log.new"), ("-", "transaction.new")]


def test_held_counts_reach_ws_as_totals_over_the_proxy_workers() -> None:
    """SPEC §3.1 (`waiting`: connections held right now) and §15 (what is shared stays exact):
    with proxy workers each worker publishes the connections *it* holds for a key. /ws clients
    get the totals over the workers, in `waiters.changed` and in the pending events' `waiting`.
    Before, 8 connections held over two workers ended as `waiting 5` and two separate runs of
    `waiters.changed`, which /ws clients could not add up (they never see the `source`)."""
    hub = ws_hub.Hub(FakeContext())  # type: ignore[arg-type]
    key = {"container_name": "a", "host": "h.example", "port": 443}
    out = []
    for source, prev, cur in [
        ("proxy-0", 0, 1),
        ("proxy-0", 1, 2),
        ("proxy-1", 0, 1),
        ("proxy-0", 2, 3),
        ("proxy-1", 1, 2),
    ]:
        d = hub.totals(topics.WAITERS_CHANGED, {**key, "previous_count": prev, "current_count": cur}, source)
        out.append((d["previous_count"], d["current_count"]))
    assert out == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    pend = {"container_name": "a", "destination_host": "h.example", "destination_port": 443, "waiting": 2}
    assert hub.totals(topics.PENDING_UPDATED, pend, "recorder")["waiting"] == 5
    assert (
        hub.totals(topics.PENDING_UPDATED, {**pend, "destination_port": 80}, "recorder")["waiting"] == 2
    )  # unknown key
    # proxy-1 dies with its 2: its share goes when its successor's heartbeat arrives, and /ws
    # clients are told (before: the total changed with no event, the Pending view kept showing them)
    told: list[tuple[str, object]] = []
    hub.dispatch = lambda topic, data: told.append((topic, data))  # type: ignore[method-assign]
    hub.forget_source("proxy-1")
    assert told == [
        (topics.WAITERS_CHANGED, {**key, "resolved_hostname": None, "previous_count": 5, "current_count": 3})
    ]
    hub.forget_source("proxy-1")  # nothing of it left: nothing said
    assert len(told) == 1
    assert hub.totals(topics.PENDING_UPDATED, {**pend, "waiting": 1}, "recorder")["waiting"] == 3
    d = hub.totals(topics.WAITERS_CHANGED, {**key, "previous_count": 3, "current_count": 0}, "proxy-0")
    assert (d["previous_count"], d["current_count"]) == (3, 0) and hub._held == {}
    assert hub.totals(topics.LOG_NEW, {"id": 1}, "proxy-0") == {"id": 1}  # other events as they are
