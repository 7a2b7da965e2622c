"""The API's view of each proxy's control endpoint (services/api/proxies.py, SPEC §15): a proxy
whose heartbeats arrive but which does not answer the API is "unreachable" (not up), found out
when it appears; when it answers again it is given the silent mode it missed, set or cleared."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bus.reqrep import ControlServer
from services.api import proxies
from services.api.proxies import ProxyGroup


class Proxy:
    """A proxy's control endpoint that records what it was told."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.server: ControlServer | None = None
        self.task: asyncio.Future | None = None

    def start(self) -> None:
        def record(op: str):  # noqa: ANN202
            def handler(args: dict[str, Any]) -> dict[str, Any]:
                self.calls.append((op, args))
                return {"active": op == "allowall.set", "mode": args.get("mode")}

            return handler

        self.server = ControlServer(self.endpoint, {op: record(op) for op in ("allowall.set", "allowall.clear")})
        self.task = asyncio.ensure_future(self.server.serve())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.server is not None:
            self.server.close()
        self.server = self.task = None


async def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_proxy_that_does_not_answer_is_unreachable_and_gets_what_it_missed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(proxies, "PROBE_EVERY", 0.1)

    async def go() -> None:
        local, remote = Proxy(f"ipc://{tmp_path}/w0.sock"), Proxy(f"ipc://{tmp_path}/b.sock")
        local.start()
        group = ProxyGroup([local.endpoint], 0.2, 1, lambda: 30.0)
        beat = {"role": "proxy", "control": remote.endpoint, "started_at": 1.0}
        try:
            group.note_heartbeat("proxy-b", beat)  # it heartbeats; its control endpoint is silent
            await _until(lambda: group.unreachable("proxy-b") == remote.endpoint)
            assert group.unreachable("proxy-0") is None  # (configured workers: health has their pids)

            await group.call("allowall.set", {"mode": "deny", "duration_seconds": 60})
            assert local.calls[-1][0] == "allowall.set"

            remote.start()  # it answers now: its next heartbeat has it asked again
            await asyncio.sleep(0.15)
            group.note_heartbeat("proxy-b", beat)
            await _until(lambda: group.unreachable("proxy-b") is None and remote.calls)
            op, args = remote.calls[-1]
            assert op == "allowall.set" and args["mode"] == "deny" and 0 < args["duration_seconds"] <= 60

            remote.stop()  # away again; meanwhile silent mode is cleared
            await group.call("allowall.clear")
            assert group.unreachable("proxy-b") == remote.endpoint
            remote.start()
            remote.calls.clear()
            await asyncio.sleep(0.15)
            group.note_heartbeat("proxy-b", beat)
            await _until(lambda: remote.calls == [("allowall.clear", {})])

            group.forget("proxy-b")
            assert group.unreachable("proxy-b") is None
        finally:
            group.close()
            local.stop()
            remote.stop()

    asyncio.run(go())


def test_a_proxy_that_answers_from_the_start_is_never_unreachable(tmp_path: Path) -> None:
    async def go() -> None:
        remote = Proxy(f"ipc://{tmp_path}/b.sock")
        remote.start()
        group = ProxyGroup([], 0.3, 1, lambda: 30.0)
        try:
            group.note_heartbeat("proxy-b", {"role": "proxy", "control": remote.endpoint, "started_at": 1.0})
            await asyncio.sleep(0.3)
            assert group.unreachable("proxy-b") is None
            assert remote.calls == []  # a ping only: nothing set that nobody asked for
        finally:
            group.close()
            remote.stop()

    asyncio.run(go())


def test_allowall_changed_is_announced_only_on_a_change(tmp_path: Path) -> None:
    """SPEC §4 `allowall.changed`: "silent mode changed". A DELETE when it is off, or the same
    mode again without an end, changed nothing and announced it anyway (tester A #9)."""

    async def go() -> None:
        local = Proxy(f"ipc://{tmp_path}/w0.sock")
        local.start()
        group = ProxyGroup([local.endpoint], 0.5, 1, lambda: 30.0)
        events: list[tuple[str, Any]] = []
        group.publish = lambda topic, data: events.append((topic, data))
        try:
            await group.call("allowall.clear")  # not known before (an API just started): said
            assert len(events) == 1
            await group.call("allowall.clear")  # off already
            await group.call("allowall.clear")
            assert len(events) == 1 and len(local.calls) == 3  # (still asked: each proxy clears its own)
            await group.call("allowall.set", {"mode": "allow", "duration_seconds": 0})
            assert len(events) == 2 and events[-1][1]["active"] is True
            await group.call("allowall.set", {"mode": "allow", "duration_seconds": 0})  # the same again
            assert len(events) == 2
            await group.call("allowall.set", {"mode": "deny", "duration_seconds": 0})  # another mode
            assert len(events) == 3
            await group.call("allowall.set", {"mode": "deny", "duration_seconds": 60})  # an end now
            await group.call("allowall.set", {"mode": "deny", "duration_seconds": 60})  # a later end
            assert len(events) == 5
            await group.call("allowall.clear")
            await group.call("allowall.clear")
            assert len(events) == 6 and events[-1][1]["active"] is False
            assert {topic for topic, _ in events} == {"allowall.changed"}
        finally:
            group.close()
            local.stop()

    asyncio.run(go())


@pytest.mark.parametrize("ready", [True, False])
def test_health_shows_an_unreachable_proxy_as_not_up(monkeypatch, ready: bool) -> None:
    import os
    import time

    from services.api import health
    from services.api.context import ServiceSeen

    class Ctx:
        def __init__(self) -> None:
            from types import SimpleNamespace

            self.cfg = SimpleNamespace(
                bus={"heartbeatInterval": 1.0}, ports=lambda: {}, db_path="/x", raw={}, workers=1
            )
            self.started_at = time.time() - 100
            self.proxy = SimpleNamespace(unreachable=lambda name: "tcp://b:1" if name == "proxy-b" else None)
            now = time.time()
            self.seen = {
                n: ServiceSeen(pid=os.getpid(), last_seen=now, started_at=0, uptime=1, stats={}, role=r)
                for n, r in (
                    ("bus", ""),
                    ("proxy", "proxy"),
                    ("proxy-b", "proxy"),
                    ("recorder", ""),
                    ("maintenance", ""),
                )
            }
            self.seen["proxy-b"].ready = ready

        def stale_after(self) -> float:
            return 2.5

        async def db(self, fn: Any, *args: Any) -> bool:
            return True

    monkeypatch.setattr(health, "_local_pids", {})
    import falcon.asgi
    import falcon.testing

    app = falcon.asgi.App()
    app.add_route("/api/health", health.HealthResource(Ctx()))  # type: ignore[arg-type]
    r = falcon.testing.TestClient(app).simulate_get("/api/health")
    assert r.status_code == 503 and r.json["down"] == ["proxy-b"]
    assert r.json["services"]["proxy-b"]["state"] == ("unreachable" if ready else "starting")
    assert r.json["services"]["proxy"]["state"] == "up"
