"""The request path's shortcuts (issue 18) give what the long way gives, without sockets:

- a plain head's fields are read by splitting its text (`http1._plain_lines`) instead of the
  parser's callbacks: same head, same error, for any bytes (hypothesis);
- a parsed head renders upstream without re-checking its pieces (`RequestHead.render_upstream`);
- the credential hook skips a head with no `greyproxy` and no Authorization: same answer and same
  upstream bytes as when it looks;
- the whole forward-proxy loop sends the same bytes upstream and to the client with every
  shortcut on as with every one off;
- one read timer per connection (`Conn.read_more`) still times every read out at its deadline;
- the DNS proxy's name hook costs no coroutine when there is nothing to wait for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from contextlib import contextmanager
from typing import Any, Iterator
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from greyproxy.credentials.placeholders import mint
from greyproxy.credentials.substitute import Live
from greyproxy.policy import RuleSet
from greyproxy.policy.ruleset import Rule, builtin_rules
from services.proxy import http1, http_proxy
from services.proxy.conn import Conn
from services.proxy.context import ClientConn, Limits, ProxyContext
from services.proxy.credentials import KEY_OK, LiveCredentials
from services.proxy.gate import Gate, Verdict
from services.proxy.hooks import CredentialSubstitution, Flow, HookChain, RuleRecheck
from harness.fuzz import examples

FUZZ = settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def long_way() -> Iterator[None]:
    """Every shortcut off: heads read through the parser's callbacks, rendered with the checks,
    and the credential hook always looking."""
    real_parse = http1.parse_request_head

    def parse_marked(*a: Any, **k: Any) -> Any:
        got = real_parse(*a, **k)
        if got is not None:
            got[0].placeholder_free = False
            got[0].parsed = False
        return got

    with (
        mock.patch.object(http1, "_plain_lines", lambda _text: None),
        mock.patch.object(http1, "parse_request_head", parse_marked),
    ):
        yield


def outcome(fn: Any, *args: Any) -> Any:
    """What a parse gives, comparable: every field of the head (those left out of == too), or the error."""
    try:
        got = fn(*args)
    except (http1.HttpError, http1.UpstreamError) as exc:
        return (type(exc).__name__, getattr(exc, "status", None), str(exc))
    if got is None:
        return None
    head, n = got
    fields = {f.name: getattr(head, f.name) for f in dataclasses.fields(head)}
    fields.pop("placeholder_free", None)  # (the long way clears these two on purpose)
    fields.pop("parsed", None)
    return fields, n


# Pieces a head is made of, the awkward ones included: folded lines, bare CR or LF, NUL, spaces
# around the colon, tabs, empty values, repeated and hop-by-hop fields, odd request lines.
_NAMES = st.sampled_from(
    [
        "Host",
        "host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authorization",
        "Upgrade",
        "Expect",
        "Content-Type",
        "X-A",
        "Set-Cookie",
        "Bad Name",
        "",
        "Na\x00me",
    ]
)
_VALUES = st.sampled_from(
    [
        "",
        "x",
        " padded ",
        "\tt\t",
        "5",
        "0",
        "chunked",
        "gzip, chunked",
        "close",
        "keep-alive",
        "upgrade",
        "websocket",
        "100-continue",
        "a\x00b",
        "a\rb",
        "a\nb",
        "a\r\n folded",
        "caf\xe9",
        "greyproxy:credential:x",
        "127.0.0.1:8080",
        "Basic Zm9vOmJhcg==",
    ]
)
_SEPARATORS = st.sampled_from([": ", ":", " : ", ":\t", ":  "])
_FIELD = st.builds(lambda k, s, v: k + s + v, _NAMES, _SEPARATORS, _VALUES)
_REQUEST_LINES = st.sampled_from(
    [
        "GET http://127.0.0.1:8080/1k HTTP/1.1",
        "GET http://127.0.0.1:8080/1k HTTP/1.0",
        "POST http://example.com/a?b=1#f HTTP/1.1",
        "GET http://example.com HTTP/1.1",
        "OPTIONS http://example.com HTTP/1.1",
        "CONNECT example.com:443 HTTP/1.1",
        "GET  http://example.com/ HTTP/1.1",
        "GET http://example.com/ HTTP/1.1 ",
        "GET /origin-form HTTP/1.1",
        "GET http://ex\xe4mple.com/ HTTP/1.1",
        "GET http://greyproxy.example/ HTTP/1.1",
        "GET http://h/?k=greyproxy%3Acredential%3Ax HTTP/1.1",
        "GET http://[::1]:8080/ HTTP/2.0",
    ]
)
_STATUS_LINES = st.sampled_from(
    [
        "HTTP/1.1 200 OK",
        "HTTP/1.1 200",
        "HTTP/1.1 200 ",
        "HTTP/1.0 204 No Content",
        "HTTP/1.1 404 Not  Found",
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 100 Continue",
        "HTTP/1.1 304 Not Modified",
        "HTTP/2.0 200 OK",
        "HTTP/1.1 999 Odd",
    ]
)
_EOL = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r"])


@st.composite
def heads(draw: Any, first: Any) -> bytes:
    lead = draw(st.sampled_from(["", "", "\r\n"]))
    lines = [draw(first), *draw(st.lists(_FIELD, max_size=6))]
    text = lead + "".join(line + draw(_EOL) for line in lines) + "\r\n"
    return text.encode("latin-1") + draw(st.sampled_from([b"", b"body", b"0\r\n\r\n"]))


@FUZZ
@given(heads(_REQUEST_LINES))
@example(b"GET http://127.0.0.1:8080/1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
@example(b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n")
@example(b"GET http://h/ HTTP/1.1\r\nHost: h\nX: a\r\n\r\n")
def test_request_head_split_reads_like_the_parser(raw: bytes) -> None:
    fast = outcome(http1.parse_request_head, raw, 65536, 100)
    with long_way():
        slow = outcome(http1.parse_request_head, raw, 65536, 100)
    assert fast == slow
    fast_o = outcome(http1.parse_request_head, raw, 65536, 100, ("https", "h.example", 443))
    with long_way():
        slow_o = outcome(http1.parse_request_head, raw, 65536, 100, ("https", "h.example", 443))
    assert fast_o == slow_o


@FUZZ
@given(heads(_STATUS_LINES), st.sampled_from(["GET", "HEAD", "CONNECT", "get"]))
@example(
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "GET",
)
@example(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nconnection: close\r\n\r\n", "GET")
def test_response_head_split_reads_like_the_parser(raw: bytes, method: str) -> None:
    fast = outcome(http1.parse_response_head, raw, 65536, method)
    with long_way():
        slow = outcome(http1.parse_response_head, raw, 65536, method)
    assert fast == slow
    if fast is not None and not isinstance(fast[0], str):
        resp = http1.parse_response_head(raw, 65536, method)[0]  # type: ignore[index]
        for keep in (True, False):
            assert http1.render_response_head(resp, keep)  # renders either way


@FUZZ
@given(heads(_REQUEST_LINES))
def test_parsed_head_renders_upstream_as_the_checked_render(raw: bytes) -> None:
    try:
        got = http1.parse_request_head(raw, 65536, 100)
    except http1.HttpError:
        return
    if got is None or got[0].method == "CONNECT":
        return
    head = got[0]
    assert head.parsed
    for version in ("1.0", "1.1"):
        checked = http1.render_request_head(head.method, head.path, version, head.upstream_headers())
        assert head.render_upstream(version) == checked


def test_head_built_by_hand_is_checked_when_rendered() -> None:
    head = http1.RequestHead("GET", "/", "1.1", [("X", "a\r\nInjected: 1")], path="/", authority="h")
    with pytest.raises(ValueError):
        head.render_upstream("1.1")


PH = mint("gw-1")


def _live() -> LiveCredentials:
    live = LiveCredentials("/nonexistent", None, None)  # type: ignore[arg-type]
    live.map = {PH: Live(PH, "sk-fast-path-1234", "KEY", "gw-1", None, ("api.example.com",), 4e9)}
    live.key = KEY_OK
    return live


@FUZZ
@given(
    st.sampled_from(["/", "/p?q=" + PH, "/p?q=greyproxy%3Acredential%3Axyz", "/greyproxy", "/" + PH]),
    st.lists(
        st.sampled_from(
            [
                "X-Key: " + PH,
                "X-Key: greyproxy:credential:unknown",
                "Authorization: Bearer " + PH,
                "Authorization: Basic eDpncmV5cHJveHk6Y3JlZGVudGlhbDp4",
                "Authorization: Basic Zm9vOmJhcg==",
                "Accept: */*",
                "X-Note: greyproxy rocks",
            ]
        ),
        max_size=3,
    ),
    st.sampled_from(["https", "http"]),
)
def test_credential_hook_shortcut_answers_as_the_full_look(path: str, fields: list[str], scheme: str) -> None:
    raw = (f"GET {path} HTTP/1.1\r\nHost: api.example.com\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()
    hook = CredentialSubstitution(_live())

    def run(force_look: bool) -> tuple[Any, bytes | None, tuple[str, ...]]:
        head = http1.parse_request_head(raw, 65536, 100, (scheme, "api.example.com", 443))[0]  # type: ignore[index]
        if force_look:
            head.placeholder_free = False
        flow = Flow("c", scheme, "api.example.com", 443, head, Verdict(True, "rule", 1))
        r = hook(flow)
        if r is not None and not hasattr(r, "status"):
            r = asyncio.run(r)  # type: ignore[arg-type]
        return r, (flow.render("1.1") if r is None else None), tuple(flow.substituted)

    assert run(False) == run(True)


# ---------------------------------------------------------------- the whole loop, both ways

NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
    b'Connection: keep-alive\r\nETag: "x"\r\n\r\nhello'
)


class _Journal:
    def append(self, kind: str, data: Any, record_id: str | None = None) -> str:
        return "1"


class _Publisher:
    def publish(self, *_a: Any) -> None:
        return None


class _Transport:
    def __init__(self, proto: Conn, on_write: Any) -> None:
        self.proto, self.on_write, self.closing = proto, on_write, False

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0


REQUESTS = [
    b"GET http://127.0.0.1:8080/a HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    b"GET http://127.0.0.1:8080/b?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept:*/*\r\nX-Pad:  v  \r\n\r\n",
    b"GET http://127.0.0.1:8080/c HTTP/1.1\r\nHost: other\r\nProxy-Connection: keep-alive\r\nConnection: x-drop\r\n"
    b"X-Drop: 1\r\nTE: trailers\r\n\r\n",
    b"POST http://127.0.0.1:8080/d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://127.0.0.1:8080/e HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Key: greyproxy:credential:nope\r\n\r\n",
]


async def _through_proxy(requests: list[bytes]) -> tuple[bytes, bytes]:
    """Every request on one kept-alive client connection; (bytes the origin got, bytes the client got)."""
    gate = Gate(_Journal(), _Publisher(), {43051}, {"127.0.0.1"}, 1.0, 10)  # type: ignore[arg-type]
    gate.set_rules(RuleSet([Rule.from_dict({**r, "id": i + 1}) for i, r in enumerate(builtin_rules())]), 1)
    ctx = ProxyContext(gate, Limits(idle_timeout=2.0, header_timeout=2.0))
    ctx.hooks = HookChain([RuleRecheck(gate), CredentialSubstitution(_live())])
    loop = asyncio.get_running_loop()
    upstream_got, client_got = bytearray(), bytearray()
    pending = list(requests)

    async def connect(host: str, port: int, timeout: float, guard: Any) -> Conn:
        up = Conn()

        def origin(data: bytes) -> None:
            upstream_got.extend(data)
            if data.startswith((b"GET", b"POST")):
                loop.call_soon(up.data_received, NGINX)

        up.connection_made(_Transport(up, origin))  # type: ignore[arg-type]
        return up

    client = ClientConn(ctx, http_proxy.handle_http)

    def answered(data: bytes) -> None:
        client_got.extend(data)
        if pending:
            loop.call_soon(client.data_received, pending.pop(0))
        else:
            client.transport.close()  # type: ignore[union-attr]

    with mock.patch.object(http_proxy, "connect", connect):
        client.connection_made(_Transport(client, answered))  # type: ignore[arg-type]
        client.data_received(pending.pop(0))
        await asyncio.wait_for(client.task, 5)  # type: ignore[arg-type]
    return bytes(upstream_got), bytes(client_got)


def test_whole_loop_sends_the_same_bytes_with_and_without_the_shortcuts() -> None:
    fast = asyncio.run(_through_proxy(REQUESTS))
    with long_way():
        slow = asyncio.run(_through_proxy(REQUESTS))
    assert fast == slow
    upstream, client = fast
    assert upstream.count(b"HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n") == 4  # Host from the target, first
    assert b"Proxy-Connection" not in upstream and b"X-Drop" not in upstream and b"TE:" not in upstream
    assert b"POST /d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 3\r\n\r\nabc" in upstream
    assert client.count(b"hello") == 4
    # The last one refused by the credential hook (unknown placeholder, or the key found unusable
    # when it looked again: this test has no database).
    assert b"HTTP/1.1 403 Forbidden" in client and b"X-Greyproxy-Reason: " in client


# ---------------------------------------------------------------- one read timer per connection


def _conn() -> Conn:
    c = Conn()
    c.connection_made(_Transport(c, lambda _d: None))  # type: ignore[arg-type]
    return c


def test_reads_share_one_timer_until_a_deadline_comes_earlier() -> None:
    async def main() -> None:
        c = _conn()
        loop = asyncio.get_running_loop()
        for i in range(5):
            loop.call_soon(c.data_received, b"x")
            assert await c.read_more(60) is True
            if i == 0:
                timer = c._timer
            assert c._timer is timer  # armed once, kept
        loop.call_soon(c.data_received, b"x")
        assert await c.read_more(1) is True
        assert c._timer is not timer and c._timer is not None  # an earlier deadline re-arms it
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await c.read_more(0.1)
        assert 0.09 <= loop.time() - t0 < 0.5
        c.connection_lost(None)
        assert c._timer is None  # nothing left scheduled for a closed connection

    asyncio.run(main())


def test_a_stale_timer_never_times_out_a_later_read() -> None:
    async def main() -> None:
        c = _conn()
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, c.data_received, b"x")
        assert await c.read_more(0.05) is True  # the timer stays armed for 0.05
        loop.call_later(0.15, c.data_received, b"y")
        assert await c.read_more(None) is True  # no deadline: the old timer must not fire on it
        loop.call_later(0.01, c.data_received, b"z")
        assert await c.read_more(0.05) is True  # armed for 0.05 again
        loop.call_later(0.1, c.data_received, b"w")
        assert await c.read_more(0.3) is True  # a later deadline: the early timer waits on to it

    asyncio.run(main())


# ---------------------------------------------------------------- the DNS proxy's name hook


def test_name_hook_is_free_when_nothing_is_waited_for() -> None:
    from services.proxy.dns_proxy import DnsProxy

    async def main() -> None:
        gate = Gate(_Journal(), _Publisher(), {43051}, {"127.0.0.1"}, 1.0, 10)  # type: ignore[arg-type]
        gate.set_rules(RuleSet([Rule(id=1, container_pattern="*", destination_pattern="10.9.9.9")]), 1)
        dns = DnsProxy(gate, _Journal(), None, None, 10, "127.0.0.1", 0)  # type: ignore[arg-type]
        started: list[str] = []

        async def reverse(ip: str) -> None:
            started.append(ip)
            await asyncio.sleep(0)

        dns._reverse = reverse  # type: ignore[method-assign]
        assert dns.ensure_name("c", "example.com", 80) is None  # a name: nothing to look up
        gate.names["10.1.1.1"] = ("named.example", time.time())
        assert dns.ensure_name("c", "10.1.1.1", 80) is None  # already named
        dns._ptr_negative["10.2.2.2"] = time.monotonic() + 60
        assert dns.ensure_name("c", "10.2.2.2", 80) is None  # known to have no name
        assert dns.ensure_name("c", "10.9.9.9", 80) is None  # a rule decides it: looked up, not waited for
        wait = dns.ensure_name("c", "10.3.3.3", 80)  # nothing decides it: worth waiting for
        assert wait is not None
        await wait
        assert started == ["10.9.9.9", "10.3.3.3"]

    asyncio.run(main())
