"""The dashboard's server side (services/api/ui.py) without sockets: Falcon's test client."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pytest

from greyproxy.policy import scope_patterns
from harness.api import LocalClient, offline_app
from services.api import ui


def _client(tmp_path: Path, prefix: str) -> falcon.testing.TestClient:
    return LocalClient(offline_app(tmp_path, prefix))


@pytest.mark.parametrize("prefix", ["/", "/proxy"])
def test_app_for_deep_links_assets_with_etags_and_json_404s_under_the_prefix(tmp_path: Path, prefix: str) -> None:
    c = _client(tmp_path, prefix)
    p = prefix.rstrip("/")
    for path in (f"{p}/", f"{p}/pending", f"{p}/transactions/42", f"{p}/conversations/a/subagent_1", f"{p}/apis"):
        r = c.simulate_get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert f'<base href="{p}/">' in r.text
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
    for path in (f"{p}/api/nope", f"{p}/api", f"{p}/static/missing.js", f"{p}/static/../ui.py"):
        r = c.simulate_get(path)
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/json"), path
    r = c.simulate_get(f"{p}/static/app.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert c.simulate_get(f"{p}/static/app.css", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    assert c.simulate_get(f"{p}/static/app.css", headers={"If-None-Match": '"other"'}).status_code == 200
    assert c.simulate_post(f"{p}/rules").status_code == 405
    # The local-API protection covers the dashboard too.
    assert c.simulate_get(f"{p}/", host="evil.example").status_code == 421


def test_assets_fit_the_first_load_budget() -> None:
    assets = ui.load_assets()
    assert {"app.css", "js/main.js", "js/views/pending.js"} <= set(assets)
    assert sum(len(a.body) for a in assets.values()) < 300 * 1024


@pytest.mark.parametrize(
    "host,port", [("a.b.example.co.uk", 443), ("api.github.com", 8443), ("10.1.2.3", 22), ("weird[1]*.example", 80)]
)
def test_scope_preview_is_the_rule_the_decision_creates(tmp_path: Path, host: str, port: int) -> None:
    c = _client(tmp_path, "/")
    r = c.simulate_get("/ui/scopes", params={"container": "claude", "host": host, "port": str(port)})
    assert r.status_code == 200, r.text
    for scope, patterns in r.json.items():
        assert tuple(patterns.values()) == scope_patterns(scope, "claude", host, port)
    assert r.json["subdomain_wildcard"]["destination_pattern"] in (
        "**.example.co.uk",
        "**.github.com",
        "10.1.2.3",
        "**.weird[[]1][*].example",
    )


def test_scope_preview_bad_input_is_a_400_naming_it(tmp_path: Path) -> None:
    c = _client(tmp_path, "/")
    r = c.simulate_get("/ui/scopes", params={"container": "c", "host": "h", "port": "x"})
    assert r.status_code == 400 and "port" in r.json["error"]
    assert c.simulate_get("/ui/scopes", params={"host": "h", "port": "1"}).status_code == 400
    # a port in other than ASCII digits ('５' is a digit to str.isdigit and int())
    r = c.simulate_get("/ui/scopes", params={"container": "c", "host": "h", "port": "４４３"})
    assert r.status_code == 400 and "port" in r.json["error"]


def test_scope_preview_for_a_public_suffix_host_does_not_widen_past_it(tmp_path: Path) -> None:
    """SPEC §3.2: the wildcard comes from the registrable domain; github.io has none (tester A #8)."""
    c = _client(tmp_path, "/")
    r = c.simulate_get("/ui/scopes", params={"container": "c", "host": "github.io", "port": "443"})
    assert r.status_code == 200
    assert r.json["subdomain_wildcard"] == {
        "container_pattern": "c",
        "destination_pattern": "github.io",
        "port_pattern": "*",
    }


async def _upgrade(app: Any, path: str, denial: bool) -> tuple[list[dict[str, Any]], list[Any]]:
    """A WebSocket upgrade on `path` straight through ASGI: (what the app sent, its ERROR records)."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost:43080")],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 43080),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}} if denial else {},
    }
    events = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop(0)
        await asyncio.sleep(3600)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize("prefix", ["/", "/proxy"])
def test_websocket_upgrade_on_a_dashboard_path_is_a_clean_json_404(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade on any path but ws (tester A #4): before, the dashboard sink got it, Falcon's
    deprecation warning failed on it (no __qualname__), and each one logged an ERROR traceback
    and answered a bare 403. Now: the JSON 404 of an unknown path, nothing logged."""
    app = offline_app(tmp_path, prefix)
    p = prefix.rstrip("/")
    caplog.set_level(logging.WARNING)
    for path in (f"{p}/wsx", f"{p}/", f"{p}/pending", f"{p}/static/x.js"):
        sent = asyncio.run(_upgrade(app, path, denial=True))
        assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 404, (path, sent)
        assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
        assert orjson.loads(sent[1]["body"])["error"].startswith("not found"), path
        # a server without the denial extension: closed before accept with 3000 + 404
        sent = asyncio.run(_upgrade(app, path, denial=False))
        assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", 3404)], (path, sent)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
