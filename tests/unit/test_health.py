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
