"""/ws and the public event stream through the real stack (SPEC §8).

Clients are real: websockets' sync client, curl through the HTTP proxy, `greyproxy events` as a
subprocess, and a bus Publisher for synthetic events on public topics nobody acts on
(`log.new`, `maintenance.progress`, `session.heartbeat`). The origin listens on 127.0.0.2,
which no builtin rule covers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from bus.pubsub import Publisher
from conftest import PYTHON, REPO, HelloHandler, Stack, plain_origin, wait_for
from greyproxy.config import load_config

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

ORIGIN_HOST = "127.0.0.2"
PAD = "x" * 100  # flood events of ~150 bytes: more than the kernel's socket buffers hold
_marks = itertools.count()


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(HelloHandler, ORIGIN_HOST) as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack({"proxy": {"holdTimeout": 20}})
    s.start()
    try:
        yield s
    finally:
        s.cleanup()
    shutil.rmtree(s.root, ignore_errors=True)  # kept (with its logs) when the stack did not stop cleanly


@pytest.fixture(scope="module")
def bus_pub(stack: Stack) -> Iterator[Publisher]:
    endpoint = load_config(stack.cfg_path, env=stack.env).bus["pub"]
    pub = Publisher(endpoint, "test")
    time.sleep(0.5)  # zmq's slow joiner: the broker's subscriptions must reach this PUB first
    yield pub
    pub.close()


def ws_url(stack: Stack) -> str:
    return stack.api.replace("http://", "ws://", 1) + "/ws"


@contextlib.contextmanager
def open_ws(stack: Stack, **kw: Any) -> Iterator[ClientConnection]:
    with connect(ws_url(stack), open_timeout=5, **kw) as c:
        hello = recv(c)
        assert hello["type"] == "connected" and hello["message"] and hello["timestamp"], hello
        yield c


def recv(c: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    return orjson.loads(c.recv(timeout=timeout))


def recv_until(
    c: ClientConnection,
    pred: Callable[[dict[str, Any]], bool],
    timeout: float = 5.0,
    seen: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The first message matching pred; everything read before it goes into `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            tail = seen[-3:] if seen else None
            raise AssertionError(f"no matching message within {timeout}s; saw {len(seen or ())}, last {tail!r}"[:2000])
        try:
            msg = recv(c, left)
        except TimeoutError:
            continue
        if pred(msg):
            return msg
        if seen is not None:
            seen.append(msg)


def command(
    c: ClientConnection,
    obj: dict[str, Any] | str,
    reply_types: tuple[str, ...],
    seen: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    c.send(obj if isinstance(obj, str) else orjson.dumps(obj).decode())
    msg = recv_until(c, lambda m: m["type"] in reply_types, seen=seen)
    assert "timestamp" in msg, msg
    return msg


def is_event(m: dict[str, Any], type_: str, **data: Any) -> bool:
    d = m.get("data")
    return m.get("type") == type_ and isinstance(d, dict) and all(d.get(k) == v for k, v in data.items())


def test_pending_allow_over_ws(stack: Stack, origin: int) -> None:
    with open_ws(stack) as c:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [
                "curl",
                "-s",
                "-S",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-x",
                f"http://agentws@127.0.0.1:{stack.ports['http-proxy']}",
                f"http://{ORIGIN_HOST}:{origin}/",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            got: dict[str, dict[str, Any]] = {}
            while len(got) < 2:
                m = recv_until(
                    c,
                    lambda m: (
                        is_event(m, "pending_request.created", container_name="agentws")
                        or is_event(m, "waiters.changed", container_name="agentws")
                    ),
                    timeout=3,
                )
                got.setdefault(m["type"], m)
            # At the moment of the hold, not at its end (the hold lasts 20 s); loose for a busy machine.
            assert time.monotonic() - t0 < 3.0, f"events took {time.monotonic() - t0:.2f}s"
            entry = got["pending_request.created"]["data"]
            assert entry["destination_host"] == ORIGIN_HOST and entry["destination_port"] == origin
            assert got["waiters.changed"]["data"]["current_count"] >= 1

            c.send(orjson.dumps({"command": "allow", "pending_id": entry["id"]}).decode())
            success = allowed = None
            while success is None or allowed is None:
                m = recv_until(c, lambda m: m["type"] in ("command_success", "error", "pending_request.allowed"))
                assert m["type"] != "error", m
                if m["type"] == "command_success":
                    success = m
                elif m["data"]["pending_id"] == entry["id"]:
                    allowed = m
            assert success["command"] == "allow" and success["pending_id"] == entry["id"], success
            assert isinstance(success["rule_id"], int) and "timestamp" in success
            assert allowed["data"]["rule"]["id"] == success["rule_id"]
            assert allowed["data"]["rule"]["created_by"] == "ws"
            out, err = proc.communicate(timeout=10)
            assert out == "200", (out, err)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_subscribe_and_unsubscribe(stack: Stack, bus_pub: Publisher) -> None:
    mark = f"sub-{next(_marks)}"
    with open_ws(stack) as c, open_ws(stack) as witness:
        assert command(c, {"command": "subscribe", "event_type": "log.*"}, ("subscribed",))["event_type"] == "log.*"
        bus_pub.publish("maintenance.progress", {"job": mark, "processed": 0, "total": 1, "done": False})
        bus_pub.publish("log.new", {"mark": mark, "n": 1})
        bus_pub.publish("session.heartbeat", {"mark": mark})
        bus_pub.publish("log.new", {"mark": mark, "n": 2})
        seen: list[dict[str, Any]] = []
        first = recv_until(c, lambda m: is_event(m, "log.new", mark=mark), seen=seen)
        second = recv_until(c, lambda m: is_event(m, "log.new", mark=mark), seen=seen)
        assert (first["data"]["n"], second["data"]["n"]) == (1, 2)
        command(c, {"command": "ping"}, ("pong",))
        assert all(m["type"].startswith("log.") for m in seen), seen
        # The witness (a fresh connection) got the non-log events: they did go through the bridge.
        recv_until(witness, lambda m: is_event(m, "session.heartbeat", mark=mark))

        reply = command(c, {"command": "unsubscribe", "event_type": "log.*"}, ("unsubscribed",))
        assert reply["event_type"] == "log.*"
        bus_pub.publish("log.new", {"mark": mark, "n": 3})
        bus_pub.publish("maintenance.progress", {"job": mark, "processed": 1, "total": 1, "done": True})
        recv_until(witness, lambda m: is_event(m, "maintenance.progress", job=mark, done=True))
        c.send('{"command": "ping"}')
        assert recv(c)["type"] == "pong"  # nothing was queued before it
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.3)

        # An unknown type is refused, and the connection stays usable.
        bad = command(c, {"command": "subscribe", "event_type": "nope.never"}, ("error", "subscribed"))
        assert bad["type"] == "error" and "nope.never" in bad["error"], bad


def _claims(stack: Stack) -> int:
    return stack.get("/api/notifications").json()["active_claims"]


def test_notification_claims(stack: Stack) -> None:
    with open_ws(stack) as a, open_ws(stack) as b:
        seen: list[dict[str, Any]] = []
        assert command(a, {"command": "claim_notifications"}, ("notification_claimed",))["active_claims"] == 1
        assert command(b, {"command": "claim_notifications"}, ("notification_claimed",), seen)["active_claims"] == 2
        # Claiming twice on one connection is one claim.
        assert command(b, {"command": "claim_notifications"}, ("notification_claimed",), seen)["active_claims"] == 2
        if not any(is_event(m, "notification.claims_changed", active_claims=2) for m in seen):
            recv_until(b, lambda m: is_event(m, "notification.claims_changed", active_claims=2))
        assert _claims(stack) == 2
        a.close()
        recv_until(b, lambda m: is_event(m, "notification.claims_changed", active_claims=1))
        assert _claims(stack) == 1
    wait_for(lambda: _claims(stack) == 0, 5, message="claims released")


def test_errors_and_upgrade_checks(stack: Stack) -> None:
    port = stack.ports["api"]
    with open_ws(stack, origin=f"http://127.0.0.1:{port}") as c:  # same-origin works
        assert command(c, "{not json", ("error",))["error"] == "invalid JSON"
        assert command(c, {"command": "fly"}, ("error",))["error"] == "unknown command: fly"
        err = command(c, {"command": "allow", "pending_id": 987654}, ("error", "command_success"))
        assert err["type"] == "error" and err["error"] == "pending request 987654 not found", err
        assert err["command"] == "allow" and err["pending_id"] == 987654
        err = command(c, {"command": "deny", "pending_id": "x"}, ("error",))
        assert err["error"] == "pending_id must be an integer" and err["command"] == "deny"
        # Issue 13 item 11: dismissing an unknown id is an error reply (REST answers removed=false).
        err = command(c, {"command": "dismiss", "pending_id": 987654}, ("command_success", "error"))
        assert err["type"] == "error" and err["error"] == "pending request 987654 not found", err
        assert err["command"] == "dismiss" and err["pending_id"] == 987654
        assert command(c, {"command": "ping"}, ("pong",))["type"] == "pong"

    for bad_origin in ("http://evil.example", f"http://evil.example:{port}", "null"):
        with pytest.raises(InvalidStatus) as info, connect(ws_url(stack), origin=bad_origin, open_timeout=5):
            pass
        assert info.value.response.status_code == 403, bad_origin
    # A DNS-rebinding page: right address, foreign Host.
    sock = socket.create_connection(("127.0.0.1", port))
    with pytest.raises(InvalidStatus) as info, connect(f"ws://evil.example:{port}/ws", sock=sock, open_timeout=5):
        pass
    assert info.value.response.status_code == 421  # the refusal's own status (denial response)
    sock = socket.create_connection(("127.0.0.1", port))
    with connect(f"ws://localhost:{port}/ws", sock=sock, origin=f"http://localhost:{port}", open_timeout=5) as c:
        assert recv(c)["type"] == "connected"


def test_events_cli(stack: Stack, origin: int) -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "greyproxy", "events", "--type", "pending_request.created", "-C", str(stack.cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stack.env,
        cwd=str(REPO),
    )
    curl = None
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert "listening on" in proc.stderr.readline()
        time.sleep(0.3)  # the SUB subscription travels to the broker
        curl = subprocess.Popen(
            [
                "curl",
                "-s",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-x",
                f"http://agentcli@127.0.0.1:{stack.ports['http-proxy']}",
                f"http://{ORIGIN_HOST}:{origin}/cli",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        line = _readline(proc, 8)
        clock, topic, rest = line.split(" ", 2)
        assert len(clock) == 8 and clock[2] == ":" and topic == "pending_request.created", line
        assert "container_name=agentcli" in rest and f"destination_host={ORIGIN_HOST}" in rest, line
        proc.terminate()
        assert proc.wait(5) == 0
    finally:
        for p in (proc, curl):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    assert box and box[0], "no event printed in time"
    return box[0].rstrip("\n")


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_client_is_bounded(stack: Stack, bus_pub: Publisher) -> None:
    api_pid = stack.pid("api")
    assert api_pid
    # The slow client reads nothing until the end; a fixed small receive buffer (no autotuning up to
    # tens of MB), a short frame queue and no compression make its socket fill up as a stalled tab's would.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", stack.ports["api"]))
    with open_ws(stack, sock=sock, max_queue=4, compression=None) as slow, open_ws(stack) as fast:
        _flood(stack, bus_pub, api_pid, slow, fast)


def _flood(stack: Stack, bus_pub: Publisher, api_pid: int, slow: ClientConnection, fast: ClientConnection) -> None:
    n_events = 100_000
    mark = f"flood-{next(_marks)}"
    command(fast, {"command": "subscribe", "event_type": "log.new"}, ("subscribed",))
    rss0 = _rss_kb(api_pid)
    peak = [rss0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kb(api_pid))
            time.sleep(0.05)

    seqs: list[int] = []
    fast_drops: list[int] = []
    halfway = threading.Event()  # the bridge has dispatched well past what the slow client's buffers hold

    def read_fast() -> None:
        # Until the last event, or the stream has been quiet for 2 s (the tail may have been dropped).
        while True:
            try:
                m = recv(fast, 2.0)
            except TimeoutError:
                return
            if m["type"] == "dropped":
                fast_drops.append(m["count"])
            elif is_event(m, "log.new", mark=mark):
                seqs.append(m["data"]["seq"])
                if m["data"]["seq"] >= n_events // 2:
                    halfway.set()
                if m["data"]["seq"] == n_events - 1:
                    return

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_fast, daemon=True)]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        for i in range(n_events):
            bus_pub.publish("log.new", {"mark": mark, "seq": i, "pad": PAD})
        t_pub = time.monotonic() - t0
        # Half the flood is through the bridge: the slow client reads at last. What was queued, then the notice.
        halfway.wait(20)
        seen: list[dict[str, Any]] = []
        dropped = recv_until(slow, lambda m: m["type"] == "dropped", timeout=20, seen=seen)
        threads[1].join(30)
        assert not threads[1].is_alive(), "the fast client's stream never settled"
        t_fast = time.monotonic() - t0
        peak[0] = max(peak[0], _rss_kb(api_pid))
    finally:
        done.set()
    growth_mb = (peak[0] - rss0) / 1024
    assert growth_mb < 60, f"API RSS grew {growth_mb:.1f} MB"
    assert len(seqs) >= 1000, f"the fast client got only {len(seqs)} events"
    assert all(a < b for a, b in zip(seqs, seqs[1:])), "events out of order"
    slow_seqs = [m["data"]["seq"] for m in seen if is_event(m, "log.new", mark=mark)]
    assert dropped["count"] > 0 and "timestamp" in dropped, dropped
    rest: list[dict[str, Any]] = []
    assert command(slow, {"command": "ping"}, ("pong",), rest)  # still connected and usable
    with contextlib.suppress(TimeoutError):  # replies overtake queued events: read those too
        while True:
            rest.append(recv(slow, 0.5))
    slow_seqs += [m["data"]["seq"] for m in rest if is_event(m, "log.new", mark=mark)]
    assert all(a < b for a, b in zip(slow_seqs, slow_seqs[1:])), "the slow client's events out of order"
    # Issue 13 item 15: the memory bound must not come from losing the flood before the API. Every
    # event reached the API: each client got it or was told it was dropped (the notices count them).
    # Pub/sub may still drop by design before the API (the publisher's queue, counted in
    # bus_pub.dropped, or the broker's high-water mark on a loaded machine, not counted anywhere):
    # allow 0.1 % of the flood for what nobody can count.
    slow_drops = dropped["count"] + sum(m["count"] for m in rest if m["type"] == "dropped")
    lost_before_api = bus_pub.dropped + n_events // 1000
    assert n_events - lost_before_api <= len(seqs) + sum(fast_drops) <= n_events, (len(seqs), sum(fast_drops))
    # The slow client's drop notices count every event it lost, other topics' too (heartbeats, ...).
    assert n_events - lost_before_api <= len(slow_seqs) + slow_drops <= n_events + 100, (len(slow_seqs), slow_drops)
    print(
        f"flood: published in {t_pub:.1f} s, fast done at {t_fast:.1f} s, rss +{growth_mb:.1f} MB, "
        f"fast got {len(seqs)} (drops {sum(fast_drops)}), "
        f"slow got {len(slow_seqs)} then dropped {dropped['count']}"
    )


def test_a_stop_closes_each_client_with_1012_and_logs_no_traceback() -> None:
    """SPEC §8 (/ws): a clean stop (SIGTERM to `greyproxy serve`) while /ws clients are connected: uvicorn's own
    graceful shutdown closes each with 1012 (service restart), so a client knows to reconnect, and
    api.log stays free of errors. Before, the server's task was cancelled: the clients saw the TCP
    connection drop without a close frame, and api.log had an "Exception in ASGI application"
    traceback (CancelledError) per client."""
    with Stack({"proxy": {"workers": 1}}) as s, contextlib.ExitStack() as opened:
        clients = [opened.enter_context(connect(ws_url(s), open_timeout=5)) for _ in range(2)]
        for c in clients:
            assert recv(c)["type"] == "connected"
        started = time.monotonic()
        assert s.stop() == 0
        assert time.monotonic() - started < 8
        for c in clients:
            with pytest.raises(ConnectionClosed):
                while True:
                    c.recv(timeout=5)
            assert c.close_code == 1012, c.close_code
        api_log = (s.data_dir / "logs" / "api.log").read_text()
        assert "Traceback" not in api_log and "ERROR" not in api_log, api_log[-3000:]


def test_health_changes_reach_ws_clients_without_polling(stack: Stack) -> None:
    """SPEC §11 (no polling while the socket is up) and §5: a process that stops answering its
    heartbeats, and its return, come to /ws clients as `health.changed` with GET /api/health's
    body; so does the state at the first look after a client connects; nothing is sent while
    nothing changes."""
    pid = stack.get("/api/health").json()["services"]["maintenance"]["pid"]
    assert isinstance(pid, int)
    with open_ws(stack) as c:
        # at the first look after a client connected: what it may have missed since its own read
        first = recv_until(c, lambda m: m["type"] == "health.changed", timeout=5)
        assert first["data"]["status"] == "ok", first
        c.send(orjson.dumps({"command": "subscribe", "event_type": "health.changed"}).decode())
        recv_until(c, lambda m: m["type"] == "subscribed")
        with pytest.raises(TimeoutError):
            c.recv(timeout=2.5)  # steady: no event
        os.kill(pid, signal.SIGSTOP)
        try:
            down = recv_until(c, lambda m: m["type"] == "health.changed", timeout=15)
        finally:
            os.kill(pid, signal.SIGCONT)
        body = down["data"]
        assert body["status"] == "degraded" and "maintenance" in body["down"], body
        assert body["services"]["maintenance"]["up"] is False and body["services"]["proxy"]["up"] is True
        up = recv_until(c, lambda m: m["type"] == "health.changed" and m["data"]["status"] == "ok", timeout=15)
        assert up["data"]["services"]["maintenance"]["up"] is True
    wait_for(lambda: stack.get("/api/health").status_code == 200, 10, message="healthy again")
