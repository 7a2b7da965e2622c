"""Starting over a busy port: closing connections (TIME_WAIT) are waited for, a listening program is not.

The default ports lie in Linux's ephemeral range, so a client connection may have used one as
its local port; bound without SO_REUSEADDR, its TIME_WAIT blocks our listener for up to 60 s.
"""

from __future__ import annotations

import errno
import shutil
import socket
import struct
import time

import httpx
import pytest
from conftest import Stack, wait_for

from greyproxy import ports

pytestmark = pytest.mark.stack


def _client_on(port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(client bound to local `port` WITHOUT SO_REUSEADDR, the accepted end, the peer's listener)."""
    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(1)
    cli = socket.socket()
    cli.bind(("127.0.0.1", port))
    cli.connect(peer.getsockname())
    conn, _ = peer.accept()
    return cli, conn, peer


def test_stack_comes_up_over_a_time_wait_on_the_api_port() -> None:
    stack = Stack()
    port = stack.ports["api"]
    cli, conn, peer = _client_on(port)
    cli.close()  # the client closes first: its socket, on the API port, goes to TIME_WAIT
    assert conn.recv(1) == b""
    conn.close()
    peer.close()
    err = ports.try_bind("127.0.0.1", port)
    assert err is not None and err.errno == errno.EADDRINUSE, "premise: the TIME_WAIT blocks the API port"
    t0 = time.monotonic()
    try:
        stack.start(timeout=90)
        took = time.monotonic() - t0
        assert took < 65 + 20, took  # the wait (≤ 65 s) plus an ordinary start
        out = stack.serve_log.read_text()
        assert out.count("waiting up to 65 s") == 1, out
        assert "TIME_WAIT" in out and "not by a listening program" in out, out
        code, body = stack.health()
        assert code == 200, body
    finally:
        stack.cleanup()
    shutil.rmtree(stack.root, ignore_errors=True)


def test_a_service_waits_for_a_connection_on_its_port(short_tmp, service_runner) -> None:
    """`greyproxy run api` (as supervisord restarts it) waits for the port, then serves."""
    stack = Stack(root=short_tmp)  # only for its config and ports; the stack is not started
    port = stack.ports["api"]
    cli, conn, peer = _client_on(port)  # ESTABLISHED: holds the port until it goes
    try:
        api = service_runner("api", stack.cfg_path, stack.env)
        wait_for(lambda: "waiting up to 65 s" in api.log_path.read_text(), 20, message="the API to say it waits")
        assert api.alive(), api.logs()
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.close()  # an RST: gone at once, no TIME_WAIT

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1, trust_env=False).status_code > 0
            except httpx.HTTPError:
                return False

        wait_for(answers, 20, message="the API to answer once the port is free")
        assert api.log_path.read_text().count("waiting up to 65 s") == 1, api.logs()
        api.stop()
    finally:
        conn.close()
        peer.close()
        stack._client.close()


def test_serve_refuses_a_listening_program_at_once_naming_it(short_tmp) -> None:
    stack = Stack(root=short_tmp)
    port = stack.ports["http-proxy"]
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        t0 = time.monotonic()
        with pytest.raises(AssertionError, match="exited with 1"):
            stack.start(timeout=30)
        assert time.monotonic() - t0 < 15
        out = stack.serve_log.read_text()
        assert f"127.0.0.1:{port} is in use by a listening program: pid " in out, out
        assert "waiting" not in out, out
    finally:
        holder.close()
        stack.cleanup()
