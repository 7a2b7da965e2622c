"""Sans-I/O protocol code of the proxy: HTTP/1.x heads and bodies, SOCKS5 handshakes."""

from __future__ import annotations

import base64
import ipaddress
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.proxy.http1 import (
    BodyReader,
    HttpError,
    RequestHead,
    UpstreamError,
    parse_basic_user,
    parse_request_head,
    parse_response_head,
    render_request_head,
    render_response,
    render_response_head,
)
from services.proxy.socks5 import (
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_GENERAL_FAILURE,
    REP_SUCCEEDED,
    Socks5Server,
    SocksError,
)
from harness.fuzz import examples

FUZZ = settings(max_examples=examples(300), deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def req(first_line: str, *headers: str, body: bytes = b"") -> bytes:
    return ("\r\n".join((first_line, *headers)) + "\r\n\r\n").encode("latin-1") + body


def parse(raw: bytes, **kw: int) -> RequestHead:
    got = parse_request_head(raw, **kw)
    assert got is not None, "head should be complete"
    return got[0]


def status_of(raw: bytes, **kw: int) -> int:
    with pytest.raises(HttpError) as info:
        parse_request_head(raw, **kw)
    return info.value.status


# ============================================================================ request targets


@pytest.mark.parametrize(
    ("target", "host", "port", "scheme", "path"),
    [
        ("http://example.com/a?b=1", "example.com", 80, "http", "/a?b=1"),
        ("http://Example.COM:8080", "example.com", 8080, "http", "/"),
        ("http://example.com?q=1", "example.com", 80, "http", "/?q=1"),
        ("http://example.com/x#frag", "example.com", 80, "http", "/x"),
        ("http://example.com:/", "example.com", 80, "http", "/"),
        ("HTTP://example.com/", "example.com", 80, "http", "/"),
        ("https://secure.example/login", "secure.example", 443, "https", "/login"),
        ("https://secure.example:8443/", "secure.example", 8443, "https", "/"),
        ("http://10.0.0.1:3128/p", "10.0.0.1", 3128, "http", "/p"),
        ("http://[2001:DB8:0:0::1]:8443/p", "2001:db8::1", 8443, "http", "/p"),
        ("http://[::1]/", "::1", 80, "http", "/"),
        ("http://under_score.example./", "under_score.example.", 80, "http", "/"),
        ("http://0xfeed.example/", "0xfeed.example", 80, "http", "/"),
        ("http://1.2.3.4./", "1.2.3.4", 80, "http", "/"),
    ],
)
def test_absolute_form_targets(target: str, host: str, port: int, scheme: str, path: str) -> None:
    head = parse(req(f"GET {target} HTTP/1.1", "Host: ignored"))
    assert (head.method, head.target, head.version) == ("GET", target, "1.1")
    assert (head.host, head.port, head.scheme, head.path) == (host, port, scheme, path)


def test_options_without_path_becomes_asterisk() -> None:
    assert parse(req("OPTIONS http://example.com:81 HTTP/1.1")).path == "*"
    assert parse(req("OPTIONS http://example.com:81/x HTTP/1.1")).path == "/x"


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("example.com:443", "example.com", 443),
        ("EXAMPLE.com:8443", "example.com", 8443),
        ("93.184.216.34:443", "93.184.216.34", 443),
        ("[::1]:443", "::1", 443),
        ("[2001:db8:0:0:0:0:0:1]:22", "2001:db8::1", 22),
        ("host:65535", "host", 65535),
        ("host:1", "host", 1),
    ],
)
def test_connect_targets(target: str, host: str, port: int) -> None:
    head = parse(req(f"CONNECT {target} HTTP/1.1", f"Host: {target}"))
    assert (head.method, head.host, head.port, head.scheme, head.path) == ("CONNECT", host, port, "", "")
    assert head.upgrade is None


@pytest.mark.parametrize(
    ("first_line", "detail"),
    [
        ("GET /index.html HTTP/1.1", "absolute URI required"),
        ("OPTIONS * HTTP/1.1", "absolute URI required"),
        ("GET ftp://example.com/ HTTP/1.1", "unsupported scheme"),
        ("GET ws://example.com/ HTTP/1.1", "unsupported scheme"),
        ("GET http://user:pw@example.com/ HTTP/1.1", "userinfo"),
        ("GET http://example.com:0/ HTTP/1.1", "bad port"),
        ("GET http://example.com:65536/ HTTP/1.1", "bad port"),
        ("GET http://example.com:123456/ HTTP/1.1", "bad port"),
        ("GET http://:80/ HTTP/1.1", "missing host"),
        ("GET http://127.1/ HTTP/1.1", "bad host"),
        ("GET http://2130706433/ HTTP/1.1", "bad host"),
        ("GET http://010.0.0.1/ HTTP/1.1", "bad host"),
        ("GET http://0x7f.0.0.1/ HTTP/1.1", "bad host"),
        ("GET http://foo.0x/ HTTP/1.1", "bad host"),
        ("GET http://a..b/ HTTP/1.1", "bad host"),
        ("GET http://[::1/ HTTP/1.1", ""),
        ("GET http://[v1.x]/ HTTP/1.1", ""),
        ("CONNECT example.com HTTP/1.1", "host:port"),
        ("CONNECT example.com: HTTP/1.1", "host:port"),
        ("CONNECT example.com:0 HTTP/1.1", "bad port"),
        ("CONNECT example.com:99999 HTTP/1.1", "bad port"),
        ("CONNECT example.com:https HTTP/1.1", "bad port"),
        ("CONNECT :443 HTTP/1.1", "missing host"),
        ("CONNECT [::1] HTTP/1.1", "host:port"),
        ("CONNECT [::1]x:443 HTTP/1.1", "junk"),
        ("CONNECT user@example.com:443 HTTP/1.1", "userinfo"),
        ("CONNECT http://example.com:443 HTTP/1.1", ""),
    ],
)
def test_bad_targets_are_400(first_line: str, detail: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_request_head(req(first_line, "Host: x"))
    assert info.value.status == 400
    assert info.value.reason == "Bad Request"
    assert detail in str(info.value)


# ============================================================================ derived fields


@pytest.mark.parametrize(
    ("version", "headers", "keep_alive"),
    [
        ("1.1", (), True),
        ("1.1", ("Connection: close",), False),
        ("1.1", ("Connection: Keep-Alive, CLOSE",), False),
        ("1.1", ("Connection: keep-alive",), True),
        ("1.0", (), False),
        ("1.0", ("Connection: keep-alive",), True),
        ("1.0", ("Connection: Keep-Alive",), True),
        ("1.0", ("Connection: x-foo", "Connection: keep-alive"), True),
        ("1.0", ("Connection: keep-alive, close",), False),
        ("1.0", ("Proxy-Connection: keep-alive",), False),
    ],
)
def test_keep_alive_rules(version: str, headers: tuple[str, ...], keep_alive: bool) -> None:
    head = parse(req(f"GET http://example.com/ HTTP/{version}", *headers))
    assert head.version == version
    assert head.keep_alive is keep_alive


def test_framing_fields() -> None:
    head = parse(req("POST http://e.com/ HTTP/1.1", "Content-Length: 12", "Expect: 100-Continue"))
    assert (head.content_length, head.chunked, head.expect_continue) == (12, False, True)
    head = parse(req("POST http://e.com/ HTTP/1.1", "Transfer-Encoding:  Chunked "))
    assert (head.content_length, head.chunked, head.expect_continue) == (None, True, False)
    assert status_of(req("POST http://e.com/ HTTP/1.1", "Transfer-Encoding: gzip, Chunked")) == 400  # exactly chunked
    head = parse(req("GET http://e.com/ HTTP/1.1"))
    assert (head.content_length, head.chunked) == (None, False)


def test_header_lookup_and_value_stripping() -> None:
    head = parse(req("GET http://e.com/ HTTP/1.1", "X-Thing:   padded value \t", "x-thing: second", "Empty:"))
    assert head.headers == [("X-Thing", "padded value"), ("x-thing", "second"), ("Empty", "")]
    assert head.header("X-THING") == "padded value"
    assert head.header("empty") == ""
    assert head.header("missing") is None


def test_upgrade_requires_connection_upgrade() -> None:
    head = parse(req("GET http://e.com/chat HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade"))
    assert head.upgrade == "websocket"
    assert head.upstream_headers() == [("Host", "e.com"), ("Upgrade", "websocket"), ("Connection", "upgrade")]
    head = parse(req("GET http://e.com/chat HTTP/1.1", "Upgrade: websocket"))
    assert head.upgrade is None
    assert head.upstream_headers() == [("Host", "e.com")]


# ============================================================================ Proxy-Authorization


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("value", "user"),
    [
        (basic("agent1:secret"), "agent1"),
        (basic("agent1:"), "agent1"),
        (basic("agent1:pa:ss:word"), "agent1"),
        (basic("äg€nt:x"), "äg€nt"),
        ("basic " + base64.b64encode(b"lower:x").decode(), "lower"),
        ("BASIC   " + base64.b64encode(b"spaced:x").decode(), "spaced"),
        (basic("proxy:secret"), None),
        (basic(":secret"), None),
        (basic("nocolon"), None),
        (basic("tab\tname:x"), None),
        ("Basic !!!notbase64", None),
        # not UTF-8: latin-1 (python-requests and pip encode Basic credentials so), still printable only
        ("Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "ÿþ"),
        ("Basic " + base64.b64encode("ü-agent:x".encode("latin-1")).decode(), "ü-agent"),
        ("Basic " + base64.b64encode(b"\x85a:x").decode(), None),
        # the reserved namespace of unnamed clients (unknown-<ip>): names no one, as 'proxy'
        (basic("unknown-10.9.9.9:x"), None),
        (basic("unknown-:x"), None),
        (basic("Unknown-10.9.9.9:x"), "Unknown-10.9.9.9"),
        ("Bearer " + base64.b64encode(b"agent1:x").decode(), None),
        ("", None),
        ("Basic", None),
    ],
)
def test_parse_basic_user(value: str, user: str | None) -> None:
    assert parse_basic_user(value) == user


def test_proxy_user_extracted_and_password_not_kept() -> None:
    cred = basic("agent7:hunter2")
    head = parse(req("GET http://e.com/ HTTP/1.1", f"Proxy-Authorization: {cred}"))
    assert head.proxy_user == "agent7"
    assert head.header("Proxy-Authorization") == "[redacted]"
    assert "hunter2" not in repr(head) and cred.split()[1] not in repr(head)
    assert all(k.lower() != "proxy-authorization" for k, _ in head.upstream_headers())


def test_proxy_user_absent() -> None:
    assert parse(req("GET http://e.com/ HTTP/1.1")).proxy_user is None
    assert parse(req("GET http://e.com/ HTTP/1.1", f"Proxy-Authorization: {basic('proxy:x')}")).proxy_user is None


# ============================================================================ upstream headers


def test_hop_by_hop_removal() -> None:
    head = parse(
        req(
            "POST http://api.example:8080/v1?x=1 HTTP/1.1",
            "Host: evil.example",
            "User-Agent: t/1",
            "Connection: keep-alive, X-Secret, Content-Length, Transfer-Encoding, Host",
            "Keep-Alive: timeout=5",
            "Proxy-Connection: keep-alive",
            f"Proxy-Authorization: {basic('a:b')}",
            "Proxy-Authenticate: Basic",
            "Proxy-Custom: 1",
            "TE: trailers",
            "Trailer: X-Checksum",
            "X-Secret: dropped",
            "Upgrade: h2c",
            "Transfer-Encoding: chunked",
            "Accept: */*",
        )
    )
    assert head.upgrade is None
    assert head.upstream_headers() == [
        ("Host", "api.example:8080"),
        ("User-Agent", "t/1"),
        ("Transfer-Encoding", "chunked"),
        ("Accept", "*/*"),
    ]
    wire = render_request_head(head.method, head.path, "1.1", head.upstream_headers())
    assert wire == (
        b"POST /v1?x=1 HTTP/1.1\r\nHost: api.example:8080\r\nUser-Agent: t/1\r\n"
        b"Transfer-Encoding: chunked\r\nAccept: */*\r\n\r\n"
    )


def test_host_header_added_when_missing_and_replaces_client_host() -> None:
    head = parse(req("GET http://[::1]:8080/ HTTP/1.0", "Content-Length: 0"))
    assert head.upstream_headers() == [("Host", "[::1]:8080"), ("Content-Length", "0")]
    head = parse(req("GET http://a.example/ HTTP/1.1", "host: b.example", "HOST: c.example"))
    assert head.upstream_headers() == [("Host", "a.example")]


# ============================================================================ smuggling and limits


@pytest.mark.parametrize(
    "headers",
    [
        ("Content-Length: 5", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: chunked", "Content-Length: 5"),
        ("Content-Length: 5", "Content-Length: 6"),
        ("Content-Length: 5", "Content-Length: 5"),
        ("Content-Length: 5, 5",),
        ("Content-Length: +5",),
        ("Content-Length: -1",),
        ("Content-Length: 0x10",),
        ("Content-Length: 99999999999999999999999",),
        ("Transfer-Encoding: gzip",),
        ("Transfer-Encoding: chunked, gzip",),
        ("Transfer-Encoding: gzip, chunked",),
        ("Transfer-Encoding: gzip", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: identity",),
        ("Content-Length : 5",),
        ("Transfer-Encoding : chunked",),
        ("X\x00A: b",),
        ("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: chunked, chunked",),
        ("Transfer-Encoding: xchunked",),
        ("Transfer-Encoding:",),
        ("X-A: one", " folded"),
        ("X-A: one", "\tfolded"),
        (" X-Leading: space",),
        ("X-A: a\x00b",),
        ("X-A: a\rb",),
        ("X-A: a\nb",),
        ("Bad Name: x",),
        ("Bad@Name: x",),
        (": no-name",),
        ("X-A x",),
    ],
)
def test_ambiguous_or_malformed_heads_are_400(headers: tuple[str, ...]) -> None:
    assert status_of(req("POST http://e.com/ HTTP/1.1", *headers)) == 400


def test_transfer_encoding_in_http10_is_400() -> None:
    assert status_of(req("POST http://e.com/ HTTP/1.0", "Transfer-Encoding: chunked")) == 400


def test_bare_lf_head_is_400() -> None:
    assert status_of(b"GET http://e.com/ HTTP/1.1\nHost: e.com\n\n") == 400


@pytest.mark.parametrize(
    ("first_line", "status"),
    [
        ("GET http://e.com/ HTTP/2.0", 505),
        ("GET http://e.com/ HTTP/0.9", 505),
        ("GET http://e.com/ HTTP/1.2", 400),
        ("GET http://e.com/ HTTP/9.9", 400),
        ("GET http://e.com/ FTP/1.1", 400),
    ],
)
def test_versions(first_line: str, status: int) -> None:
    assert status_of(req(first_line)) == status


def test_http2_preface_is_505() -> None:
    assert status_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == 505


def test_non_http_garbage_fails_before_the_limit() -> None:
    # A TLS ClientHello sent to the plain proxy port: refused at once, not after 64 KiB.
    assert status_of(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") == 400


def test_one_mib_request_line_is_414() -> None:
    assert status_of(b"GET http://e.com/" + b"a" * (1 << 20)) == 414
    assert status_of(b"GET http://e.com/" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n") == 414


def test_request_line_just_over_small_limit_is_414() -> None:
    line = b"GET http://e.com/" + b"a" * 100
    assert status_of(line, max_header_bytes=64) == 414


def test_oversized_headers_are_431() -> None:
    big = [f"X-Pad-{i}: {'v' * 1000}" for i in range(70)]
    raw = req("GET http://e.com/ HTTP/1.1", *big)
    assert status_of(raw) == 431  # complete but too large
    assert status_of(raw[:-4]) == 431  # still incomplete, already too large
    assert parse_request_head(raw, max_header_bytes=len(raw)) is not None


def test_two_hundred_headers_are_431() -> None:
    headers = [f"X-H{i}: v" for i in range(200)]
    raw = req("GET http://e.com/ HTTP/1.1", *headers)
    assert status_of(raw) == 431
    assert status_of(raw[:-2]) == 431  # counted before the head completes too
    assert len(parse(req("GET http://e.com/ HTTP/1.1", *headers[:100])).headers) == 100


def test_status_reasons() -> None:
    for raw, status, reason in [
        (b"GET /x HTTP/1.1\r\n\r\n", 400, "Bad Request"),
        (b"GET http://e.com/" + b"a" * 70000, 414, "URI Too Long"),
        (req("GET http://e.com/ HTTP/2.0"), 505, "HTTP Version Not Supported"),
    ]:
        with pytest.raises(HttpError) as info:
            parse_request_head(raw)
        assert (info.value.status, info.value.reason) == (status, reason)
    assert HttpError(431).reason == "Request Header Fields Too Large"
    assert str(HttpError(400, "incomplete request")) == "incomplete request"


# ============================================================================ buffering


def test_incomplete_heads_return_none_at_every_prefix() -> None:
    raw = req("GET http://e.com/path HTTP/1.1", "Host: e.com", "Accept: */*")
    for i in range(len(raw)):
        assert parse_request_head(raw[:i]) is None, i
    head, n = parse_request_head(raw)  # type: ignore[misc]
    assert n == len(raw) and head.path == "/path"


def test_consumed_count_and_following_bytes() -> None:
    body = b"hello"
    raw = req("POST http://e.com/ HTTP/1.1", "Content-Length: 5", body=body) + b"GET http://e.com/2 HTTP/1.1\r\n\r\n"
    head, n = parse_request_head(raw)  # type: ignore[misc]
    assert raw[n : n + 5] == body
    nxt, m = parse_request_head(raw[n + 5 :])  # type: ignore[misc]
    assert nxt.path == "/2" and n + 5 + m == len(raw)


def test_leading_blank_lines_are_skipped_and_counted() -> None:
    raw = b"\r\n\r\n" + req("GET http://e.com/ HTTP/1.1")
    head, n = parse_request_head(raw)  # type: ignore[misc]
    assert (head.host, n) == ("e.com", len(raw))
    assert parse_request_head(b"\r\n") is None


def test_connect_with_early_data() -> None:
    raw = req("CONNECT e.com:443 HTTP/1.1", "Host: e.com:443") + b"\x16\x03\x01"
    head, n = parse_request_head(raw)  # type: ignore[misc]
    assert raw[n:] == b"\x16\x03\x01" and head.port == 443


# ============================================================================ BodyReader


def chunked_message() -> bytes:
    return (
        b"5\r\nhello\r\n"
        b'1a;name=value;x="q"\r\nabcdefghijklmnopqrstuvwxyz\r\n'
        b"A \t;ext\r\n0123456789\r\n"
        b"0\r\nX-Trailer: yes\r\nX-Other:\r\n\r\n"
    )


def run_reader(reader: BodyReader, pieces: list[bytes]) -> tuple[bytes, bytes, list[bool]]:
    fwd, rest, dones = b"", b"", []
    for piece in pieces:
        a, b, done = reader.feed(piece)
        fwd += a
        rest += b
        dones.append(done)
    return fwd, rest, dones


def test_chunked_split_at_every_position() -> None:
    msg, tail = chunked_message(), b"NEXT REQUEST"
    data = msg + tail
    for i in range(len(data) + 1):
        fwd, rest, dones = run_reader(BodyReader(None, True), [data[:i], data[i:]])
        assert (fwd, rest) == (msg, tail), i
        assert dones[-1] is True
        assert dones[0] is (i >= len(msg)), i


def test_chunked_split_at_every_pair_of_positions() -> None:
    msg = chunked_message()
    for i in range(len(msg) + 1):
        for j in range(i, len(msg) + 1, 3):
            fwd, rest, dones = run_reader(BodyReader(None, True), [msg[:i], msg[i:j], msg[j:]])
            assert (fwd, rest, dones[-1]) == (msg, b"", True), (i, j)


def test_chunked_byte_by_byte_done_exactly_at_end() -> None:
    msg = chunked_message()
    reader = BodyReader(None, True)
    for i, byte in enumerate(msg):
        fwd, rest, done = reader.feed(bytes([byte]))
        assert (fwd, rest) == (bytes([byte]), b"")
        assert done is (i == len(msg) - 1)
    assert reader.feed(b"more") == (b"", b"more", True)


def test_chunked_minimal_and_leading_zeros() -> None:
    assert BodyReader(None, True).feed(b"0\r\n\r\nX") == (b"0\r\n\r\n", b"X", True)
    assert BodyReader(None, True).feed(b"0003\r\nabc\r\n00\r\n\r\n") == (b"0003\r\nabc\r\n00\r\n\r\n", b"", True)


@pytest.mark.parametrize(
    "data",
    [
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after size
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after data
        b"5\r\nhelloXX0\r\n\r\n",  # data longer than declared
        b"5\r\nhel\r\n0\r\n\r\n",  # data shorter: CRLF counted as data, then junk
        b"g\r\n",  # not hex
        b"-1\r\n",  # negative
        b"\r\n",  # empty size
        b"5 \r\nhello\r\n",  # whitespace without an extension
        b" 5\r\nhello\r\n",  # leading whitespace
        b"5\r\r\nhello\r\n",  # stray CR
        b"5;a\x00b\r\nhello\r\n",  # control byte in extension
        b"11111111111111111\r\n",  # 17 hex digits
        b"1" + b";" * 5000 + b"\r\n",  # size line too long
        b"0\r\nbad trailer\r\n\r\n",  # trailer is not a field
        b"0\r\nX: y\nZ: w\r\n\r\n",  # bare LF in trailers
    ],
)
def test_malformed_chunked_is_400(data: bytes) -> None:
    reader = BodyReader(None, True)
    with pytest.raises(HttpError) as info:
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
    assert info.value.status == 400
    with pytest.raises(HttpError):
        BodyReader(None, True).feed(data)


def test_endless_size_line_fails_without_newline() -> None:
    reader = BodyReader(None, True)
    with pytest.raises(HttpError):
        for _ in range(10):
            reader.feed(b"0" * 1000)


def test_content_length_body() -> None:
    reader = BodyReader(10, False)
    assert reader.feed(b"12345") == (b"12345", b"", False)
    assert reader.feed(b"67890GET") == (b"67890", b"GET", True)
    assert reader.feed(b"x") == (b"", b"x", True)


def test_empty_bodies_are_done_at_once() -> None:
    assert BodyReader(0, False).feed(b"abc") == (b"", b"abc", True)
    assert BodyReader(None, False).feed(b"abc") == (b"", b"abc", True)
    assert BodyReader(0, False).done and not BodyReader(1, False).done


def test_until_close_body() -> None:
    reader = BodyReader(None, False, until_close=True)
    assert reader.until_close is True
    assert reader.feed(b"abc") == (b"abc", b"", False)
    assert reader.feed(b"\r\n0\r\n\r\n") == (b"\r\n0\r\n\r\n", b"", False)
    assert BodyReader(None, True, until_close=True).until_close is False  # chunked framing wins


# ============================================================================ responses


@pytest.mark.parametrize(
    ("method", "head", "has_body", "until_close", "chunked", "length", "keep_alive"),
    [
        ("GET", "HTTP/1.1 200 OK\r\nContent-Length: 5", True, False, False, 5, True),
        ("GET", "HTTP/1.1 200 OK\r\nContent-Length: 0", False, False, False, 0, True),
        ("GET", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", True, False, True, None, True),
        ("GET", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", True, True, False, None, False),
        ("GET", "HTTP/1.1 200 OK", True, True, False, None, False),
        ("GET", "HTTP/1.0 200 OK", True, True, False, None, False),
        ("GET", "HTTP/1.0 200 OK\r\nContent-Length: 2", True, False, False, 2, False),
        ("GET", "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive", True, False, False, 2, True),
        ("GET", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close", True, False, False, 2, False),
        ("HEAD", "HTTP/1.1 200 OK\r\nContent-Length: 500", False, False, False, 500, True),
        ("HEAD", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False, False, False, None, True),
        ("head", "HTTP/1.1 200 OK", False, False, False, None, True),
        ("GET", "HTTP/1.1 204 No Content", False, False, False, None, True),
        ("GET", "HTTP/1.1 304 Not Modified\r\nContent-Length: 99", False, False, False, 99, True),
        ("GET", "HTTP/1.1 100 Continue", False, False, False, None, True),
        ("GET", "HTTP/1.1 103 Early Hints\r\nLink: </s.css>", False, False, False, None, True),
        ("GET", "HTTP/1.1 404 Not Found\r\nContent-Length: 3", True, False, False, 3, True),
    ],
)
def test_response_framing(
    method: str, head: str, has_body: bool, until_close: bool, chunked: bool, length: int | None, keep_alive: bool
) -> None:
    raw = (head + "\r\n\r\n").encode()
    got = parse_response_head(raw + b"BODY", request_method=method)
    assert got is not None
    resp, n = got
    assert n == len(raw)
    assert (resp.has_body, resp.until_close, resp.chunked, resp.content_length, resp.keep_alive) == (
        has_body,
        until_close,
        chunked,
        length,
        keep_alive,
    )


def test_response_fields() -> None:
    resp, _ = parse_response_head(b"HTTP/1.1 418 I'm a teapot\r\nX-A: 1\r\nx-b:  2 \r\n\r\n")  # type: ignore[misc]
    assert (resp.version, resp.status, resp.reason) == ("1.1", 418, "I'm a teapot")
    assert resp.headers == [("X-A", "1"), ("x-b", "2")]
    assert resp.header("X-B") == "2"
    resp, _ = parse_response_head(b"HTTP/1.1 200\r\n\r\n")  # type: ignore[misc]
    assert (resp.status, resp.reason) == (200, "")


def test_switching_protocols_response_is_complete() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    resp, n = parse_response_head(raw + b"\x81\x05hello")  # type: ignore[misc]
    assert (resp.status, n, resp.has_body) == (101, len(raw), False)


def test_incomplete_response_returns_none() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    for i in range(len(raw)):
        assert parse_response_head(raw[:i]) is None, i


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 99 Odd\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.0\r\n",
        b"<html>oops</html>\r\n\r\n",
    ],
)
def test_bad_responses_raise_upstream_error(raw: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response_head(raw)


def test_oversized_response_head() -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"v" * 100
    with pytest.raises(UpstreamError):
        parse_response_head(raw, max_header_bytes=64)
    with pytest.raises(UpstreamError):
        parse_response_head(raw + b"\r\n\r\n", max_header_bytes=64)


def test_upstream_error_is_not_http_error() -> None:
    assert not issubclass(UpstreamError, HttpError) and not issubclass(HttpError, UpstreamError)


def test_render_response_head_replaces_hop_by_hop() -> None:
    resp, _ = parse_response_head(  # type: ignore[misc]
        b"HTTP/1.0 200 OK\r\nConnection: close, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n"
        b"Proxy-Authenticate: Basic\r\nContent-Length: 2\r\nSet-Cookie: a=b\r\n\r\n"
    )
    assert render_response_head(resp, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=b\r\nConnection: keep-alive\r\n\r\n"
    )
    assert render_response_head(resp, keep_alive=False).endswith(b"\r\nConnection: close\r\n\r\n")


# ============================================================================ rendering


def test_render_request_head_bytes() -> None:
    assert render_request_head("GET", "/a?b", "1.0", [("Host", "e.com"), ("X", "é")]) == (
        b"GET /a?b HTTP/1.0\r\nHost: e.com\r\nX: \xe9\r\n\r\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("GET", "/a\r\nX: y", "1.1", []),
        ("GET", "/", "1.1", [("X", "a\r\nInjected: 1")]),
        ("GET", "/", "1.1", [("X\n", "a")]),
        ("GET", "/", "1.1", [("X", "a\x00")]),
    ],
)
def test_render_request_head_refuses_injection(args: tuple) -> None:
    with pytest.raises(ValueError):
        render_request_head(*args)


def test_render_response() -> None:
    assert render_response(403, "Forbidden", b"Blocked\n") == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 8\r\n"
        b"Connection: close\r\n\r\nBlocked\n"
    )
    assert render_response(
        502, "Bad Gateway", headers=[("Content-Type", "text/html"), ("Content-Length", "99"), ("X-A", "b")], close=False
    ) == (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nX-A: b\r\nContent-Length: 0\r\n\r\n")


def test_rendered_response_parses_back() -> None:
    raw = render_response(400, "Bad Request", b"nope")
    resp, n = parse_response_head(raw)  # type: ignore[misc]
    assert (resp.status, resp.content_length, resp.keep_alive, raw[n:]) == (400, 4, False, b"nope")


# ============================================================================ SOCKS5


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def auth(user: bytes, password: bytes) -> bytes:
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


def request(cmd: int, atyp: int, addr: bytes, port: int) -> bytes:
    if atyp == 3:
        addr = bytes([len(addr)]) + addr
    return bytes([5, cmd, 0, atyp]) + addr + port.to_bytes(2, "big")


def run_socks(pieces: list[bytes]) -> tuple[Socks5Server, list[bytes]]:
    server = Socks5Server()
    out: list[bytes] = []
    for piece in pieces:
        out += server.feed(piece)
    return server, out


def test_socks_no_auth_ipv4_connect() -> None:
    server = Socks5Server()
    assert server.feed(greeting(0)) == [b"\x05\x00"]
    assert server.request is None
    assert server.feed(request(1, 1, bytes([10, 1, 2, 3]), 8080)) == []
    r = server.request
    assert r is not None
    assert (r.command, r.host, r.port, r.address_type, r.username) == (CMD_CONNECT, "10.1.2.3", 8080, 1, None)
    assert server.leftover == b"" and server.failed is False


def test_socks_userpass_preferred_and_username_kept() -> None:
    server = Socks5Server()
    assert server.feed(greeting(0, 1, 2)) == [b"\x05\x02"]
    assert server.feed(auth(b"agent1", b"s3cret")) == [b"\x01\x00"]
    server.feed(request(1, 3, b"Example.COM", 443))
    assert server.request is not None
    assert (server.request.host, server.request.port, server.request.username) == ("example.com", 443, "agent1")


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (b"", None),
        (b"proxy", None),
        (b"Proxy", "Proxy"),
        (b"\xff\xfe", "ÿþ"),  # not UTF-8: latin-1, as the HTTP proxy reads Basic credentials
        ("ü-agent".encode("latin-1"), "ü-agent"),
        (b"\x85a", None),
        (b"a\x01b", None),
        ("ü".encode(), "ü"),
        (b"unknown-10.9.9.9", None),  # the reserved namespace of unnamed clients: names no one
    ],
)
def test_socks_placeholder_usernames(user: bytes, expected: str | None) -> None:
    server, out = run_socks([greeting(2), auth(user, b"pw"), request(1, 1, bytes(4), 1)])
    assert out == [b"\x05\x02", b"\x01\x00"]
    assert server.request is not None and server.request.username == expected


def test_socks_password_is_not_kept() -> None:
    server, _ = run_socks([greeting(2), auth(b"u", b"topsecretpw"), request(1, 3, b"e.com", 80)])
    state = repr(vars(server)) + repr(server.request)
    assert "topsecretpw" not in state and "u" == server.username


@pytest.mark.parametrize(
    ("atyp", "addr", "host"),
    [
        (1, bytes([127, 0, 0, 1]), "127.0.0.1"),
        (4, ipaddress.IPv6Address("2001:db8::1").packed, "2001:db8::1"),
        (4, bytes(15) + b"\x01", "::1"),
        (3, b"sub.Example.org", "sub.example.org"),
        (3, b"fqdn.example.", "fqdn.example."),
        (3, b"10.0.0.1", "10.0.0.1"),
        (3, b"[::1]", "::1"),
    ],
)
def test_socks_address_types(atyp: int, addr: bytes, host: str) -> None:
    server, _ = run_socks([greeting(0), request(1, atyp, addr, 65535)])
    assert server.request is not None
    assert (server.request.host, server.request.port, server.request.address_type) == (host, 65535, atyp)


def test_socks_split_at_every_byte() -> None:
    data = (
        greeting(0, 2) + auth(b"agent9", b"pw") + request(1, 4, ipaddress.IPv6Address("fe80::2").packed, 22) + b"EARLY"
    )
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1, 5):
            server, out = run_socks([data[:i], data[i:j], data[j:]])
            assert out == [b"\x05\x02", b"\x01\x00"], (i, j)
            assert server.request is not None
            assert (server.request.host, server.request.port, server.request.username) == ("fe80::2", 22, "agent9")
            assert server.leftover == b"EARLY", (i, j)


def test_socks_byte_by_byte() -> None:
    data = greeting(0) + request(1, 3, b"e.com", 443)
    server = Socks5Server()
    for i, byte in enumerate(data):
        server.feed(bytes([byte]))
        assert (server.request is None) is (i < len(data) - 1)


def test_socks_leftover_after_request() -> None:
    server, _ = run_socks([greeting(0) + request(1, 1, bytes(4), 80) + b"GET / HTTP/1.1\r\n"])
    assert server.leftover == b"GET / HTTP/1.1\r\n"
    assert server.feed(b"more") == []
    assert server.leftover == b"GET / HTTP/1.1\r\nmore"


def test_socks_large_pipelined_early_data_is_fine() -> None:
    server, _ = run_socks([greeting(0) + request(1, 1, bytes(4), 443) + b"x" * 5000])
    assert server.request is not None and len(server.leftover) == 5000


@pytest.mark.parametrize(("methods", "reply"), [((), b"\x05\xff"), ((1,), b"\x05\xff"), ((0x80, 3), b"\x05\xff")])
def test_socks_no_acceptable_method(methods: tuple[int, ...], reply: bytes) -> None:
    server = Socks5Server()
    assert server.feed(greeting(*methods)) == [reply]
    assert server.failed is True
    assert server.feed(request(1, 1, bytes(4), 80)) == []
    assert server.request is None


@pytest.mark.parametrize("data", [b"\x04\x01\x00\x50", b"GET / HTTP/1.1\r\n", b"\x00"])
def test_socks_bad_greeting_version_just_closes(data: bytes) -> None:
    with pytest.raises(SocksError) as info:
        Socks5Server().feed(data)
    assert info.value.reply is None


def test_socks_bad_auth_version_just_closes() -> None:
    server = Socks5Server()
    server.feed(greeting(2))
    with pytest.raises(SocksError) as info:
        server.feed(b"\x05\x01a\x01b")
    assert info.value.reply is None


@pytest.mark.parametrize(("cmd", "expected"), [(CMD_BIND, 2), (CMD_UDP_ASSOCIATE, 3)])
def test_socks_bind_and_udp_are_parsed(cmd: int, expected: int) -> None:
    server, _ = run_socks([greeting(0), request(cmd, 1, bytes(4), 0)])
    assert server.request is not None and server.request.command == expected
    assert server.request.port == 0


def test_socks_unicode_names_are_taken_in_idna_form() -> None:
    # Issue 13 item 5: rules hold punycode; a UTF-8 name (ATYP=3) is judged and resolved as that form.
    for name, want in (
        ("bücher.de", "xn--bcher-kva.de"),
        ("日本.example", "xn--wgv71a.example"),
        ("BÜCHER.DE", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ):
        server = Socks5Server()
        server.feed(greeting(0))
        server.feed(request(1, 3, name.encode(), 443))
        assert server.request is not None and server.request.host == want, name


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"\x05\x09\x00\x01", REP_COMMAND_NOT_SUPPORTED),
        (b"\x05\x00", REP_COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x02", REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x00", REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x00\x00\x50", REP_GENERAL_FAILURE),
        (request(1, 3, b"bad host", 80), REP_GENERAL_FAILURE),
        (request(1, 3, b"a/b", 80), REP_GENERAL_FAILURE),
        (request(1, 3, b"127.1", 80), REP_GENERAL_FAILURE),
        (request(1, 3, "b\u202eücher.de".encode(), 80), REP_GENERAL_FAILURE),  # a bidi override
        (request(1, 3, "bü\x00cher.de".encode(), 80), REP_GENERAL_FAILURE),
        (request(1, 3, "bücher.de".encode("latin-1"), 80), REP_GENERAL_FAILURE),  # not UTF-8
        (request(1, 1, bytes(4), 0), REP_GENERAL_FAILURE),
        (b"\x04\x01\x00\x01", None),
    ],
)
def test_socks_bad_requests(data: bytes, reply: int | None) -> None:
    server = Socks5Server()
    server.feed(greeting(0))
    with pytest.raises(SocksError) as info:
        server.feed(data)
    assert info.value.reply == reply


def test_socks_buffer_limit() -> None:
    server = Socks5Server(max_buffer=16)
    server.feed(greeting(2))
    with pytest.raises(SocksError) as info:
        server.feed(b"\x01\xff" + b"u" * 20)  # a 255-byte username cannot fit in 16 bytes
    assert info.value.reply == REP_GENERAL_FAILURE


@pytest.mark.parametrize(
    ("args", "wire"),
    [
        ((REP_SUCCEEDED,), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((REP_SUCCEEDED, "192.168.1.2", 40000), b"\x05\x00\x00\x01\xc0\xa8\x01\x02\x9c\x40"),
        ((REP_COMMAND_NOT_SUPPORTED,), b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((REP_SUCCEEDED, "::1", 443), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x01\xbb"),
        ((REP_SUCCEEDED, "[::1]", 443), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x01\xbb"),
        ((REP_SUCCEEDED, "host.example", 1), b"\x05\x00\x00\x03\x0chost.example\x00\x01"),
    ],
)
def test_socks_reply_encoding(args: tuple, wire: bytes) -> None:
    assert Socks5Server().reply(*args) == wire


# ============================================================================ fuzzing

HTTP_ERRORS = (HttpError,)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_request_head_only_http_errors(data: bytes) -> None:
    try:
        got = parse_request_head(data, max_header_bytes=512, max_headers=20)
    except HttpError as exc:
        assert exc.status in (400, 414, 431, 505)
        return
    if got is not None:
        head, n = got
        assert 0 < n <= len(data) and data[:n].endswith(b"\r\n\r\n")
        assert 0 < head.port <= 65535 and head.host


@FUZZ
@given(
    st.sampled_from(
        [
            b"GET http://e.com/ HTTP/1.1\r\n",
            b"CONNECT e.com:443 HTTP/1.1\r\n",
            b"POST http://e.com/ HTTP/1.0\r\nContent-Length: 3\r\n",
        ]
    ),
    st.binary(max_size=300),
)
def test_fuzz_request_head_after_valid_prefix(prefix: bytes, data: bytes) -> None:
    try:
        parse_request_head(prefix + data)
    except HttpError:
        pass


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["GET", "HEAD", "POST", "CONNECT"]))
def test_fuzz_response_head_only_upstream_errors(data: bytes, method: str) -> None:
    try:
        got = parse_response_head(b"HTTP/1.1 " + data if data[:1].isdigit() else data, 512, method)
    except UpstreamError:
        return
    if got is not None:
        assert 100 <= got[0].status <= 999


@FUZZ
@given(
    st.lists(st.binary(max_size=40), max_size=20),
    st.sampled_from([(None, True, False), (7, False, False), (None, False, True), (0, False, False)]),
)
def test_fuzz_body_reader(pieces: list[bytes], mode: tuple[int | None, bool, bool]) -> None:
    reader = BodyReader(*mode)
    total_in = total_out = 0
    try:
        for piece in pieces:
            fwd, rest, done = reader.feed(piece)
            total_in += len(piece)
            total_out += len(fwd) + len(rest)
            assert fwd + rest == piece  # nothing is ever altered, only split
            assert done or not rest
    except HttpError as exc:
        assert exc.status == 400
        return
    assert total_in == total_out


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=12))
def test_fuzz_socks(pieces: list[bytes]) -> None:
    server = Socks5Server()
    try:
        for piece in pieces:
            for out in server.feed(piece):
                assert out in (b"\x05\x00", b"\x05\x02", b"\x05\xff", b"\x01\x00")
    except SocksError as exc:
        assert exc.reply in (None, 1, 7, 8)
        return
    if server.request is not None:
        assert server.request.command in (1, 2, 3) and server.request.host


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=12))
def test_fuzz_socks_after_valid_greeting(pieces: list[bytes]) -> None:
    server = Socks5Server()
    server.feed(greeting(0, 2))
    try:
        for piece in pieces:
            server.feed(piece)
    except SocksError:
        pass


# --- framing: whatever the CL/TE lines, a request is either unambiguous or refused with 400

_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
framing_name = st.sampled_from(
    [
        "Content-Length",
        "content-length",
        "CONTENT-LENGTH",
        "Transfer-Encoding",
        "transfer-encoding",
        "Content-Length ",
        "Transfer-Encoding\t",
        "X-Other",
    ]
)
framing_value = st.one_of(
    st.sampled_from(
        [
            "chunked",
            "Chunked",
            " chunked ",
            "gzip, chunked",
            "chunked, gzip",
            "identity",
            "xchunked",
            "chunked;q=1",
            "chunked,",
            "",
            "0",
            "5",
            "05",
            "5, 5",
            "+5",
            "-5",
            "0x5",
            "5 5",
            "5.0",
            "99999999999999999999",
            "1e3",
        ]
    ),
    st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    st.text(alphabet="chunkedCHUNKED ,;\t0123456789\x00\r\n\x0b", max_size=12),
)
ORIGIN_CTX = ("http", "e.com", 80)


def _outcome(raw: bytes, origin: tuple[str, str, int] | None) -> tuple[str, object]:
    try:
        got = parse_request_head(raw, origin=origin)
    except HttpError as exc:
        return "error", exc.status
    assert got is not None
    head = got[0]
    return "ok", (head.chunked, head.content_length)


@FUZZ
@given(st.lists(st.tuples(framing_name, framing_value), max_size=4), st.sampled_from(["1.0", "1.1"]), st.booleans())
def test_fuzz_request_framing_is_unambiguous_or_400(fields: list[tuple[str, str]], version: str, fold: bool) -> None:
    lines = [f"{k}: {v}" for k, v in fields]
    if fold and lines:
        lines.insert(1, " folded")  # an obs-fold continuation line after the first field
    head_text = "\r\n".join([f"POST http://e.com/ HTTP/{version}", "Host: e.com", *lines]) + "\r\n\r\n"
    raw = head_text.encode("latin-1")
    kind, value = _outcome(raw, None)
    origin_raw = raw.replace(b"http://e.com/", b"/", 1)
    # The interception pipeline (origin-form requests) applies exactly the same framing rules.
    assert _outcome(origin_raw, ORIGIN_CTX) == (kind, value)
    if kind == "error":
        assert value == 400
        return
    head, n = parse_request_head(raw)  # type: ignore[misc]
    assert b"\r\n folded" not in raw[:n]  # an obs-fold inside a head is never accepted
    chunked, length = value  # type: ignore[misc]
    # From the fields as parsed (a generated CR LF CR LF may have ended the head early).
    cls = [v for k, v in head.headers if k.lower() == "content-length"]
    tes = [v for k, v in head.headers if k.lower() == "transfer-encoding"]
    if chunked:
        assert version == "1.1" and not cls and len(tes) == 1 and tes[0].strip(" \t").lower() == "chunked"
        assert length is None
    elif cls:
        assert not tes and len(cls) == 1 and re.fullmatch(r"[0-9]{1,18}", cls[0].strip(" \t"))
        assert length == int(cls[0])
    else:
        assert not tes and length is None


@FUZZ
@given(st.binary(min_size=1, max_size=12), st.binary(max_size=24))
def test_fuzz_header_bytes_never_pass_control_characters(name: bytes, value: bytes) -> None:
    raw = b"GET http://e.com/ HTTP/1.1\r\nHost: e.com\r\n" + name + b": " + value + b"\r\n\r\n"
    for origin in (None, ORIGIN_CTX):
        target_raw = raw if origin is None else raw.replace(b"http://e.com/", b"/", 1)
        try:
            got = parse_request_head(target_raw, origin=origin)
        except HttpError as exc:
            assert exc.status in (400, 431)
            continue
        if got is None:
            continue  # the generated bytes made the head look unfinished (e.g. an early blank line)
        for k, v in got[0].headers:
            assert _TOKEN_CHARS.fullmatch(k), k
            assert not re.search(r"[\x00\r\n]", v), v
            assert v == v.strip(" \t")


# --- round trips of generated valid messages

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostname = (
    st.lists(label, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: re.fullmatch(r"[0-9]+|0x[0-9a-f]*", h.split(".")[-1]) is None)
)  # numeric TLDs are IPv4 spellings
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
token = st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True)
field_value = st.from_regex(r"[!-~]([ !-~]{0,20}[!-~])?", fullmatch=True)
path_part = st.from_regex(r"(/[A-Za-z0-9._~%!$&'()*+,;=:@-]{0,10}){0,4}(\?[A-Za-z0-9=&]{0,10})?", fullmatch=True)


@FUZZ
@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    st.one_of(hostname, ipv4, ipv6),
    st.one_of(st.none(), st.integers(1, 65535)),
    path_part,
    st.lists(st.tuples(token, field_value), max_size=8),
    st.sampled_from(["1.0", "1.1"]),
    st.one_of(st.none(), st.integers(0, 10**12)),
)
def test_roundtrip_generated_requests(
    method: str,
    host: str,
    port: int | None,
    path: str,
    headers: list[tuple[str, str]],
    version: str,
    length: int | None,
) -> None:
    authority = f"[{host}]" if ":" in host else host
    if port is not None:
        authority += f":{port}"
    all_headers = [("Host", authority), *headers]
    if length is not None:
        all_headers.append(("Content-Length", str(length)))
    raw = render_request_head(method, f"http://{authority}{path}", version, all_headers)
    head, n = parse_request_head(raw + b"body")  # type: ignore[misc]
    assert n == len(raw)
    assert (head.method, head.version, head.scheme) == (method, version, "http")
    assert head.host == (ipaddress.ip_address(host).compressed if ":" in host else host)
    assert head.port == (port or 80)
    expected_path = path if path.startswith("/") else "/" + path if path else ("*" if method == "OPTIONS" else "/")
    assert head.path == expected_path
    assert head.headers == all_headers
    assert head.content_length == length
    assert head.upstream_headers() == all_headers
    again = render_request_head(head.method, head.target, head.version, head.headers)
    assert again == raw


@FUZZ
@given(
    st.lists(st.binary(min_size=1, max_size=50), max_size=6),
    st.lists(st.tuples(token, field_value), max_size=3),
    st.lists(st.integers(0, 400), max_size=5),
    st.binary(max_size=10),
)
def test_roundtrip_chunked_bodies(
    chunks: list[bytes], trailers: list[tuple[str, str]], cuts: list[int], tail: bytes
) -> None:
    msg = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n"
    msg += b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"
    data = msg + tail
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    fwd, rest, dones = run_reader(BodyReader(None, True), pieces)
    assert (fwd, rest, dones[-1]) == (msg, tail, True)


@FUZZ
@given(
    st.one_of(hostname.map(lambda h: (3, h)), ipv4.map(lambda h: (1, h)), ipv6.map(lambda h: (4, h))),
    st.integers(1, 65535),
    st.one_of(st.none(), st.binary(min_size=1, max_size=20)),
    st.lists(st.integers(0, 120), max_size=6),
)
def test_roundtrip_generated_socks(target: tuple[int, str], port: int, user: bytes | None, cuts: list[int]) -> None:
    atyp, host = target
    addr = host.encode() if atyp == 3 else ipaddress.ip_address(host).packed
    data = greeting(2 if user is not None else 0)
    if user is not None:
        data += auth(user, b"pw")
    data += request(1, atyp, addr, port)
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    server, out = run_socks(pieces)
    assert out == ([b"\x05\x02", b"\x01\x00"] if user is not None else [b"\x05\x00"])
    assert server.request is not None
    assert (server.request.host, server.request.port, server.request.address_type) == (host, port, atyp)
    if user is not None:
        try:
            name: str | None = user.decode()
        except UnicodeDecodeError:
            name = user.decode("latin-1")  # (as the HTTP proxy reads Basic credentials)
        if name is not None and (name == "proxy" or name.startswith("unknown-") or not name.isprintable()):
            name = None
        assert server.request.username == name


# --- mutations of valid messages reach deeper parser states than random bytes

VALID_REQUEST = req(
    "POST http://e.com:8080/p?q HTTP/1.1",
    "Host: e.com",
    "Connection: keep-alive, X-A",
    "X-A: 1",
    "Transfer-Encoding: chunked",
    f"Proxy-Authorization: {basic('u:p')}",
)
VALID_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


def mutate(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(base)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    return bytes(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_request(edits: list[tuple[int, int]]) -> None:
    try:
        got = parse_request_head(mutate(VALID_REQUEST, edits))
    except HttpError:
        return
    if got is not None:
        head = got[0]
        assert head.version in ("1.0", "1.1") and 0 < head.port <= 65535
        names = {k.lower() for k, _ in head.upstream_headers()}
        assert not names & {"connection", "proxy-authorization", "keep-alive"} or head.upgrade is not None


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.sampled_from(["GET", "HEAD"]),
)
def test_fuzz_mutated_response(edits: list[tuple[int, int]], method: str) -> None:
    try:
        parse_response_head(mutate(VALID_RESPONSE, edits), request_method=method)
    except UpstreamError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3))
def test_fuzz_mutated_chunked(edits: list[tuple[int, int]]) -> None:
    data = mutate(chunked_message(), edits)
    reader = BodyReader(None, True)
    try:
        fwd, rest, done = reader.feed(data)
    except HttpError:
        return
    assert fwd + rest == data and (done or not rest)


def test_render_response_head_relays_a_clean_head_as_received() -> None:
    # Nothing hop-by-hop: the bytes as they came (odd spacing and all) plus our Connection field.
    raw = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Type:  text/plain \r\nContent-Length: 2\r\n\r\n"
    resp, _ = parse_response_head(raw)  # type: ignore[misc]
    assert render_response_head(resp, keep_alive=True) == raw[:-2] + b"Connection: keep-alive\r\n\r\n"
    assert render_response_head(resp, keep_alive=False) == raw[:-2] + b"Connection: close\r\n\r\n"
    # Their own `Connection: keep-alive` is what ours would say: relayed unchanged.
    raw2 = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"
    resp2, _ = parse_response_head(raw2)  # type: ignore[misc]
    assert render_response_head(resp2, keep_alive=True) == raw2
    assert render_response_head(resp2, keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    "extra",
    [
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\n",  # names another field
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
        b"Connection: keep-alive\r\nConnection: keep-alive\r\n",
        b"Proxy-Authenticate: Basic\r\n",
        b"Upgrade: h2c\r\n",
        b"Trailer: X-Checksum\r\n",
    ],
)
def test_render_response_head_rebuilds_a_head_with_hop_by_hop_fields(extra: bytes) -> None:
    resp, _ = parse_response_head(b"HTTP/1.1 200 OK\r\nServer: x\r\n" + extra + b"Content-Length: 2\r\n\r\n")  # type: ignore[misc]
    assert render_response_head(resp, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
    )


def test_render_response_head_closing_replaces_their_keep_alive() -> None:
    for conn_line in (b"Connection: keep-alive", b"connection: Keep-Alive"):
        resp, _ = parse_response_head(  # type: ignore[misc]
            b"HTTP/1.1 200 OK\r\nServer: x\r\n" + conn_line + b"\r\nContent-Length: 2\r\n\r\n"
        )
        assert render_response_head(resp, keep_alive=False) == (
            b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        )


# ---------------------------------------------------------------- issue 13 item 5: Unicode names

_IDN_LABELS = st.text(
    alphabet=st.characters(min_codepoint=0x61, max_codepoint=0x7A)
    | st.sampled_from("äöüßéñ日本語한국어ελληνικάрусский\u202e\u200b\u0000\u0007\u061c"),
    min_size=1,
    max_size=12,
)


@given(st.lists(_IDN_LABELS, min_size=1, max_size=3), st.sampled_from(["CONNECT", "GET"]))
@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_unicode_targets_parse_to_idna_or_a_400(labels: list[str], method: str) -> None:
    name = ".".join(labels) + ".example"
    target = f"{name}:443" if method == "CONNECT" else f"http://{name}:80/p"
    raw = f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    try:
        got = parse_request_head(raw, 65536, 100)
    except HttpError as exc:
        assert exc.status == 400
        return
    assert got is not None
    head, used = got
    assert used == len(raw)  # counted on the bytes received, not on the rewritten line
    assert head.host.isascii() and head.host == head.host.lower()
    assert not any(c in name for c in "\u202e\u200b\u0000\u0007\u061c")  # those never pass
    if name.isascii():
        assert head.host == name.lower()
    else:
        assert "xn--" in head.host


@pytest.mark.parametrize(
    ("target", "want_target", "want_port"),
    [
        (b"http://b\xc3\xbccher.de/p", "http://xn--bcher-kva.de/p", 80),
        (b"http://b\xc3\xbccher.de:8080/p", "http://xn--bcher-kva.de:8080/p", 8080),
        (b"https://B\xc3\x9cCHER.de:8443", "https://xn--bcher-kva.de:8443", 8443),
    ],
)
def test_unicode_absolute_form_keeps_scheme_and_port(target: bytes, want_target: str, want_port: int) -> None:
    # The rewrite splits "scheme://" (bytes) off first, then the text authority at its last ":" (str):
    # the scheme separator and the port's colon must each land in their own place.
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    got = parse_request_head(raw, 65536, 100)
    assert got is not None
    head, used = got
    assert used == len(raw)
    assert (head.host, head.port, head.target) == ("xn--bcher-kva.de", want_port, want_target)


@given(st.lists(_IDN_LABELS, min_size=1, max_size=3))
@settings(max_examples=examples(300), deadline=None)
def test_socks_unicode_names_parse_to_idna_or_fail(labels: list[str]) -> None:
    name = (".".join(labels) + ".example").encode()
    if len(name) > 255:
        return
    server = Socks5Server()
    server.feed(greeting(0))
    try:
        server.feed(request(1, 3, name, 443))
    except SocksError as exc:
        assert exc.reply == REP_GENERAL_FAILURE
        return
    assert server.request is not None and server.request.host.isascii()


# Field names (any spelling) and Connection values for the shortcuts of `_filter_hop_by_hop` and
# `_derive_request_headers`: the same answers with the head's names known (the shortcuts) as unknown.
_SHORTCUT_NAMES = st.sampled_from(
    ["Connection", "connection", "CONNECTION", "Host", "X-A", "x-b", "Keep-Alive", "Proxy-X", "Upgrade",
     "Content-Length", "Expect", "Accept"]
)  # fmt: skip
_SHORTCUT_CONNECTION = st.lists(
    st.sampled_from(["close", "keep-alive", "Close", "x-a", "X-B", "host", "content-length", "upgrade", "te", ""]),
    max_size=3,
).map(", ".join)


@FUZZ
@given(
    st.lists(st.tuples(_SHORTCUT_NAMES, _SHORTCUT_CONNECTION), max_size=5),
    st.sampled_from(["1.0", "1.1"]),
    st.booleans(),
)
@example([("Connection", "close, x-a"), ("X-A", "1")], "1.1", False)
@example([("connection", "keep-alive"), ("Host", "x")], "1.0", True)
def test_known_names_shortcuts_answer_as_the_general_path(
    fields: list[tuple[str, str]], version: str, keep_upgrade: bool
) -> None:
    from dataclasses import replace

    from services.proxy import http1

    # a Content-Length field's value must be a number for the head to parse
    fields = [(k, "0" if k == "Content-Length" else v) for k, v in fields]
    raw = "\r\n".join([f"GET http://e.com/ HTTP/{version}", "Host: e.com", *[f"{k}: {v}" for k, v in fields]])
    try:
        got = parse_request_head((raw + "\r\n\r\n").encode("latin-1"))
    except HttpError:
        return
    assert got is not None
    head = got[0]
    assert head.names is not None
    general = http1._filter_hop_by_hop(head.headers, keep_upgrade, None)
    assert http1._filter_hop_by_hop(head.headers, keep_upgrade, head.names) == general
    unknown = replace(head, names=None)
    http1._derive_request_headers(unknown)
    assert (unknown.keep_alive, unknown.chunked, unknown.content_length, unknown.expect_continue, unknown.upgrade) == (
        head.keep_alive,
        head.chunked,
        head.content_length,
        head.expect_continue,
        head.upgrade,
    )


def test_connection_close_shortcuts() -> None:
    head = parse(req("GET http://e.com/ HTTP/1.1", "Connection: close", "Accept: */*"))
    assert not head.keep_alive
    assert head.upstream_headers() == [("Host", "e.com"), ("Accept", "*/*")]
    # a Connection field naming a field that is here: that one goes too (the general loop)
    head = parse(req("GET http://e.com/ HTTP/1.1", "Connection: close, X-A", "X-A: 1", "Accept: */*"))
    assert not head.keep_alive
    assert head.upstream_headers() == [("Host", "e.com"), ("Accept", "*/*")]
    head = parse(req("GET http://e.com/ HTTP/1.0", "Connection: keep-alive"))
    assert head.keep_alive
    assert head.upstream_headers() == [("Host", "e.com")]


@given(
    method=st.text(
        alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        min_size=1,
        max_size=64,
    ),
    body=st.booleans(),
)
@example(method="FOO", body=False)
@example(method="get", body=True)
@example(method="M-SEARCH", body=False)
@settings(max_examples=examples(200), deadline=None)
def test_any_token_is_a_method(method: str, body: bool) -> None:
    """SPEC §3.1's table (400 only for a malformed request) and RFC 9110 §9.1: a method is any
    token. llhttp refuses the ones it does not know by name
    ("Invalid method encountered"): the proxy answered 400 to `curl -X FOO`, which the origin would
    have taken. The head is relayed with its method as it came; the framing is the usual."""
    if method == "CONNECT":
        return  # the tunnel: its own target form (test_connect_targets)
    extra = "Content-Length: 3\r\n" if body else ""
    raw = f"{method} http://a.example/x HTTP/1.1\r\nHost: a.example\r\n{extra}\r\nabc".encode()
    parsed = parse_request_head(raw)
    assert parsed is not None
    head, used = parsed
    assert (head.method, head.host, head.path) == (method, "a.example", "/x")
    assert head.content_length == (3 if body else None) and raw[used:] == b"abc"
    # and the next head on the connection parses as usual (the parser pool is not left broken)
    again = parse_request_head(b"GET http://a.example/y HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert again is not None and again[0].method == "GET" and again[0].path == "/y"


@pytest.mark.parametrize("method", ["F(O", 'FO"O', "F/O", "FÖO", "x" * 65])
def test_a_method_that_is_no_token_is_400(method: str) -> None:
    """SPEC §3.1's table: a request line whose method is no token is malformed (400)."""
    with pytest.raises(HttpError) as info:
        parse_request_head(f"{method} http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n".encode("utf-8"))
    assert info.value.status == 400


def test_a_non_ascii_port_after_a_unicode_host_is_400_not_a_crash() -> None:
    """SPEC §3.1's table (malformed request: 400). Found by the mutation fuzzer: a UTF-8 host name (written in IDNA form before parsing) with a
    non-ASCII port raised UnicodeEncodeError out of the parser instead of a 400."""
    with pytest.raises(HttpError) as info:
        parse_request_head("GET http://日本.example:\x80/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert info.value.status == 400
