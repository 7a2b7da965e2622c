"""Sans-I/O pieces of interception: the "is this HTTP?" peek, origin-form request heads, and the
BodyReader's payload sink used for capture."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.proxy.http1 import BodyReader, HttpError, parse_request_head
from services.proxy.mitm import MAX_PEEK, http_state, settled_state
from harness.fuzz import examples

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    "data,state",
    [
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"POST /v1/messages?x=1 HTTP/1.0\r\nHost: a\r\n", "http"),
        (b"OPTIONS * HTTP/1.1\n", "http"),
        (b"G", "more"),
        (b"GET", "more"),
        (b"GET /a", "more"),
        (b"GET /a HTT", "more"),
        (b"GET /a HTTP/1.1\r", "more"),
        (b"GET /a XTTP", "more"),  # (a space may be inside the target: only the line's end says)
        (b"SET k v\r\n", "other"),
        (b"PING\r\n", "other"),
        (b"SSH-2.0-OpenSSH_9.6 Ubuntu-3\r\n", "other"),
        (b"RTSP/1.0 200 OK\r\n", "other"),  # (a status line: no method)
        (b"GET rtsp://x/ RTSP/1.0\r\n", "http"),  # node's parser serves RTSP/ lines: the proxy's refuses
        (b"\x16\x03\x01", "other"),
        (b" GET / HTTP/1.1\r\n", "http"),  # Python's http.server strips whitespace before the method
        (b"\t\x0bGET / HTTP/1.1\r\n", "http"),
        (b"GET /a XTTP/1.1\r\n", "other"),
        (b"GET  HTTP/1.1\r\n", "other"),  # no target
        # What origin servers read as a request, though this proxy's parser would refuse it: HTTP, so
        # the request path answers it (400, 505) instead of piping it to the origin unrecorded.
        (b"get / HTTP/1.1\r\n", "http"),
        (b"GET / HTTP/2.0\r\n", "http"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http"),
        (b"\r\nGET / HTTP/1.1\r\n", "http"),
        (b"\r\n\r\n\nGET / HTTP/1.1\r\n", "http"),
        (b"\r\n", "more"),
        (b"GET  /a  HTTP/1.1  \r\n", "http"),
        (b"GET /a b HTTP/1.1\r\n", "http"),
        ("GET /\u00fc HTTP/1.1\r\n".encode(), "http"),
        (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n", "http"),
        (b"GET / HTTP/1.10\r\n", "http"),  # Python's http.server and Go take a two-digit minor
        (b"GET\t/secret\tHTTP/1.1\r\n", "http"),  # ... and tabs between the words
        (b"GET /x HTTP/1.1\t\r\n", "http"),
        (b"GET /x\r\n", "http"),  # HTTP/0.9 (nginx serves it)
        (b"GET key\r\n", "other"),
        # (outside tester B, again) Python's str.split() separators, HTTP/0.9 with an absolute URI,
        # what node's parser serves, a PROXY protocol header (v1, v2) before a request
        (b"GET\x1c/secret.txt\x1cHTTP/1.1\r\n", "http"),
        (b"\x1fGET / HTTP/1.1\r\n", "http"),
        (b"GET\xa0/ HTTP/1.1\r\n", "http"),
        (b"GET\x85/ HTTP/1.1\r\n", "http"),
        (b"GET http://h/index.html\r\n", "http"),
        (b"GET /n RTSP/1.0\r\n", "http"),
        (b"SOURCE /n ICE/1.0\r\n", "http"),
        (b"PROXY TCP4 10.9.9.9 127.0.0.1 1234 80\r\nGET / HTTP/1.1\r\n", "http"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c", "http"),
        (b"\r\n\r\n\x00", "more"),
        (b"SET /x\r\n", "other"),
        (b"GET /" + b"a" * (MAX_PEEK - 5), "http"),  # longer than the look: the request path reads it
        (b"\r\n" * (MAX_PEEK // 2), "other"),  # no method in 8 KiB
        (b"0032git-upload-pack /repo.git\x00host=x\x00", "other"),  # at once: git waits for the server
        (b"GET /a\x00" + b"a" * MAX_PEEK, "other"),  # begun, then a control byte: not a request line
        (b"0032git-upload-pack /repo.git\x00host=x\x00" + b"a" * MAX_PEEK, "other"),
        (b"", "other"),
    ],
)
def test_http_state(data: bytes, state: str) -> None:
    assert http_state(data) == state


@pytest.mark.parametrize(
    "data,state",
    [
        (b"GET /a", "http"),  # begun, left unfinished: the request path reads it (408, 400)
        (b"G", "http"),
        (b"GET /x HTTP/1.1", "http"),  # a last line with no LF, then EOF: Python's http.server serves it
        (b"\r\n", "other"),  # no method
        (b"0032git-upload-pack /repo.git\x00host=127.0.0.2\x00", "other"),  # git waits with no LF
        (b"get /a", "other"),  # not a method as HTTP's are
        (b"GET /a\x01", "other"),
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"", "other"),
        (b"\x16\x03\x01\x02", "other"),  # a TLS record cut short
        (b"PING\r\n", "other"),
        (b"SSH-2.0-x y\r\n", "other"),
    ],
)
def test_settled_state_at_the_first_messages_deadline(data: bytes, state: str) -> None:
    assert settled_state(data) == state
    assert settled_state(bytearray(data)) == state


@given(
    st.sampled_from([b"GET", b"POST", b"DELETE", b"M-SEARCH"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/?=&%.-_", min_size=1, max_size=60).map(str.encode),
    st.sampled_from([b"1.0", b"1.1"]),
    st.sampled_from([b"\r\n", b"\n"]),
)
@FUZZ
def test_every_prefix_of_a_request_line_waits(method: bytes, target: bytes, version: bytes, eol: bytes) -> None:
    line = method + b" /" + target + b" HTTP/" + version + eol
    for i in range(1, len(line)):
        assert http_state(line[:i]) == "more", line[:i]
    assert http_state(line) == "http"


@given(st.binary(max_size=200))
@FUZZ
def test_http_state_is_total(data: bytes) -> None:
    assert http_state(data) in ("http", "other", "more")


# What `http_state` reads, written another way: empty lines and whitespace, a method of token
# characters, then up to the line's LF (within MAX_PEEK) words split on whitespace as Python's
# str.split() splits latin-1 text, the last beginning `HTTP/`, `RTSP/` or `ICE/` with one between,
# or `GET /...` / `GET http://...` alone (HTTP/0.9); a PROXY protocol header.
_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_WS_BYTES = bytes(c for c in range(256) if chr(c).isspace())  # str.split()'s, on latin-1 text
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def _begun_model(head: bytes) -> bool:
    """An unfinished first line begun as HTTP's: whitespace, an upper-case method, printable bytes."""
    rest = head.lstrip(b" \t\n\r\x0b\x0c")
    method = re.match(rb"[A-Z_-]+", rest)
    if method is None:
        return False
    after = rest[method.end() :]
    if after and after[:1] not in (b" ", b"\t", b"\x0b", b"\x0c", b"\r"):
        return False
    return not any(c < 9 or 14 <= c < 32 or c == 127 for c in after)


def _http_state_by_regex(buf: bytes) -> str:
    head = buf[:MAX_PEEK]
    if not head:
        return "other"
    if head.startswith(_PROXY_V2):
        return "http"
    if _PROXY_V2.startswith(head):
        return "more"
    # still a request line's start: wait, or past the look read it when it is begun as HTTP's are
    begun = ("http" if _begun_model(head) else "other") if len(buf) >= MAX_PEEK else "more"
    rest = head.lstrip(_WS_BYTES)
    if not rest:
        return begun
    method = re.match(_TCHAR + rb"+", rest)
    if method is None:
        return "other"
    if method.end() == len(rest):
        return begun
    if rest[method.end()] not in _WS_BYTES or rest[method.end()] == 0x0A:
        return "other"
    nl = rest.find(b"\n", method.end())
    odd = re.fullmatch(rb"[A-Z_-]+", method.group()) is None
    if odd and any(c < 9 or 14 <= c < 32 or c == 127 for c in rest[method.end() : None if nl < 0 else nl]):
        return "other"  # a control byte after a method unlike HTTP's
    if nl < 0:
        return begun
    if method.group() == b"PROXY":
        return "http"
    words = rest[:nl].decode("latin-1").split()
    if len(words) >= 3:
        last = words[-1]
        return "http" if any(last.startswith(v) and len(last) > len(v) for v in ("HTTP/", "RTSP/", "ICE/")) else "other"
    if len(words) == 2:
        return "http" if words[0] == "GET" and (words[1].startswith("/") or "://" in words[1]) else "other"
    return "other"


_LINES = [
    b"GET / HTTP/1.1\r\n",
    b"M-SEARCH * HTTP/1.0\n",
    b"ABCDEFGHIJKLMNOPQRSTU x HTTP/1.1\n",
    b"\r\nGET  /a b  HTTP/1.1 \r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET  HTTP/1.1\r\n",  # no target
    b"OPTIONS * HTTP/1.1\r\n\r\n",
    b"GET /" + b"a" * (MAX_PEEK - 20) + b" HTTP/1.1\r\n",  # its LF within MAX_PEEK
    b"GET /" + b"a" * (MAX_PEEK - 10) + b" HTTP/1.1\r\n",  # past it
]
# bytes that make or break a request line where they land
_BYTES = st.sampled_from(b"GETPOHX_-a/ \t\x0b\x1c\xa0\x85\r\n01.~!\x7f\x00\x16\xc3g2:")


@st.composite
def _near_request_lines(draw: st.DrawFn) -> bytes:
    """A request line (or its start), a few bytes inserted, replaced or dropped, maybe cut short."""
    data = bytearray(draw(st.sampled_from(_LINES)))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "drop", "cut"]))
        if op == "insert":
            data[i:i] = bytes([draw(_BYTES)])
        elif op == "replace" and i < len(data):
            data[i] = draw(_BYTES)
        elif op == "drop" and i < len(data):
            del data[i]
        elif op == "cut":
            del data[i:]
    return bytes(data)


@given(st.one_of(_near_request_lines(), st.lists(_BYTES, max_size=40).map(bytes), st.binary(max_size=60)))
@FUZZ
def test_http_state_reads_what_the_regular_expressions_say(data: bytes) -> None:
    """Read byte by byte, a request line (and every prefix of one) is what the regular expressions said,
    from bytes or a bytearray (the connections' buffers)."""
    want = _http_state_by_regex(data)
    assert http_state(data) == want
    assert http_state(bytearray(data)) == want


def _parse(raw: bytes, origin=("https", "api.example.com", 443)):  # noqa: ANN001, ANN202
    got = parse_request_head(raw, origin=origin)
    assert got is not None
    return got[0]


def test_origin_form_takes_host_header() -> None:
    head = _parse(b"GET /v1/models?x=1 HTTP/1.1\r\nHost: API.example.com\r\nAccept: */*\r\n\r\n")
    assert (head.scheme, head.host, head.port, head.path) == ("https", "api.example.com", 443, "/v1/models?x=1")
    assert head.upstream_headers()[0] == ("Host", "API.example.com")
    head = _parse(b"GET / HTTP/1.1\r\nHost: 127.0.0.2:8443\r\n\r\n")
    assert (head.host, head.port, head.authority) == ("127.0.0.2", 8443, "127.0.0.2:8443")


def test_origin_form_http10_without_host_uses_the_tunnel() -> None:
    head = _parse(b"GET /x HTTP/1.0\r\n\r\n", origin=("http", "10.0.0.1", 8080))
    assert (head.host, head.port, head.authority) == ("10.0.0.1", 8080, "10.0.0.1:8080")
    head = _parse(b"GET /x HTTP/1.0\r\n\r\n", origin=("https", "::1", 443))
    assert head.authority == "[::1]"


def test_absolute_form_is_accepted_towards_an_origin() -> None:
    head = _parse(b"GET https://api.example.com/a HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert (head.host, head.path) == ("api.example.com", "/a")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /a HTTP/1.1\r\n\r\n",  # no Host in 1.1
        b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET a HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
    ],
)
def test_origin_form_rejects(raw: bytes) -> None:
    with pytest.raises(HttpError):
        parse_request_head(raw, origin=("https", "a", 443))


def test_without_origin_the_proxy_forms_are_unchanged() -> None:
    with pytest.raises(HttpError):
        parse_request_head(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")  # a forward proxy needs absolute-form


def test_body_reader_sink_gets_payload_without_chunk_framing() -> None:
    seen = bytearray()
    r = BodyReader(None, chunked=True, sink=seen.extend)
    wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT"
    out = bytearray()
    for i in range(0, len(wire), 3):  # any split
        data, rest, done = r.feed(wire[i : i + 3])
        out += data
        if done:
            break
    assert bytes(seen) == b"hello world"
    assert bytes(out) + rest == wire[: len(out) + len(rest)]
    seen.clear()
    data, rest, done = BodyReader(4, chunked=False, sink=seen.extend).feed(b"abcdef")
    assert (data, rest, done, bytes(seen)) == (b"abcd", b"ef", True, b"abcd")
    seen.clear()
    BodyReader(None, chunked=False, until_close=True, sink=seen.extend).feed(b"stream")
    assert bytes(seen) == b"stream"
