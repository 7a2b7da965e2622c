"""GET /api/health's judgement from heartbeats and local pids, without processes of our own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import falcon.asgi
import falcon.testing

from services.api import health
from services.api.context import ServiceSeen


class FakeCtx:
    def __init__(self, seen: dict[str, ServiceSeen]) -> None:
        self.cfg = SimpleNamespace(bus={"heartbeatInterval": 1.0}, ports=lambda: {}, db_path="/nonexistent")
        self.started_at = time.time() - 100
        self.seen = seen
        self.departed_counters: dict[str, Any] = {}
        self.proxy: Any = None  # the API's proxy group (services/api/proxies.py); none here

    def stale_after(self) -> float:
        return 2.5

    async def db(self, fn: Any, *args: Any) -> bool:
        return True


def _seen(pid: int, age: float) -> ServiceSeen:
    return ServiceSeen(pid=pid, last_seen=time.time() - age, started_at=0.0, uptime=1.0, stats={})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _get(ctx: FakeCtx) -> tuple[int, dict]:
    app = falcon.asgi.App()
    app.add_route("/api/health", health.HealthResource(ctx))  # type: ignore[arg-type]
    r = falcon.testing.TestClient(app).simulate_get("/api/health")
    return r.status_code, r.json


def test_broker_down_names_only_the_bus_while_the_other_processes_live(monkeypatch) -> None:
    dead = _dead_pid()
    me = os.getpid()
    ctx = FakeCtx(
        {"bus": _seen(dead, 10), "proxy": _seen(me, 10), "recorder": _seen(dead, 10), "maintenance": _seen(me, 0.1)}
    )
    monkeypatch.setattr(health, "_local_pids", {"bus": dead, "proxy": me, "recorder": dead, "maintenance": me})
    code, body = _get(ctx)
    assert code == 503
    assert body["down"] == ["bus", "recorder"]  # the proxy is alive: silent only because the bus is
    assert body["services"]["proxy"]["up"] is True


def test_a_killed_local_service_is_down_at_once_and_a_remote_one_waits_for_staleness(monkeypatch) -> None:
    dead = _dead_pid()
    me = os.getpid()
    ctx = FakeCtx(
        {"bus": _seen(me, 0.1), "proxy": _seen(dead, 0.1), "recorder": _seen(dead, 0.1), "maintenance": _seen(me, 10)}
    )
    # recorder's heartbeat came from another host: its pid means nothing here
    monkeypatch.setattr(health, "_local_pids", {"bus": me, "proxy": dead, "maintenance": me})
    code, body = _get(ctx)
    assert code == 503
    assert body["down"] == ["proxy", "maintenance"]  # maintenance: stale while the bus is up
    assert body["services"]["recorder"]["up"] is True


def test_all_fresh_is_ok(monkeypatch) -> None:
    me = os.getpid()
    ctx = FakeCtx({name: _seen(me, 0.1) for name in health.WATCHED})
    monkeypatch.setattr(health, "_local_pids", {name: me for name in health.WATCHED})
    code, body = _get(ctx)
    assert code == 200 and body["status"] == "ok" and "down" not in body


def test_a_service_still_starting_is_not_up(monkeypatch) -> None:
    me = os.getpid()
    seen = {name: _seen(me, 0.1) for name in health.WATCHED}
    seen["proxy"].ready = False
    monkeypatch.setattr(health, "_local_pids", {name: me for name in health.WATCHED})
    code, body = _get(FakeCtx(seen))
    assert code == 503 and body["down"] == ["proxy"]
    assert body["services"]["proxy"]["state"] == "starting"
    assert body["services"]["bus"]["state"] == "up"


def test_one_that_died_while_starting_is_down_not_starting_forever(monkeypatch) -> None:
    """SPEC §5 (health): its last heartbeat said ready: false, then nothing: that is a process
    gone, not starting."""
    me = os.getpid()
    seen = {name: _seen(me, 0.1) for name in health.WATCHED}
    seen["recorder"] = _seen(me, 60)
    seen["recorder"].ready = False
    monkeypatch.setattr(health, "_local_pids", {})
    code, body = _get(FakeCtx(seen))
    assert code == 503 and body["down"] == ["recorder"]
    assert body["services"]["recorder"]["state"] == "down"


class FakeProxies:
    def __init__(self) -> None:
        self.noted: list[str] = []
        self.forgotten: list[str] = []

    def note_heartbeat(self, name: str, data: dict) -> None:
        self.noted.append(name)

    def forget(self, name: str) -> None:
        self.forgotten.append(name)


def _ctx_of(monkeypatch: Any, workers: int) -> FakeCtx:
    """An API context with no service heard from yet, `workers` configured proxy processes, and
    every heartbeat taken as from another host (no local pid checks)."""
    monkeypatch.setattr(health, "_local_pids", {})
    for state in ("_procs_by_name", "_duplicate_said", "_last_proc"):  # (names seen by earlier tests)
        monkeypatch.setattr(health, state, {})
    ctx = FakeCtx({})
    ctx.cfg.raw = {"proxy": {"name": "proxy"}}
    ctx.cfg.workers = workers
    ctx.proxy = FakeProxies()
    return ctx


def _beat(name: str, **extra: Any) -> dict[str, Any]:
    return {"service": name, "pid": 4242, "host": "elsewhere", "started_at": 1.0, "uptime": 2.0, "ready": True, **extra}


def test_a_clean_stop_is_down_at_once_and_a_remote_proxy_that_left_is_no_longer_listed(monkeypatch) -> None:
    """SPEC §5 (health) and §15 (several hosts), docs/events.md: a service's last heartbeat says
    `stopping`. A local one shows down at once
    (not after staleness); a proxy on another host that left is dropped from /api/health and from
    the API's fan-out, so the stack is not degraded for good; one that dies silently stays, down."""
    me = os.getpid()
    ctx = _ctx_of(monkeypatch, workers=1)
    for name in ("bus", "recorder", "maintenance"):
        health.take_heartbeat(ctx, _beat(name, pid=me))  # type: ignore[arg-type]
    for name in ("proxy", "proxy-b", "proxy-c"):
        health.take_heartbeat(ctx, _beat(name, role="proxy", control=f"tcp://h:{len(name)}"))  # type: ignore[arg-type]
    code, body = _get(ctx)
    assert code == 200, body
    assert body["services"]["proxy"]["up"] and body["services"]["proxy-b"]["up"]

    health.take_heartbeat(ctx, _beat("proxy-b", role="proxy", ready=False, stopping=True))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("recorder", ready=False, stopping=True))  # type: ignore[arg-type]
    ctx.seen["proxy-c"].last_seen -= 60  # died without a word
    code, body = _get(ctx)
    assert code == 503
    assert "proxy-b" not in body["services"], "a remote proxy that stopped cleanly has left"
    assert ctx.proxy.forgotten == ["proxy-b"]
    assert body["services"]["recorder"]["state"] == "down"  # at once: its heartbeat is still fresh
    assert body["services"]["proxy-c"]["state"] == "down"
    assert body["down"] == ["proxy-c", "recorder"]

    # The configured proxy stopping is down, still listed (it is expected back).
    health.take_heartbeat(ctx, _beat("proxy", role="proxy", ready=False, stopping=True))  # type: ignore[arg-type]
    code, body = _get(ctx)
    assert body["services"]["proxy"]["state"] == "down" and ctx.proxy.forgotten == ["proxy-b"]
    # A proxy that left comes back with its next heartbeat.
    health.take_heartbeat(ctx, _beat("proxy-b", role="proxy"))  # type: ignore[arg-type]
    assert "proxy-b" in _get(ctx)[1]["services"]


def test_a_process_that_died_and_came_back_is_counted_a_restart_and_a_clean_restart_is_not(monkeypatch, caplog) -> None:
    """SPEC §5 (GET /api/health) and docs/events.md (heartbeat): a new `started_at` under a name whose last process never sent
    its `stopping` heartbeat is a restart after a death (killed, crashed, bus.stallTimeout):
    counted in /api/health's `restarts` and `last_restart`, and logged. A clean stop and start,
    and the same process's own heartbeats, are not; "proxy" sums its workers'."""
    me = os.getpid()
    ctx = _ctx_of(monkeypatch, workers=2)
    for name in ("bus", "recorder", "maintenance", "proxy-0", "proxy-1"):
        for _ in range(3):  # the same process, beat after beat
            health.take_heartbeat(ctx, _beat(name, pid=me, started_at=100.0))  # type: ignore[arg-type]
    code, body = _get(ctx)
    assert code == 200, body
    assert all(body["services"][n]["restarts"] == 0 for n in ("bus", "recorder", "proxy-0", "proxy"))
    assert body["services"]["recorder"]["last_restart"] is None

    # proxy-1 killed (no stopping heartbeat), started again; the recorder stopped cleanly, started again
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, started_at=200.0))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("recorder", pid=me, started_at=100.0, ready=False, stopping=True))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("recorder", pid=me, started_at=300.0))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, started_at=200.0))  # type: ignore[arg-type]
    code, body = _get(ctx)
    svc = body["services"]
    assert svc["proxy-1"]["restarts"] == 1 and svc["proxy-1"]["last_restart"].startswith("1970-01-01T00:03:20")
    assert svc["recorder"]["restarts"] == 0 and svc["recorder"]["last_restart"] is None
    assert svc["proxy"]["restarts"] == 1 and svc["proxy"]["last_restart"] == svc["proxy-1"]["last_restart"]
    assert "proxy-1 started again" in caplog.text and "recorder started again" not in caplog.text

    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, started_at=400.0))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("proxy-0", pid=me, started_at=500.0))  # type: ignore[arg-type]
    svc = _get(ctx)[1]["services"]
    assert (svc["proxy-0"]["restarts"], svc["proxy-1"]["restarts"], svc["proxy"]["restarts"]) == (1, 2, 3)
    assert svc["proxy"]["last_restart"] == svc["proxy-0"]["last_restart"]  # the latest of them


def _scrape(ctx: FakeCtx) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics's samples as {(name, labels): value}, through prometheus_client's own parser."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from greyproxy.metrics import HeartbeatCollector
    from services.api.metrics import heartbeat_snapshot

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HeartbeatCollector(lambda: heartbeat_snapshot(ctx)))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_counters_never_go_down_when_a_worker_restarts_or_a_remote_proxy_leaves(monkeypatch) -> None:
    """SPEC §14 (/metrics, summed over the proxy's processes): a worker killed and started again
    begins its counters at zero. Its last values are carried over, so the sum over the workers
    goes on from where it was: before, it dropped by that worker's share, which Prometheus takes
    for a reset of the whole sum (rate() then counts the other workers' totals again). The same for
    a clean restart, the recorder, and a proxy on another host that leaves."""
    me = os.getpid()
    ctx = _ctx_of(monkeypatch, workers=2)

    def proxy_stats(allowed: int, acked: int, decisions: int, active: int) -> dict[str, Any]:
        return {
            "active_connections": active,  # a gauge: not carried
            "journal": {"acked": acked},
            "metrics": {
                "connections": {"allowed": allowed},
                "decision_seconds": {"le": [0.1, 1.0], "cumulative": [decisions, decisions, decisions], "sum": 0.5},
            },
        }

    for name in ("bus", "maintenance"):
        health.take_heartbeat(ctx, _beat(name, pid=me))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("recorder", pid=me, started_at=1.0, stats={"records": 50}))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("proxy-0", pid=me, role="proxy", stats=proxy_stats(10, 11, 10, 3)))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, role="proxy", stats=proxy_stats(20, 21, 20, 4)))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("proxy-far", role="proxy", control="tcp://h:1", stats=proxy_stats(5, 5, 5, 1)))  # type: ignore[arg-type]
    allowed = ("greyproxy_proxy_connections_total", (("result", "allowed"),))
    acked = ("greyproxy_journal_acked_records_total", ())
    count = ("greyproxy_proxy_decision_seconds_count", ())
    active = ("greyproxy_proxy_active_connections", ())
    records = ("greyproxy_recorder_records_total", ())
    m = _scrape(ctx)
    assert (m[allowed], m[acked], m[count], m[active], m[records]) == (35, 37, 35, 8, 50)

    # proxy-1 killed and started again: its counters start at zero, the sum does not drop
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, role="proxy", started_at=9.0, stats=proxy_stats(0, 0, 0, 0)))  # type: ignore[arg-type]
    m = _scrape(ctx)
    assert (m[allowed], m[acked], m[count], m[active]) == (35, 37, 35, 4), m  # the gauge is what is open now
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, role="proxy", started_at=9.0, stats=proxy_stats(2, 2, 2, 1)))  # type: ignore[arg-type]
    assert _scrape(ctx)[allowed] == 37  # and goes on from there; the same process's beats carry nothing
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, role="proxy", started_at=9.0, stats=proxy_stats(3, 3, 3, 1)))  # type: ignore[arg-type]
    assert _scrape(ctx)[allowed] == 38

    # a second restart of the same worker carries both earlier processes' counters
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, role="proxy", started_at=12.0, stats=proxy_stats(1, 1, 1, 0)))  # type: ignore[arg-type]
    assert _scrape(ctx)[allowed] == 39

    # the recorder stopped cleanly and started again
    health.take_heartbeat(
        ctx, _beat("recorder", pid=me, started_at=1.0, ready=False, stopping=True, stats={"records": 60})
    )  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("recorder", pid=me, started_at=20.0, stats={"records": 1}))  # type: ignore[arg-type]
    assert _scrape(ctx)[records] == 61

    # the proxy on another host leaves cleanly (its last heartbeat carries its final counters)
    health.take_heartbeat(
        ctx,
        _beat("proxy-far", role="proxy", ready=False, stopping=True, stats=proxy_stats(6, 6, 6, 0)),  # type: ignore[arg-type]
    )
    m = _scrape(ctx)
    assert "proxy-far" not in ctx.seen
    assert (m[allowed], m[acked], m[count], m[active]) == (40, 42, 40, 3), m


def test_two_live_processes_under_one_name_are_said_and_not_counted_as_restarts(monkeypatch, caplog) -> None:
    """SPEC §5 (/api/health) and §15 (several hosts); docs/configuration.md: proxy.name is unique
    on the bus. Two proxies on other hosts left with
    the same name interleave their heartbeats: the API counted a restart at every beat and showed
    whichever beat last. Now the one that started first keeps the name, the other's beats are
    dropped, and the clash is logged (once a minute). A proxy named like this stack's workers
    together ("proxy" with proxy.workers 2) is dropped too: it replaced their sum in /api/health."""
    me = os.getpid()
    ctx = _ctx_of(monkeypatch, workers=2)
    for name in ("bus", "recorder", "maintenance", "proxy-0", "proxy-1"):
        health.take_heartbeat(ctx, _beat(name, pid=me))  # type: ignore[arg-type]
    a = _beat("proxy-far", role="proxy", pid=111, host="host-a", started_at=10.0, control="tcp://a:1")
    b = _beat("proxy-far", role="proxy", pid=222, host="host-b", started_at=20.0, control="tcp://b:1")
    for _ in range(4):
        health.take_heartbeat(ctx, a)  # type: ignore[arg-type]
        health.take_heartbeat(ctx, b)  # type: ignore[arg-type]
    svc = _get(ctx)[1]["services"]
    assert svc["proxy-far"]["pid"] == 111  # the first to start keeps the name
    assert svc["proxy-far"]["restarts"] <= 1  # (b's very first beat looked like a restart), not one per beat
    clash = [r.getMessage() for r in caplog.records if "two processes send heartbeats as 'proxy-far'" in r.getMessage()]
    assert len(clash) == 1 and "host-a" in clash[0] and "host-b" in clash[0]

    health.take_heartbeat(ctx, _beat("proxy", role="proxy", pid=333, host="host-c", started_at=5.0))  # type: ignore[arg-type]
    body = _get(ctx)[1]
    agg = body["services"]["proxy"]
    assert agg["pid"] != 333 and agg["workers"][:2] == ["proxy-0", "proxy-1"]  # still the workers' sum
    assert any("the name of this stack's workers together" in r.getMessage() for r in caplog.records)

    # a real restart (the old process never beats again) is still one
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, started_at=99.0))  # type: ignore[arg-type]
    health.take_heartbeat(ctx, _beat("proxy-1", pid=me, started_at=99.0))  # type: ignore[arg-type]
    assert _get(ctx)[1]["services"]["proxy-1"]["restarts"] == 1


def test_a_process_with_sigkill_pending_is_not_alive(monkeypatch) -> None:
    """SPEC §5 (health names a killed service at once): kill -9 of a process in an uninterruptible
    wait (the recorder in a disk write under load) leaves it running with SIGKILL pending for a moment,
    and /api/health asked then said 200 (test_faults failed so, rarely). Pending SIGKILL is dead."""
    import builtins
    import io
    import os

    from services.api import health

    pid = os.getpid()
    assert health._pid_alive(pid)
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path == f"/proc/{pid}/status":
            return io.BytesIO(b"Name:\tpython\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert not health._pid_alive(pid)
