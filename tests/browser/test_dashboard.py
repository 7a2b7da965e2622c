"""The dashboard in a real browser (SPEC §11 Acceptance 1-8).

Playwright for Python drives Debian's `chromium` (`executable_path`; Playwright's own browser
download is never used). One stack and one browser serve the module; each test opens its own
context. The stack has a CA (`greyproxy cert generate` before start) and trusts a trustme
origin on 127.0.0.2, so intercepted HTTPS is recorded; 127.0.0.2 is not covered by the builtin
rules, so a client that no rule covers is held in the pending queue.

The last test writes screenshots of every view, light and dark, to docs/screenshots/.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import PYTHON, REPO, Stack, start_https_origin, wait_for  # noqa: E402

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ORIGIN = "127.0.0.2"  # not covered by the builtin rules (those name 127.0.0.1, localhost, ::1)
TX_AGENT = "agent-tx"
SHOTS = REPO / "docs" / "screenshots"
VIEWS = ["overview", "pending", "rules", "logs", "transactions", "conversations", "settings"]
FIRST_LOAD_BUDGET = 300 * 1024

if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


# ----------------------------------------------------------------------------- origins


class _Plain(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"plain origin says hello\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


class _Json(_Plain):
    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        received = json.loads(self.rfile.read(n) or b"{}")
        body = json.dumps({"echo": received, "ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Framer(http.server.BaseHTTPRequestHandler):
    """Another origin's page that frames the dashboard (and, as a control, its own page)."""

    target = ""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/inner":
            body = b"<!doctype html><p id=inner>framable</p>"
        else:
            body = (
                f'<!doctype html><iframe id="dash" src="{self.target}"></iframe><iframe id="own" src="/inner"></iframe>'
            ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def _serve(handler: type, host: str = "127.0.0.1") -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, server.server_address[1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def origin_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def plain_origin() -> Iterator[int]:
    server, port = _serve(_Plain, ORIGIN)
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tls_origin(origin_ca: trustme.CA) -> Iterator[int]:
    server, port = start_https_origin(origin_ca, ORIGIN, _Json)
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, origin_ca: trustme.CA) -> Iterator[Stack]:
    ca_file = tmp_path_factory.mktemp("origin-ca") / "origin-ca.pem"
    origin_ca.cert_pem.write_to_path(str(ca_file))
    s = Stack({"proxy": {"holdTimeout": 15}, "mitm": {"upstreamCaFile": str(ca_file)}})
    try:
        subprocess.run(
            [PYTHON, "-m", "greyproxy", "cert", "generate", "-C", str(s.cfg_path)],
            env=s.env,
            cwd=str(REPO),
            capture_output=True,
            timeout=30,
            check=True,
        )
        s.start()
        r = s.request(
            "POST",
            "/api/rules",
            json={"container_pattern": TX_AGENT, "destination_pattern": ORIGIN, "port_pattern": "*", "action": "allow"},
        )
        assert r.status_code == 201, r.text
        yield s
    finally:
        s.cleanup()
        shutil.rmtree(s.root, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watched:
    """A page with its console errors, page errors and failed requests recorded."""

    def __init__(self, browser, scheme: str = "light", width: int = 1280, height: int = 820) -> None:  # noqa: ANN001
        self.context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.bytes: dict[str, int] = {}
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))

        def finished(r) -> None:  # noqa: ANN001
            with contextlib.suppress(Exception):
                self.bytes[r.url] = int((r.sizes() or {}).get("responseBodySize") or 0)

        self.page.on("requestfinished", finished)

    def close(self) -> None:
        self.context.close()

    def clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.failed == [], self.failed


@pytest.fixture
def watched(browser) -> Iterator:  # noqa: ANN001
    pages: list[Watched] = []

    def make(**kw) -> Watched:  # noqa: ANN003
        w = Watched(browser, **kw)
        pages.append(w)
        return w

    yield make
    for w in pages:
        w.close()


def _held_curl(stack: Stack, container: str, url: str, timeout: int = 20) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            str(timeout),
            "-x",
            f"http://{container}:x@127.0.0.1:{stack.ports['http-proxy']}",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rules(stack: Stack, **params: str) -> list[dict]:
    r = stack.get("/api/rules", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return r.json()["items"]


# ----------------------------------------------------------------------------- 1. served, headers, framing


def test_app_page_deep_links_headers_and_api_404s(stack: Stack) -> None:
    for path in (
        "/",
        "/pending",
        "/rules",
        "/logs",
        "/transactions/42",
        "/conversations/session_x/subagent_1",
        "/settings",
        "/no/such/view",
    ):
        r = stack.get(path)
        assert r.status_code == 200, (path, r.status_code)
        assert r.headers["content-type"].startswith("text/html")
        assert "static/js/main.js" in r.text
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    for path in ("/api/nope", "/api/rules/987654", "/api/no/such/thing", "/api"):
        r = stack.get(path)
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/json"), path
        assert "error" in r.json()
    asset = stack.get("/static/js/main.js")
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")
    assert asset.headers["etag"] and "no-cache" in asset.headers["cache-control"]
    again = stack.get("/static/js/main.js", headers={"If-None-Match": asset.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert stack.get("/static/nope.js").status_code == 404
    assert stack.request("POST", "/pending", json={}).status_code == 405


def test_overview_loads_clean_within_budget_and_framing_is_refused(stack: Stack, watched) -> None:  # noqa: ANN001
    w = watched()
    resp = w.page.goto(stack.url("/"))
    assert resp.status == 200
    assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
    w.page.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    w.page.wait_for_load_state("networkidle")
    w.clean()
    total = sum(w.bytes.values())
    assert 0 < total <= FIRST_LOAD_BUDGET, (total, w.bytes)

    # A page on another origin frames the dashboard: refused; its own frame (the control) loads.
    _Framer.target = stack.url("/")
    server, port = _serve(_Framer)
    try:
        f = watched()
        f.page.goto(f"http://localhost:{port}/")
        f.page.wait_for_load_state("networkidle")
        wait_for(lambda: f.page.frame_locator("#own").locator("#inner").count() == 1, 5, message="the control frame")
        time.sleep(0.5)
        dash = f.page.frame_locator("#dash")
        assert dash.locator("#nav").count() == 0, "the dashboard rendered inside another origin's frame"
        assert any("frame-ancestors" in e or "Refused to frame" in e for e in f.errors) or f.page.frames[1].url in (
            "",
            "about:blank",
            "chrome-error://chromewebdata/",
        )
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- 2, 3. pending


def test_held_curl_appears_within_a_second_and_a_allows_it(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    w = watched()
    w.page.goto(stack.url("/pending"))
    w.page.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    dest = f"{ORIGIN}:{plain_origin}"
    t0 = time.monotonic()
    curl = _held_curl(stack, "agent-ui", f"http://{dest}/")
    try:
        row = w.page.locator(".prow", has_text="agent-ui").filter(has_text=dest)
        row.wait_for(timeout=1500)
        appeared = time.monotonic() - t0
        assert appeared <= 1.0 + 0.3, f"the entry appeared after {appeared:.2f}s"  # 0.3 s: curl's own start
        wait_for(lambda: re.match(r"^\(\d+\) Greyproxy", w.page.title()), 2, message="the count in the tab title")
        row.locator(".pmain").click()
        preview = w.page.locator(".rule-preview[data-action=allow]")
        wait_for(lambda: dest in preview.inner_text(), 5, message="the allow preview")
        expected_preview = preview.inner_text()
        w.page.keyboard.press("a")
        out, _ = curl.communicate(timeout=10)
    finally:
        if curl.poll() is None:
            curl.kill()
    assert out == "200", out
    rule = next(r for r in _rules(stack, container="agent-ui") if r["destination_pattern"] == ORIGIN)
    assert (rule["container_pattern"], rule["port_pattern"], rule["action"]) == ("agent-ui", str(plain_origin), "allow")
    assert expected_preview == f"allow agent-ui → {ORIGIN}:{plain_origin} (permanent)"
    w.page.locator("#nav a[data-view=rules]").click()
    w.page.locator("table.grid tr", has_text="agent-ui").filter(has_text=ORIGIN).wait_for(timeout=5000)
    w.clean()


def test_deny_subdomain_wildcard_previews_exactly_the_rule_created(stack: Stack, watched) -> None:  # noqa: ANN001
    w = watched()
    w.page.goto(stack.url("/pending"))
    w.page.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    curl = _held_curl(stack, "agent-psl", "http://x.b.example.co.uk/")
    try:
        row = w.page.locator(".prow", has_text="agent-psl")
        row.wait_for(timeout=10_000)  # (how soon it appears: test_held_curl_appears_within_a_second…)
        row.locator(".pmain").click()
        w.page.locator(".decision label.radio", has_text="subdomain wildcard").click()
        preview = w.page.locator(".rule-preview[data-action=deny]")
        wait_for(lambda: "**.example.co.uk" in preview.inner_text(), 5, message="the wildcard preview")
        shown = preview.inner_text()
        w.page.locator(".decision button.btn-deny").click()
        out, _ = curl.communicate(timeout=10)
    finally:
        if curl.poll() is None:
            curl.kill()
    assert out == "403", out
    rules = [r for r in _rules(stack, container="agent-psl")]
    assert len(rules) == 1, rules
    r = rules[0]
    assert (r["container_pattern"], r["destination_pattern"], r["port_pattern"], r["action"]) == (
        "agent-psl",
        "**.example.co.uk",
        "*",
        "deny",
    )
    assert shown == f"deny {r['container_pattern']} → {r['destination_pattern']}:{r['port_pattern']} (permanent)"
    w.clean()


@contextlib.contextmanager
def _list_read_before(page, api_path: str, happen: Callable[[], None]) -> Iterator[list[bool]]:  # noqa: ANN001
    """While inside: the page's first read of the list at `api_path` is answered with the list as
    it was read, but only after `happen()` (which makes a change and waits until the API shows it)
    and half a second more, so that the change's live event reaches the page while that stale list
    is still on its way. Yields a list that holds True once that read went through the route."""
    pattern = re.compile(rf".*{re.escape(api_path)}(\?.*)?$")
    routed: list[bool] = []

    def stale_list(route) -> None:  # noqa: ANN001
        if routed:
            route.continue_()
            return
        routed.append(True)
        response = route.fetch()  # the list as it is now: without the change made next
        happen()
        time.sleep(0.5)
        route.fulfill(response=response)

    page.route(pattern, stale_list)
    try:
        yield routed
    finally:
        page.unroute(pattern)


def test_a_request_held_while_the_pending_list_loads_is_still_shown(stack: Stack, watched) -> None:  # noqa: ANN001
    """The pending list can be read before a request is held and arrive after that request's live
    event (someone opens the page just as an agent is held): the row must not vanish with it."""
    w = watched()
    p = w.page
    p.goto(stack.url("/logs"))
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)  # events flow before the hold
    held: list[subprocess.Popen] = []

    def hold() -> None:
        held.append(_held_curl(stack, "agent-race", "http://race.example/"))
        wait_for(
            lambda: stack.get("/api/pending", params={"container": "agent-race"}).json()["items"],
            10,
            message="the held request pending",
        )

    try:
        with _list_read_before(p, "/api/pending", hold) as routed:
            p.locator("#nav a[data-view=pending]").click()
            p.locator(".prow", has_text="agent-race").wait_for(timeout=5000)
            assert routed, "the pending list was not read through the route"
            time.sleep(0.3)
            assert p.locator(".prow", has_text="agent-race").count() == 1
    finally:
        for curl in held:
            if curl.poll() is None:
                curl.kill()
            curl.communicate(timeout=5)
    w.clean()


def test_a_decision_logged_while_the_logs_list_loads_is_still_shown(stack: Stack, watched) -> None:  # noqa: ANN001
    """The logs list can be read before a decision is logged and arrive after its live event: the
    row must be shown on top of that list, not dropped with the count of new rows."""
    r = stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": "agent-lograce", "destination_pattern": "lograce.example", "action": "deny"},
    )
    assert r.status_code == 201, r.text
    w = watched()
    p = w.page
    p.goto(stack.url("/pending"))
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)  # events flow before the request
    answers: list[str] = []

    def decide() -> None:
        proxy = f"http://agent-lograce:x@127.0.0.1:{stack.ports['http-proxy']}"
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-x", proxy]
        answers.append(
            subprocess.run([*curl, "http://lograce.example/"], capture_output=True, text=True, timeout=20).stdout
        )
        wait_for(
            lambda: stack.get("/api/logs", params={"container": "agent-lograce"}).json()["items"],
            10,
            message="the decision logged",
        )

    with _list_read_before(p, "/api/logs", decide) as routed:
        p.locator("#nav a[data-view=logs]").click()
        p.locator("table.grid tr", has_text="agent-lograce").wait_for(timeout=5000)
        assert routed, "the logs list was not read through the route"
        assert answers == ["403"], answers
    w.clean()


# ----------------------------------------------------------------------------- 4. rules


def test_rule_create_error_at_the_field_then_edit_and_delete(stack: Stack, watched) -> None:  # noqa: ANN001
    w = watched()
    p = w.page
    p.goto(stack.url("/rules"))
    p.get_by_role("button", name="New rule").click()
    form = p.locator("form.rule-edit")
    form.get_by_label("Container pattern").fill("agent-form")
    form.get_by_label("Destination pattern").fill("bad host")
    form.get_by_role("button", name="Create rule").click()
    expected = stack.request(
        "POST", "/api/rules", json={"container_pattern": "agent-form", "destination_pattern": "bad host"}
    ).json()["error"]
    err = form.locator("[data-field=destination_pattern] .field-error")
    err.wait_for(timeout=5000)
    assert err.inner_text() == expected
    assert form.get_by_label("Destination pattern").get_attribute("aria-invalid") == "true"
    assert form.locator("[data-field=container_pattern] .field-error").is_hidden()

    form.get_by_label("Destination pattern").fill("api.form.example")
    form.get_by_label("Port").fill("70000")
    form.get_by_role("button", name="Create rule").click()
    port_err = form.locator("[data-field=port_pattern] .field-error")
    port_err.wait_for(timeout=5000)
    assert "70000" in port_err.inner_text()
    form.get_by_label("Port").fill("443")
    form.get_by_role("button", name="Create rule").click()
    row = p.locator("table.grid tr", has_text="api.form.example")
    row.wait_for(timeout=5000)
    rule = next(r for r in _rules(stack, container="agent-form"))
    assert (rule["destination_pattern"], rule["port_pattern"]) == ("api.form.example", "443")

    row.get_by_role("button", name=f"Edit rule {rule['id']}").click()
    form = p.locator("form.rule-edit")
    form.get_by_label("Port").fill("8443")
    form.get_by_role("button", name="Save").click()
    p.locator("table.grid tr", has_text="api.form.example").filter(has_text="8443").wait_for(timeout=5000)
    assert stack.get(f"/api/rules/{rule['id']}").json()["port_pattern"] == "8443"

    row = p.locator("table.grid tr", has_text="api.form.example")
    row.get_by_role("button", name=f"Delete rule {rule['id']}").click()
    row.get_by_role("button", name=f"Confirm delete rule {rule['id']}").click()
    p.locator("table.grid tr", has_text="api.form.example").wait_for(state="detached", timeout=5000)
    assert _rules(stack, container="agent-form") == []
    # The two 400s this test provoked are reported by the browser itself; nothing else may be.
    assert [e for e in w.errors if "status of 400" not in e] == [] and len(w.errors) == 2, w.errors
    assert w.failed == []


# ----------------------------------------------------------------------------- 5. reconnect


def test_banner_across_an_api_restart_and_views_current_after(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    w = watched()
    p = w.page
    p.goto(stack.url("/pending"))
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    old = stack.pid("api")
    assert old in stack.child_pids()
    os.kill(old, signal.SIGKILL)
    banner = p.locator("#offline")
    banner.wait_for(state="visible", timeout=5000)
    assert "Disconnected" in banner.inner_text()
    # While the API is down the recorder still queues this one; the page cannot hear of it.
    curl = _held_curl(stack, "agent-offline", f"http://{ORIGIN}:{plain_origin}/", timeout=8)
    try:
        banner.wait_for(state="hidden", timeout=30_000)
        # After the reconnect the view re-read the queue: the entry made while it was down is there.
        p.locator(".prow", has_text="agent-offline").wait_for(timeout=5000)
        assert p.locator("#live").get_attribute("data-state") == "connected"
    finally:
        curl.kill()
        curl.wait(5)
    wait_for(lambda: stack.pid("api") not in (None, old), 25, message="the new api process")
    # Errors while the API was gone are the browser's own reports of the refused socket, or of a
    # request in flight when it was killed (reset, or no answer at all): expected.
    gone = ("ERR_CONNECTION_REFUSED", "ERR_CONNECTION_RESET", "ERR_EMPTY_RESPONSE")
    w.errors = [e for e in w.errors if "WebSocket" not in e and not any(g in e for g in gone)]
    w.failed = [f for f in w.failed if not any(g in f for g in gone)]
    w.clean()


def test_overview_lists_each_proxy_worker_with_its_state(watched) -> None:  # noqa: ANN001
    """SPEC §15 / UI.md's process health: with proxy.workers 2 the Overview shows each worker
    beside "proxy", with /api/health's state. A worker that stops answering (SIGSTOP: alive, but
    its heartbeats stop) shows down, and "proxy" with it; the other stays up. Killed, it is started
    again and shown "restarted 1×" (/api/health's `restarts`)."""
    s = Stack({"proxy": {"workers": 2}})
    try:
        s.start()
        w = watched()
        p = w.page
        p.goto(s.url("/"))
        for name in ("proxy-0", "proxy-1"):
            p.locator(f'[data-proc="{name}"] .state', has_text="● up").wait_for(timeout=5000)
        pid = s.pid("proxy-1")
        assert pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: s.health()[1]["services"]["proxy-1"]["state"] == "down", 15, message="proxy-1 down")
            p.get_by_role("button", name="Refresh").click()
            p.locator('[data-proc="proxy-1"] .state', has_text="✕ down").wait_for(timeout=5000)
            p.locator('[data-proc="proxy"] .state', has_text="✕ down").wait_for(timeout=5000)
            assert p.locator('[data-proc="proxy-0"] .state').inner_text() == "● up"
            label = p.locator("#health .hdot").filter(has_text="proxy").first.get_attribute("aria-label")
            assert label == "proxy: down", label
        finally:
            os.kill(pid, signal.SIGCONT)
        # Killed, it is started again by supervisord: the Overview says it was restarted, once.
        assert not p.locator('[data-proc="proxy-1"] .restarts').count()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: s.health()[1]["services"]["proxy-1"]["restarts"] == 1, 20, message="proxy-1 restarted")
        wait_for(lambda: s.health()[0] == 200, 20, message="the stack healthy again")
        p.get_by_role("button", name="Refresh").click()
        p.locator('[data-proc="proxy-1"] .restarts', has_text="restarted 1×").wait_for(timeout=5000)
        p.locator('[data-proc="proxy"] .restarts', has_text="restarted 1×").wait_for(timeout=5000)
        assert p.locator('[data-proc="proxy-1"] .state').inner_text() == "● up"
        assert not p.locator('[data-proc="proxy-0"] .restarts').count()
        # The page's own fetch of the 503 health answer is reported by the browser; nothing else.
        w.errors = [e for e in w.errors if "status of 503" not in e]
        w.clean()
    finally:
        s.cleanup()
        shutil.rmtree(s.root, ignore_errors=True)


# ----------------------------------------------------------------------------- 6. theme


def test_dark_theme_is_applied_at_once_and_persists(stack: Stack, watched) -> None:  # noqa: ANN001
    w = watched()
    p = w.page
    p.goto(stack.url("/settings"))
    p.locator("label.radio", has_text="dark").click()
    wait_for(lambda: p.evaluate("document.documentElement.dataset.theme") == "dark", 2, message="dark at once")
    bg = p.evaluate("getComputedStyle(document.body).backgroundColor")
    wait_for(lambda: stack.get("/api/settings").json()["theme"] == "dark", 5, message="the setting saved")
    p.wait_for_load_state("networkidle")
    p.reload()
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    assert p.evaluate("document.documentElement.dataset.theme") == "dark"
    # A fresh browser profile (no local cache) gets it from the setting.
    fresh = watched()
    fresh.page.goto(stack.url("/overview"))
    wait_for(
        lambda: fresh.page.evaluate("document.documentElement.dataset.theme") == "dark",
        5,
        message="dark from the server setting",
    )
    assert fresh.page.evaluate("getComputedStyle(document.body).backgroundColor") == bg != "rgb(246, 247, 249)"
    assert stack.request("PUT", "/api/settings", json={"theme": "system"}).status_code == 200
    w.clean()
    fresh.clean()


# ----------------------------------------------------------------------------- 7. transaction detail


def test_transaction_detail_pretty_json_and_redacted_headers(stack: Stack, tls_origin: int, watched) -> None:  # noqa: ANN001
    secret = "Bearer sk-test-do-not-show-0123456789"
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1}
    r = subprocess.run(
        [
            "curl",
            "-s",
            "-S",
            "--max-time",
            "15",
            "--cacert",
            str(stack.data_dir / "ca-cert.pem"),
            "-x",
            f"http://{TX_AGENT}:x@127.0.0.1:{stack.ports['http-proxy']}",
            "-H",
            f"Authorization: {secret}",
            "-H",
            "Content-Type: application/json",
            "--data",
            json.dumps(payload),
            f"https://{ORIGIN}:{tls_origin}/v1/echo",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, (r.stdout, r.stderr)

    def tx() -> dict | None:
        items = stack.get("/api/transactions", params={"container": TX_AGENT, "method": "POST"}).json()["items"]
        return items[0] if items else None

    t = wait_for(tx, 10, message="the transaction recorded")
    w = watched()
    p = w.page
    p.goto(stack.url(f"/transactions/{t['id']}"))
    detail = p.locator("section.detail")
    detail.locator("pre.body").first.wait_for(timeout=5000)
    req_body = detail.locator("pre[aria-label='request body']").inner_text()
    assert req_body == json.dumps(payload, indent=2), req_body
    resp_body = detail.locator("pre[aria-label='response body']").inner_text()
    assert '\n  "ok": true' in resp_body
    heads = detail.locator("table[aria-label='Request headers']").inner_text()
    assert "Authorization" in heads or "authorization" in heads
    assert "[REDACTED]" in heads and "sk-test" not in p.content()
    assert detail.locator("td.redacted").count() >= 1
    # Copy as curl: the redacted value stays a variable.
    p.context.grant_permissions(["clipboard-read", "clipboard-write"])
    p.get_by_role("button", name="Copy as curl").click()
    curl_text = p.evaluate("navigator.clipboard.readText()")
    assert "sk-test" not in curl_text and "${AUTHORIZATION" in curl_text and f"{ORIGIN}:{tls_origin}" in curl_text
    # The usual layout: the method and URL on the first line, then one option (with its value) a line.
    lines = curl_text.split("\n")
    assert lines[0] == f"curl -X POST 'https://{ORIGIN}:{tls_origin}/v1/echo' \\", lines
    assert all(x.startswith(("  -H ", "  --data-raw ")) for x in lines[1:]), lines
    assert all(x.endswith(" \\") for x in lines[:-1]) and lines[-1].startswith("  --data-raw "), lines
    w.clean()


# ----------------------------------------------------------------------------- scale


def test_ten_thousand_pending_entries_stay_windowed(stack: Stack, watched) -> None:  # noqa: ANN001
    import sqlite3

    now = time.time()
    con = sqlite3.connect(stack.db_path, timeout=10)
    try:
        cols = {row[1] for row in con.execute("PRAGMA table_info(pending)")}
        assert {"container_name", "destination_host", "destination_port"} <= cols, cols
        rows = [("agent-bulk", f"h{i}.bulk.example", 443, now - i, now - i, 1) for i in range(10_000)]
        con.executemany(
            "INSERT INTO pending (container_name, destination_host, destination_port, "
            "first_seen, last_seen, attempt_count) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        con.commit()
    finally:
        con.close()
    try:
        w = watched()
        p = w.page
        t0 = time.monotonic()
        p.goto(stack.url("/pending"))
        p.locator(".prow").first.wait_for(timeout=5000)
        first_paint = time.monotonic() - t0
        wait_for(
            lambda: "10,0" in p.locator("h1 .count").inner_text() or "10 0" in p.locator("h1 .count").inner_text(),
            10,
            message="the whole queue counted",
        )
        assert p.locator(".prow").count() < 80, "rows outside the window were rendered"
        t1 = time.monotonic()
        for _ in range(50):
            p.keyboard.press("j")
        p.evaluate("document.querySelector('.vlist').scrollTop = 400000")
        p.wait_for_timeout(100)
        assert p.locator(".prow").count() < 80
        assert time.monotonic() - t1 < 5
        assert first_paint < 5, first_paint
        w.clean()
    finally:
        ids = [
            i["id"]
            for i in stack.get("/api/pending", params={"container": "agent-bulk", "limit": 10000}, timeout=30).json()[
                "items"
            ]
        ]
        for i in range(0, len(ids), 2000):
            r = stack.request("POST", "/api/pending/bulk-dismiss", json={"pending_ids": ids[i : i + 2000]}, timeout=60)
            assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- 8. screenshots


def test_why_explains_a_pending_entry_and_a_log_row(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    """SPEC §16: "Why?" asks GET /api/rules/explain and shows the decision, the rule and the candidates."""
    deny = stack.request(
        "POST",
        "/api/rules",
        json={
            "container_pattern": "why-ui",
            "destination_pattern": ORIGIN,
            "port_pattern": str(plain_origin),
            "action": "deny",
        },
    ).json()
    code = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "-x",
            f"http://why-ui:x@127.0.0.1:{stack.ports['http-proxy']}",
            f"http://{ORIGIN}:{plain_origin}/",
        ],
        capture_output=True,
        text=True,
        timeout=15,
    ).stdout
    assert code == "403"
    w = watched()
    w.page.goto(stack.url("/logs?container=why-ui"))
    row = w.page.locator("table.grid tbody tr", has_text="why-ui").first
    row.wait_for(timeout=10_000)
    row.locator("details.why summary").click()
    explained = row.locator(".explain")
    explained.wait_for(timeout=5000)
    text = explained.inner_text()
    assert "deny" in text and f"#{deny['id']} deny why-ui" in text and "specificity" in text, text
    assert "/logs" in w.page.url  # opening "Why?" did not follow the row's link

    dest = f"{ORIGIN}:{plain_origin}"
    curl = _held_curl(stack, "why-pending", f"http://{dest}/")
    try:
        w.page.goto(stack.url("/pending"))
        prow = w.page.locator(".prow", has_text="why-pending").filter(has_text=dest)
        prow.wait_for(timeout=10_000)
        prow.locator(".pmain").click()
        w.page.locator("section.decision details.why summary").click()
        panel = w.page.locator("section.decision .explain")
        panel.wait_for(timeout=5000)
        assert "pending" in panel.inner_text() and "no rule matches" in panel.inner_text()
    finally:
        curl.kill()
        curl.communicate(timeout=5)
        ids = [e["id"] for e in stack.get("/api/pending", params={"container": "why-pending"}).json()["items"]]
        stack.request("POST", "/api/pending/bulk-dismiss", json={"pending_ids": ids})
    w.clean()


# ----------------------------------------------------------------------------- found by an outside tester


def _dismiss_pending(stack: Stack, container: str) -> None:
    ids = [e["id"] for e in stack.get("/api/pending", params={"container": container, "limit": 1000}).json()["items"]]
    if ids:
        stack.request("POST", "/api/pending/bulk-dismiss", json={"pending_ids": ids})


def _credentials(stack: Stack) -> list[dict]:
    body = stack.get("/api/credentials").json()
    return body if isinstance(body, list) else body["items"]


def _through_proxy(stack: Stack, container: str, *urls: str) -> list[str]:
    """One curl through the HTTP proxy asking for every URL in turn (one kept-alive connection for
    plain HTTP: a log entry per request); the status codes, in order."""
    out = subprocess.run(
        ["curl", "-s", "--max-time", "20", "-x", f"http://{container}:x@127.0.0.1:{stack.ports['http-proxy']}"]
        + [a for u in urls for a in ("-o", "/dev/null", "-w", "%{http_code}\\n", u)],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()


def test_health_dots_and_processes_card_follow_health_while_open(stack: Stack, watched) -> None:  # noqa: ANN001
    """The top bar's dots and the Overview's Processes card follow health while the page is open
    (`health.changed` on /ws, no polling): a proxy that stops answering (SIGSTOP) shows down with no
    click and no reload, its "last seen N s ago" ages, and it shows up again once it is back. An up
    process says its heartbeat is current (not the age of the page's last read)."""
    w = watched()
    p = w.page
    p.goto(stack.url("/overview"))
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    p.locator('#health .hdot[aria-label="proxy: up"]').wait_for(timeout=5000)
    card = p.locator('[data-proc="proxy"]')
    card.locator(".state", has_text="● up").wait_for(timeout=5000)
    assert "heartbeat current" in card.inner_text() and "seen" not in card.inner_text(), card.inner_text()
    pid = stack.pid("proxy")
    assert pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: stack.health()[1]["services"]["proxy"]["state"] == "down", 15, message="proxy down")
        p.locator('#health .hdot[aria-label="proxy: down"]').wait_for(timeout=8000)
        card.locator(".state", has_text="✕ down").wait_for(timeout=8000)

        def seen() -> int:
            m = re.search(r"seen (\d+)s ago", card.inner_text())
            return int(m.group(1)) if m else -1

        first = wait_for(lambda: seen() if seen() >= 0 else None, 5, message="'seen N s ago'")
        wait_for(lambda: seen() >= first + 2, 6, message="'seen N s ago' ageing")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: stack.health()[0] == 200, 20, message="the stack healthy again")
    p.locator('#health .hdot[aria-label="proxy: up"]').wait_for(timeout=8000)
    card.locator(".state", has_text="● up").wait_for(timeout=8000)
    # The page's own reads of the 503 health answer are reported by the browser; nothing else.
    w.errors = [e for e in w.errors if "status of 503" not in e]
    w.clean()


def test_pending_filter_matches_container_or_host(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    w = watched()
    p = w.page
    p.goto(stack.url("/pending"))
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    dest = f"{ORIGIN}:{plain_origin}"
    curls = [
        _held_curl(stack, "agent-filterbox", f"http://{dest}/"),
        _held_curl(stack, "agent-unfiltered", f"http://{dest}/"),
    ]
    try:
        mine = p.locator(".prow", has_text="agent-filterbox")
        other = p.locator(".prow", has_text="agent-unfiltered")
        mine.first.wait_for(timeout=10_000)
        other.wait_for(timeout=10_000)
        box = p.get_by_label("Filter pending entries")
        # A container name: its entry stays, the other goes.
        box.fill("filterbox")
        wait_for(lambda: other.count() == 0 and mine.count() == 1, 5, message="filtered by container")
        assert p.locator(".pending-list .empty").count() == 0
        # A host: both entries (same destination).
        box.fill(ORIGIN)
        wait_for(lambda: other.count() == 1 and mine.count() == 1, 5, message="filtered by host")
        # Live: a new entry of that container to another host appears under the container filter.
        box.fill("filterbox")
        wait_for(lambda: other.count() == 0 and mine.count() == 1, 5, message="filtered by container again")
        curls.append(_held_curl(stack, "agent-filterbox", "http://filterlive.example/"))
        mine.filter(has_text="filterlive.example").wait_for(timeout=5000)
        assert other.count() == 0
        # The placeholder is shown whole.
        fits = box.evaluate(
            """(el) => { const cs = getComputedStyle(el); const c = document.createElement('canvas').getContext('2d');
                c.font = cs.font; return c.measureText(el.placeholder).width
                  <= el.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight); }"""
        )
        assert fits, "the filter's placeholder is cut off"
    finally:
        for c in curls:
            c.kill()
            c.communicate(timeout=5)
        for name in ("agent-filterbox", "agent-unfiltered"):
            _dismiss_pending(stack, name)
    w.clean()


def test_pending_shortcuts_work_after_a_radio_is_clicked(stack: Stack, watched) -> None:  # noqa: ANN001
    """A clicked scope radio keeps the focus: arrows still move within its group, and `t`, `d`
    are still shortcuts (only text-entry controls swallow them)."""
    w = watched()
    p = w.page
    p.goto(stack.url("/pending"))
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    curl = _held_curl(stack, "agent-radio", "http://r.radio.example.co.uk/")
    try:
        row = p.locator(".prow", has_text="agent-radio")
        row.wait_for(timeout=10_000)
        row.locator(".pmain").click()
        p.locator(".decision label.radio", has_text="exact").first.wait_for(timeout=5000)
        p.locator(".decision label.radio", has_text="any port").click()
        preview = p.locator(".rule-preview[data-action=deny]")
        wait_for(lambda: "r.radio.example.co.uk:*" in preview.inner_text(), 5, message="the any-port preview")
        assert p.evaluate("document.activeElement.type") == "radio", "the clicked radio does not have the focus"
        p.keyboard.press("ArrowRight")  # the radio group's own key: the next scope
        wait_for(lambda: "**.example.co.uk" in preview.inner_text(), 5, message="the wildcard preview (arrow key)")
        assert p.evaluate("document.activeElement.type") == "radio"
        p.keyboard.press("t")  # duration: permanent → 1 hour
        wait_for(lambda: preview.inner_text().endswith("(1 hour)"), 5, message="t cycled the duration")
        p.keyboard.press("d")
        out, _ = curl.communicate(timeout=10)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.communicate(timeout=5)
    assert out == "403", out
    rules = _rules(stack, container="agent-radio")
    assert len(rules) == 1, rules
    r = rules[0]
    assert (r["destination_pattern"], r["port_pattern"], r["action"]) == ("**.example.co.uk", "*", "deny")
    assert r["expires_at"], r
    stack.request("DELETE", f"/api/rules/{r['id']}")
    w.clean()


def test_logs_live_rows_never_move_what_is_read(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    """Scrolled down, or with a "Why?" open, new log rows wait behind "N new" (which moves no row
    and closes no panel); showing them keeps the panel open; at the very top with nothing open
    they slot in on top."""
    name = "agent-tail"
    r = stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": name, "destination_pattern": ORIGIN, "port_pattern": "*", "action": "allow"},
    )
    assert r.status_code == 201, r.text
    url = f"http://{ORIGIN}:{plain_origin}/"

    def burst(n: int, expect: int) -> None:
        assert _through_proxy(stack, name, *[url] * n) == ["200"] * n
        wait_for(
            lambda: stack.get("/api/logs", params={"container": name, "limit": 1}).json()["total"] >= expect,
            10,
            message=f"{expect} log entries",
        )

    burst(40, 40)
    w = watched()
    p = w.page
    p.goto(stack.url(f"/logs?container={name}"))
    p.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    rows = p.locator("table.grid tbody tr")
    wait_for(lambda: rows.count() == 40, 10, message="the 40 rows")
    scroller = p.locator(".table-wrap")
    assert scroller.evaluate("(el) => el.scrollHeight > el.clientHeight + 200"), "the table does not scroll"
    scroller.evaluate("(el) => { el.scrollTop = 300; }")
    target = rows.nth(15)
    target.locator("details.why summary").click()
    target.locator(".explain").wait_for(timeout=5000)
    y = target.bounding_box()["y"]
    text = target.inner_text()

    burst(3, 43)
    bar = p.locator(".newbar button", has_text="3 new")
    bar.wait_for(timeout=5000)
    assert rows.count() == 40
    assert rows.nth(15).inner_text() == text
    assert abs(target.bounding_box()["y"] - y) < 1, "a row being read moved"
    assert target.locator("details.why[open] .explain").count() == 1, "the open Why? closed"

    bar.click()
    wait_for(lambda: rows.count() == 43, 5, message="the 3 new rows shown")
    assert p.locator("table.grid tbody details.why[open] .explain").count() == 1, "showing them closed the Why?"
    assert scroller.evaluate("(el) => el.scrollTop") == 0
    p.locator("table.grid tbody details.why[open] summary").click()  # closed: at rest at the top
    wait_for(lambda: p.locator("table.grid tbody details.why[open]").count() == 0, 2, message="the Why? closed")
    scroller.evaluate("(el) => { el.scrollTop = 0; }")  # (the click scrolled the row into view)
    burst(2, 45)
    wait_for(lambda: rows.count() == 45, 5, message="live rows slotted in on top")
    assert p.locator(".newbar").is_hidden()
    w.clean()


def test_long_container_names_keep_the_destination_visible(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    long = "agent-" + "very-long-container-name-" * 7  # 181 characters (a proxy user name)
    dest = f"{ORIGIN}:{plain_origin}"
    rule = stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": long, "destination_pattern": "longname.example", "action": "deny"},
    ).json()
    assert _through_proxy(stack, long, "http://longname.example/") == ["403"]
    curl = _held_curl(stack, long, f"http://{dest}/")

    # Each layout is measured in one call in the page (the views redraw rows as events arrive).
    measure = """([sel, long, part]) => {
        const box = (el) => { const r = el.getBoundingClientRect(); return {left: r.left, right: r.right, width: r.width}; };
        const row = [...document.querySelectorAll(sel)].find((el) => el.textContent.includes(long));
        if (!row) return null;
        return {row: box(row), parts: [...row.children].map(box), part: box(row.querySelector(part)),
                partText: row.querySelector(part).textContent, titled: !!row.querySelector(`[title="${long}"]`),
                card: row.closest('.card') ? box(row.closest('.card')) : null,
                scrollWidth: document.documentElement.scrollWidth};
    }"""

    def inside(child: dict, parent: dict) -> bool:
        return child["left"] >= parent["left"] - 0.5 and child["right"] <= parent["right"] + 0.5

    try:
        for width in (1280, 390):
            w = watched(width=width)
            p = w.page
            p.goto(stack.url("/pending"))
            p.locator(".prow", has_text=long).wait_for(timeout=10_000)
            m = p.evaluate(measure, [".prow", long, ".dest"])
            assert m["part"]["width"] > 50, (width, m)  # the destination is shown
            assert inside(m["part"], m["row"]), (width, m)
            assert m["partText"] == dest and m["titled"], (width, m)  # the whole name on hover
            assert m["scrollWidth"] <= width, (width, m)

            p.goto(stack.url("/overview"))
            p.locator("section[aria-labelledby=h-recent] li", has_text=long).first.wait_for(timeout=10_000)
            m = p.evaluate(measure, ["section[aria-labelledby=h-recent] li", long, ".grow"])
            assert m["partText"] == "longname.example:80" and m["part"]["width"] > 50, (width, m)
            assert inside(m["row"], m["card"]) and all(inside(x, m["card"]) for x in m["parts"]), (width, m)
            assert m["titled"] and m["scrollWidth"] <= width, (width, m)
            w.clean()
    finally:
        curl.kill()
        curl.communicate(timeout=5)
        _dismiss_pending(stack, long)
        stack.request("DELETE", f"/api/rules/{rule['id']}")


def test_transactions_export_har_of_the_filtered_list(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    name = "agent-har"
    r = stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": name, "destination_pattern": ORIGIN, "port_pattern": "*", "action": "allow"},
    )
    assert r.status_code == 201, r.text
    base = f"http://{ORIGIN}:{plain_origin}"
    assert _through_proxy(stack, name, f"{base}/har-a", f"{base}/har-b") == ["200", "200"]
    assert _through_proxy(stack, TX_AGENT, f"{base}/not-this-one") == ["200"]
    wait_for(
        lambda: stack.get("/api/transactions", params={"container": name}).json()["total"] == 2,
        10,
        message="the two transactions recorded",
    )
    w = watched()
    p = w.page
    p.goto(stack.url("/transactions"))
    p.get_by_label("Container").fill(name)
    rows = p.locator("table.grid tbody tr")
    wait_for(lambda: rows.count() == 2 and all(name in t for t in rows.all_inner_texts()), 5, message="filtered")
    link = p.get_by_role("link", name="Export HAR")
    link.wait_for(timeout=5000)
    assert link.get_attribute("href") == f"/api/transactions/export.har?container={name}"
    with p.expect_download(timeout=10_000) as dl:
        link.click()
    har = json.loads(Path(dl.value.path()).read_text())
    entries = har["log"]["entries"]
    assert [e["request"]["url"] for e in entries] == [f"{base}/har-a", f"{base}/har-b"], entries
    assert {e["_container"] for e in entries} == {name}
    size = rows.first.locator("td.num").first.text_content()
    assert re.fullmatch(r"[\d.]+\xa0(B|KiB|MiB)", size), repr(size)  # a size never wraps from its unit
    w.clean()


def test_a_long_destination_wraps_in_logs_and_a_get_shows_no_request_body(
    stack: Stack,
    plain_origin: int,
    watched,  # noqa: ANN001
) -> None:
    """A 150-character host name wraps in the Logs' Destination column instead of widening it past
    the screen (the Method, Reason, Rule and ms columns stay in view); a GET's transaction detail
    says its request had no body (it showed the response's size as a request body not stored)."""
    host = "a" * 60 + "." + "b" * 60 + ".wide-destination.example"
    name = "agent-wide"
    rule = stack.request(
        "POST", "/api/rules", json={"container_pattern": name, "destination_pattern": host, "action": "deny"}
    ).json()
    allow = stack.request(
        "POST", "/api/rules", json={"container_pattern": name, "destination_pattern": ORIGIN, "action": "allow"}
    ).json()
    try:
        assert _through_proxy(stack, name, f"http://{host}/", f"http://{ORIGIN}:{plain_origin}/get-me") == [
            "403",
            "200",
        ]
        w = watched(width=1280)
        p = w.page
        p.goto(stack.url(f"/logs?container={name}"))
        row = p.locator("table.grid tbody tr", has_text="wide-destination")
        row.first.wait_for(timeout=10_000)
        right = p.evaluate(
            """(host) => { const tr = [...document.querySelectorAll('table.grid tbody tr')].find((r) => r.textContent.includes(host));
                 return [...tr.children].map((td) => td.getBoundingClientRect().right); }""",
            "wide-destination",
        )
        assert max(right) <= 1280, right  # every column in view
        assert host in row.first.inner_text().replace("\n", ""), "the whole name is shown"
        txn = wait_for(
            lambda: next(
                (
                    t
                    for t in stack.get("/api/transactions", params={"container": name}).json()["items"]
                    if t["url"].endswith("/get-me")
                ),
                None,
            ),
            10,
            message="the GET's transaction",
        )
        p.goto(stack.url(f"/transactions/{txn['id']}"))
        body = p.locator("section:not(.detail)", has=p.locator("h3", has_text="Request body"))
        body.wait_for(timeout=10_000)
        assert "no body" in body.inner_text() and "not stored" not in body.inner_text(), body.inner_text()
        w.clean()
    finally:
        stack.request("DELETE", f"/api/rules/{rule['id']}")
        stack.request("DELETE", f"/api/rules/{allow['id']}")


def test_smaller_fixes_year_builtin_rules_credential_delete_and_first_banner(stack: Stack, watched) -> None:  # noqa: ANN001
    w = watched()
    p = w.page
    # A date in another year says which; builtin rules have no Edit / Delete.
    rule = stack.request(
        "POST",
        "/api/rules",
        json={
            "container_pattern": "agent-year",
            "destination_pattern": "year.example",
            "expires_at": "2030-01-01T00:00:00Z",
        },
    ).json()
    try:
        p.goto(stack.url("/rules"))
        row = p.locator("table.grid tr", has_text="year.example")
        row.wait_for(timeout=5000)
        assert "2030" in row.inner_text(), row.inner_text()
        builtin = p.locator("table.grid tbody tr", has_text="builtin")
        wait_for(lambda: builtin.count() >= 3, 5, message="the builtin rules")
        assert builtin.get_by_role("button").count() == 0
    finally:
        stack.request("DELETE", f"/api/rules/{rule['id']}")
    # Deleting a global credential asks first, as deleting a rule does.
    created = stack.request(
        "POST",
        "/api/credentials",
        json={"label": "UI_DELETE_ME", "value": "v-0123456789abcdef", "hosts": ["api.example.com"]},
    )
    assert created.status_code in (200, 201), created.text
    try:
        p.goto(stack.url("/settings"))
        p.get_by_role("button", name="Delete UI_DELETE_ME").click()
        confirm = p.get_by_role("button", name="Confirm delete UI_DELETE_ME")
        confirm.wait_for(timeout=2000)
        assert any(c["label"] == "UI_DELETE_ME" for c in _credentials(stack))
        confirm.click()
        p.get_by_role("button", name="Delete UI_DELETE_ME").wait_for(state="detached", timeout=5000)
        assert not any(c["label"] == "UI_DELETE_ME" for c in _credentials(stack))
    finally:
        for c in _credentials(stack):
            if c["label"] == "UI_DELETE_ME":
                stack.request("DELETE", f"/api/credentials/{c['id']}")
    w.clean()
    # A page whose first /ws attempt fails shows the banner at once (it never was connected).
    fresh = watched()
    q = fresh.page
    allow: list[bool] = []

    def ws_route(ws) -> None:  # noqa: ANN001
        if allow:
            ws.connect_to_server()
        else:
            ws.close()

    q.route_web_socket(re.compile(r".*/ws$"), ws_route)
    q.goto(stack.url("/overview"))
    banner = q.locator("#offline")
    banner.wait_for(state="visible", timeout=5000)
    assert "Disconnected" in banner.inner_text()
    allow.append(True)
    q.get_by_role("button", name="Retry now").click()
    q.wait_for_selector("#live[data-state=connected]", timeout=10_000)
    assert banner.is_hidden()
    fresh.clean()


def test_screenshots_of_every_view_light_and_dark(stack: Stack, plain_origin: int, watched) -> None:  # noqa: ANN001
    SHOTS.mkdir(parents=True, exist_ok=True)
    tx = stack.get("/api/transactions", params={"limit": 1, "method": "POST"}).json()["items"]
    curls = [
        _held_curl(stack, name, url, timeout=12)
        for name, url in (
            ("claude", f"http://{ORIGIN}:{plain_origin}/"),
            ("claude", "http://registry.npmjs.org/"),
            ("codex", "http://api.github.com/"),
            ("opencode", "http://files.pythonhosted.org/"),
        )
    ]
    try:
        wait_for(lambda: stack.get("/api/pending/count").json()["count"] >= 4, 10, message="pending entries")
        for scheme in ("light", "dark"):
            w = watched(scheme=scheme)
            for view in VIEWS:
                path = f"/{view}"
                if view == "transactions" and tx:
                    path = f"/transactions/{tx[0]['id']}"
                w.page.goto(stack.url(path))
                w.page.wait_for_selector("#live[data-state=connected]", timeout=10_000)
                w.page.wait_for_load_state("networkidle")
                w.page.wait_for_timeout(300)
                w.page.screenshot(path=str(SHOTS / f"{view}-{scheme}.png"))
            w.clean()
        narrow = watched(width=360, height=740)
        narrow.page.goto(stack.url("/pending"))
        narrow.page.locator(".prow").first.wait_for(timeout=5000)
        assert narrow.page.evaluate("document.documentElement.scrollWidth") <= 360
        narrow.page.screenshot(path=str(SHOTS / "pending-360px.png"))
        narrow.clean()
    finally:
        for c in curls:
            c.kill()
            c.wait(5)
    for view in VIEWS:
        for scheme in ("light", "dark"):
            assert (SHOTS / f"{view}-{scheme}.png").stat().st_size > 10_000
