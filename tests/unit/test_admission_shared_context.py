"""Who was admitted reaches the connect explicitly (`gate.Admission`), never through shared state.

uvloop runs every connection accepted on one listener in one contextvars context, and the HTTP
proxy's request steps run in those connections' callbacks (keepalive.py). Here two client
connections of one listener share one context (`loop.call_soon(..., context=shared)`, as uvloop
calls a listener's protocols) and their steps run from loop callbacks with no current task.

The rules: an address rule denies bob the address 127.0.0.1 (where the origin listens); a broad
rule allows everyone by name. The gate's own lookup of the origin's name saw another address (the
name moved since: its admission passes), so only the guard of bob's connect can refuse him, and it
must judge bob's admission, whatever was admitted since (alice, whom the address rule does not
cover). Checked: CONNECT's steps driven apart (bob admitted, then alice, then bob's connect), the
request path itself with the two connections' bytes interleaved, an intercepted tunnel's reconnect,
and a parked upstream taken by a later request of a client after an address rule was added.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from bus import records
from greyproxy.policy import Rule, RuleSet
from services.proxy import http1, http_proxy, upstream
from services.proxy.conn import Conn
from services.proxy.context import ClientConn, Limits, ProxyContext
from services.proxy.gate import Gate, Verdict
from services.proxy.upstream import UpstreamFailure

from harness.fakes import Journal, Publisher
from harness.wire import Wire

NAME = "origin.test"
MOVED = "192.0.2.9"  # where the gate's lookup last saw NAME (it resolves to 127.0.0.1 now)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
RULES = [Rule(1, "bob", "127.0.0.1", "*", "deny"), Rule(2, "*", "*", "*", "allow")]
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(autouse=True)
def no_cached_addresses() -> Iterator[None]:
    upstream._addresses.clear()
    yield
    upstream._addresses.clear()


def _auth(user: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(user.encode() + b":x") + b"\r\n"


def connect_head(user: str, port: int) -> bytes:
    return b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n" % (NAME.encode(), port, NAME.encode(), port, _auth(user))


def get_head(user: str, port: int, extra: bytes = b"") -> bytes:
    return b"GET http://%s:%d/ HTTP/1.1\r\nHost: %s:%d\r\n%s%s\r\n" % (
        NAME.encode(), port, NAME.encode(), port, _auth(user), extra
    )  # fmt: skip


class Origin:
    """A loopback HTTP origin answering every request head with `OK`; counts its connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open -= 1
            w.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Listener:
    """One listener's connections: the real gate and request path over in-memory client transports,
    real upstream connects to the origin; every callback in the one shared context."""

    def __init__(self, origin: Origin, rules: list[Rule] = RULES) -> None:
        self.loop = asyncio.get_running_loop()
        self.journal = Journal()
        self.gate = Gate(self.journal, Publisher(), {43051}, {"127.0.0.1"}, 5.0, 10)  # type: ignore[arg-type]
        self.gate.set_rules(RuleSet(list(rules)), 1)
        self.ctx = ProxyContext(self.gate, Limits(idle_timeout=5.0, header_timeout=5.0))
        self.shared = contextvars.Context()
        self.origin = origin
        self.moved()

    def moved(self) -> None:
        """The gate's lookup of NAME saw MOVED; a connect finds 127.0.0.1 (the origin)."""
        self.gate._addresses[NAME] = ([MOVED], time.monotonic())
        upstream._addresses[(NAME, self.origin.port)] = ([("127.0.0.1", self.origin.port)], self.loop.time() + 60)

    def deny_alice_the_origin(self) -> None:
        """Rule 3 (an address rule) denies alice 127.0.0.1, where the origin is; the gate's lookup
        of NAME saw it elsewhere, so her requests are still admitted: only a connect's guard, or
        the check of an upstream connected before, meets the rule."""
        self.gate.set_rules(RuleSet([Rule(3, "alice", "127.0.0.0/8", "*", "deny"), *RULES]), 2)
        self.moved()

    def later(self, fn: Any, *args: Any) -> None:
        """`fn(*args)` from a loop callback in the listener's context (no current task)."""
        self.loop.call_soon(fn, *args, context=self.shared)

    def accept(self, begin: Any = http_proxy.begin_http) -> tuple[ClientConn, Wire]:
        """A new client connection; `begin`: how it starts (None: the handler's task at accept)."""
        client = ClientConn(self.ctx, http_proxy.handle_http, begin)
        wire = Wire(client)
        self.later(client.connection_made, wire)
        return client, wire

    def drive(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future:
        """Run `coro` by hand from callbacks in the shared context, each step a callback of its own
        (as keepalive.py drives a request step); its result in the future."""
        done = self.loop.create_future()

        def step(_fut: Any = None) -> None:
            assert asyncio.current_task(self.loop) is None
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                done.set_result(stop.value)
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                done.set_exception(exc)
                return
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(lambda _f: self.later(step))

        self.later(step)
        return done

    def logs(self) -> list[tuple[str, str, int | None]]:
        """(container, result, rule id) of each log entry, in order."""
        out = []
        for kind, data in self.journal.records:
            if kind == records.LOG:
                f = records.log_fields(data)
                out.append((f["container_name"], f["result"], f["rule_id"]))
        return out


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def until(check: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


def head_of(data: bytes) -> http1.RequestHead:
    got = http1.parse_request_head(data, 65536, 100)
    assert got is not None
    return got[0]


def _status(wire: Wire) -> bytes:
    return bytes(wire.out).split(b"\r\n", 1)[0]


# ---------------------------------------------------------------- a step connecting after another admission


async def admit_connect(client: ClientConn, head: http1.RequestHead, name: str) -> Verdict | None:
    """`http_proxy.admit_connect` as the handler runs it: its result, or its steps' coroutine awaited."""
    got = http_proxy.admit_connect(client, head, name)
    return await got if http_proxy.later(got) else got


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_a_connect_after_another_connections_admission_is_judged_for_its_own(loop_kind: str) -> None:
    """CONNECT's steps as the handler runs them (`admit_connect`, then `open_tunnel`), driven from
    callbacks in the listener's one context: bob admitted, then alice, then bob's connect. Bob's
    connect is refused by the address rule (his admission), alice's goes through. Judged by the
    last admission made in that context (the design before), bob's connect went through as alice's."""

    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            lis = Listener(origin)
            bob, bob_wire = lis.accept(begin=lambda c: None)  # the steps are driven below
            alice, alice_wire = lis.accept(begin=lambda c: None)
            await settle()
            bob_head = head_of(connect_head("bob", origin.port))
            alice_head = head_of(connect_head("alice", origin.port))
            vb = await lis.drive(admit_connect(bob, bob_head, "bob"))
            va = await lis.drive(admit_connect(alice, alice_head, "alice"))
            assert isinstance(vb, Verdict) and vb.allowed and isinstance(va, Verdict) and va.allowed
            await lis.drive(http_proxy.open_tunnel(bob, bob_head, "bob", vb, lambda: None))
            assert _status(bob_wire) == b"HTTP/1.1 403 Forbidden"
            assert b"which rule 1 denies" in bob_wire.out
            assert origin.accepted == 0
            await lis.drive(http_proxy.open_tunnel(alice, alice_head, "alice", va, lambda: None))
            assert bytes(alice_wire.out) == b"HTTP/1.1 200 Connection established\r\n\r\n"
            await until(lambda: origin.accepted == 1)
            # bob: his block by the address rule (no allowed entry); alice: allowed by rule 2
            assert lis.logs() == [("bob", "allowed", 2), ("alice", "allowed", 2), ("bob", "blocked", 1)]
            alice_wire.close()
            await settle()
        finally:
            origin.close()

    LOOPS[loop_kind](main())


# ---------------------------------------------------------------- the request path, interleaved


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_two_connections_interleaved_in_one_listener_context(loop_kind: str) -> None:
    """The request path itself (`begin_http`: served in the callbacks, handed to the handler where it
    waits): bob's and alice's CONNECTs and plain requests, their bytes delivered from callbacks in
    turn. Each is judged for its own admission: bob refused (403, the address rule), alice served."""

    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            lis = Listener(origin)
            conns = {name: lis.accept() for name in ("bob", "alice", "bob2", "alice2")}
            await settle()
            user = {"bob": "bob", "alice": "alice", "bob2": "bob", "alice2": "alice"}
            for name in ("bob", "alice"):  # CONNECTs, then plain requests, interleaved
                lis.later(conns[name][0].data_received, connect_head(user[name], origin.port))
            for name in ("bob2", "alice2"):
                lis.later(conns[name][0].data_received, get_head(user[name], origin.port))
            await until(lambda: all(w.out for _c, w in conns.values()))
            await until(lambda: conns["alice2"][1].out.endswith(b"ok"))
            assert _status(conns["bob"][1]) == _status(conns["bob2"][1]) == b"HTTP/1.1 403 Forbidden"
            assert all(b"resolves to 127.0.0.1, which rule 1 denies" in conns[n][1].out for n in ("bob", "bob2"))
            assert bytes(conns["alice"][1].out) == b"HTTP/1.1 200 Connection established\r\n\r\n"
            assert bytes(conns["alice2"][1].out).startswith(b"HTTP/1.1 200 OK\r\n")
            assert origin.accepted == 2  # alice's two; none of bob's
            blocked = [entry for entry in lis.logs() if entry[1] == "blocked"]
            assert blocked == [("bob", "blocked", 1), ("bob", "blocked", 1)]
            assert ("alice", "allowed", 2) in lis.logs()
            for _c, w in conns.values():
                w.close()
            await settle()
        finally:
            origin.close()

    LOOPS[loop_kind](main())


# ---------------------------------------------------------------- an intercepted tunnel's reconnect


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_an_intercepted_tunnels_reconnect_is_judged_for_the_tunnels_admission(loop_kind: str, tmp_path: Path) -> None:
    """`Interceptor._reconnect` (the next request in an intercepted tunnel whose upstream closed)
    comes long after the tunnel's admission: other connections are admitted meanwhile. It is judged
    for the tunnel's own (its Session's client, destination and verdict)."""
    from greyproxy.certs import CAWatcher
    from services.proxy.mitm import Interceptor, Session
    from services.proxy.pipeline import Recorder

    class Settings:
        def on_change(self, fn: Any) -> None:
            fn({"mitmEnabled": True})

    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            lis = Listener(origin)
            certs = CAWatcher(tmp_path)
            certs.check()
            mitm = Interceptor(lis.gate, Recorder(lis.journal), certs, Settings(), [])  # type: ignore[arg-type]
            sessions = {}
            for user in ("bob", "alice"):  # bob's tunnel admitted first, then alice's
                head = head_of(connect_head(user, origin.port))
                verdict = await lis.drive(lis.gate.admit(user, head.host, head.port, "CONNECT"))
                assert verdict.allowed
                sessions[user] = Session(user, NAME, origin.port, "http", NAME, verdict, Conn(), None, method="SOCKS5")
            with pytest.raises(UpstreamFailure) as exc:
                await lis.drive(mitm._reconnect(sessions["bob"], lis.ctx))
            assert exc.value.kind == "guard" and "rule 1" in str(exc.value)
            up = await lis.drive(mitm._reconnect(sessions["alice"], lis.ctx))
            assert isinstance(up, Conn)
            up.close()
            fields = [records.log_fields(d) for k, d in lis.journal.records if k == records.LOG]
            refused = [f for f in fields if f["result"] == "blocked"]
            assert [(f["container_name"], f["rule_id"], f["method"]) for f in refused] == [("bob", 1, "SOCKS5")]
        finally:
            origin.close()

    LOOPS[loop_kind](main())


# ---------------------------------------------------------------- a parked upstream, an address rule added since


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
@pytest.mark.parametrize("begin", [True, False], ids=["callbacks", "handler"])
def test_a_parked_upstream_is_judged_again_for_the_next_requests_admission(loop_kind: str, begin: bool) -> None:
    """Alice's request leaves its upstream (to 127.0.0.1) parked; then an address rule denying alice
    127.0.0.1 is added. Her next connection's request is admitted (the gate's lookup saw the name
    elsewhere) but the parked upstream is not used: it is closed, and the fresh connect is refused
    by the rule (403, one block entry). Without a rule change the parked one is reused."""

    async def main() -> tuple[bytes, ...]:
        origin = Origin()
        await origin.start()
        try:
            lis = Listener(origin)
            pool = lis.ctx.pool
            out = []
            for step in ("first", "reused", "denied"):
                if step == "denied":
                    lis.deny_alice_the_origin()
                client, wire = lis.accept(http_proxy.begin_http if begin else None)
                lis.later(client.data_received, get_head("alice", origin.port, b"Connection: close\r\n"))
                await until(lambda w=wire: w.closing)
                await until(lambda c=client: not c.counted)
                out.append(bytes(wire.out))
                if step != "denied":
                    await until(lambda: len(pool) == 1)  # parked for the next one
            assert pool.stats()["reused"] == 1 and len(pool) == 0
            await until(lambda: origin.open == 0)  # the refused parked connection was closed
            assert origin.accepted == 1
            assert lis.logs()[-1] == ("alice", "blocked", 3)
            assert [e for e in lis.logs() if e[1] == "blocked"] == [("alice", "blocked", 3)]
            return tuple(out)
        finally:
            lis.ctx.pool.close_all()
            origin.close()

    first, reused, denied = LOOPS[loop_kind](main())
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and reused.startswith(b"HTTP/1.1 200 OK\r\n")
    assert denied.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"which rule 3 denies" in denied


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
@pytest.mark.parametrize("begin", [True, False], ids=["callbacks", "handler"])
def test_an_upstream_kept_on_the_connection_is_judged_again_for_its_next_request(loop_kind: str, begin: bool) -> None:
    """Alice's first request on a kept-alive connection leaves its upstream (to 127.0.0.1) kept on
    that connection; then an address rule denying alice 127.0.0.1 is added. Her next request on the
    same connection is admitted (the gate's lookup saw the name elsewhere) but the kept upstream
    does not serve it: it is closed, and the fresh connect is refused by the rule (403, one block
    entry). Without a rule change the second request is served on the kept upstream."""

    async def main() -> tuple[bytes, ...]:
        origin = Origin()
        await origin.start()
        try:
            lis = Listener(origin)
            client, wire = lis.accept(http_proxy.begin_http if begin else None)
            out = []
            for step in ("first", "kept", "denied"):
                if step == "denied":
                    lis.deny_alice_the_origin()
                before = len(wire.out)
                lis.later(client.data_received, get_head("alice", origin.port))
                if step == "denied":
                    await until(lambda w=wire: w.closing)
                else:
                    await until(
                        lambda w=wire, b=before: b"HTTP/1.1" in bytes(w.out[b:]) and bytes(w.out).endswith(b"ok")
                    )
                out.append(bytes(wire.out[before:]))
            await until(lambda: origin.open == 0)  # the refused kept connection was closed
            assert origin.accepted == 1
            assert [e for e in lis.logs() if e[1] == "blocked"] == [("alice", "blocked", 3)]
            return tuple(out)
        finally:
            lis.ctx.pool.close_all()
            origin.close()

    first, kept, denied = LOOPS[loop_kind](main())
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and kept.startswith(b"HTTP/1.1 200 OK\r\n")
    assert denied.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"which rule 3 denies" in denied


# ---------------------------------------------------------------- SOCKS5


def socks_request(user: str, port: int) -> bytes:
    """Greeting (user name/password), the RFC 1929 sub-negotiation and a CONNECT to NAME:port."""
    u, name = user.encode(), NAME.encode()
    return (
        b"\x05\x01\x02"
        + b"\x01" + bytes([len(u)]) + u + b"\x01x"
        + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")
    )  # fmt: skip


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_socks5_connections_interleaved_in_one_listener_context(loop_kind: str) -> None:
    """The SOCKS5 listener's handler for bob and alice, their bytes delivered from callbacks in the
    listener's one context in turn: bob's connect refused by the address rule (reply 0x02, logged as
    his block), alice's tunnel connected (0x00)."""
    from services.proxy.socks5_proxy import handle_socks

    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            lis = Listener(origin)
            conns = {}
            for user in ("bob", "alice"):
                client = ClientConn(lis.ctx, handle_socks)
                wire = Wire(client)
                lis.later(client.connection_made, wire)
                conns[user] = (client, wire)
            for user in ("bob", "alice"):
                lis.later(conns[user][0].data_received, socks_request(user, origin.port))
            # greeting answer (2 bytes), auth answer (2), then the reply: its code is byte 5
            await until(lambda: all(len(w.out) >= 6 for _c, w in conns.values()))
            assert conns["bob"][1].out[5] == 0x02 and conns["alice"][1].out[5] == 0x00
            await until(lambda: origin.accepted == 1)
            assert [e for e in lis.logs() if e[1] == "blocked"] == [("bob", "blocked", 1)]
            for _c, w in conns.values():
                w.close()
            await settle()
        finally:
            origin.close()

    LOOPS[loop_kind](main())
