"""REST areas (rules, pending, logs, dashboard, settings, notifications, allow-all) through falcon.testing.

Each test gets a fresh SQLite file, a real bus Publisher whose events a bound SUB socket
captures, and ControlClients that point either at nobody (the proxy is down) or at a real
ControlServer, run in its own thread, that plays the proxy and records what it was asked.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import falcon.testing
import orjson
import pytest
import zmq
import zmq.asyncio

from bus.pubsub import Publisher
from bus.reqrep import ControlClient, ControlServer, RemoteError
from greyproxy.config import load_config
from greyproxy.store import logs as logs_store
from greyproxy.store import open_database
from greyproxy.timeutil import parse_time, rfc3339
from harness.api import LocalClient
from services.api import logs as logs_mod
from services.api import notify
from services.api import pending as pending_mod
from services.api import rules as rules_mod
from services.api.app import create_app
from services.api.context import ApiContext

ALLOWALL_OFF = {"active": False, "mode": None, "expires_at": None, "remaining_seconds": None}


# --------------------------------------------------------------------------- harness


class EventSink:
    """Binds the endpoint the API's Publisher connects to and collects (topic, data) pairs."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.bind(endpoint)

    def receive(self, wait: float) -> tuple[str, Any] | None:
        """The next (topic, data), or None when nothing arrives within `wait` seconds."""
        if not self.sock.poll(max(1, int(wait * 1000))):
            return None
        topic, payload = self.sock.recv_multipart()
        return topic.decode(), orjson.loads(payload)["data"]

    def poll_for(self, topic: str, wait: float) -> bool:
        """Receive until a message on `topic` arrives (True, at once) or `wait` seconds pass
        (False); what arrived before it is dropped."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is None:
                return False
            if got[0] == topic:
                return True
        return False

    def until(self, topic: str, wait: float = 10.0) -> list[tuple[str, Any]]:
        """Everything received before the next message on `topic` (a marker the test published
        after what it looks at: one publisher's messages arrive in order)."""
        out: list[tuple[str, Any]] = []
        deadline = time.monotonic() + wait
        while (got := self.receive(max(0.0, deadline - time.monotonic()))) is not None:
            if got[0] == topic:
                return out
            out.append(got)
        raise AssertionError(f"the marker {topic} never arrived (got {out})")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class FakeProxy:
    """A real ControlServer in a thread of its own, answering like the proxy and recording calls."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.waiters: list[dict[str, Any]] = []
        self.stats = {"active_connections": 7, "waiting": 2, "allowall": dict(ALLOWALL_OFF)}
        self.allowall = dict(ALLOWALL_OFF)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _handlers(self) -> dict[str, Any]:
        def rec(op: str, result: Any) -> Any:
            def handler(args: dict[str, Any]) -> Any:
                self.calls.append((op, args))
                return result() if callable(result) else result

            return handler

        def set_allowall(args: dict[str, Any]) -> dict[str, Any]:
            self.calls.append(("allowall.set", args))
            if args.get("mode") not in ("allow", "deny"):
                raise RemoteError("mode must be allow or deny", 400)
            dur = args.get("duration_seconds") or 0
            self.allowall = {
                "active": True,
                "mode": args["mode"],
                "expires_at": rfc3339(time.time() + dur) if dur else None,
                "remaining_seconds": dur or None,
            }
            return self.allowall

        def clear_allowall(args: dict[str, Any]) -> dict[str, Any]:
            self.calls.append(("allowall.clear", args))
            self.allowall = dict(ALLOWALL_OFF)
            return self.allowall

        return {
            "rules.reload": rec("rules.reload", {"reloaded": True}),
            "holds.block": rec("holds.block", lambda: {"blocked": 1}),
            "waiters": rec("waiters", lambda: {"waiters": list(self.waiters)}),
            "stats": rec("stats", lambda: dict(self.stats)),
            "allowall.get": rec("allowall.get", lambda: dict(self.allowall)),
            "allowall.set": set_allowall,
            "allowall.clear": clear_allowall,
        }

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.zctx = zmq.asyncio.Context()
        self.server = ControlServer(self.endpoint, self._handlers(), ctx=self.zctx)
        self.task = self.loop.create_task(self.server.serve())
        self._ready.set()
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        finally:
            self.server.close()
            self.zctx.term()
            self.loop.close()

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self._thread.join(5)


class Api:
    """The app plus its world: database, captured events, and (optionally) a live fake proxy."""

    def __init__(self, tmp_path: Path, sock_dir: str, proxy_up: bool, prefix: str = "/") -> None:
        self.db = open_database(tmp_path / "db")
        config = tmp_path / "config.yaml"
        config.write_text(f'greyproxy: {{pathPrefix: "{prefix}"}}\n')
        self.cfg = load_config(config, env={"GREYPROXY_DATA_HOME": str(tmp_path / "data")})
        self.sink = EventSink(f"ipc://{sock_dir}/bus")
        self.proxy = FakeProxy(f"ipc://{sock_dir}/proxy") if proxy_up else None
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-db")
        self.ctx = ApiContext(
            cfg=self.cfg,
            publisher=Publisher(f"ipc://{sock_dir}/bus", "api"),
            db_executor=self.executor,
            proxy=ControlClient(f"ipc://{sock_dir}/proxy", "proxy", timeout=0.5 if proxy_up else 0.05, retries=1),
            recorder=ControlClient(f"ipc://{sock_dir}/nobody-r", "recorder", timeout=0.05, retries=1),
            maintenance=ControlClient(f"ipc://{sock_dir}/nobody-m", "maintenance", timeout=0.05, retries=1),
        )
        self.client = LocalClient(create_app(self.ctx))
        self.prefix = prefix.rstrip("/")
        self._warm_up()

    def _warm_up(self) -> None:
        """zmq drops what a PUB sends before the subscription arrives: publish until one gets through."""
        for _ in range(1000):
            self.ctx.publish("test.warmup", {})
            if self.sink.poll_for("test.warmup", 0.005):
                return
        raise AssertionError("the event sink never received a message")

    def url(self, path: str) -> str:
        return f"{self.prefix}{path}"

    def get(self, path: str, **params: Any) -> falcon.testing.Result:
        return self.client.simulate_get(self.url(path), params=params or None)

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> falcon.testing.Result:
        if raw is not None:
            return self.client.simulate_post(self.url(path), body=raw, content_type="application/json")
        if body is None:
            return self.client.simulate_post(self.url(path))
        return self.client.simulate_post(self.url(path), json=body)

    def put(self, path: str, body: Any = None, raw: bytes | None = None) -> falcon.testing.Result:
        if raw is not None:
            return self.client.simulate_put(self.url(path), body=raw, content_type="application/json")
        return self.client.simulate_put(self.url(path), json=body)

    def delete(self, path: str) -> falcon.testing.Result:
        return self.client.simulate_delete(self.url(path))

    def events(self, topic: str | None = None) -> list[Any]:
        """The events published since the last call: the API publishes (on this thread) while it
        answers, so all of them arrive before a marker published now."""
        self.ctx.publish("test.mark", {})
        got = [(t, data) for t, data in self.sink.until("test.mark") if t != "test.warmup"]  # a late warm-up
        return [data for t, data in got if topic is None or t == topic] if topic else got

    def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        return self.db.execute_sql(query, args).fetchall()

    def add_pending(
        self,
        container: str,
        host: str,
        port: int,
        resolved: str | None = None,
        first: float | None = None,
        last: float | None = None,
        attempts: int = 1,
    ) -> int:
        now = time.time()
        cur = self.db.execute_sql(
            "INSERT INTO pending (container_name, destination_host, destination_port, resolved_hostname,"
            " first_seen, last_seen, attempt_count) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (container, host, port, resolved, first or now, last or now, attempts),
        )
        return cur.lastrowid

    def add_log(
        self,
        ts: float,
        container: str,
        host: str,
        port: int,
        result: str,
        rule_id: int | None = None,
        resolved: str | None = None,
        method: str = "CONNECT",
    ) -> int:
        cur = self.db.execute_sql(
            "INSERT INTO logs (timestamp, container_name, destination_host, destination_port, resolved_hostname,"
            " method, result, rule_id, response_time_ms, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1.5, 'rule')",
            (ts, container, host, port, resolved, method, result, rule_id),
        )
        self.db.execute_sql(logs_store.ADD_COUNT, (container, result, 1))  # as the recorder does (migration 10)
        return cur.lastrowid

    def close(self) -> None:
        self.ctx.publisher.close()
        for client in (self.ctx.proxy, self.ctx.recorder, self.ctx.maintenance):
            client.close()
        if self.proxy:
            self.proxy.close()
        self.sink.close()
        self.executor.shutdown(wait=True)
        self.db.close()


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="gpt")  # short: ipc:// paths are limited to ~107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def short_proxy_timeouts(request, monkeypatch):
    # The proxy is often deliberately absent: keep each unanswered nudge short (shortest where
    # nobody can answer; a live fake proxy in its own thread gets 0.1 s, for a busy machine).
    timeout = 0.1 if "live" in request.fixturenames else 0.01
    monkeypatch.setattr(rules_mod, "RELOAD_TIMEOUT", timeout)
    monkeypatch.setattr(rules_mod, "BLOCK_TIMEOUT", timeout)
    monkeypatch.setattr(pending_mod, "WAITERS_TIMEOUT", timeout)
    monkeypatch.setattr(logs_mod, "STATS_TIMEOUT", timeout)


@pytest.fixture
def api(tmp_path, sock_dir):
    a = Api(tmp_path, sock_dir, proxy_up=False)
    yield a
    a.close()


@pytest.fixture
def live(tmp_path, sock_dir):
    a = Api(tmp_path, sock_dir, proxy_up=True)
    yield a
    a.close()


def error_of(res: falcon.testing.Result) -> str:
    assert set(res.json) >= {"error"}, res.json
    return res.json["error"]


def new_rule(api: Api, **fields: Any) -> dict[str, Any]:
    body = {"container_pattern": "agent", "destination_pattern": "example.com", **fields}
    res = api.post("/api/rules", body)
    assert res.status_code == 201, res.json
    return res.json


# --------------------------------------------------------------------------- rules: listing


def test_rules_list_builtins_shape_and_pagination(api):
    res = api.get("/api/rules")
    assert res.status_code == 200
    assert res.json["total"] == 3
    assert {r["destination_pattern"] for r in res.json["items"]} == {"localhost", "127.0.0.1", "::1"}
    assert all(r["source"] == "builtin" and r["is_active"] for r in res.json["items"])
    ids = [new_rule(api, destination_pattern=f"h{i}.example.com")["id"] for i in range(5)]
    page = api.get("/api/rules", limit=2, offset=1).json
    assert page["total"] == 8
    assert [r["id"] for r in page["items"]] == [ids[3], ids[2]]  # newest first
    assert api.get("/api/rules", offset=100).json == {"items": [], "total": 8}


def test_rules_list_filters(api):
    new_rule(api, container_pattern="opencode", destination_pattern="registry.npmjs.org", port_pattern="443")
    new_rule(api, container_pattern="claude", destination_pattern="api.anthropic.com", action="deny")
    api.sql(
        "INSERT INTO rules (container_pattern, destination_pattern, port_pattern, action, created_at,"
        " expires_at) VALUES ('old', 'gone.example', '*', 'allow', ?, ?)",
        (time.time() - 100, time.time() - 10),
    )
    assert [r["container_pattern"] for r in api.get("/api/rules", container="code").json["items"]] == ["opencode"]
    assert [r["destination_pattern"] for r in api.get("/api/rules", destination="NPMJS").json["items"]] == [
        "registry.npmjs.org"
    ]
    assert [r["action"] for r in api.get("/api/rules", action="deny").json["items"]] == ["deny"]
    assert api.get("/api/rules", destination="gone").json == {"items": [], "total": 0}
    expired = api.get("/api/rules", destination="gone", include_expired="true").json
    assert expired["total"] == 1 and expired["items"][0]["is_active"] is False
    assert api.get("/api/rules", destination="50%_").json["items"] == []  # LIKE wildcards are literal


@pytest.mark.parametrize(
    "params, field",
    [
        ({"limit": "abc"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "-3"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "x"}, "offset"),
        ({"action": "maybe"}, "action"),
        ({"include_expired": "perhaps"}, "include_expired"),
    ],
)
def test_rules_list_bad_query(api, params, field):
    res = api.get("/api/rules", **params)
    assert res.status_code == 400
    assert field in error_of(res)


# --------------------------------------------------------------------------- rules: create


def test_rule_create_defaults_and_event(api):
    before = time.time()
    res = api.post("/api/rules", {"container_pattern": "opencode", "destination_pattern": "*.npmjs.org"})
    assert res.status_code == 201
    rule = res.json
    assert rule["port_pattern"] == "*" and rule["action"] == "allow" and rule["rule_type"] == "glob"
    assert rule["created_by"] == "api" and rule["source"] == "global" and rule["is_active"] is True
    assert rule["expires_at"] is None and rule["hit_count"] == 0 and rule["notes"] is None
    assert parse_time(rule["created_at"]) >= int(before)
    assert rule["created_at"].endswith("Z")
    assert api.events("rule.created") == [rule]


def test_rule_create_normalises_and_keeps_fields(api):
    rule = new_rule(
        api,
        port_pattern=" 80, 443 ",
        notes="npm",
        created_by="dashboard",
        rule_type="glob",
        action="deny",
        destination_pattern="  10.0.0.0/8 ",
    )
    assert rule["port_pattern"] == "80,443"
    assert rule["destination_pattern"] == "10.0.0.0/8"
    assert (rule["notes"], rule["created_by"], rule["action"]) == ("npm", "dashboard", "deny")
    assert new_rule(api, port_pattern=8080)["port_pattern"] == "8080"  # a JSON number is accepted


def test_rule_create_identical_active_is_reused(api):
    first = new_rule(api, port_pattern="443")
    api.events()
    again = api.post(
        "/api/rules",
        {
            "container_pattern": "agent",
            "destination_pattern": "example.com",
            "port_pattern": "443",
            "notes": "different notes",
        },
    )
    assert again.status_code == 201
    assert again.json["id"] == first["id"]
    assert api.get("/api/rules").json["total"] == 4
    assert api.events() == []  # nothing changed
    assert new_rule(api, port_pattern="443", action="deny")["id"] != first["id"]  # action is part of identity


def test_rule_create_replaces_expired_identical(api):
    api.sql(
        "INSERT INTO rules (container_pattern, destination_pattern, port_pattern, action, created_at,"
        " expires_at) VALUES ('agent', 'example.com', '*', 'allow', ?, ?)",
        (time.time() - 100, time.time() - 1),
    )
    old_id = api.sql("SELECT MAX(id) FROM rules")[0][0]
    rule = new_rule(api)
    assert rule["id"] != old_id and rule["is_active"]
    assert api.sql("SELECT COUNT(*) FROM rules WHERE id = ?", (old_id,))[0][0] == 0
    events = api.events()
    assert [t for t, _ in events] == ["rule.deleted", "rule.created"]
    assert events[0][1]["id"] == old_id and events[0][1]["rule"]["is_active"] is False


def test_rule_create_expiry(api):
    rule = new_rule(api, expires_in_seconds=3600)
    assert abs(parse_time(rule["expires_at"]) - (time.time() + 3600)) < 5
    at = rfc3339(time.time() + 7200)
    assert new_rule(api, destination_pattern="b.example", expires_at=at)["expires_at"] == at
    offset_form = new_rule(api, destination_pattern="c.example", expires_at="2999-01-01T02:00:00+02:00")
    assert offset_form["expires_at"] == "2999-01-01T00:00:00Z"
    assert new_rule(api, destination_pattern="d.example", expires_at=None)["expires_at"] is None


@pytest.mark.parametrize(
    "body, field",
    [
        ({"destination_pattern": "x.com"}, "container_pattern"),
        ({"container_pattern": "a"}, "destination_pattern"),
        ({"container_pattern": 5, "destination_pattern": "x.com"}, "container_pattern"),
        ({"container_pattern": "a", "destination_pattern": ["x.com"]}, "destination_pattern"),
        ({"container_pattern": "  ", "destination_pattern": "x.com"}, "container_pattern"),
        ({"container_pattern": "a b", "destination_pattern": "x.com"}, "container_pattern"),
        ({"container_pattern": "a", "destination_pattern": "10.0.0.0/99"}, "destination_pattern"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "action": "block"}, "action"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "action": True}, "action"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "rule_type": "regex"}, "rule_type"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "rule_type": "permanent"}, "rule_type"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "port_pattern": "70000"}, "port_pattern"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "port_pattern": "https"}, "port_pattern"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "port_pattern": "9000-8000"}, "port_pattern"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "port_pattern": True}, "port_pattern"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "expires_at": "tomorrow"}, "expires_at"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "expires_at": 12345}, "expires_at"),
        (
            {"container_pattern": "a", "destination_pattern": "x.com", "expires_at": "2001-01-01T00:00:00Z"},
            "expires_at",
        ),
        ({"container_pattern": "a", "destination_pattern": "x.com", "expires_in_seconds": 0}, "expires_in_seconds"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "expires_in_seconds": -5}, "expires_in_seconds"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "expires_in_seconds": "60"}, "expires_in_seconds"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "expires_in_seconds": True}, "expires_in_seconds"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "expires_in_seconds": 1.5}, "expires_in_seconds"),
        (
            {
                "container_pattern": "a",
                "destination_pattern": "x.com",
                "expires_in_seconds": 60,
                "expires_at": "2999-01-01T00:00:00Z",
            },
            "expires_at",
        ),
        ({"container_pattern": "a", "destination_pattern": "x.com", "notes": 7}, "notes"),
        ({"container_pattern": "a", "destination_pattern": "x.com", "created_by": {}}, "created_by"),
    ],
)
def test_rule_create_rejects_bad_fields(api, body, field):
    res = api.post("/api/rules", body)
    assert res.status_code == 400, res.json
    assert field in error_of(res)
    assert api.get("/api/rules").json["total"] == 3  # nothing stored


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "invalid JSON"),
        (b"", "required"),
        (b"[1, 2]", "object"),
        (b'"text"', "object"),
    ],
)
def test_rule_create_bad_bodies(api, raw, message):
    res = api.post("/api/rules", raw=raw)
    assert res.status_code == 400
    assert message in error_of(res)


# --------------------------------------------------------------------------- rules: get, update, delete


def test_rule_get_one(api):
    rule = new_rule(api)
    assert api.get(f"/api/rules/{rule['id']}").json == rule
    res = api.get("/api/rules/9999")
    assert res.status_code == 404 and "9999" in error_of(res)


def test_rule_update_partial(api):
    rule = new_rule(api, port_pattern="443", notes="first")
    api.events()
    res = api.put(f"/api/rules/{rule['id']}", {"action": "deny", "port_pattern": "80,443"})
    assert res.status_code == 200
    updated = res.json
    assert (updated["action"], updated["port_pattern"], updated["notes"]) == ("deny", "80,443", "first")
    assert updated["container_pattern"] == "agent" and updated["created_at"] == rule["created_at"]
    assert api.events("rule.updated") == [updated]
    assert api.get(f"/api/rules/{rule['id']}").json == updated
    renamed = api.put(
        f"/api/rules/{rule['id']}", {"container_pattern": "other", "destination_pattern": "*.x.io", "notes": None}
    ).json
    assert (renamed["container_pattern"], renamed["destination_pattern"], renamed["notes"]) == ("other", "*.x.io", None)


def test_rule_update_expiry_set_and_clear(api):
    rule = new_rule(api)
    at = rfc3339(time.time() + 600)
    assert api.put(f"/api/rules/{rule['id']}", {"expires_at": at}).json["expires_at"] == at
    assert api.put(f"/api/rules/{rule['id']}", {"expires_at": None}).json["expires_at"] is None
    api.put(f"/api/rules/{rule['id']}", {"expires_at": at})
    assert api.put(f"/api/rules/{rule['id']}", {"expires_at": ""}).json["expires_at"] is None
    past = api.put(f"/api/rules/{rule['id']}", {"expires_at": "2001-01-01T00:00"}).json
    assert past["expires_at"] == "2001-01-01T00:00:00Z" and past["is_active"] is False  # expiring now is allowed
    soon = api.put(f"/api/rules/{rule['id']}", {"expires_in_seconds": 60}).json
    assert soon["is_active"] and abs(parse_time(soon["expires_at"]) - time.time() - 60) < 5


def test_rule_update_empty_body_changes_nothing(api):
    rule = new_rule(api)
    api.events()
    assert api.put(f"/api/rules/{rule['id']}", {}).json == rule
    assert api.events() == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"action": "sometimes"}, "action"),
        ({"action": None}, "action"),
        ({"port_pattern": "1-2-3"}, "port_pattern"),
        ({"container_pattern": ""}, "container_pattern"),
        ({"destination_pattern": None}, "destination_pattern"),
        ({"expires_at": "next week"}, "expires_at"),
        ({"expires_at": 5}, "expires_at"),
        ({"notes": 1}, "notes"),
        ({"rule_type": "regex"}, "rule_type"),
    ],
)
def test_rule_update_rejects_bad_fields(api, body, field):
    rule = new_rule(api)
    res = api.put(f"/api/rules/{rule['id']}", body)
    assert res.status_code == 400
    assert field in error_of(res)
    assert api.get(f"/api/rules/{rule['id']}").json == rule


def test_rule_update_unknown_and_bad_json(api):
    res = api.put("/api/rules/4242", {"action": "deny"})
    assert res.status_code == 404 and "4242" in error_of(res)
    rule = new_rule(api)
    assert api.put(f"/api/rules/{rule['id']}", raw=b"{oops").status_code == 400
    assert api.put(f"/api/rules/{rule['id']}", raw=b"[]").status_code == 400


def test_rule_delete(api):
    rule = new_rule(api)
    api.events()
    res = api.delete(f"/api/rules/{rule['id']}")
    assert res.status_code == 200 and res.json == {"status": "ok", "deleted": True}
    assert api.events("rule.deleted") == [{"id": rule["id"], "rule": rule}]
    assert api.delete(f"/api/rules/{rule['id']}").json == {"status": "ok", "deleted": False}
    assert api.get(f"/api/rules/{rule['id']}").status_code == 404


def test_a_rule_like_a_builtin_one_is_the_users_own(api):
    """POST of `* -> 127.0.0.1` once answered with the seeded builtin rule; with
    greyproxy.builtinRules: false that rule is ignored, so the user's rule did nothing (outside
    tester C). A user's rule is its own, a global one; POSTing it again returns it."""
    body = {"container_pattern": "*", "destination_pattern": "127.0.0.1", "action": "allow"}
    first = api.post("/api/rules", body)
    assert first.status_code == 201 and first.json["source"] == "global", first.json
    again = api.post("/api/rules", body)
    assert again.json["id"] == first.json["id"]


def test_rule_delete_builtin_is_refused(api):
    """Builtin rules are listed, not edited or deleted (README, docs/configuration.md): they are
    seeded once, so a deleted one never came back; greyproxy.builtinRules: false switches them off."""
    builtin = api.get("/api/rules", destination="localhost").json["items"][0]
    assert builtin["source"] == "builtin"
    api.events()
    res = api.delete(f"/api/rules/{builtin['id']}")
    assert res.status_code == 400
    assert f"builtin rule {builtin['id']} cannot be deleted" in error_of(res)
    assert "greyproxy.builtinRules: false" in error_of(res)
    assert api.get(f"/api/rules/{builtin['id']}").json == builtin
    assert api.get("/api/rules").json["total"] == 3
    assert api.events() == []
    assert api.delete("/api/rules/9999").json == {"status": "ok", "deleted": False}  # unknown: as before


def test_rule_changes_nudge_the_proxy_before_answering(live):
    rule = new_rule(live)
    assert live.proxy.ops() == ["rules.reload"]
    live.put(f"/api/rules/{rule['id']}", {"action": "deny"})
    live.delete(f"/api/rules/{rule['id']}")
    assert live.proxy.ops() == ["rules.reload"] * 3
    new_rule(live, container_pattern="other")
    new_rule(live, container_pattern="other")  # reused: no change, no nudge
    assert live.proxy.ops() == ["rules.reload"] * 4


def test_rule_changes_succeed_with_the_proxy_down(api):
    t0 = time.monotonic()
    rule = new_rule(api)
    assert api.put(f"/api/rules/{rule['id']}", {"action": "deny"}).status_code == 200
    assert api.delete(f"/api/rules/{rule['id']}").json["deleted"] is True
    assert time.monotonic() - t0 < 3  # each unanswered nudge is bounded


def test_rule_create_withdraws_the_pending_entries_it_decides(live):
    """A new rule that decides a pending destination releases (allow) or refuses (deny) its held
    connections on the proxy's reload: the entry leaves the queue too, with the events a person's
    decision by that rule has (as ingest's cleanup; SPEC §11: entries leave when decided anywhere)."""
    covered = live.add_pending("sp", "held.example", 443)
    by_name = live.add_pending("sp", "10.9.8.7", 443, resolved="held.example")
    other_port = live.add_pending("sp", "held.example", 8443)
    other_container = live.add_pending("sq", "held.example", 443)
    to_deny = live.add_pending("sp", "bad.example", 80)
    live.events()
    rule = new_rule(live, container_pattern="sp", destination_pattern="held.example", port_pattern="443")
    left = {r[0] for r in live.sql("SELECT id FROM pending")}
    assert left == {other_port, other_container, to_deny}
    assert live.get("/api/pending/count").json == {"count": 3}
    events = live.events()
    assert [t for t, _ in events] == ["rule.created", "pending_request.allowed", "pending_request.allowed"]
    assert sorted(d["pending_id"] for _, d in events[1:]) == sorted([covered, by_name])
    assert all(d["rule"] == rule for _, d in events[1:])
    deny = new_rule(live, container_pattern="sp", destination_pattern="bad.example", action="deny")
    assert ("pending_request.dismissed", {"pending_id": to_deny, "rule": deny}) in live.events()
    assert {r[0] for r in live.sql("SELECT id FROM pending")} == {other_port, other_container}


def test_a_rule_for_one_ip_of_a_named_entry_leaves_the_entry(live):
    """An entry judged under a name stands for every IP of it (another IP bumps it and has no row):
    a rule naming one IP releases that IP's connections, but the entry stays until the name is
    decided; once it left with the rule, the other IP's held connection had no entry anyone could
    decide (outside tester A). A rule naming the host takes it."""
    pid = live.add_pending("sv", "127.0.0.2", 443, resolved="multi.example")
    live.events()
    new_rule(live, container_pattern="sv", destination_pattern="127.0.0.2", port_pattern="443")
    assert {r[0] for r in live.sql("SELECT id FROM pending")} == {pid}
    assert [t for t, _ in live.events()] == ["rule.created"]
    new_rule(live, container_pattern="sv", destination_pattern="multi.example", port_pattern="443")
    assert live.sql("SELECT id FROM pending") == []


def test_rule_create_leaves_entries_another_rule_decides_otherwise(live):
    new_rule(live, container_pattern="sr", destination_pattern="x.example", port_pattern="443", action="deny")
    stale = live.add_pending("sr", "x.example", 443)  # the more specific deny decides it, not the new allow
    live.events()
    new_rule(live, container_pattern="sr", destination_pattern="**.x.example")
    assert {r[0] for r in live.sql("SELECT id FROM pending")} == {stale}
    assert [t for t, _ in live.events()] == ["rule.created"]
    new_rule(live, container_pattern="sr", destination_pattern="**.x.example")  # reused: nothing changes
    assert live.events() == []


def test_rule_update_withdraws_the_pending_entries_it_now_decides(live):
    rule = new_rule(live, container_pattern="su", destination_pattern="before.example")
    pid = live.add_pending("su", "after.example", 443)
    live.events()
    updated = live.put(f"/api/rules/{rule['id']}", {"destination_pattern": "after.example"}).json
    assert live.sql("SELECT id FROM pending") == []
    assert live.events() == [
        ("rule.updated", updated),
        ("pending_request.allowed", {"pending_id": pid, "rule": updated}),
    ]


def test_rule_destinations_are_stored_as_they_match_so_twins_are_found(api):
    """SPEC §2.2: destinations compare case-insensitively, trailing dot ignored; §2.4: an identical
    rule returns the existing one. 'dup.test', 'DUP.TEST' and 'dup.test.' made three rules."""
    first = new_rule(api, container_pattern="nd", destination_pattern="dup.test", port_pattern="80")
    for variant in ("DUP.TEST", "dup.test.", " Dup.Test. "):
        again = new_rule(api, container_pattern="nd", destination_pattern=variant, port_pattern="80")
        assert again["id"] == first["id"], variant
    assert new_rule(api, container_pattern="nd", destination_pattern="[0:0::1]")["destination_pattern"] == "::1"
    assert api.get("/api/rules", container="nd").json["total"] == 2
    changed = api.put(f"/api/rules/{first['id']}", {"destination_pattern": "Other.Test."}).json
    assert changed["destination_pattern"] == "other.test"


@pytest.mark.parametrize(
    "destination, says",
    [
        ("dup.test:443", "port_pattern ('443')"),
        ("*.dup.test:8443", "port_pattern ('8443')"),
        ("[::1]:443", "port_pattern"),
        ("http://a.test/", "is a URL: give the host alone ('a.test')"),
        ("https://a.test:8443/x", "URL"),
        ("a.test/path", "a host name is given alone, without a path"),
    ],
)
def test_rule_destination_that_could_never_match_is_refused(api, destination, says):
    """'dup.test:443' was stored and never matched; 'http://a.test/' was refused as 'not a valid CIDR'."""
    res = api.post("/api/rules", {"container_pattern": "nm", "destination_pattern": destination})
    assert res.status_code == 400
    assert says in error_of(res) and "not a valid CIDR" not in error_of(res)
    rule = new_rule(api, container_pattern="nm")
    res = api.put(f"/api/rules/{rule['id']}", {"destination_pattern": destination})
    assert res.status_code == 400 and says in error_of(res)


def test_rule_update_cannot_make_a_twin_of_an_active_rule(api):
    """POST answers an identical rule with the existing one (SPEC §2.4); PUT made a second one."""
    a = new_rule(api, container_pattern="tw", destination_pattern="same.test", port_pattern="443")
    b = new_rule(api, container_pattern="tw", destination_pattern="other.test", port_pattern="443")
    api.events()
    res = api.put(f"/api/rules/{b['id']}", {"destination_pattern": "SAME.test."})
    assert res.status_code == 409
    assert f"rule {a['id']} has the same" in error_of(res)
    assert api.get(f"/api/rules/{b['id']}").json == b
    assert api.events() == []
    assert api.put(f"/api/rules/{a['id']}", {"destination_pattern": "same.test"}).status_code == 200  # itself
    # An expired twin is no twin (POST replaces those too): a rule may be expired into one, or
    # become one of an expired rule.
    past = "2001-01-01T00:00:00Z"
    assert api.put(f"/api/rules/{b['id']}", {"destination_pattern": "same.test", "expires_at": past}).status_code == 200
    assert api.put(f"/api/rules/{b['id']}", {"expires_at": None}).status_code == 409  # active again: a twin
    api.put(f"/api/rules/{a['id']}", {"expires_at": past})
    assert api.put(f"/api/rules/{b['id']}", {"expires_at": None}).status_code == 200
    # Twins stored before the guard existed: notes may still be edited, the patterns kept as they are.
    api.sql(
        "INSERT INTO rules (container_pattern, destination_pattern, port_pattern, action, created_at)"
        " VALUES ('tw', 'same.test', '443', 'allow', ?)",
        (time.time(),),
    )
    old_twin = api.sql("SELECT MAX(id) FROM rules")[0][0]
    assert api.put(f"/api/rules/{old_twin}", {"notes": "kept"}).status_code == 200
    assert api.put(f"/api/rules/{old_twin}", {"port_pattern": "443"}).status_code == 200  # unchanged


# --------------------------------------------------------------------------- rules: ingest


def test_ingest_imports_skips_and_cleans_pending(live):
    new_rule(live, container_pattern="a", destination_pattern="known.example", port_pattern="443")
    covered = live.add_pending("a", "api.github.com", 443)
    by_name = live.add_pending("a", "140.82.112.3", 443, resolved="github.com")
    uncovered = live.add_pending("a", "elsewhere.example", 443)
    denied = live.add_pending("b", "evil.example", 80)
    live.events()
    live.proxy.calls.clear()
    res = live.post(
        "/api/rules/ingest",
        [
            {"container_pattern": "a", "destination_pattern": "known.example", "port_pattern": "443"},  # exists
            {"container_pattern": "a", "destination_pattern": "**.github.com", "notes": "gh"},
            {"container_pattern": "a", "destination_pattern": "**.github.com", "notes": "dup in batch"},
            {
                "container_pattern": "b",
                "destination_pattern": "evil.example",
                "action": "deny",
                "id": 99,
                "created_at": "ignored",
                "is_active": True,
            },  # an exported rule's extra fields are ignored
        ],
    )
    assert res.status_code == 200
    assert res.json == {"imported": 2, "skipped": 2, "pending_cleaned": 2}
    left = {r[0] for r in live.sql("SELECT id FROM pending")}
    assert left == {uncovered, denied}
    events = live.events()
    assert [t for t, _ in events].count("rule.created") == 2
    allowed = [d for t, d in events if t == "pending_request.allowed"]
    assert {d["pending_id"] for d in allowed} == {covered, by_name}
    assert all(d["rule"]["destination_pattern"] == "**.github.com" for d in allowed)
    assert live.proxy.ops() == ["rules.reload"]
    notes = [r["notes"] for r in live.get("/api/rules", destination="github").json["items"]]
    assert notes == ["gh"]


def test_ingest_cleans_only_the_entries_an_imported_allow_covers(live):
    """SPEC §2.4: pending entries that an *imported* allow rule now covers are removed. Before, any
    rule decided it: an existing rule's or a builtin loopback allow's entries went too (with
    greyproxy.builtinRules: false those connections are held, and were left with nothing to allow)."""
    new_rule(live, container_pattern="x", destination_pattern="known.example", port_pattern="443")
    by_existing = live.add_pending("x", "known.example", 443)
    by_builtin = live.add_pending("z", "127.0.0.1", 19163)
    imported = live.add_pending("y", "127.0.0.1", 19163)
    new_rule(live, container_pattern="y", destination_pattern="blocked.example", port_pattern="443", action="deny")
    denied_anyway = live.add_pending("y", "blocked.example", 443)  # (a stale entry the deny decides)
    live.events()
    res = live.post(
        "/api/rules/ingest",
        [
            {"container_pattern": "y", "destination_pattern": "127.0.0.1", "port_pattern": "19163"},
            {"container_pattern": "*", "destination_pattern": "blocked.example"},  # the deny still wins
            {"container_pattern": "y", "destination_pattern": "nothing.example", "action": "deny"},
        ],
    )
    assert res.status_code == 200, res.text
    assert res.json == {"imported": 3, "skipped": 0, "pending_cleaned": 1}
    left = {r[0] for r in live.sql("SELECT id FROM pending")}
    assert left == {by_existing, by_builtin, denied_anyway}
    allowed = [d for t, d in live.events() if t == "pending_request.allowed"]
    assert [(d["pending_id"], d["rule"]["container_pattern"]) for d in allowed] == [(imported, "y")]


def test_ingest_is_all_or_nothing(api):
    api.add_pending("a", "x.example", 443)
    res = api.post(
        "/api/rules/ingest",
        [
            {"container_pattern": "a", "destination_pattern": "x.example"},
            {"container_pattern": "a", "destination_pattern": "y.example"},
            {"container_pattern": "a", "destination_pattern": "z.example", "port_pattern": "99999"},
        ],
    )
    assert res.status_code == 400
    assert "item 2" in error_of(res) and "port_pattern" in error_of(res)
    assert api.get("/api/rules").json["total"] == 3
    assert api.sql("SELECT COUNT(*) FROM pending")[0][0] == 1
    assert api.events() == []


@pytest.mark.parametrize(
    "body, message",
    [
        ({"container_pattern": "a"}, "array"),
        ([5], "item 0"),
        ([{"destination_pattern": "x"}], "item 0"),
        ([{"container_pattern": "a", "destination_pattern": "x", "action": "nope"}], "item 0"),
    ],
)
def test_ingest_rejects_bad_items(api, body, message):
    res = api.post("/api/rules/ingest", body)
    assert res.status_code == 400
    assert message in error_of(res)


def test_ingest_empty_and_bad_json(api):
    assert api.post("/api/rules/ingest", []).json == {"imported": 0, "skipped": 0, "pending_cleaned": 0}
    assert api.post("/api/rules/ingest", raw=b"[{").status_code == 400


# --------------------------------------------------------------------------- pending: list and count


def seed_siblings(api: Api) -> dict[str, int]:
    now = time.time()
    return {
        "ip1": api.add_pending("c1", "1.2.3.4", 443, resolved="api.x.com", first=now - 300, last=now - 60, attempts=2),
        "ip2": api.add_pending("c1", "5.6.7.8", 443, resolved="api.x.com", first=now - 200, last=now - 10, attempts=3),
        "name": api.add_pending("c1", "api.x.com", 443, first=now - 100, last=now - 30, attempts=4),
        "other_port": api.add_pending("c1", "api.x.com", 80, first=now - 50, last=now - 40),
        "other_container": api.add_pending("c2", "1.2.3.4", 443, resolved="api.x.com", first=now - 20, last=now - 5),
    }


def test_pending_groups_siblings(api):
    ids = seed_siblings(api)
    res = api.get("/api/pending")
    assert res.status_code == 200
    body = res.json
    assert body["total"] == 3
    assert [i["id"] for i in body["items"]] == [ids["other_container"], ids["ip2"], ids["other_port"]]
    group = body["items"][1]
    assert group["attempt_count"] == 9
    assert group["destination_host"] == "5.6.7.8" and group["resolved_hostname"] == "api.x.com"
    first_seen = {r[0]: r[1] for r in api.sql("SELECT id, first_seen FROM pending")}
    assert group["first_seen"] == rfc3339(first_seen[ids["ip1"]])
    assert group["waiting"] == 0  # the proxy is down
    assert set(group) == {
        "id",
        "container_name",
        "container_id",
        "destination_host",
        "destination_port",
        "resolved_hostname",
        "first_seen",
        "last_seen",
        "attempt_count",
        "waiting",
    }
    assert api.get("/api/pending/count").json == {"count": 3}


def test_pending_filters_and_pagination(api):
    ids = seed_siblings(api)
    assert [i["id"] for i in api.get("/api/pending", container="c2").json["items"]] == [ids["other_container"]]
    by_resolved = api.get("/api/pending", destination="api.x").json
    assert by_resolved["total"] == 3
    by_ip = api.get("/api/pending", destination="5.6.7").json
    assert [i["id"] for i in by_ip["items"]] == [ids["ip2"]] and by_ip["items"][0]["attempt_count"] == 3
    page = api.get("/api/pending", limit=1, offset=1).json
    assert page["total"] == 3 and [i["id"] for i in page["items"]] == [ids["ip2"]]
    assert api.get("/api/pending", container="nobody").json == {"items": [], "total": 0}
    for bad in ({"limit": "x"}, {"limit": "0"}, {"offset": "-2"}):
        assert api.get("/api/pending", **bad).status_code == 400


def test_pending_empty(api):
    assert api.get("/api/pending").json == {"items": [], "total": 0}
    assert api.get("/api/pending/count").json == {"count": 0}


def test_pending_waiting_comes_from_the_proxy(live):
    ids = seed_siblings(live)
    live.proxy.waiters = [
        {"container_name": "c1", "host": "1.2.3.4", "port": 443, "count": 2},
        {"container_name": "c1", "host": "api.x.com", "port": 443, "count": 1},
        {"container_name": "c1", "host": "api.x.com", "port": 80, "count": 4},
        {"container_name": "zz", "host": "nowhere", "port": 1, "count": 9},
        {"bogus": True},
    ]
    items = {i["id"]: i["waiting"] for i in live.get("/api/pending").json["items"]}
    assert items == {ids["ip2"]: 3, ids["other_port"]: 4, ids["other_container"]: 0}


# --------------------------------------------------------------------------- pending: decisions


def test_allow_default_exact_removes_siblings(live):
    ids = seed_siblings(live)
    live.events()
    res = live.post(f"/api/pending/{ids['ip1']}/allow")
    assert res.status_code == 200
    rule = res.json["rule"]
    assert res.json["pending_removed"] is True
    assert (rule["container_pattern"], rule["destination_pattern"], rule["port_pattern"], rule["action"]) == (
        "c1",
        "api.x.com",
        "443",
        "allow",
    )
    assert rule["expires_at"] is None and rule["created_by"] == "api"
    left = {r[0] for r in live.sql("SELECT id FROM pending")}
    assert left == {ids["other_port"], ids["other_container"]}
    events = live.events()
    assert ("rule.created", rule) in events
    assert ("pending_request.allowed", {"pending_id": ids["ip1"], "rule": rule}) in events
    assert live.proxy.ops() == ["rules.reload"]  # already done when the call returned


def test_allow_reuses_identical_active_rule(live):
    existing = new_rule(live, container_pattern="c9", destination_pattern="pkg.dev", port_pattern="443")
    pid = live.add_pending("c9", "pkg.dev", 443)
    live.events()
    res = live.post(f"/api/pending/{pid}/allow", {"scope": "exact"})
    assert res.json["rule"]["id"] == existing["id"]
    events = live.events()
    assert [t for t, _ in events] == ["pending_request.allowed"]


def test_allow_all_containers_withdraws_the_other_containers_entries(live):
    """The rule '*' → host:port releases every container's held connections; their entries went
    on waiting in the queue (waiting 0) until pendingTtlDays."""
    a = live.add_pending("aca", "shared.example", 443)
    b = live.add_pending("acb", "shared.example", 443)
    c = live.add_pending("acc", "1.2.3.4", 443, resolved="shared.example")
    other = live.add_pending("acb", "shared.example", 80)
    live.events()
    res = live.post(f"/api/pending/{a}/allow", {"scope": "all_containers"})
    rule = res.json["rule"]
    assert (rule["container_pattern"], rule["destination_pattern"]) == ("*", "shared.example")
    assert {r[0] for r in live.sql("SELECT id FROM pending")} == {other}
    allowed = {d["pending_id"]: d["rule"] for t, d in live.events() if t == "pending_request.allowed"}
    assert allowed == {a: rule, b: rule, c: rule}
    # In a bulk allow an id the first decision already withdrew counts as done, not as not found.
    d = live.add_pending("acd", "bulk.example", 443)
    e = live.add_pending("ace", "bulk.example", 443)
    res = live.post("/api/pending/bulk-allow", {"pending_ids": [d, e], "scope": "all_containers"})
    assert res.json["not_found"] == [] and res.json["pending_removed"] == 2
    assert len(res.json["rules_created"]) == 1


@pytest.mark.parametrize(
    "scope, host, resolved, expected",
    [
        ("exact", "1.2.3.4", None, ("c1", "1.2.3.4", "8443")),
        ("any_port", "api.example.com", None, ("c1", "api.example.com", "*")),
        ("subdomain_wildcard", "a.b.co.uk", None, ("c1", "**.b.co.uk", "*")),
        ("subdomain_wildcard", "9.9.9.9", "deep.api.github.com", ("c1", "**.github.com", "*")),
        # a public suffix has no registrable domain: the host itself, never **.github.io (tester A #8)
        ("subdomain_wildcard", "github.io", None, ("c1", "github.io", "*")),
        ("subdomain_wildcard", "co.uk", None, ("c1", "co.uk", "*")),
        ("all_containers", "10.1.1.1", "svc.internal.example", ("*", "svc.internal.example", "8443")),
    ],
)
def test_allow_scopes(api, scope, host, resolved, expected):
    pid = api.add_pending("c1", host, 8443, resolved=resolved)
    res = api.post(f"/api/pending/{pid}/allow", {"scope": scope})
    assert res.status_code == 200, res.json
    rule = res.json["rule"]
    assert (rule["container_pattern"], rule["destination_pattern"], rule["port_pattern"]) == expected


@pytest.mark.parametrize(
    "duration, seconds",
    [
        ("once", 30),
        ("1h", 3600),
        ("12h", 43200),
        ("24h", 86400),
        ("7d", 7 * 86400),
        ("30d", 30 * 86400),
        ("45m", 2700),
        ("2d", 2 * 86400),
        ("permanent", None),
    ],
)
def test_allow_durations(api, duration, seconds):
    pid = api.add_pending("c1", "dur.example", 443)
    rule = api.post(f"/api/pending/{pid}/allow", {"duration": duration, "notes": "why"}).json["rule"]
    assert rule["notes"] == "why"
    if seconds is None:
        assert rule["expires_at"] is None
    else:
        assert abs(parse_time(rule["expires_at"]) - (time.time() + seconds)) < 5
        assert rule["is_active"] is True


@pytest.mark.parametrize(
    "body, field",
    [
        ({"scope": "planet"}, "scope"),
        ({"scope": 3}, "scope"),
        ({"duration": "forever"}, "duration"),
        ({"duration": "0h"}, "duration"),
        ({"duration": 60}, "duration"),
        ({"notes": ["x"]}, "notes"),
    ],
)
def test_decision_rejects_bad_body(api, body, field):
    pid = api.add_pending("c1", "bad.example", 443)
    for action in ("allow", "deny"):
        res = api.post(f"/api/pending/{pid}/{action}", body)
        assert res.status_code == 400
        assert field in error_of(res)
    assert api.get("/api/pending/count").json == {"count": 1}
    assert api.post(f"/api/pending/{pid}/allow", raw=b"{nope").status_code == 400
    assert api.post(f"/api/pending/{pid}/allow", raw=b"[]").status_code == 400


@pytest.mark.parametrize(
    "body, meant",
    [
        ({"duraton": "1h"}, "duration"),  # the rule would have been permanent
        ({"scpoe": "exact"}, "scope"),
        ({"note": "why"}, "notes"),
        ({"Duration": "1h"}, "duration"),
    ],
)
def test_decision_refuses_a_misspelt_field(api, body, meant):
    """SPEC §3.2: a grant whose bound is misspelt is refused (400, naming the field meant), not widened to
    the default."""
    pid = api.add_pending("c1", "typo.example", 443)
    for action in ("allow", "deny"):
        res = api.post(f"/api/pending/{pid}/{action}", body)
        assert res.status_code == 400, res.json
        assert f"did you mean '{meant}'" in error_of(res)
    assert api.get("/api/pending/count").json == {"count": 1}  # nothing decided
    bulk = api.post("/api/pending/bulk-allow", {"pending_ids": [pid], **body})
    assert bulk.status_code == 400 and f"did you mean '{meant}'" in error_of(bulk)
    assert api.get("/api/pending/count").json == {"count": 1}


@pytest.mark.parametrize(
    "field, value, hint",
    [
        # the rule API's own expiry fields (POST /api/rules): the likeliest confusion
        ("expires_in_seconds", 3600, "POST /api/rules"),
        ("expires_at", "2030-01-01T00:00:00Z", "POST /api/rules"),
        ("ttl", "1h", "did you mean 'duration'"),
        ("expires", "1h", "did you mean 'duration'"),
        ("dur", "1h", "did you mean 'duration'"),
        ("action", "allow", ""),
        ("container", "c1", ""),
    ],
)
def test_decision_refuses_every_unknown_field(api, field, value, hint):
    """README: a grant's field that is not one it takes is refused, not ignored: ignored, an
    expiry under another name left a permanent rule (tester A #3)."""
    pid = api.add_pending("c1", "expiry.example", 443)
    for action in ("allow", "deny"):
        res = api.post(f"/api/pending/{pid}/{action}", {"scope": "exact", field: value})
        assert res.status_code == 400, res.json
        err = error_of(res)
        assert f"unknown field '{field}'" in err and hint in err
        assert "(accepted: scope, duration, notes)" in err
    bulk = api.post("/api/pending/bulk-allow", {"pending_ids": [pid], field: value})
    assert bulk.status_code == 400 and f"unknown field '{field}'" in error_of(bulk)
    assert "pending_ids" in error_of(bulk)
    assert api.get("/api/pending/count").json == {"count": 1}  # nothing decided
    assert api.sql("SELECT count(*) FROM rules WHERE destination_pattern = 'expiry.example'") == [(0,)]
    res = api.post(f"/api/pending/{pid}/allow", {"duration": "1h"})
    assert res.status_code == 200 and res.json["rule"]["expires_at"] is not None


def test_ws_decision_refuses_an_unknown_field(api):
    """The /ws allow/deny commands take the same body as REST (SPEC §8): same refusal."""
    from services.api.ws import commands

    class Conn:
        peer = "test"

        class hub:  # noqa: N801 - the attribute the commands read
            ctx = api.ctx

    pid = api.add_pending("c1", "expiry.example", 443)
    msg = {"command": "allow", "pending_id": pid, "expires_in_seconds": 3600}
    out = asyncio.run(commands.handle_text(Conn(), orjson.dumps(msg).decode()))  # type: ignore[arg-type]
    assert out["type"] == "error" and out["command"] == "allow" and out["pending_id"] == pid
    assert "unknown field 'expires_in_seconds'" in out["error"] and "duration" in out["error"]
    assert api.get("/api/pending/count").json == {"count": 1}


def test_decision_unknown_id(api):
    for action in ("allow", "deny"):
        res = api.post(f"/api/pending/777/{action}", {})
        assert res.status_code == 404
        assert "777" in error_of(res)


def test_deny_creates_deny_rule_and_blocks_holds(live):
    ids = seed_siblings(live)
    live.events()
    res = live.post(f"/api/pending/{ids['name']}/deny", {"scope": "any_port"})
    assert res.status_code == 200
    rule = res.json["rule"]
    assert (rule["container_pattern"], rule["destination_pattern"], rule["port_pattern"], rule["action"]) == (
        "c1",
        "api.x.com",
        "*",
        "deny",
    )
    events = live.events()
    assert ("pending_request.dismissed", {"pending_id": ids["name"], "rule": rule}) in events
    assert ("rule.created", rule) in events
    # The rule (any port) decides the entry for port 80 too: it goes, and its connections are refused.
    assert ("pending_request.dismissed", {"pending_id": ids["other_port"], "rule": rule}) in events
    assert {r[0] for r in live.sql("SELECT id FROM pending")} == {ids["other_container"]}
    assert live.proxy.ops() == ["rules.reload", "holds.block"]
    block = live.proxy.calls[1][1]
    assert block["reason"] == "rule"
    assert sorted(map(tuple, block["keys"])) == [
        ("c1", "1.2.3.4", 443),
        ("c1", "5.6.7.8", 443),
        ("c1", "api.x.com", 80),
        ("c1", "api.x.com", 443),
    ]


def test_decisions_succeed_with_the_proxy_down(api):
    pid = api.add_pending("c1", "down.example", 443)
    assert api.post(f"/api/pending/{pid}/deny").status_code == 200
    assert api.get("/api/pending/count").json == {"count": 0}


def test_dismiss(live):
    ids = seed_siblings(live)
    live.events()
    res = live.delete(f"/api/pending/{ids['ip2']}")
    assert res.status_code == 200 and res.json == {"status": "ok", "removed": True}
    assert {r[0] for r in live.sql("SELECT id FROM pending")} == {ids["other_port"], ids["other_container"]}
    assert live.events() == [("pending_request.dismissed", {"pending_id": ids["ip2"]})]
    assert live.proxy.ops() == ["holds.block"]
    assert live.proxy.calls[0][1]["reason"] == "dismissed"
    assert len(live.proxy.calls[0][1]["keys"]) == 3
    again = live.delete(f"/api/pending/{ids['ip2']}")
    assert again.status_code == 200 and again.json == {"status": "ok", "removed": False}
    assert live.events() == []


def test_dismiss_blocks_and_counts_the_connections_held_for_a_sibling_ip(live):
    """A second IP of a host bumps the first IP's entry (SPEC §3.1): its held connection has no row.
    The entry's `waiting` counts it (the proxy says under which name it was judged), and dismiss
    (single and bulk) names the group to the proxy, (container, resolved host, port), which blocks
    the connections held under that name (`Gate.block_holds`). Before: `waiting` 1 with two held,
    and only the row's key blocked: the sibling waited out the hold timeout."""
    pid = live.add_pending("c7", "10.0.0.1", 443, resolved="multi.test", attempts=2)
    live.proxy.waiters = [
        {"container_name": "c7", "host": "10.0.0.1", "port": 443, "resolved_hostname": "multi.test", "count": 1},
        {"container_name": "c7", "host": "10.0.0.2", "port": 443, "resolved_hostname": "multi.test", "count": 1},
        {"container_name": "c7", "host": "10.0.0.3", "port": 443, "resolved_hostname": "other.test", "count": 1},
        {"container_name": "c7", "host": "10.0.0.2", "port": 80, "resolved_hostname": "multi.test", "count": 1},
    ]
    [item] = live.get("/api/pending", container="c7").json["items"]
    assert (item["attempt_count"], item["waiting"]) == (2, 2)
    assert live.delete(f"/api/pending/{pid}").json == {"status": "ok", "removed": True}
    block = live.proxy.calls[-1]
    assert block[0] == "holds.block" and block[1]["reason"] == "dismissed"
    assert sorted(map(tuple, block[1]["keys"])) == [("c7", "10.0.0.1", 443), ("c7", "multi.test", 443)]
    pid = live.add_pending("c7", "10.0.0.1", 443, resolved="multi.test")
    assert live.post("/api/pending/bulk-dismiss", {"pending_ids": [pid]}).json["removed"] == 1
    block = live.proxy.calls[-1]
    assert sorted(map(tuple, block[1]["keys"])) == [("c7", "10.0.0.1", 443), ("c7", "multi.test", 443)]


def test_bulk_allow(live):
    ids = seed_siblings(live)
    live.events()
    res = live.post(
        "/api/pending/bulk-allow",
        {
            "pending_ids": [ids["ip2"], ids["other_container"], 9999, ids["ip1"]],
            "scope": "subdomain_wildcard",
            "duration": "1h",
        },
    )
    assert res.status_code == 200
    body = res.json
    assert body["not_found"] == [9999]
    assert body["pending_removed"] == 3  # ip1 went with its sibling ip2
    patterns = sorted(
        (r["container_pattern"], r["destination_pattern"], r["port_pattern"]) for r in body["rules_created"]
    )
    assert patterns == [("c1", "**.x.com", "*"), ("c2", "**.x.com", "*")]
    assert all(r["expires_at"] is not None for r in body["rules_created"])
    # c1 → **.x.com (any port) decides the entry for port 80 too: it leaves the queue with the others.
    assert live.sql("SELECT id FROM pending") == []
    allowed = [d["pending_id"] for t, d in live.events() if t == "pending_request.allowed"]
    assert sorted(allowed) == sorted([ids["ip2"], ids["other_container"], ids["other_port"]])
    assert live.proxy.ops() == ["rules.reload"]


def test_bulk_dismiss(live):
    ids = seed_siblings(live)
    live.events()
    res = live.post("/api/pending/bulk-dismiss", {"pending_ids": [ids["name"], ids["other_port"], 31337]})
    assert res.status_code == 200
    assert res.json == {"status": "ok", "removed": 2, "not_found": [31337]}
    assert {r[0] for r in live.sql("SELECT id FROM pending")} == {ids["other_container"]}
    dismissed = [d for t, d in live.events() if t == "pending_request.dismissed"]
    assert dismissed == [{"pending_id": ids["name"]}, {"pending_id": ids["other_port"]}]
    assert live.proxy.ops() == ["holds.block"]
    assert len(live.proxy.calls[0][1]["keys"]) == 4


@pytest.mark.parametrize("path", ["/api/pending/bulk-allow", "/api/pending/bulk-dismiss"])
@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "pending_ids"),
        ({"pending_ids": 5}, "pending_ids"),
        ({"pending_ids": ["1"]}, "pending_ids[0]"),
        ({"pending_ids": [1, True]}, "pending_ids[1]"),
        ([1, 2], "object"),
    ],
)
def test_bulk_rejects_bad_ids(api, path, body, field):
    res = api.post(path, body)
    assert res.status_code == 400
    assert field in error_of(res)


def test_bulk_allow_rejects_bad_scope_and_empty_list(api):
    pid = api.add_pending("c1", "a.example", 443)
    res = api.post("/api/pending/bulk-allow", {"pending_ids": [pid], "scope": "nope"})
    assert res.status_code == 400 and "scope" in error_of(res)
    assert api.post("/api/pending/bulk-allow", {"pending_ids": []}).json == {
        "rules_created": [],
        "pending_removed": 0,
        "not_found": [],
    }
    assert api.post("/api/pending/bulk-dismiss", {"pending_ids": []}).json == {
        "status": "ok",
        "removed": 0,
        "not_found": [],
    }


# --------------------------------------------------------------------------- logs


def test_logs_list_filters_summary_and_pages(api):
    now = time.time()
    rule = new_rule(api, container_pattern="c1", destination_pattern="x.com", port_pattern="443")
    gone = new_rule(api, container_pattern="c1", destination_pattern="gone.com")
    api.add_log(now - 300, "c1", "x.com", 443, "allowed", rule["id"])
    api.add_log(now - 200, "c1", "1.1.1.1", 443, "allowed", gone["id"], resolved="one.one.example")
    api.add_log(now - 100, "c2", "evil.com", 80, "blocked", None, method="HTTP")
    api.delete(f"/api/rules/{gone['id']}")
    res = api.get("/api/logs")
    assert res.status_code == 200
    body = res.json
    assert body["total"] == 3 and body["page"] == 1 and body["pages"] == 1
    assert [i["destination_host"] for i in body["items"]] == ["evil.com", "1.1.1.1", "x.com"]
    summaries = [i["rule_summary"] for i in body["items"]]
    assert summaries == [None, None, "c1 → x.com:443"]
    assert set(body["items"][0]) >= {
        "id",
        "timestamp",
        "container_name",
        "container_id",
        "destination_host",
        "destination_port",
        "resolved_hostname",
        "method",
        "result",
        "rule_id",
        "rule_summary",
        "response_time_ms",
        "reason",
        "mitm_skip_reason",
    }
    assert [i["container_name"] for i in api.get("/api/logs", container="c2").json["items"]] == ["c2"]
    assert [i["destination_host"] for i in api.get("/api/logs", destination="one.one").json["items"]] == ["1.1.1.1"]
    assert [i["result"] for i in api.get("/api/logs", result="blocked").json["items"]] == ["blocked"]
    window = api.get("/api/logs", from_date=rfc3339(now - 250), to_date=rfc3339(now - 150)).json
    assert [i["destination_host"] for i in window["items"]] == ["1.1.1.1"]
    paged = api.get("/api/logs", limit=2, offset=2).json
    assert (paged["total"], paged["page"], paged["pages"], len(paged["items"])) == (3, 2, 2, 1)
    assert api.get("/api/logs", container="nobody").json == {"items": [], "total": 0, "page": 1, "pages": 1}


def test_logs_total_stays_exact_through_inserts_deletes_and_updates(api):
    """`total` comes from trigger-kept counts when only container/result filter: it must equal COUNT(*)."""
    now = time.time()
    for i in range(60):
        api.add_log(now - i, f"c{i % 3}", f"h{i % 7}.com", 443, "allowed" if i % 4 else "blocked")

    def check() -> None:
        for params in (
            {},
            {"container": "c1"},
            {"result": "blocked"},
            {"container": "c2", "result": "allowed"},
            {"container": "nobody"},
            {"destination": "h3"},
            {"from_date": rfc3339(now - 30)},
        ):
            where, args = ["1 = 1"], []
            for key, col in (("container", "container_name"), ("result", "result")):
                if key in params:
                    where.append(f"{col} = ?")
                    args.append(params[key])
            if "destination" in params:
                where.append("destination_host LIKE ?")
                args.append(f"%{params['destination']}%")
            if "from_date" in params:
                where.append("timestamp >= ?")
                args.append(parse_time(params["from_date"]))
            expected = api.sql(f"SELECT COUNT(*) FROM logs WHERE {' AND '.join(where)}", tuple(args))[0][0]
            assert api.get("/api/logs", **params).json["total"] == expected, params

    check()
    api.sql("DELETE FROM logs WHERE container_name = 'c0' AND timestamp < ?", (now - 20,))
    api.sql(
        "UPDATE logs SET result = 'blocked', container_name = 'c2' WHERE container_name = 'c1' AND result = 'allowed'"
        " AND timestamp > ?",
        (now - 40,),
    )
    check()
    api.sql("DELETE FROM logs")
    assert api.get("/api/logs").json["total"] == 0
    check()


@pytest.mark.parametrize(
    "params, field",
    [
        ({"result": "maybe"}, "result"),
        ({"from_date": "yesterday"}, "from_date"),
        ({"to_date": "12/01/2026"}, "to_date"),
        ({"limit": "0"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
    ],
)
def test_logs_bad_query(api, params, field):
    res = api.get("/api/logs", **params)
    assert res.status_code == 400
    assert field in error_of(res)


def test_logs_accept_short_time_form(api):
    api.add_log(parse_time("2026-03-01T10:30:00Z"), "c", "h", 1, "allowed")
    res = api.get("/api/logs", from_date="2026-03-01T10:00", to_date="2026-03-01T11:00")
    assert res.json["total"] == 1


def seed_stats_logs(api: Api) -> float:
    base = parse_time("2026-02-02T00:00:00Z")  # a Monday
    for minute in (5, 10, 70):
        api.add_log(base + minute * 60, "alpha", "ok.example", 443, "allowed")
    api.add_log(base + 20 * 60, "alpha", "bad.example", 443, "blocked", resolved="bad-name.example")
    api.add_log(base + 130 * 60, "beta", "bad.example", 443, "blocked")
    api.add_log(base + 140 * 60, "beta", "other.example", 80, "blocked")
    api.add_log(base - 3600, "alpha", "early.example", 443, "blocked")  # outside the window
    return base


def test_logs_stats(api):
    base = seed_stats_logs(api)
    res = api.get("/api/logs/stats", from_date=rfc3339(base), to_date=rfc3339(base + 3 * 3600 - 1), group_by="hour")
    assert res.status_code == 200
    s = res.json
    assert s["period"] == {"from": "2026-02-02T00:00:00Z", "to": "2026-02-02T02:59:59Z"}
    assert (s["total_requests"], s["allowed"], s["blocked"]) == (6, 3, 3)
    assert s["top_containers"] == [
        {"name": "alpha", "total": 4, "allowed": 3, "blocked": 1, "percentage": 66.67},
        {"name": "beta", "total": 2, "allowed": 0, "blocked": 2, "percentage": 33.33},
    ]
    assert s["top_destinations"][0] == {
        "host": "bad.example",
        "port": 443,
        "resolved_hostname": "bad-name.example",
        "count": 2,
        "containers": ["alpha", "beta"],
    }
    assert [d["host"] for d in s["top_destinations"]] == ["bad.example", "other.example"]
    assert s["timeline"] == [
        {"timestamp": "2026-02-02T00:00:00Z", "allowed": 2, "blocked": 1},
        {"timestamp": "2026-02-02T01:00:00Z", "allowed": 1, "blocked": 0},
        {"timestamp": "2026-02-02T02:00:00Z", "allowed": 0, "blocked": 2},
    ]


def test_logs_stats_grouping(api):
    base = seed_stats_logs(api)
    day = api.get(
        "/api/logs/stats", from_date=rfc3339(base - 86400), to_date=rfc3339(base + 86399), group_by="day"
    ).json
    assert day["timeline"] == [
        {"timestamp": "2026-02-01T00:00:00Z", "allowed": 0, "blocked": 1},
        {"timestamp": "2026-02-02T00:00:00Z", "allowed": 3, "blocked": 3},
    ]
    week = api.get(
        "/api/logs/stats", from_date="2026-01-20T00:00:00Z", to_date="2026-02-08T00:00:00Z", group_by="week"
    ).json
    assert [t["timestamp"] for t in week["timeline"]] == [
        "2026-01-19T00:00:00Z",
        "2026-01-26T00:00:00Z",
        "2026-02-02T00:00:00Z",
    ]  # weeks start on Monday
    assert week["timeline"][1] == {"timestamp": "2026-01-26T00:00:00Z", "allowed": 0, "blocked": 1}  # Sunday 23:00
    assert week["timeline"][2]["allowed"] == 3
    auto = api.get("/api/logs/stats", from_date="2026-01-01T00:00:00Z", to_date="2026-01-10T00:00:00Z").json
    assert auto["group_by"] == "day" and len(auto["timeline"]) == 10
    auto = api.get("/api/logs/stats", from_date="2026-01-01T00:00:00Z", to_date="2026-01-02T00:00:00Z").json
    assert auto["group_by"] == "hour" and len(auto["timeline"]) == 25
    auto = api.get("/api/logs/stats", from_date="2025-01-01T00:00:00Z", to_date="2026-01-01T00:00:00Z").json
    assert auto["group_by"] == "week"


def test_logs_stats_defaults_to_today(api):
    now = time.time()
    api.add_log(now - 1, "c", "today.example", 443, "allowed")
    s = api.get("/api/logs/stats").json
    assert s["period"]["from"].endswith("T00:00:00Z")
    assert s["period"]["from"][:10] == rfc3339(now)[:10]
    assert s["total_requests"] == 1 and s["group_by"] == "hour"


@pytest.mark.parametrize(
    "params, field",
    [
        ({"group_by": "month"}, "group_by"),
        ({"from_date": "x"}, "from_date"),
        ({"from_date": "2026-02-02T00:00:00Z", "to_date": "2026-02-01T00:00:00Z"}, "from_date"),
    ],
)
def test_logs_stats_bad_query(api, params, field):
    res = api.get("/api/logs/stats", **params)
    assert res.status_code == 400
    assert field in error_of(res)


def test_logs_stats_empty(api):
    s = api.get("/api/logs/stats", from_date="2026-01-01T00:00:00Z", to_date="2026-01-01T05:00:00Z").json
    assert (s["total_requests"], s["top_containers"], s["top_destinations"]) == (0, [], [])
    assert len(s["timeline"]) == 6 and all(t["allowed"] == t["blocked"] == 0 for t in s["timeline"])


def test_dashboard_with_live_proxy(live):
    now = time.time()
    live.add_log(now - 3 * 86400, "alpha", "a.example", 443, "allowed")
    live.add_log(now - 2 * 86400, "alpha", "b.example", 443, "blocked")
    for i in range(3):
        live.add_log(now - 60 + i, "beta", "c.example", 443, "allowed")
    live.add_log(now - 40 * 86400, "old", "old.example", 443, "allowed")
    seed_siblings(live)
    live.proxy.stats = {
        "active_connections": 5,
        "waiting": 2,
        "allowall": {"active": True, "mode": "allow", "expires_at": None, "remaining_seconds": None},
    }
    res = live.get("/api/dashboard", period="7d", recent_limit=2)
    assert res.status_code == 200
    d = res.json
    assert (d["total_requests"], d["allowed"], d["blocked"]) == (5, 4, 1)
    assert d["allow_rate"] == 80.0
    assert d["by_container"][0]["name"] == "beta" and d["by_container"] == d["top_containers"]
    assert d["top_blocked"] == [
        {"host": "b.example", "port": 443, "resolved_hostname": None, "count": 1, "containers": ["alpha"]}
    ]
    assert [r["destination_host"] for r in d["recent"]] == ["c.example", "c.example"]
    assert d["pending_count"] == 3
    assert (d["active_connections"], d["waiting"]) == (5, 2)
    assert d["allowall"]["active"] is True and d["allowall"]["mode"] == "allow"
    assert d["group_by"] == "day" and len(d["timeline"]) == 8
    assert live.get("/api/dashboard", period="30d").json["total_requests"] == 5
    assert live.get("/api/dashboard", period="30d", from_date=rfc3339(now - 50 * 86400)).json["total_requests"] == 6


def test_dashboard_with_proxy_down(api):
    api.add_log(time.time() - 5, "c", "x.example", 443, "blocked")
    d = api.get("/api/dashboard").json
    assert (d["active_connections"], d["waiting"], d["allowall"]) == (0, 0, ALLOWALL_OFF)
    assert d["total_requests"] == 1 and d["allow_rate"] == 0.0 and d["pending_count"] == 0
    assert d["recent"][0]["destination_host"] == "x.example"


@pytest.mark.parametrize(
    "params, field",
    [
        ({"period": "year"}, "period"),
        ({"recent_limit": "many"}, "recent_limit"),
        ({"recent_limit": "500"}, "recent_limit"),
        ({"group_by": "minute"}, "group_by"),
        ({"to_date": "soon"}, "to_date"),
    ],
)
def test_dashboard_bad_query(api, params, field):
    res = api.get("/api/dashboard", **params)
    assert res.status_code == 400
    assert field in error_of(res)


# --------------------------------------------------------------------------- settings and notifications


DEFAULT_HEADERS = [
    "Authorization",
    "Proxy-Authorization",
    "Cookie",
    "Set-Cookie",
    "*api-key*",
    "*apikey*",
    "*token*",
    "*secret*",
    "*auth*",
    "*password*",
    "*passwd*",
    "*session*",
]  # issue 13 item 4


@pytest.fixture
def no_backend(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_settings_defaults(api, no_backend):
    res = api.get("/api/settings")
    assert res.status_code == 200
    assert res.json == {
        "theme": "system",
        "notificationsEnabled": True,
        "mitmEnabled": True,
        "conversationsEnabled": True,
        "redactedHeaders": DEFAULT_HEADERS,
        "logDnsQueries": False,
        "notifications": {"available": False, "backend": "none"},
    }


def test_settings_update_persist_and_event(api, no_backend):
    api.events()
    res = api.put(
        "/api/settings", {"theme": "dark", "mitmEnabled": False, "redactedHeaders": ["X-Internal", "cookie", "*sid*"]}
    )
    assert res.status_code == 200
    s = res.json
    assert s["theme"] == "dark" and s["mitmEnabled"] is False and s["notificationsEnabled"] is True
    assert s["redactedHeaders"] == [*DEFAULT_HEADERS, "X-Internal", "*sid*"]
    assert api.get("/api/settings").json == s
    stored = dict(api.sql("SELECT key, value FROM settings"))
    assert orjson.loads(stored["redactedHeaders"]) == ["X-Internal", "*sid*"]  # only the extras
    assert orjson.loads(stored["theme"]) == "dark"
    changed = api.events("settings.changed")
    assert changed == [{k: v for k, v in s.items() if k != "notifications"}]
    again = api.put("/api/settings", {"redactedHeaders": []}).json
    assert again["redactedHeaders"] == DEFAULT_HEADERS and again["theme"] == "dark"


def test_settings_round_trip_and_empty_update(api, no_backend):
    api.put("/api/settings", {"logDnsQueries": True, "redactedHeaders": ["X-A"]})
    current = api.get("/api/settings").json
    api.events()
    assert api.put("/api/settings", current).json == current  # GET → PUT changes nothing
    assert api.put("/api/settings", {}).json == current
    assert api.put("/api/settings", {"notifications": {"enabled": False}}).json["notificationsEnabled"] is False


@pytest.mark.parametrize(
    "body, field",
    [
        ({"colour": "blue"}, "colour"),
        ({"theme": "neon"}, "theme"),
        ({"theme": 1}, "theme"),
        ({"mitmEnabled": "yes"}, "mitmEnabled"),
        ({"notificationsEnabled": 1}, "notificationsEnabled"),
        ({"conversationsEnabled": None}, "conversationsEnabled"),
        ({"logDnsQueries": "false"}, "logDnsQueries"),
        ({"redactedHeaders": "X-A"}, "redactedHeaders"),
        ({"redactedHeaders": [1]}, "redactedHeaders[0]"),
        ({"redactedHeaders": ["ok", "has space"]}, "redactedHeaders[1]"),
        ({"redactedHeaders": [""]}, "redactedHeaders[0]"),
        ({"notifications": {"enabled": "on"}}, "notifications.enabled"),
        ({"notifications": {"sound": True}}, "notifications.sound"),
        ({"notifications": True}, "notifications"),
    ],
)
def test_settings_rejects_bad_values(api, body, field):
    res = api.put("/api/settings", body)
    assert res.status_code == 400
    assert field in error_of(res)
    assert api.sql("SELECT COUNT(*) FROM settings")[0][0] == 0  # nothing half-applied


def test_settings_bad_bodies(api):
    assert api.put("/api/settings", raw=b"{").status_code == 400
    assert api.put("/api/settings", raw=b"[]").status_code == 400
    assert api.put("/api/settings", {"theme": "dark", "bogus": 1}).status_code == 400
    assert api.get("/api/settings").json["theme"] == "system"


def test_notifications_get_and_put(api, no_backend):
    assert api.get("/api/notifications").json == {
        "enabled": True,
        "available": False,
        "backend": "none",
        "active_claims": 0,
    }
    api.ctx.notification_claims = 2  # maintained by the /ws layer
    api.events()
    res = api.put("/api/notifications", {"enabled": False})
    assert res.status_code == 200
    assert res.json == {"enabled": False, "available": False, "backend": "none", "active_claims": 2}
    assert api.get("/api/settings").json["notificationsEnabled"] is False
    assert api.events("settings.changed")[0]["notificationsEnabled"] is False
    for bad in ({}, {"enabled": "no"}, {"enabled": None}, {"enabled": True, "volume": 3}):
        r = api.put("/api/notifications", bad)
        assert r.status_code == 400
    assert api.put("/api/notifications", raw=b"nope").status_code == 400


def test_notifications_backend_detected(api, monkeypatch, tmp_path):
    monkeypatch.setattr(notify.sys, "platform", "linux")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "notify-send"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir))
    assert api.get("/api/notifications").json["available"] is True
    assert api.get("/api/settings").json["notifications"] == {"available": True, "backend": "notify-send"}


# --------------------------------------------------------------------------- allow-all


def test_allowall_proxy_down_is_503(api):
    for res in (api.get("/api/allowall"), api.post("/api/allowall", {"mode": "allow"}), api.delete("/api/allowall")):
        assert res.status_code == 503
        assert "proxy" in error_of(res)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"mode": "sometimes"}, "mode"),
        ({"mode": 1}, "mode"),
        ({"duration_seconds": 28801}, "duration_seconds"),
        ({"duration_seconds": -1}, "duration_seconds"),
        ({"duration_seconds": "60"}, "duration_seconds"),
        ({"duration_seconds": True}, "duration_seconds"),
        ({"duration_seconds": 1.5}, "duration_seconds"),
    ],
)
def test_allowall_validates_before_asking_the_proxy(api, body, field):
    res = api.post("/api/allowall", body)
    assert res.status_code == 400  # not 503: the body is wrong whatever the proxy's state
    assert field in error_of(res)
    assert api.post("/api/allowall", raw=b"{x").status_code == 400


@pytest.mark.parametrize("body", [{"duration": 300}, {"seconds": 300}, {"mdoe": "deny"}, {"ttl": 300}])
def test_allowall_refuses_a_misspelt_field(live, body):
    """SPEC §4: `duration` for `duration_seconds` would otherwise mean silent mode until restart."""
    res = live.post("/api/allowall", body)
    assert res.status_code == 400
    assert "did you mean" in error_of(res)
    assert "allowall.set" not in live.proxy.ops()
    res = live.post("/api/allowall", {"duration_seconds": 300, "enabled": True})
    assert res.status_code == 400 and "unknown field 'enabled'" in error_of(res)
    assert "(accepted: mode, duration_seconds)" in error_of(res)
    assert "allowall.set" not in live.proxy.ops()


def test_allowall_forwards_to_the_proxy(live):
    assert live.get("/api/allowall").json == ALLOWALL_OFF
    res = live.post("/api/allowall", {"mode": "deny", "duration_seconds": 60})
    assert res.status_code == 200
    assert res.json["active"] is True and res.json["mode"] == "deny" and res.json["remaining_seconds"] == 60
    assert live.proxy.calls[-1] == ("allowall.set", {"mode": "deny", "duration_seconds": 60})
    assert live.post("/api/allowall").json["mode"] == "allow"  # empty body: allow until restart
    assert live.proxy.calls[-1] == ("allowall.set", {"mode": "allow", "duration_seconds": 0})
    assert live.delete("/api/allowall").json == ALLOWALL_OFF
    assert live.proxy.ops()[-1] == "allowall.clear"


# --------------------------------------------------------------------------- path prefix


def test_routes_live_under_the_path_prefix(tmp_path, sock_dir):
    a = Api(tmp_path, sock_dir, proxy_up=False, prefix="/proxy")
    try:
        assert a.get("/api/rules").json["total"] == 3
        assert a.client.simulate_get("/api/rules").status_code == 404
    finally:
        a.close()


# --------------------------------------------------------------------------- OS notifications


class FakeCtx:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.notification_claims = 0


def fake_backend(tmp_path: Path, name: str) -> tuple[notify.Backend, Path]:
    log_file = tmp_path / f"{name}.log"
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log_file}"\necho 42\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return notify.Backend(name, str(script)), log_file


def created(pid: int, host: str = "api.example.com", port: int = 443, waiting: int = 1) -> dict[str, Any]:
    return {
        "id": pid,
        "container_name": "agent",
        "destination_host": host,
        "destination_port": port,
        "resolved_hostname": None,
        "waiting": waiting,
    }


def test_notifier_notify_send(tmp_path):
    cfg = load_config(env={"GREYPROXY_DATA_HOME": str(tmp_path)})
    backend, log_file = fake_backend(tmp_path, "notify-send")
    clock = [1000.0]

    async def scenario() -> None:
        ctx = FakeCtx(cfg)
        n = notify.Notifier(ctx, backend, clock=lambda: clock[0])
        assert n.handle("pending_request.created", created(1)) is True
        await n.wait_idle()
        assert n.handle("pending_request.created", created(1)) is False  # cooldown per key
        assert n.handle("pending_request.updated", created(1, waiting=0)) is False
        clock[0] += 31
        assert n.handle("pending_request.updated", created(1, waiting=0)) is False  # nobody waiting
        assert n.handle("pending_request.updated", created(1, waiting=2)) is True
        await n.wait_idle()
        assert n.handle("pending_request.created", created(2, port=80)) is True  # another key
        await n.wait_idle()
        ctx.notification_claims = 1
        assert n.handle("pending_request.created", created(3, host="claimed.example")) is False
        ctx.notification_claims = 0
        n.handle("settings.changed", {"notificationsEnabled": False})
        assert n.handle("pending_request.created", created(4, host="off.example")) is False
        n.handle("settings.changed", {"notificationsEnabled": True})
        assert n.handle("pending_request.created", created(5, host="on.example")) is True
        await n.wait_idle()
        assert n.handle("pending_request.created", {"bogus": True}) is False

    asyncio.run(scenario())
    lines = log_file.read_text().splitlines()
    assert len(lines) == 4
    assert "--print-id" in lines[0] and "agent wants to connect to api.example.com:443" in lines[0]
    assert "agent wants to connect to api.example.com:80" in lines[2]
    assert "on.example:443" in lines[3]


def test_notifier_terminal_notifier_opens_dashboard_and_closes(tmp_path):
    cfg = load_config(env={"GREYPROXY_DATA_HOME": str(tmp_path)})
    backend, log_file = fake_backend(tmp_path, "terminal-notifier")

    async def scenario() -> None:
        n = notify.Notifier(FakeCtx(cfg), backend)
        data = created(7) | {"resolved_hostname": "named.example"}
        assert n.handle("pending_request.created", data) is True
        await n.wait_idle()
        n.handle("pending_request.allowed", {"pending_id": 7, "rule": {}})
        await n.wait_idle()
        assert n.handle("pending_request.created", data) is True  # decided: the cooldown starts over
        await n.wait_idle()

    asyncio.run(scenario())
    lines = log_file.read_text().splitlines()
    assert "agent wants to connect to named.example:443" in lines[0]
    assert "-open http://127.0.0.1:43080/?pending=7" in lines[0]
    group = lines[0].split("-group ")[1].split()[0]
    assert lines[1] == f"-remove {group}"
    assert len(lines) == 3


def test_notifier_unavailable_backend(tmp_path):
    cfg = load_config(env={"GREYPROXY_DATA_HOME": str(tmp_path)})

    async def scenario() -> None:
        n = notify.Notifier(FakeCtx(cfg), notify.NO_BACKEND)
        assert n.handle("pending_request.created", created(1)) is False
        await asyncio.wait_for(notify.run_notifier(FakeCtx(cfg), notify.NO_BACKEND), 1)  # returns at once

    asyncio.run(scenario())


def test_notifier_survives_a_broken_backend(tmp_path):
    cfg = load_config(env={"GREYPROXY_DATA_HOME": str(tmp_path)})
    broken = notify.Backend("notify-send", str(tmp_path / "does-not-exist"))

    async def scenario() -> None:
        n = notify.Notifier(FakeCtx(cfg), broken)
        assert n.handle("pending_request.created", created(1)) is True
        await n.wait_idle()  # the failure is logged, never raised

    asyncio.run(scenario())


def test_run_notifier_reacts_to_bus_events(tmp_path, sock_dir, monkeypatch):
    backend, log_file = fake_backend(tmp_path, "notify-send")
    db = open_database(tmp_path / "db")
    cfg = load_config(env={"GREYPROXY_DATA_HOME": str(tmp_path)})
    cfg.bus["sub"] = f"ipc://{sock_dir}/sub"

    class Ctx(FakeCtx):
        def __init__(self) -> None:
            super().__init__(cfg)
            self.db_executor = ThreadPoolExecutor(1)

        async def db(self, fn: Any, *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self.db_executor, fn, *args)

    async def scenario() -> None:
        zctx = zmq.Context()
        pub = zctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(cfg.bus["sub"])  # plays the broker's XPUB side
        ctx = Ctx()
        task = asyncio.create_task(notify.run_notifier(ctx, backend))
        try:
            for _ in range(100):  # until the subscription is through, and then one notification ran
                pub.send_multipart(
                    [
                        b"pending_request.created",
                        orjson.dumps(
                            {
                                "type": "pending_request.created",
                                "data": created(9),
                                "ts": 0,
                                "source": "recorder",
                                "seq": 1,
                            }
                        ),
                    ]
                )
                await asyncio.sleep(0.05)
                if log_file.exists() and log_file.read_text():
                    break
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            pub.close()
            zctx.term()
            ctx.db_executor.shutdown()

    asyncio.run(scenario())
    db.close()
    assert "agent wants to connect to api.example.com:443" in log_file.read_text()


# --------------------------------------------------------------------------- HTTP and parsing nits (tester A #10)


def test_head_is_answered_as_get_without_a_body(api):
    """RFC 9110: HEAD wherever GET is served (it was 405 on every route but /metrics)."""
    for path in ("/api/rules", "/api/pending/count", "/api/openapi.json", "/", "/static/app.css"):
        get = api.client.simulate_get(path)
        head = api.client.simulate_head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-length"] == str(len(get.content)), path
        assert head.headers["content-type"] == get.headers["content-type"]
    head = api.client.simulate_head("/api/rules/777")
    assert head.status_code == 404 and head.content == b""
    # a streamed body (the HAR export): its head, the stream closed unread
    head = api.client.simulate_head("/api/transactions/export.har")
    assert head.status_code == 200 and head.content == b"" and "attachment" in head.headers["content-disposition"]
    # only where GET is: a POST-only route stays 405
    assert api.client.simulate_head("/api/pending/bulk-allow").status_code == 405


@pytest.mark.parametrize("value", ["５", "٣", " 5 ", "+5", "5_0", "", "0x10", "5.0"])
def test_integer_query_parameters_take_ascii_digits_only(api, value):
    """SPEC conventions: bad numbers → 400. int() took full-width digits, padding, '+' and '_'."""
    for path in ("/api/logs", "/api/rules", "/api/pending", "/api/transactions"):
        res = api.client.simulate_get(path, query_string=f"limit={quote(value)}")
        assert res.status_code == 400, (path, value, res.status_code)
        assert "limit must be an integer" in error_of(res)
    assert api.get("/api/rules", limit="2").status_code == 200
    res = api.get("/api/rules", offset="-1")
    assert res.status_code == 400 and "offset must be between" in error_of(res)


def test_a_timestamp_out_of_utc_range_is_a_clear_400(api):
    """0001-01-01T00:00:00+01:00 is valid RFC 3339 but before year 1 in UTC: said so, not
    called malformed."""
    for path in ("/api/logs", "/api/transactions", "/api/logs/stats"):
        res = api.get(path, from_date="0001-01-01T00:00:00+01:00")
        assert res.status_code == 400, path
        assert "from_date is out of range" in error_of(res) and "0001-01-01T00:00:00Z" in error_of(res)
        res = api.get(path, to_date="9999-12-31T23:59:59-01:00")
        assert res.status_code == 400 and "to_date is out of range" in error_of(res)
    assert api.get("/api/logs", from_date="0001-01-01T00:00:00Z").status_code == 200
    res = api.get("/api/logs", from_date="yesterday")
    assert res.status_code == 400 and "RFC 3339" in error_of(res)


# --------------------------------------------------------------------------- credential sessions


@pytest.mark.parametrize(
    "field, hint",
    [("ttl", "did you mean 'ttl_seconds'"), ("expires_in_seconds", "did you mean 'ttl_seconds'"), ("owner", "")],
)
def test_session_refuses_an_unknown_field(api, field, hint):
    """POST /api/sessions with `"ttl": 60` made a 900 s session (tester A #3): refused, naming the
    field and the accepted ones; the fields of SPEC §12.2 all pass."""
    api.cfg.data_dir.mkdir(parents=True, exist_ok=True)
    api.ctx.credentials_key.start()  # (the API process does this at start: session.key)
    ph = "greyproxy:credential:v1:gw-ttl:" + "a" * 32
    body = {"session_id": "gw-ttl", "container_name": "c", "mappings": {ph: "sk-secret-value"}}
    res = api.post("/api/sessions", {**body, field: 60})
    assert res.status_code == 400, res.json
    err = error_of(res)
    assert f"unknown field '{field}'" in err and hint in err and "ttl_seconds" in err
    assert "sk-secret-value" not in res.text
    full = {
        **body,
        "labels": {ph: "OPENAI_API_KEY"},
        "hosts": {ph: ["api.openai.com"]},
        "metadata": {"cwd": "/tmp"},
        "ttl_seconds": 60,
        "global_credentials": [],
    }
    res = api.post("/api/sessions", full)
    assert res.status_code == 200, res.json
    assert res.json["ttl_seconds"] == 60


# --------------------------------------------------------------------------- identities


@pytest.fixture
def quick_identities(monkeypatch):
    from services.api import identities

    monkeypatch.setattr(identities, "RELOAD_TIMEOUT", 0.01)  # nobody plays the proxy here


@pytest.mark.parametrize("name", ["team/z1", "a/b/c", "x/rotate", "/lead", "t1/"])
def test_an_identity_with_a_slash_can_be_rotated_and_released(api, quick_identities, name):
    """SPEC §16 for a name with '/', which the claim takes (tester C #3): rotate and release
    answered 404 whether the '/' was sent raw or as %2F, and the claim could never be undone."""
    res = api.post("/api/identities", {"name": name})
    assert res.status_code == 201, res.json
    first = res.json["secret"]
    for path in (quote(name, safe=""), name):  # %2F (as `greyproxy env --claim` sends it) or raw
        res = api.post(f"/api/identities/{path}/rotate")
        assert res.status_code == 200, (path, res.json)
        assert res.json["name"] == name and res.json["secret"] != first
        first = res.json["secret"]
    assert api.client.simulate_delete(f"/api/identities/{quote(name, safe='')}").status_code == 204
    assert [i["name"] for i in api.get("/api/identities").json["items"]] == []
    res = api.post(f"/api/identities/{name}/rotate")
    assert res.status_code == 404 and repr(name) in error_of(res)
    assert api.post("/api/identities", {"name": name}).status_code == 201
    assert api.client.simulate_delete(f"/api/identities/{name}").status_code == 204  # raw too


def test_an_ordinary_identity_keeps_its_routes(api, quick_identities):
    assert api.post("/api/identities", {"name": "agent"}).status_code == 201
    assert api.post("/api/identities", {"name": "agent/x"}).status_code == 201
    assert api.post("/api/identities/agent/rotate").json["name"] == "agent"
    assert api.delete("/api/identities/agent").status_code == 204
    assert [i["name"] for i in api.get("/api/identities").json["items"]] == ["agent/x"]
    assert api.client.simulate_get("/api/identities/agent/x").status_code == 405  # no GET of one claim
    assert api.client.simulate_put("/api/identities/agent/x/rotate").status_code == 405
