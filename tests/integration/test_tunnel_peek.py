"""The interception hook's look at a tunnel's first bytes (SPEC §7), through the real stack.

The look runs inside the connection's own task (no task per tunnel, services/proxy/conn.py
`wait_either`); these tests hold it to what it decides and logs, with the client's bytes arriving
late, in pieces, never, or after the server has spoken first.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from harness.tls import server_context

from conftest import (
    OriginHandler,
    Stack,
    echo_origin,
    https_origin,
    intercepting_stack,
    plain_origin,
    wait_for,
    wait_log_entry,
)

pytestmark = pytest.mark.stack

HOST = "127.0.0.1"  # allowed by the built-in rules
SNI = "origin.test"


class _Json(OriginHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.reply(json.dumps({"path": self.path}).encode(), "application/json")


@pytest.fixture(scope="module")
def stack(origin_ca_file: Path) -> Iterator[Stack]:
    with intercepting_stack({"proxy": {"headerTimeout": 5}}, origin_ca_file) as s:
        yield s


@pytest.fixture(scope="module")
def tls_origin(origin_ca: trustme.CA) -> Iterator[int]:
    with https_origin(origin_ca, HOST, _Json, SNI) as port:
        yield port


@pytest.fixture(scope="module")
def http_origin() -> Iterator[int]:
    with plain_origin() as port:
        yield port


@pytest.fixture(scope="module")
def banner_origin() -> Iterator[int]:
    """A server that speaks first (as SMTP or SSH do), then echoes."""
    with echo_origin(HOST, banner=b"220 banner first\r\n") as port:
        yield port


def _tunnel(stack: Stack, container: str, port: int) -> tuple[socket.socket, bytes]:
    """A tunnel through the proxy, and whatever of the tunnel's bytes came with the 200."""
    sock = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10)
    auth = base64.b64encode(f"{container}:x".encode()).decode()
    sock.sendall(f"CONNECT {HOST}:{port} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(1024)
        assert chunk, reply
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return sock, reply.split(b"\r\n\r\n", 1)[1]


def _recv_until(sock: socket.socket, end: bytes, data: bytes = b"") -> bytes:
    while end not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _transactions(stack: Stack, container: str) -> list[dict]:
    r = stack.get("/api/transactions", params={"container": container, "limit": 50})
    assert r.status_code == 200, r.text
    return [i for i in r.json()["items"] if i["container_name"] == container]


def test_a_client_silent_for_a_while_then_speaking_http_is_intercepted(stack: Stack, http_origin: int) -> None:
    sock, early = _tunnel(stack, "peek-silent", http_origin)
    assert early == b""  # the origin waits for a request
    with sock:
        time.sleep(1.5)  # the look waits (in the handler's own task) without a deadline of its own
        sock.sendall(f"GET /late HTTP/1.1\r\nHost: {HOST}:{http_origin}\r\nConnection: close\r\n\r\n".encode())
        reply = _recv_until(sock, b"reached\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"reached\n"), reply
    assert wait_log_entry(stack, "peek-silent")["mitm_skip_reason"] is None  # intercepted: no skip reason
    t = wait_for(lambda: _transactions(stack, "peek-silent"), 10, message="the transaction")[0]
    assert t["url"] == f"http://{HOST}:{http_origin}/late" and t["status_code"] == 200


def test_a_request_line_in_pieces_is_intercepted(stack: Stack, http_origin: int) -> None:
    request = f"GET /pieces HTTP/1.1\r\nHost: {HOST}:{http_origin}\r\nConnection: close\r\n\r\n".encode()
    sock, _ = _tunnel(stack, "peek-pieces", http_origin)
    with sock:
        for i in range(0, len(request), 3):
            sock.sendall(request[i : i + 3])
            time.sleep(0.01)
        reply = _recv_until(sock, b"reached\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    t = wait_for(lambda: _transactions(stack, "peek-pieces"), 10, message="the transaction")[0]
    assert t["url"] == f"http://{HOST}:{http_origin}/pieces"


def test_a_client_hello_in_pieces_is_intercepted(stack: Stack, tls_origin: int) -> None:
    ctx = ssl.create_default_context(cafile=str(stack.data_dir / "ca-cert.pem"))  # trusts the Greyproxy CA
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SNI)
    sock, _ = _tunnel(stack, "peek-hello", tls_origin)
    with sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        assert hello[:2] == b"\x16\x03" and len(hello) > 40
        for i in range(0, len(hello), 7):  # a few bytes at a time: the look waits for the whole hello
            sock.sendall(hello[i : i + 7])
            time.sleep(0.005)
        while True:
            data = sock.recv(65536)
            assert data, "the proxy closed during the handshake"
            incoming.write(data)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
        if outgoing.pending:
            sock.sendall(outgoing.read())
        issuer = dict(rdn[0] for rdn in tls.getpeercert()["issuer"])
        assert issuer["commonName"] == "Greyproxy CA"  # the proxy's leaf: intercepted
        tls.write(f"GET /hello HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        plain = b""
        while b'"/hello"' not in plain:
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    plain += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
    assert plain.startswith(b"HTTP/1.1 200") and plain.endswith(b'{"path": "/hello"}'), plain
    assert wait_log_entry(stack, "peek-hello")["mitm_skip_reason"] is None
    t = wait_for(lambda: _transactions(stack, "peek-hello"), 10, message="the transaction")[0]
    assert t["url"].endswith("/hello") and t["status_code"] == 200


def test_a_server_speaking_first_is_piped_at_once(stack: Stack, banner_origin: int) -> None:
    sock, early = _tunnel(stack, "peek-banner", banner_origin)  # the banner may come with the 200
    with sock:
        sock.settimeout(3)  # the client says nothing: the banner must not wait for it
        assert _recv_until(sock, b"\r\n", early) == b"220 banner first\r\n"
        sock.sendall(b"EHLO x\r\n")
        assert _recv_until(sock, b"EHLO x\r\n") == b"EHLO x\r\n"
    assert wait_log_entry(stack, "peek-banner")["mitm_skip_reason"] == "non_tls"


def test_a_client_that_leaves_without_a_byte_is_logged(stack: Stack, http_origin: int) -> None:
    sock, _ = _tunnel(stack, "peek-gone", http_origin)
    time.sleep(0.3)
    sock.close()
    assert wait_log_entry(stack, "peek-gone")["mitm_skip_reason"] == "non_tls"


@pytest.mark.parametrize(
    "first,path",
    [
        (b"\r\n", "/blank-line-first"),  # RFC 9112 §2.2: servers skip it (nginx does)
        (b"", "/" + "long" * 2600),  # a request line past the look's 8 KiB
    ],
    ids=["blank-line-first", "10k-request-line"],
)
def test_a_request_the_look_once_called_not_http_is_intercepted(
    stack: Stack, http_origin: int, first: bytes, path: str
) -> None:
    """What an origin reads as a request is never piped to it unread: once, a blank line first or a
    request line longer than the look's 8 KiB made the tunnel `non_tls`, unrecorded (and its later
    requests unchecked)."""
    container = f"peek-around-{len(path)}"
    sock, _ = _tunnel(stack, container, http_origin)
    with sock:
        sock.sendall(first + f"GET {path} HTTP/1.1\r\nHost: {HOST}:{http_origin}\r\nConnection: close\r\n\r\n".encode())
        reply = _recv_until(sock, b"reached\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert wait_log_entry(stack, container)["mitm_skip_reason"] is None
    t = wait_for(lambda: _transactions(stack, container), 10, message="the transaction")[0]
    assert t["url"] == f"http://{HOST}:{http_origin}{path}" and t["status_code"] == 200


def test_the_http2_preface_in_a_tunnel_is_answered_not_piped(stack: Stack, http_origin: int) -> None:
    """HTTP/2 with prior knowledge is HTTP the proxy cannot read: 505 from the proxy, not the origin."""
    sock, _ = _tunnel(stack, "peek-h2c", http_origin)
    with sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        reply = _recv_until(sock, b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 505"), reply
    assert wait_log_entry(stack, "peek-h2c")["mitm_skip_reason"] is None
    # no record can be made of it (there is no request): the proxy's log says why the client broke
    proxy_log = stack.data_dir / "logs" / "proxy.log"
    wait_for(
        lambda: (
            "peek-h2c: refused a request inside its intercepted connection" in proxy_log.read_text(errors="replace")
        ),
        10,
        message="the refusal in proxy.log",
    )


def test_a_client_offering_only_h2_is_intercepted(stack: Stack, tls_origin: int) -> None:
    """SPEC §7: clients are offered HTTP/1.1 only. A client offering only `h2` once had its tunnel
    piped untouched (`non_http_after_tls`), so what it offered decided whether it was recorded; now
    its handshake ends at the proxy with no protocol agreed, and an HTTP/1.1 request is recorded."""
    ctx = ssl.create_default_context(cafile=str(stack.data_dir / "ca-cert.pem"))
    ctx.set_alpn_protocols(["h2"])
    raw, _ = _tunnel(stack, "peek-h2-only", tls_origin)
    with ctx.wrap_socket(raw, server_hostname=SNI) as tls:
        issuer = dict(rdn[0] for rdn in tls.getpeercert()["issuer"])
        assert issuer["commonName"] == "Greyproxy CA"  # the proxy's leaf: intercepted
        assert tls.selected_alpn_protocol() is None
        tls.sendall(f"GET /h2-only HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode())
        reply = _recv_until(tls, b'"/h2-only"}')
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert wait_log_entry(stack, "peek-h2-only")["mitm_skip_reason"] is None
    t = wait_for(lambda: _transactions(stack, "peek-h2-only"), 10, message="the transaction")[0]
    assert t["url"].endswith("/h2-only") and t["status_code"] == 200


def test_a_request_line_left_unfinished_past_the_look_is_still_read(stack: Stack, http_origin: int) -> None:
    """A first line begun and not finished within headerTimeout (5 s here) is the request path's to
    read (it once made the tunnel `non_tls`, piped unread: a slow line was a way around the record)."""
    sock, _ = _tunnel(stack, "peek-slow-line", http_origin)
    with sock:
        sock.sendall(b"GET /slow-li")
        time.sleep(5.5)
        sock.sendall(f"ne HTTP/1.1\r\nHost: {HOST}:{http_origin}\r\nConnection: close\r\n\r\n".encode())
        reply = _recv_until(sock, b"\r\n\r\n")
    # the request path's own header deadline had run out too: its 408, not the origin's answer
    assert reply.startswith((b"HTTP/1.1 200", b"HTTP/1.1 408")), reply
    assert wait_log_entry(stack, "peek-slow-line")["mitm_skip_reason"] is None


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with echo_origin(HOST) as port:
        yield port


def test_a_client_first_protocol_with_no_line_end_is_piped_at_once(stack: Stack, echo_port: int) -> None:
    """git's first message (`0032git-upload-pack /repo.git\\0host=...\\0`, no LF, then it waits for
    the server) is not HTTP: piped at once, not held until headerTimeout and answered 400 (as a
    first look that took any token for a method did)."""
    sock, _ = _tunnel(stack, "peek-git", echo_port)
    first = b"0032git-upload-pack /repo.git\x00host=127.0.0.1\x00"
    with sock:
        sock.settimeout(3)  # well under the stack's headerTimeout (5 s)
        sock.sendall(first)
        assert _recv_until(sock, first[-10:]) == first
    assert wait_log_entry(stack, "peek-git")["mitm_skip_reason"] == "non_tls"


def test_a_last_request_line_cut_by_the_clients_eof_is_not_piped(stack: Stack, http_origin: int) -> None:
    """A request line with no LF and then the client's EOF: Python's http.server serves it, so it is
    the request path's (which serves nothing unfinished), never piped to the origin unread."""
    sock, _ = _tunnel(stack, "peek-eof", http_origin)
    with sock:
        sock.sendall(b"GET /cut HTTP/1.1")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        reply = _recv_until(sock, b"\x00never")
    assert b"reached" not in reply, reply
    assert wait_log_entry(stack, "peek-eof")["mitm_skip_reason"] is None


@pytest.fixture(scope="module")
def mqtt_origin(origin_ca: trustme.CA) -> Iterator[int]:
    """A TLS server choosing `x-mqtt` by ALPN (as an MQTT broker on 443 does), echoing what it reads."""
    with _alpn_echo_origin(origin_ca, ["x-mqtt"]) as port:
        yield port


@pytest.fixture(scope="module")
def h2_first_origin(origin_ca: trustme.CA) -> Iterator[int]:
    """A TLS server that agrees h2 before x-mqtt (its own order)."""
    with _alpn_echo_origin(origin_ca, ["h2", "x-mqtt"]) as port:
        yield port


@contextlib.contextmanager
def _alpn_echo_origin(origin_ca: trustme.CA, protocols: list[str]) -> Iterator[int]:
    ctx = server_context(origin_ca, HOST, SNI)
    ctx.set_alpn_protocols(protocols)
    with echo_origin(HOST, tls=ctx) as port:
        yield port


def _issuer_through(stack: Stack, container: str, port: int, alpn: list[str]) -> tuple[str, str | None, ssl.SSLSocket]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # (whose certificate comes back is the test)
    ctx.set_alpn_protocols(alpn)
    raw, _ = _tunnel(stack, container, port)
    tls = ctx.wrap_socket(raw, server_hostname=SNI)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).issuer.rfc4514_string(), tls.selected_alpn_protocol(), tls


def test_a_protocol_the_origin_agrees_by_alpn_that_is_not_http_is_piped(stack: Stack, mqtt_origin: int) -> None:
    """ALPN-chosen protocols other than HTTP (MQTT on 443, XMPP, DoT) need their protocol agreed with
    the origin, which interception cannot give: when the origin agrees one, the tunnel is piped."""
    issuer, agreed, tls = _issuer_through(stack, "peek-alpn-mqtt", mqtt_origin, ["x-mqtt"])
    with tls:
        assert "Greyproxy CA" not in issuer and agreed == "x-mqtt", (issuer, agreed)  # the origin's own
        tls.sendall(b"\x10\x0c\x00\x04MQTT")
        assert tls.recv(100) == b"\x10\x0c\x00\x04MQTT"
    assert wait_log_entry(stack, "peek-alpn-mqtt")["mitm_skip_reason"] == "non_http_after_tls"


def test_an_alpn_name_the_origin_ignores_is_no_way_around_the_record(stack: Stack, tls_origin: int) -> None:
    """What the client offers decides nothing (outside tester B: offering `x-foo` to an origin that
    ignores ALPN got HTTP served unrecorded): the origin agrees no protocol, so the tunnel is
    intercepted and its HTTP recorded."""
    issuer, agreed, tls = _issuer_through(stack, "peek-alpn-foo", tls_origin, ["x-foo"])
    with tls:
        assert "Greyproxy CA" in issuer and agreed is None, (issuer, agreed)
        tls.sendall(f"GET /via-x-foo HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode())
        reply = _recv_until(tls, b'"/via-x-foo"}')
    assert reply.startswith(b"HTTP/1.1 200"), reply
    t = wait_for(lambda: _transactions(stack, "peek-alpn-foo"), 10, message="the transaction")[0]
    assert t["url"].endswith("/via-x-foo")


def test_an_http_protocol_the_origin_prefers_is_not_piped(stack: Stack, h2_first_origin: int) -> None:
    """The origin is asked with the client's whole list, as the client's own handshake offers it:
    asked without the HTTP names it agreed `x-mqtt`, then chose h2 with the client, and HTTP/2 went
    through unrecorded (outside tester B). An origin choosing h2 means HTTP: intercepted."""
    issuer, agreed, tls = _issuer_through(stack, "peek-alpn-h2first", h2_first_origin, ["h2", "x-mqtt"])
    with tls:
        assert "Greyproxy CA" in issuer and agreed is None, (issuer, agreed)
        tls.sendall(f"GET /h2first HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode())
        _recv_until(tls, b"\r\n\r\n")  # (the echo origin's answer is no HTTP: the proxy's 502)
    assert wait_log_entry(stack, "peek-alpn-h2first")["mitm_skip_reason"] is None
    t = wait_for(lambda: _transactions(stack, "peek-alpn-h2first"), 10, message="the transaction")[0]
    assert t["url"].endswith("/h2first")
