"""The dashboard's server side (services/api/ui.py) without sockets: Falcon's test client."""

from __future__ import annotations

from pathlib import Path

import falcon.testing
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
