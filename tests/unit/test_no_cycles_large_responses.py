"""Large responses leave no reference cycle behind (the proxy's HTTP listener in process, real
loopback sockets, its hot modules compiled as the service runs them).

The proxy raises its collector's threshold (services/proxy/service.py, GC_THRESHOLD): whatever a
request leaves in a reference cycle waits long for the collector. Compiled with Cython, a
coroutine's locals live in a scope that its inner functions refer back to: `Exchange.proceed`'s
head parser, `handle_http`'s helpers and the WebSocket relay's pump made such cycles, and with them
each exchange's record and its body copy (up to capture.maxBodyBytes, 2 MiB) stayed until the
collector ran: an outside run saw a proxy grow by ~5 MB per intercepted 4 MiB text response, to
600 MB. A large response is what takes those paths (a small one is served from the callbacks).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from greyproxy.certs import CAWatcher, generate_ca
from greyproxy.policy import Rule, RuleSet
from services.proxy import http_proxy
from services.proxy.context import Limits, ProxyContext, start_listener
from services.proxy.credentials import LiveCredentials
from services.proxy.gate import Gate
from services.proxy.hooks import CredentialSubstitution, HookChain, RuleRecheck
from services.proxy.mitm import Interceptor
from services.proxy.pipeline import Recorder
from harness.fakes import Journal, Publisher

BODY = (b"0123456789abcdef" * 64 + b"\n") * 1024  # 1 MiB of text: relayed by `proceed`, captured


class _Settings:
    def on_change(self, fn: Any) -> None:
        fn({"mitmEnabled": True})


def _origin(tls: ssl.SSLContext | None) -> int:
    """A keep-alive origin answering every request with BODY, in threads."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve(c: socket.socket) -> None:
        try:
            if tls is not None:
                c = tls.wrap_socket(c, server_side=True)
            f = c.makefile("rb")
            while f.readline():
                while f.readline() not in (b"\r\n", b""):
                    pass
                c.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
                )
        except OSError:
            pass
        finally:
            c.close()

    def accept() -> None:
        while True:
            c, _ = srv.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def _read_response(f: Any) -> bytes:
    assert f.readline().startswith(b"HTTP/1.1 200")
    size = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            size = int(line.split(b":")[1])
    return f.read(size)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[ProxyContext, int, int, ssl.SSLContext]]:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "origin-ca.pem"))
    generate_ca(tmp_path)
    journal = Journal()
    gate = Gate(journal, Publisher(), set(), {"127.0.0.1"}, 5.0, 10)  # type: ignore[arg-type]
    gate.set_rules(RuleSet([Rule(1, "*", "127.0.0.1", action="allow")]), 1)
    ctx = ProxyContext(gate, Limits())
    ctx.recorder = recorder = Recorder(journal)  # type: ignore[arg-type]
    ctx.hooks = HookChain([RuleRecheck(gate), CredentialSubstitution(LiveCredentials("/nonexistent", None, None))])  # type: ignore[arg-type]
    certs = CAWatcher(tmp_path)
    certs.check()
    ctx.tunnel_hook = Interceptor(gate, recorder, certs, _Settings(), [], str(tmp_path / "origin-ca.pem"))  # type: ignore[arg-type]
    gate.defer_tunnel_logs = True
    client_tls = ssl.create_default_context(cafile=str(tmp_path / "ca-cert.pem"))
    yield ctx, _origin(None), _origin(server_tls), client_tls


def _clients(port: int, plain: int, tls_port: int, client_tls: ssl.SSLContext) -> None:
    for _ in range(3):  # plain HTTP through the forward proxy: two requests on one connection
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            for _ in range(2):
                s.sendall(b"GET http://127.0.0.1:%d/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (plain, plain))
                assert _read_response(f) == BODY
    for _ in range(3):  # intercepted HTTPS
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (tls_port, tls_port))
            head = b""
            while b"\r\n\r\n" not in head:
                head += raw.recv(1)
            assert head.startswith(b"HTTP/1.1 200")
            with client_tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                f = s.makefile("rb")
                for _ in range(2):
                    s.sendall(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % tls_port)
                    assert _read_response(f) == BODY


def test_large_plain_and_intercepted_responses_leave_no_cyclic_garbage(world: Any) -> None:
    ctx, plain, tls_port, client_tls = world
    uvloop = pytest.importorskip("uvloop")

    async def main() -> Counter[str]:
        server = await start_listener(ctx, "127.0.0.1", 0, http_proxy.handle_http, begin=http_proxy.begin_http)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _clients, port, plain, tls_port, client_tls)  # warm-up: caches filled
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await loop.run_in_executor(None, _clients, port, plain, tls_port, client_tls)
            await asyncio.sleep(0.3)  # the last connections' ends
            gc.collect()
            return Counter(type(o).__name__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            server.close()

    left = uvloop.run(main())
    assert not left, left.most_common(12)
