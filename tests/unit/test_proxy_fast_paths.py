"""The request path's shortcuts (issue 18) give what the long way gives, without sockets:

- a plain head's fields are read by splitting its text (`http1._SPLIT_READING`) instead of the
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
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator
from unittest import mock

import httptools
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from greyproxy.credentials.placeholders import mint
from greyproxy.credentials.substitute import Live
from greyproxy.policy import RuleSet
from greyproxy.policy.ruleset import Rule, builtin_rules
from services.proxy import http1, http_proxy
from services.proxy.conn import Conn, PipeConn
from services.proxy.context import ClientConn, Limits, ProxyContext
from services.proxy.credentials import KEY_OK, LiveCredentials
from services.proxy.gate import Gate, Verdict
from services.proxy.hooks import CredentialSubstitution, Flow, HookChain, RuleRecheck
from harness.fuzz import examples
from harness.wire import Wire

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
        mock.patch.object(http1, "_SPLIT_READING", False),
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
    if isinstance(head, http1.ResponseHead):
        # How the fields are kept (the split reading's text and lines, where its Connection line is):
        # read the fields instead, and render the head both ways (what `connection_at` is for).
        for how in ("_headers", "index", "text", "lower", "lines", "connection_at"):
            fields.pop(how)
        fields["lookups"] = [head.header(name) for name in _LOOKUPS]  # (before the list is built)
        rendered = []
        for keep_alive in (True, False):
            try:
                rendered.append(http1.render_response_head(head, keep_alive))
            except (http1.HttpError, http1.UpstreamError, ValueError) as exc:
                rendered.append(repr(exc))
        fields["rendered"] = rendered
        fields["headers"] = head.headers
    return fields, n


# Every name the heads below are made of, in several spellings, and some absent ones.
_LOOKUPS = [
    "Host",
    "content-length",
    "Transfer-Encoding",
    "CONNECTION",
    "keep-alive",
    "proxy-connection",
    "Upgrade",
    "content-type",
    "Content-Encoding",
    "x-a",
    "Set-Cookie",
    "Sec-WebSocket-Extensions",
]


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
        "Name ",
        " Lead",
        "Proxy-Authenticate",
        "TE",
        "Trailer",
        "content-length",
        "Content-Type",
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
        "a\x01b",
        "a\x7fb",
        "trailing \t",
        "x: y",
        "1024",
        " 12 ",
        "1,2",
        "Keep-Alive",
        "close, upgrade",
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
        "GET http://example.com/ RTSP/1.0",
        "M-SEARCH http://example.com/ HTTP/1.1",
        "PROPFIND http://example.com/ HTTP/1.1",
        "get http://example.com/ HTTP/1.1",
        "GET http://example.com/ HTTP/1.1\x00",
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
        "HTTP/1.1 007 Odd",
        "HTTP/1.1  200 OK",
        "HTTP/1.1 200\tOK",
        "HTTP/1.1 200 \tOK",
        "HTTP/1.1 200 O\x00K",
        "RTSP/1.0 200 OK",
        "HTTP/1.1 200 OK\r",
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
@example(b"HTTP/1.1 200 OK\r\nProxy-Connection: close\r\nContent-Length: 0\r\n\r\n", "GET")
@example(b"HTTP/1.1 200\r\nTrailer: x\r\nTE: y\r\n\r\n", "GET")
@example(b"HTTP/1.1  200 OK\r\n\r\n", "GET")
def test_response_head_split_reads_like_the_parser(raw: bytes, method: str) -> None:
    fast = outcome(http1.parse_response_head, raw, 65536, method)
    with long_way():
        slow = outcome(http1.parse_response_head, raw, 65536, method)
    assert fast == slow
    if fast is not None and not isinstance(fast[0], str):
        resp = http1.parse_response_head(raw, 65536, method)[0]  # type: ignore[index]
        if resp.text is not None:  # the field lines the parse split once are the text's
            assert resp.field_lines() is resp.lines and resp.lines == resp.text.split("\r\n")[1:]
        for keep in (True, False):
            assert http1.render_response_head(resp, keep)  # renders either way


_ANOMALIES = st.sampled_from(["\r", "\n", "\x00", "\x01", "\x7f", "\r\n ", "\r\n\t", " :", "\r\r\n", "\n\r"])


@FUZZ
@given(
    st.sampled_from(["HTTP/1.1 200 OK", "GET http://h.example/ HTTP/1.1"]),
    st.lists(st.sampled_from(["Host: h.example", "X-A: value", "Content-Length: 0"]), min_size=1, max_size=4),
    st.data(),
)
def test_the_parser_refuses_what_splitting_would_read_otherwise(first: str, fields: list[str], data: Any) -> None:
    """What `_SPLIT_READING` relies on: a bare CR or LF, a control character, a folded line or a space
    before the colon anywhere in a field makes the parser refuse the head (were one accepted, the
    split would read the fields differently from the callbacks)."""
    line = data.draw(st.integers(0, len(fields) - 1))
    at = data.draw(st.integers(1, len(fields[line]) - 1))
    bad = data.draw(_ANOMALIES)
    if bad == " :":
        at = fields[line].index(":")
    fields[line] = fields[line][:at] + bad + fields[line][at:]
    raw = ("\r\n".join([first, *fields]) + "\r\n\r\n").encode("latin-1")
    parser = (
        httptools.HttpResponseParser(object()) if first.startswith("HTTP") else httptools.HttpRequestParser(object())
    )
    with pytest.raises(httptools.HttpParserError):
        parser.feed_data(raw)


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


REQUESTS = [
    b"GET http://127.0.0.1:8080/a HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    b"GET http://127.0.0.1:8080/b?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept:*/*\r\nX-Pad:  v  \r\n\r\n",
    b"GET http://127.0.0.1:8080/c HTTP/1.1\r\nHost: other\r\nProxy-Connection: keep-alive\r\nConnection: x-drop\r\n"
    b"X-Drop: 1\r\nTE: trailers\r\n\r\n",
    b"POST http://127.0.0.1:8080/d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://127.0.0.1:8080/e HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Key: greyproxy:credential:nope\r\n\r\n",
]


_PROTOCOLS_ASKED: list[type[Conn]] = []  # the connection classes `_through_proxy`'s upstreams were asked as


async def _through_proxy(requests: list[bytes]) -> tuple[bytes, bytes]:
    """Every request on one kept-alive client connection; (bytes the origin got, bytes the client got)."""
    gate = Gate(_Journal(), _Publisher(), {43051}, {"127.0.0.1"}, 1.0, 10)  # type: ignore[arg-type]
    gate.set_rules(RuleSet([Rule.from_dict({**r, "id": i + 1}) for i, r in enumerate(builtin_rules())]), 1)
    ctx = ProxyContext(gate, Limits(idle_timeout=2.0, header_timeout=2.0))
    ctx.hooks = HookChain([RuleRecheck(gate), CredentialSubstitution(_live())])
    loop = asyncio.get_running_loop()
    upstream_got, client_got = bytearray(), bytearray()
    pending = list(requests)

    async def connect(host: str, port: int, timeout: float, guard: Any, protocol: type[Conn] = Conn) -> Conn:
        _PROTOCOLS_ASKED.append(protocol)
        up = protocol()

        def origin(data: bytes) -> None:
            upstream_got.extend(data)
            if data.startswith((b"GET", b"POST")):
                loop.call_soon(up.data_received, NGINX)

        up.connection_made(Wire(up, origin))  # type: ignore[arg-type]
        return up

    client = ClientConn(ctx, http_proxy.handle_http)

    def answered(data: bytes) -> None:
        client_got.extend(data)
        if pending:
            loop.call_soon(client.data_received, pending.pop(0))
        else:
            client.transport.close()  # type: ignore[union-attr]

    with mock.patch.object(http_proxy, "connect", connect):
        client.connection_made(Wire(client, answered))  # type: ignore[arg-type]
        client.data_received(pending.pop(0))
        await asyncio.wait_for(client.task, 5)  # type: ignore[arg-type]
    return bytes(upstream_got), bytes(client_got)


def test_whole_loop_sends_the_same_bytes_with_and_without_the_shortcuts() -> None:
    _PROTOCOLS_ASKED.clear()
    fast = asyncio.run(_through_proxy(REQUESTS))
    # A plain-HTTP upstream is connected as a plain Conn (read as a plain protocol), not a PipeConn
    assert _PROTOCOLS_ASKED and set(_PROTOCOLS_ASKED) == {Conn} and PipeConn not in _PROTOCOLS_ASKED
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
    c.connection_made(Wire(c, lambda _d: None))  # type: ignore[arg-type]
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


class _Journal:
    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def append(self, kind: str, data: Any) -> str:
        self.records.append((kind, data))
        return str(len(self.records))


def _recorded(raw: bytes, method: str, set_headers: bool = False) -> Any:
    """The transaction record of a request answered by `raw` (its times left out)."""
    from services.proxy.pipeline import Recorder

    journal = _Journal()
    rec = Recorder(journal, max_body=64)  # type: ignore[arg-type]
    req = http1.parse_request_head(b"GET http://h.example/?token=x HTTP/1.1\r\nHost: h.example\r\n\r\n")[0]  # type: ignore[index]
    t = rec.txn("c", "http://h.example", "h.example", 80, req)
    resp = http1.parse_response_head(raw, 65536, method)[0]  # type: ignore[index]
    if set_headers:
        resp.headers = [*resp.headers, ("X-Set-By-A-Hook", "1")]
    t.resp_sink(resp)(b"body")
    t.finish(resp)
    [(kind, values)] = journal.records
    assert kind == "transaction"
    return [v for i, v in enumerate(values) if i not in (0, 15)]  # timestamp, duration_ms


@FUZZ
@given(heads(_STATUS_LINES), st.sampled_from(["GET", "HEAD"]))
@example(
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: s=1\r\nLocation: /x?token=t\r\n"
    b"Content-Length: 4\r\nset-cookie: t=2\r\n\r\nbody",
    "GET",
)
def test_a_response_is_recorded_alike_from_its_lines_or_its_pairs(raw: bytes, method: str) -> None:
    try:
        fast = _recorded(raw, method)
    except http1.UpstreamError:
        return
    with long_way():
        assert _recorded(raw, method) == fast
    # A hook that set the fields: those are recorded, not the head's lines.
    assert "X-Set-By-A-Hook" in _recorded(raw, method, set_headers=True)[10]


@FUZZ
@given(st.text(alphabet=st.sampled_from(list(" \t,aB-\xe9\x85\x0b")), max_size=12))
def test_a_value_of_one_token_is_split_as_any_other(value: str) -> None:
    assert http1._split_tokens(value) == [t.strip().lower() for t in value.split(",") if t.strip()]


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("0129 +-x\t\u00b2\u0663\uff11")), max_size=20))
@example("1" * 18)
@example("1" * 19)
@example("")
@example("999999999999999999")
@example("000000000000000012")
def test_content_length_check_is_the_regex(value: str) -> None:
    ok = http1._CL_RE.fullmatch(value) is not None
    assert http1._content_length_ok(value) == ok
    # (the number read in one loop: int() of what the regex takes, -1 for the rest)
    assert http1._content_length_value(value) == (int(value) if ok else -1)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize(
    "raw",
    [
        b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"ICE/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_a_response_the_parser_lets_through_but_is_not_http_is_the_origins_fault(raw: bytes, split: bool) -> None:
    """httptools accepts RTSP/ and ICE/ status lines and a NUL in the reason; neither is an HTTP
    answer we can relay (a NUL could not even be rendered again): the origin's error (502)."""
    if split:
        with pytest.raises(http1.UpstreamError):
            http1.parse_response_head(raw)
    else:
        with long_way(), pytest.raises(http1.UpstreamError):
            http1.parse_response_head(raw)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("protocol", ["RTSP/1.0", "ICE/1.0"])
def test_a_request_line_with_another_protocol_is_the_clients_fault(protocol: str, split: bool) -> None:
    raw = f"GET http://example.com/ {protocol}\r\nHost: example.com\r\n\r\n".encode()
    ctx = nullcontext() if split else long_way()
    with ctx, pytest.raises(http1.HttpError) as err:
        http1.parse_request_head(raw)
    assert err.value.status == 400
    # an IDNA host rewrites the line first: the protocol is still checked on the rewritten line
    idna = f"GET http://ex\u00e4mple.com/ {protocol}\r\nHost: x\r\n\r\n".encode()
    with pytest.raises(http1.HttpError):
        http1.parse_request_head(idna)
    ok = http1.parse_request_head("GET http://ex\u00e4mple.com/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert ok is not None and ok[0].version == "1.1"


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                "content-length",
                "connection",
                "transfer-encoding",
                "te",
                "trailer",
                "keep-alive",
                "upgrade",
                "proxy-connection",
                "proxy-",
                "content-type",
                "connectionx",
                "t",
                "tex",
                "c",
                "p",
                "proxy",
                "u",
                "upgrades",
                "k",
                "x-a",
                "transfer-encodings",
                "contentlength",
            ]
        ),  # fmt: skip
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["", " 1", ":", "\t,x"]),
)
def test_response_field_kinds_are_the_regex(names: list[str], value: str) -> None:
    """`_response_field` (a parsed response head's framing and hop-by-hop fields, told line by line)
    finds the fields `_RESPONSE_FIELD_RE` finds, and no other."""
    lower = "http/1.1 200 ok\r\n" + "\r\n".join(f"{n}:{value}" for n in names)
    by_regex = {m.start() + 2: m.group(1) for m in http1._RESPONSE_FIELD_RE.finditer(lower)}
    start = 0
    for name in names:
        start = lower.index("\r\n", start) + 2
        kind = http1._response_field(lower, start)
        expected = by_regex.get(start)
        wanted = {"content-length": 1, "connection": 2, "transfer-encoding": 3}.get(
            expected or "", 4 if expected else 0
        )
        assert kind == wanted, (name, expected)


_TARGETS = st.builds(
    "".join,
    st.lists(
        st.sampled_from(
            [
                "http://",
                "HTTP://",
                "https://",
                "h.example",
                ":80",
                ":8080",
                "/",
                "?",
                "#",
                "a",
                "@",
                "[::1]",
                ":",
                "ftp://",
                "%2F",
            ]
        ),
        max_size=7,
    ),
)


def _target_parts_by_regex(method: str, target: str) -> Any:
    """What `_target_parts` read before its `http://` shortcut: `_SCHEME_RE` for every target."""
    if method == "CONNECT":
        return http1._target_parts(method, target)
    m = http1._SCHEME_RE.fullmatch(target)
    if m is None:
        raise http1.HttpError(400, "absolute URI required")
    scheme, authority, rest = m.group(1, 2, 3)
    scheme = scheme.lower()
    if scheme not in http1._DEFAULT_PORTS:
        raise http1.HttpError(400, f"unsupported scheme {scheme!r}")
    host, port = http1._split_authority(authority, False, http1._DEFAULT_PORTS[scheme])
    path = rest.partition("#")[0]
    if not path:
        path = "*" if method == "OPTIONS" else "/"
    elif path.startswith("?"):
        path = "/" + path
    return scheme, host, port, path, authority


@FUZZ
@given(st.sampled_from(["GET", "OPTIONS", "POST"]), _TARGETS)
@example("GET", "http://h.example:8080/a?b#c")
@example("GET", "http://h.example?x/y")
@example("GET", "http://h.example#x?/y")
@example("OPTIONS", "http://h.example")
def test_target_parts_read_http_targets_as_the_regex(method: str, target: str) -> None:
    def of(fn: Any) -> Any:
        try:
            return fn(method, target)
        except http1.HttpError as exc:
            return (exc.status, str(exc))

    assert of(http1._target_parts) == of(_target_parts_by_regex)


@contextmanager
def fresh_request_parsers(keep: bool) -> Iterator[None]:
    """An empty pool of kept request parsers (`http1._REQUEST_PARSERS`); `keep=False`: none is kept."""
    pool = http1._REQUEST_PARSERS
    saved = pool[:]
    pool.clear()
    try:
        with mock.patch.object(http1, "_REQUEST_PARSERS_MAX", 8 if keep else 0):
            yield
    finally:
        pool[:] = saved


@FUZZ
@given(st.lists(heads(_REQUEST_LINES), min_size=2, max_size=5))
@example(
    [
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    ]
)
@example(
    [
        b"GET http://h/ HTTP/1.0\r\nHost: h\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\nProxy-Connection: close\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    ]
)
@example(
    [
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    ]
)
def test_a_kept_request_parser_reads_any_head_as_a_new_one(raws: list[bytes]) -> None:
    """Heads parsed one after another on parsers kept from the ones before give what each gives on a
    parser of its own (a head that leaves its parser elsewhere than at the next head's start, such
    as `Connection: close` or a body to come, must not pass it on)."""
    with fresh_request_parsers(keep=False):
        alone = [outcome(http1.parse_request_head, raw, 65536, 100) for raw in raws]
    with fresh_request_parsers(keep=True):
        kept = [outcome(http1.parse_request_head, raw, 65536, 100) for raw in raws]
    assert kept == alone


def test_a_plain_request_head_leaves_its_parser_for_the_next() -> None:
    """A GET's parser serves the next head (no parser made for it), one that ends its connection
    too (`Connection: close`, HTTP/1.0: the kept parsers are lenient about that alone); a head that
    brings a body or a tunnel does not leave one."""
    plain = b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n"
    made = []
    real = http1.HttpRequestParser

    def making(col: Any) -> Any:
        made.append(col)
        return real(col)

    with fresh_request_parsers(keep=True), mock.patch.object(http1, "HttpRequestParser", making):
        for _ in range(3):
            assert http1.parse_request_head(plain) is not None
        assert len(made) == 1 and len(http1._REQUEST_PARSERS) == 1
        for closing in (
            b"GET http://h/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            b"GET http://h/ HTTP/1.0\r\nHost: h\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\nHost: h\r\nProxy-Connection: close\r\n\r\n",
        ):
            assert http1.parse_request_head(closing) is not None
            assert len(http1._REQUEST_PARSERS) == 1
            assert http1.parse_request_head(plain) is not None
        assert len(made) == 1
        for other in (
            b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
        ):
            assert http1.parse_request_head(other) is not None
            assert http1._REQUEST_PARSERS == []
            assert http1.parse_request_head(plain) is not None  # a new one, kept again
        assert len(made) == 3
        with pytest.raises(http1.HttpError):
            http1.parse_request_head(b"GET http://h/ HTTP/1.1\r\nHo st: h\r\n\r\n")
        assert http1._REQUEST_PARSERS == []  # (a parser that refused a head is dropped)


def test_a_parsed_request_head_has_every_field_as_its_dataclass_would() -> None:
    """`parse_request_head` sets the head's fields one by one (no __init__ call): each is what
    RequestHead(...) with the parsed values gives, the defaults included."""
    head, n = http1.parse_request_head(b"GET http://h.example:8080/a?b HTTP/1.1\r\nHost: h.example:8080\r\n\r\n")  # type: ignore[misc]
    want = http1.RequestHead(
        "GET",
        "http://h.example:8080/a?b",
        "1.1",
        [("Host", "h.example:8080")],
        host="h.example",
        port=8080,
        scheme="http",
        path="/a?b",
        authority="h.example:8080",
        names=frozenset({"host"}),
        placeholder_free=True,
        parsed=True,
    )
    for f in dataclasses.fields(want):
        assert getattr(head, f.name) == getattr(want, f.name), f.name
        assert type(getattr(head, f.name)) is type(getattr(want, f.name)), f.name
    assert n == 64


def test_an_http_targets_authority_is_read_once_and_alike() -> None:
    """`_target_parts` remembers an http:// target's authority as `_split_authority` reads it (bounded);
    one it refuses is refused every time, never remembered."""
    http1._HTTP_AUTHORITIES.clear()
    for _ in range(2):
        for authority, want in (("h:1", ("h", 1)), ("h:2", ("h", 2)), ("H", ("h", 80)), ("[::1]:9", ("::1", 9))):
            assert http1._target_parts("GET", f"http://{authority}/x")[1:3] == want
            assert http1._HTTP_AUTHORITIES[authority] == want
    for bad in ("h:0", "a@h", "h:x"):
        for _ in range(2):
            with pytest.raises(http1.HttpError):
                http1._target_parts("GET", f"http://{bad}/")
        assert bad not in http1._HTTP_AUTHORITIES
    for i in range(5000):
        http1._target_parts("GET", f"http://h{i}/")
    assert len(http1._HTTP_AUTHORITIES) <= 4096


def test_a_tunnels_upstream_is_connected_as_a_pipe_conn() -> None:
    """The handler's CONNECT (`open_tunnel`) asks `connect` for a PipeConn (read into the scratch and
    piped to the client: a download's speed), where a plain-HTTP request asks for a plain Conn."""
    from services.proxy.upstream import UpstreamFailure

    asked: list[Any] = []

    async def connect(host: str, port: int, timeout: float, guard: Any, protocol: type[Conn] = Conn) -> Conn:
        asked.append(protocol)
        raise UpstreamFailure("refused", f"connection to {host}:{port} refused")

    async def main() -> bytes:
        gate = Gate(_Journal(), _Publisher(), {43051}, {"127.0.0.1"}, 1.0, 10)  # type: ignore[arg-type]
        ctx = ProxyContext(gate, Limits(idle_timeout=2.0, header_timeout=2.0))
        got = bytearray()
        client = ClientConn(ctx, http_proxy.handle_http)
        client.connection_made(Wire(client, got.extend))  # type: ignore[arg-type]
        head = http1.parse_request_head(b"CONNECT h.example:443 HTTP/1.1\r\nHost: h.example:443\r\n\r\n")[0]  # type: ignore[index]
        with mock.patch.object(http_proxy, "connect", connect):
            await http_proxy.open_tunnel(client, head, "c", Verdict(True, "rule", 1), lambda: None)
        return bytes(got)

    answer = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 502") and asked == [PipeConn]


@FUZZ
@given(st.text(alphabet=" \t:ab\xe9\r", max_size=12), st.integers(0, 14))
def test_value_at_is_strip_of_the_rest(line: str, start: int) -> None:
    """`_value_at(line, start)` (the parsers' reading of a field's value) is `line[start:].strip(" \\t")`."""
    assert http1._value_at(line, start) == line[start:].strip(" \t")


@FUZZ
@given(st.sampled_from(["keep-alive", "close", "Close", " close", "close, x", "", " ", "a,,b", "KEEP-ALIVE "]))
def test_split_tokens_of_the_usual_values(value: str) -> None:
    """The usual Connection values (`keep-alive`, `close`) are their own token, as the general reading gives."""
    want = [t.strip().lower() for t in value.split(",") if t.strip()]
    assert http1._split_tokens(value) == want


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["GET", "OPTIONS", "POST", "CONNECT"]), _TARGETS), min_size=1, max_size=6))
@example([("GET", "http://h.example"), ("OPTIONS", "http://h.example")])
@example([("GET", "http://h.example:443"), ("CONNECT", "h.example:443")])
def test_a_remembered_target_reads_as_a_new_one(requests: list[tuple[str, str]]) -> None:
    """Request heads read one after another (their targets' parts remembered, `http1._TARGETS`) give
    what each gives read alone: the same head or the same refusal, OPTIONS and CONNECT included."""

    def read(method: str, target: str) -> Any:
        raw = f"{method} {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode("latin-1")
        return outcome(http1.parse_request_head, raw, 65536, 100)

    alone = []
    for method, target in requests:
        http1._TARGETS.clear()
        alone.append(read(method, target))
    http1._TARGETS.clear()
    assert [read(m, t) for m, t in requests] == alone
    assert [read(m, t) for m, t in requests] == alone  # (now remembered)


def test_a_default_identity_is_one_string_per_address() -> None:
    """`default_identity` gives `unknown-<address>`, the same string object for the same address (the
    dicts keyed by identities then compare it by reference), bounded."""
    from services.proxy import context
    from services.proxy.context import ClientConn, default_identity

    def conn(ip: str) -> ClientConn:
        c = ClientConn.__new__(ClientConn)
        c.src_ip = ip
        return c

    a, b = default_identity(conn("10.0.0." + "1")), default_identity(conn("10.0.0." + "1"))
    assert a == "unknown-10.0.0.1" and a is b
    assert default_identity(conn("::1")) == "unknown-::1" and default_identity(conn("")) == "unknown-"
    for i in range(5000):
        assert default_identity(conn(f"10.1.{i // 256}.{i % 256}")) == f"unknown-10.1.{i // 256}.{i % 256}"
    assert len(context._DEFAULT_NAMES) <= 4096


@FUZZ
@given(
    st.frozensets(st.sampled_from(["host", "content-length", "x-a", "te", "close", "keep-alive"])),
    st.lists(st.sampled_from(["host", "content-length", "x-a", "te", "close", "keep-alive", "upgrade"]), max_size=4),
)
def test_names_dropped_is_the_set_reading(names: frozenset[str], tokens: list[str]) -> None:
    want = not (names.isdisjoint(tokens) or names.intersection(tokens) <= http1._NEVER_CONNECTION_DROPPED)
    assert http1._names_dropped(names, tokens) == want


@FUZZ
@given(st.lists(heads(_REQUEST_LINES), min_size=2, max_size=5), st.sampled_from(["1.1", "1.0"]))
@example(
    [
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX: 1\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\nx: 1\r\n\r\n",
        b"GET http://h/a HTTP/1.1\r\nHost: h\r\nx: 1\r\n\r\n",
        b"GET http://h:81/a HTTP/1.1\r\nHost: h\r\nx: 1\r\n\r\n",
        b"HEAD http://h:81/a HTTP/1.1\r\nHost: h\r\nx: 1\r\n\r\n",
        b"HEAD http://h:81/a HTTP/1.1\r\nHost: h\r\ny: 1\r\n\r\n",
    ],
    "1.1",
)
def test_heads_in_a_row_read_and_render_as_each_alone(raws: list[bytes], version: str) -> None:
    """Request heads parsed and rendered upstream one after another (the last head's field names and
    rendering remembered: `_LAST_NAMES`, `_LAST_RENDER`) give what each gives after a clean start."""

    def one(raw: bytes) -> Any:
        got = outcome(http1.parse_request_head, raw, 65536, 100)
        parsed = http1.parse_request_head(raw, 65536, 100) if isinstance(got, tuple) and len(got) == 2 else None
        return got, (parsed[0].render_upstream(version) if parsed is not None else None)

    alone = []
    for raw in raws:
        http1._LAST_NAMES[0] = http1._LAST_RENDER[0] = None
        alone.append(one(raw))
    assert [one(raw) for raw in raws] == alone


# Response heads byte by byte, mostly plain (`http1._PLAIN_RESPONSE_RE`), with the bytes a plain head
# must not hold mixed in: controls, DEL, obs-text, separators in names, bare CR or LF.
_PLAIN_STATUS_LINES = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200 ",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.1 101 Switching Protocols",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.1 103 Early Hints",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.0 101 Switching Protocols",
        b"HTTP/1.1 007 Odd",
        b"HTTP/1.1 20x OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.2 200 OK",
        b"HTTP/2.0 200 OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200\tOK",
        b"HTTP/1.1 200 \tO\tK",
        b"HTTP/1.1 200 O\x7fK",
        b"HTTP/1.1 200 O\x80K",
        b"HTTP/1.1 200 O\x00K",
        b"HTTP/1.1 200 O\rK",
    ]
)
_NAME_BYTES = st.sampled_from(
    [b"a", b"Z", b"0", b"-", b"!", b"~", b"|", b"`", b"{", b" ", b"\t", b"\x00", b"\x80", b"\x7f", b"/", b"\r"]
)
_VALUE_BYTES = st.sampled_from(
    [b"a", b" ", b"\t", b"~", b":", b'"', b"\x7f", b"\x80", b"\xff", b"\x00", b"\x01", b"\x0b", b"\x1f", b"\r", b"\n"]
)
_PLAIN_NAMES = st.sampled_from(
    [b"Content-Length", b"Transfer-Encoding", b"Connection", b"Content-Type", b"X-A", b"TE", b"Upgrade", b"Proxy-A"]
)
_PLAIN_VALUES = st.sampled_from(
    [b"5", b"0", b"chunked", b"gzip", b"keep-alive", b"close", b"upgrade", b"websocket", b"text/html", b" 1 ", b""]
)


@st.composite
def _byte_field(draw: Any) -> bytes:
    if draw(st.integers(0, 3)):  # mostly a plain field
        name, value = draw(_PLAIN_NAMES), draw(_PLAIN_VALUES)
    else:
        name = b"".join(draw(st.lists(_NAME_BYTES, max_size=4)))
        value = b"".join(draw(st.lists(_VALUE_BYTES, max_size=4)))
    return name + draw(st.sampled_from([b":", b": ", b" :", b":\t"])) + value


@st.composite
def _byte_heads(draw: Any) -> bytes:
    lines = [draw(_PLAIN_STATUS_LINES), *draw(st.lists(_byte_field(), max_size=5))]
    eols = [draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])) for _ in lines]
    return b"".join(line + eol for line, eol in zip(lines, eols)) + b"\r\n" + draw(st.sampled_from([b"", b"body"]))


@FUZZ
@given(_byte_heads())
@example(b"HTTP/1.1 200 OK\r\nX: a\x7fb\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nA{: b\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n")
@example(b"HTTP/1.1 200\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\n\rX: y\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\r\n\r\n")
@example(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nConnection:keep-alive\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nA: b\r\nConnection: keep-alive\r\n\r\n")
def test_a_plain_response_head_is_read_without_the_parser_as_with_it(raw: bytes) -> None:
    """A plain response head (`_PLAIN_RESPONSE_RE`) is read without the parser: the same head or the
    same error as the parser's callbacks give (its framing refused by the parser's words, the parser
    asked then); the compiled loop `_plain_end` takes exactly what the regex takes; and every plain
    head with sound framing is one the parser accepts."""
    end = http1._plain_end(raw, 65536)
    assert end == http1._plain_end_re(raw, 65536)
    assert end < 0 or end == raw.find(b"\r\n\r\n")
    for limit in (end - 1, end, end + 1):  # (the head's end counts as `parse_response_head` counts it)
        assert http1._plain_end(raw, limit) == http1._plain_end_re(raw, limit)
    plain = int(raw[9:12]) if end >= 0 else -1
    for method in ("GET", "HEAD"):
        with mock.patch.object(http1, "_COMPILED", True):  # (the plain reading as Python too: its loop)
            fast = outcome(http1.parse_response_head, raw, 65536, method)
        with long_way():
            slow = outcome(http1.parse_response_head, raw, 65536, method)
        assert fast == slow
    if plain >= 0 and plain != 101 and not isinstance(fast[0], str):  # type: ignore[index]
        parser = httptools.HttpResponseParser(object())
        try:
            parser.feed_data(raw[: end + 4])
        except httptools.HttpParserUpgrade:
            pass
        assert parser.get_status_code() == plain
    if end >= 0:  # incomplete: not plain (yet)
        assert http1._plain_end(raw[: end + 3], 65536) == http1._plain_end_re(raw[: end + 3], 65536) == -1


@FUZZ
@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"a", b"bcd", b"\r\r\n\n"]), max_size=12).map(
        b"".join
    ),
    st.integers(0, 40),
    st.integers(0, 60),
)
@example(b"\r\n\r\n", 0, 4)
@example(b"\r\n\r\n", 0, 3)
@example(b"x\r\n\r\n", 1, 5)
@example(b"\r\n\r\r\n\r\n", 0, 100)
@example(b"abcd\r\n\r\n", 0, 100)
@example(b"abcdefgh\r\n\r\n", 1, 100)
def test_head_end_is_find(buf: bytes, start: int, stop: int) -> None:
    """`_head_end` (the request head's end, found by a compiled loop) is `bytes.find` of CRLF CRLF."""
    assert http1._head_end(buf, start, stop) == buf.find(b"\r\n\r\n", start, stop)


def test_a_request_heads_names_say_what_their_set_says() -> None:
    """What `parse_request_head` remembers with the last head's names (`_names_facts`) is what the set
    of names says: a head with other names after it is read as a head alone."""
    plain = b"GET http://h.example/ HTTP/1.1\r\nHost: h.example\r\n\r\n"
    framed = b"GET http://h.example/ HTTP/1.1\r\nHost: h.example\r\nContent-Length: 2\r\n\r\nok"
    for first, second in ((plain, framed), (framed, plain), (plain, plain), (framed, framed)):
        http1._LAST_NAMES[0] = None
        http1.parse_request_head(first)
        got = outcome(http1.parse_request_head, second, 65536, 100)
        http1._LAST_NAMES[0] = None
        assert got == outcome(http1.parse_request_head, second, 65536, 100)
    for names in (frozenset({"host"}), frozenset({"host", "content-length"}), frozenset({"upgrade"}), frozenset()):
        facts = http1._names_facts(names)
        assert bool(facts & 1) == names.isdisjoint(http1._REUSE_BLOCKERS)
        assert bool(facts & 2) == names.isdisjoint(http1._REQUEST_FIELDS_BUT_CONNECTION)


def _origin_parts_as_before(
    method: str, target: str, version: str, headers: list[tuple[str, str]], scheme: str, host: str, port: int
) -> Any:
    """How a request inside a tunnel was read before `_origin_parts` (the regex first, every Host field
    collected, the authority split every time)."""
    if method == "CONNECT":
        raise http1.HttpError(405, "CONNECT inside a tunnel is not supported")
    if http1._SCHEME_RE.fullmatch(target):
        return http1._target_parts(method, target)
    if not (target.startswith("/") or (target == "*" and method == "OPTIONS")):
        raise http1.HttpError(400, "bad request target")
    hosts = [v for k, v in headers if k.lower() == "host"]
    if len(hosts) > 1:
        raise http1.HttpError(400, "more than one Host header")
    path = target.partition("#")[0]
    if hosts:
        h, p = http1._split_authority(hosts[0], False, http1._DEFAULT_PORTS.get(scheme, port))
        return scheme, h, p, path, hosts[0]
    if version == "1.0":
        default = http1._DEFAULT_PORTS.get(scheme)
        shown = f"[{host}]" if ":" in host else host
        return scheme, host, port, path, shown if port == default else f"{shown}:{port}"
    raise http1.HttpError(400, "missing Host header")


_HOST_VALUES = st.sampled_from(["a.example", "A.Example:8443", "[::1]", "[::1]:9", "u@a", "a:0", "a:x", "", "é.test"])


@FUZZ
@given(
    st.sampled_from(["GET", "OPTIONS", "CONNECT", "POST"]),
    st.one_of(_TARGETS, st.sampled_from(["/", "/a#f", "/a?b#c", "*", "a", "//x"])),
    st.sampled_from(["1.0", "1.1"]),
    st.lists(st.tuples(st.sampled_from(["Host", "host", "HOST", "Hosts", "X"]), _HOST_VALUES), max_size=3),
    st.sampled_from([("https", "t.example", 443), ("http", "10.0.0.1", 8080), ("https", "::1", 8443), ("ws", "w", 9)]),
    st.booleans(),
)
@example("GET", "/a", "1.1", [("Host", "a.example")], ("http", "t", 8080), True)
@example("GET", "/a", "1.1", [("Host", "a.example")], ("https", "t", 8443), True)  # same Host, other default
def test_a_request_in_a_tunnel_is_read_as_before(
    method: str,
    target: str,
    version: str,
    headers: list[tuple[str, str]],
    origin: tuple[str, str, int],
    twice: bool,
) -> None:
    """SPEC §15 / issue 18 item 1: `_origin_parts` (its Host value's reading remembered, the regex only for targets that may be
    absolute) gives the parts or the error the earlier reading gave; asked twice, the same again."""
    names = frozenset(k.lower() for k, _ in headers)

    def of(fn: Any, *a: Any) -> Any:
        try:
            return fn(*a)
        except http1.HttpError as exc:
            return (exc.status, str(exc))

    want = of(_origin_parts_as_before, method, target, version, headers, *origin)
    for _ in range(2 if twice else 1):
        assert of(http1._origin_parts, method, target, version, headers, names, *origin) == want
        assert of(http1._origin_parts, method, target, version, headers, None, *origin) == want


def test_a_host_value_in_a_tunnel_is_read_once_per_default_port_and_bounded() -> None:
    http1._ORIGIN_AUTHORITIES.clear()
    got = http1._origin_parts("GET", "/", "1.1", [("Host", "A.example")], frozenset({"host"}), "https", "t", 443)
    assert got == ("https", "a.example", 443, "/", "A.example")
    assert http1._ORIGIN_AUTHORITIES["A.example"] == (443, "a.example", 443)
    got = http1._origin_parts("GET", "/", "1.1", [("Host", "A.example")], frozenset({"host"}), "http", "t", 80)
    assert got[2] == 80 and http1._ORIGIN_AUTHORITIES["A.example"] == (80, "a.example", 80)
    with pytest.raises(http1.HttpError):
        http1._origin_parts("GET", "/", "1.1", [("Host", "a:0")], None, "https", "t", 443)
    assert "a:0" not in http1._ORIGIN_AUTHORITIES
    for i in range(5000):
        http1._origin_parts("GET", "/", "1.1", [("Host", f"h{i}")], None, "https", "t", 443)
    assert len(http1._ORIGIN_AUTHORITIES) <= 4096
