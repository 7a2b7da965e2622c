"""Local API protection (services/api/origin.py): the pure `refusal` decision, the LocalOnly
middleware on a small Falcon app, and the error handlers on WebSocket routes (resp is None)."""

from __future__ import annotations

import asyncio
from typing import Any

import falcon
import falcon.asgi
import falcon.testing
import pytest

from bus.reqrep import ServiceUnavailable
from services.api import errors, origin
from services.api.origin import BAD_REQUEST, FORBIDDEN, MISDIRECTED, UNSUPPORTED_MEDIA, LocalOnly, refusal

ALLOWED = origin.normalize_allowed(["greyproxy.lan", "10.0.0.5", "[fd00::1]"])


@pytest.mark.parametrize(
    "host, status",
    [
        ("localhost", None),
        ("localhost:43080", None),
        ("LOCALHOST:1", None),
        ("ui.localhost:3000", None),
        ("127.0.0.1", None),
        ("127.0.0.1:43080", None),
        ("127.9.8.7:1", None),
        ("[::1]", None),
        ("[::1]:43080", None),
        ("[::ffff:127.0.0.1]:80", None),
        ("greyproxy.lan", None),
        ("greyproxy.lan:43080", None),
        ("10.0.0.5:43080", None),
        ("[fd00::1]:1", None),
        (None, BAD_REQUEST),
        ("", BAD_REQUEST),
        ("evil.example", MISDIRECTED),
        ("evil.example:43080", MISDIRECTED),
        ("localhost.evil.example", MISDIRECTED),
        ("127.0.0.1.nip.io", MISDIRECTED),
        ("10.0.0.6", MISDIRECTED),
        ("::1", BAD_REQUEST),  # an unbracketed IPv6 literal is not a Host header
        ("localhost, evil.example", BAD_REQUEST),
        ("user@localhost", BAD_REQUEST),
        ("localhost:http", BAD_REQUEST),
        # a port out of range is no port at all (RFC 9112 §3.2: an invalid Host is a 400)
        ("localhost:99999", BAD_REQUEST),
        ("localhost:0", BAD_REQUEST),
        ("[::1]:65536", BAD_REQUEST),
        ("localhost:65535", None),
        ("localhost:\u0661", BAD_REQUEST),
    ],
)
def test_host_is_checked_for_every_method(host: str | None, status: int | None) -> None:
    for method in ("GET", "POST", "WEBSOCKET"):
        got = refusal(method, host, None, None, ALLOWED)
        assert (got.status if got else None) == status, (method, host, got)


@pytest.mark.parametrize(
    "org, ok",
    [
        (None, True),
        ("http://localhost:5173", True),
        ("http://127.0.0.1:43080", True),
        ("https://[::1]:8443", True),
        ("http://greyproxy.lan:43080", True),
        ("http://dev.localhost", True),
        ("http://evil.example", False),
        ("http://evil.example:43080", False),
        ("null", False),
        ("", False),
        ("file://", False),
        ("http://localhost.evil.example", False),
        ("http://user@localhost", False),
    ],
)
def test_foreign_origin_is_refused_whatever_the_method(org: str | None, ok: bool) -> None:
    for method in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "WEBSOCKET"):
        got = refusal(method, "localhost:43080", org, None, ALLOWED)
        assert got is None if ok else (got is not None and got.status == FORBIDDEN and got.kind == "origin"), (
            method,
            org,
            got,
        )


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "WEBSOCKET", "post"])
def test_cross_site_fetch_metadata_refuses_state_changes(method: str) -> None:
    got = refusal(method, "localhost:43080", "http://127.0.0.1:3000", "cross-site")
    assert got is not None and got.status == FORBIDDEN and got.kind == "fetch-site"
    for site in ("same-origin", "same-site", "none", None, ""):
        assert refusal(method, "localhost:43080", "http://localhost:3000", site) is None, site


# Issue 13 item 1: with the API's port known, an Origin must be the API's own origin.
OWN = 43080


@pytest.mark.parametrize(
    "org, ok",
    [
        ("http://localhost:43080", True),
        ("http://127.0.0.1:43080", True),
        ("http://[::1]:43080", True),
        ("http://dev.localhost:43080", True),
        ("http://greyproxy.lan:43080", True),
        ("HTTP://LOCALHOST:43080", True),
        ("http://localhost:3000", False),
        ("http://127.0.0.1:8888", False),
        ("http://localhost", False),
        ("https://localhost:43080", False),
        ("http://evil.example:43080", False),
        ("http://tool.example:8080", True),
        ("http://tool.example:8081", False),
        ("http://tool.example", False),
        ("https://app.example", True),
        ("https://app.example:443", True),
    ],
)
def test_origin_must_be_the_apis_own_or_listed(org: str, ok: bool) -> None:
    listed = origin.normalize_origins(["http://tool.example:8080", "https://app.example"])
    for method in ("GET", "POST", "DELETE", "WEBSOCKET"):
        for site in (None, "same-site", "same-origin"):
            got = refusal(method, "localhost:43080", org, site, ALLOWED, own_port=OWN, allowed_origins=listed)
            assert (got is None) is ok, (method, org, site, got)
            if not ok:
                assert got.status == FORBIDDEN and got.kind == "origin"


@pytest.mark.parametrize(
    "ctype, ok",
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("text/plain", False),
        ("text/plain;charset=UTF-8", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        (None, False),
        ("", False),
        ("application/jsonx", False),
    ],
)
def test_browser_writes_with_a_body_must_be_json(ctype: str | None, ok: bool) -> None:
    own = f"http://localhost:{OWN}"
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for org, site in ((own, None), (None, "same-origin"), (own, "same-origin"), (None, "none")):
            got = refusal(
                method, "localhost:43080", org, site, own_port=OWN, browser=True, has_body=True, content_type=ctype
            )
            assert (got is None) is ok, (method, org, site, ctype, got)
            if not ok:
                assert got.status == UNSUPPORTED_MEDIA and got.kind == "content-type"
        # Without a body (a DELETE, an empty POST) there is nothing a form could smuggle.
        assert (
            refusal(
                method, "localhost:43080", own, None, own_port=OWN, browser=True, has_body=False, content_type=ctype
            )
            is None
        )
        # curl and scripts: neither Origin nor Sec-Fetch-*, any content type (README's `curl -d`).
        assert (
            refusal(
                method, "localhost:43080", None, None, own_port=OWN, browser=False, has_body=True, content_type=ctype
            )
            is None
        )
    assert (
        refusal(
            "GET",
            "localhost:43080",
            own,
            "same-origin",
            own_port=OWN,
            browser=True,
            has_body=True,
            content_type="text/plain",
        )
        is None
    )  # reads change nothing


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_cross_site_reads_without_a_foreign_origin_pass(method: str) -> None:
    # A link followed from another site: a navigation, read-only, and its answer stays in the tab.
    assert refusal(method, "localhost:43080", None, "cross-site") is None


def test_host_is_judged_before_origin() -> None:
    got = refusal("POST", "evil.example", "http://evil.example", "cross-site")
    assert got is not None and got.status == MISDIRECTED and "evil.example" in got.message


# ----------------------------------------------------------------------------- the middleware


class Thing:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"ok": True}

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"posted": True}


class FailingSocket:
    def __init__(self, accept_first: bool, exc: BaseException) -> None:
        self.accept_first = accept_first
        self.exc = exc

    async def on_websocket(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket) -> None:
        if self.accept_first:
            await ws.accept()
        raise self.exc


class Echo:
    async def on_websocket(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket) -> None:
        await ws.accept()
        await ws.send_text(await ws.receive_text())


@pytest.fixture
def app() -> falcon.asgi.App:
    a = falcon.asgi.App(middleware=[LocalOnly(["greyproxy.lan"])])
    errors.install(a)
    a.add_route("/thing", Thing())
    a.add_route("/echo", Echo())
    a.add_route("/ws-boom", FailingSocket(False, RuntimeError("boom")))
    a.add_route("/ws-late-409", FailingSocket(True, errors.ApiError(409, "taken")))
    a.add_route("/ws-late-503", FailingSocket(True, ServiceUnavailable("proxy", "down")))
    return a


def request(
    app: falcon.asgi.App, method: str, path: str, host: str = "localhost:43080", **headers: str
) -> falcon.testing.Result:
    client = falcon.testing.TestClient(app)
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    return client.simulate_request(method, path, host=host, headers=hdrs, json={} if method != "GET" else None)


def test_middleware_passes_local_requests(app: falcon.asgi.App) -> None:
    assert request(app, "GET", "/thing").json == {"ok": True}
    assert request(app, "POST", "/thing", Origin="http://localhost:5173").json == {"posted": True}
    assert request(app, "POST", "/thing", host="greyproxy.lan:43080", Origin="http://greyproxy.lan").status_code == 200
    assert request(app, "GET", "/thing", host="127.0.0.1:1").status_code == 200


def test_middleware_answers_421_for_a_foreign_host_even_on_unknown_paths(app: falcon.asgi.App) -> None:
    for path in ("/thing", "/nowhere"):
        res = request(app, "GET", path, host="evil.example")
        assert res.status_code == 421, path
        assert res.headers["content-type"].startswith("application/json")
        assert set(res.json) == {"error"} and "evil.example" in res.json["error"]


def test_middleware_answers_403_for_cross_origin_and_cross_site(app: falcon.asgi.App) -> None:
    res = request(app, "POST", "/thing", Origin="http://evil.example")
    assert res.status_code == 403 and "evil.example" in res.json["error"]
    assert request(app, "GET", "/thing", Origin="http://evil.example").status_code == 403
    res = request(app, "POST", "/thing", Origin="http://127.0.0.1:3000", Sec_Fetch_Site="cross-site")
    assert res.status_code == 403 and "Sec-Fetch-Site" in res.json["error"]
    assert request(app, "GET", "/thing", Sec_Fetch_Site="cross-site").status_code == 200


async def _ws(app: falcon.asgi.App, path: str, host: str = "localhost", **headers: str) -> tuple[str, Any]:
    """('accepted', echoed text) or ('closed', close code)."""
    async with falcon.testing.ASGIConductor(app) as c:
        try:
            async with c.simulate_ws(path, host=host, headers=headers or None) as ws:
                if ws.closed:
                    return "closed", ws.close_code
                try:
                    await ws.send_text("hi")
                    return "accepted", await ws.receive_text()
                except falcon.errors.WebSocketDisconnected:
                    return "closed", ws.close_code
        except falcon.errors.WebSocketDisconnected as exc:
            return "closed", exc.code
        except falcon.errors.WebSocketServerError as exc:  # the app closed with a server-error code
            return "closed", getattr(exc, "code", 1011)


def test_middleware_checks_websocket_upgrades(app: falcon.asgi.App) -> None:
    assert asyncio.run(_ws(app, "/echo")) == ("accepted", "hi")
    assert asyncio.run(_ws(app, "/echo", Origin="http://localhost:43080")) == ("accepted", "hi")
    assert asyncio.run(_ws(app, "/echo", Origin="http://evil.example")) == ("closed", 3403)
    assert asyncio.run(_ws(app, "/echo", host="evil.example")) == ("closed", 3421)
    assert asyncio.run(_ws(app, "/echo", **{"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "cross-site"})) == (
        "closed",
        3403,
    )


def test_error_handlers_close_websockets_instead_of_failing(app: falcon.asgi.App) -> None:
    # resp is None on a WebSocket route: the handlers close the socket with 3000 + status (1011 for a bug).
    assert asyncio.run(_ws(app, "/ws-boom")) == ("closed", 1011)
    assert asyncio.run(_ws(app, "/ws-late-409")) == ("closed", 3409)
    assert asyncio.run(_ws(app, "/ws-late-503")) == ("closed", 3503)


@pytest.mark.parametrize(
    "addr, extra, expected",
    [
        (":43080", [], []),
        ("0.0.0.0:43080", ["a.lan"], ["a.lan"]),
        ("[::]:43080", [], []),
        ("192.168.1.5:43080", [], ["192.168.1.5"]),
        ("[fd00::5]:43080", ["a.lan"], ["a.lan", "fd00::5"]),
    ],
)
def test_configured_hosts_include_a_specific_bind_address(
    tmp_path, addr: str, extra: list[str], expected: list[str]
) -> None:
    from greyproxy.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(f'greyproxy: {{addr: "{addr}", allowedHosts: {extra!r}}}\n')
    cfg = load_config(path, env={"GREYPROXY_DATA_HOME": str(tmp_path / "data")})
    hosts = origin.configured_hosts(cfg)
    assert hosts == expected
    allowed = origin.normalize_allowed(hosts)
    if expected and expected[-1] != "a.lan":
        bind = expected[-1]
        host_header = f"[{bind}]:43080" if ":" in bind else f"{bind}:43080"
        assert refusal("POST", host_header, None, None, allowed) is None


# ----------------------------------------------------------------------------- issue 13: fuzzed neighbours

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from harness.fuzz import examples  # noqa: E402

_SCHEMES = st.sampled_from(["http", "https", "ws", "wss", "HTTP", "file", "chrome-extension", ""])
_HOSTS = st.sampled_from(
    [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "dev.localhost",
        "greyproxy.lan",
        "evil.example",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "",
        "[::ffff:127.0.0.1]",
    ]
)
_PORTS = st.one_of(st.none(), st.integers(min_value=0, max_value=70000))


@given(
    _SCHEMES,
    _HOSTS,
    _PORTS,
    st.sampled_from(["", "/", "/x", "?q", "#f"]),
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "WEBSOCKET"]),
)
@settings(max_examples=examples(600), deadline=None)
def test_only_the_own_origin_or_a_listed_one_passes(
    scheme: str, host: str, port: int | None, tail: str, method: str
) -> None:
    org = f"{scheme}://{host}" + ("" if port is None else f":{port}") + tail
    listed = origin.normalize_origins(["http://tool.example:8080"])
    got = refusal(method, "localhost:43080", org, None, ALLOWED, own_port=OWN, allowed_origins=listed)
    own_host = host in ("localhost", "127.0.0.1", "[::1]", "dev.localhost", "greyproxy.lan", "[::ffff:127.0.0.1]")
    expected_ok = scheme.lower() in ("http", "ws") and own_host and port == OWN and tail in ("", "/")
    assert (got is None) == expected_ok, (org, got)
    if got is not None:
        assert got.status == FORBIDDEN and got.kind == "origin"


@given(st.text(max_size=60), st.sampled_from(["GET", "POST", "WEBSOCKET"]))
@settings(max_examples=examples(400), deadline=None)
def test_any_origin_or_host_text_gets_a_clean_decision(text: str, method: str) -> None:
    for got in (
        refusal(method, "localhost:43080", text, None, own_port=OWN),
        refusal(method, text, None, None, own_port=OWN),
        refusal(method, "localhost:43080", None, text, own_port=OWN, browser=True, has_body=True, content_type=text),
    ):
        assert got is None or got.status in (BAD_REQUEST, MISDIRECTED, FORBIDDEN, UNSUPPORTED_MEDIA)
