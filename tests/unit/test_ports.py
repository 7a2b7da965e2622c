"""greyproxy.ports: a listening program is refused at once and named; lingering connections are waited for.

The sockets here are real: a TIME_WAIT made by a client socket bound without SO_REUSEADDR (the
case that blocks a listener on Linux), an ESTABLISHED client socket holding the port (freed at
once with an RST, to watch a waiting bind succeed), and a listening socket of this process.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from greyproxy import ports

SAMPLE_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A898 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0
   1: 0100007F:A898 0100007F:1F90 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0
   2: 0200007F:A898 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 77 1 0
   3: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 99 1 0
   4: garbage
"""
SAMPLE_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:A898 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 555 1 0
   1: 00000000000000000000000001000000:A898 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 556 1 0
"""


def test_parse_proc_net_reads_state_address_and_inode() -> None:
    rows = ports.parse_proc_net(SAMPLE_TCP, 0xA898, udp=False)
    assert [(r.address, r.state, r.inode) for r in rows] == [
        ("127.0.0.1", "LISTEN", 4242),
        ("127.0.0.1", "TIME_WAIT", 0),
        ("127.0.0.2", "LISTEN", 77),
    ]
    assert [r.listening for r in rows] == [True, False, True]
    six = ports.parse_proc_net(SAMPLE_TCP6, 0xA898, udp=False)
    assert [(r.address, r.inode) for r in six] == [("::", 555), ("::1", 556)]
    udp = ports.parse_proc_net(SAMPLE_TCP, 80, udp=True)
    assert [(r.state, r.listening) for r in udp] == [("BOUND", True)]


def test_holders_from_a_fake_proc_match_addresses_and_name_the_program(tmp_path) -> None:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "tcp").write_text(SAMPLE_TCP)
    (proc / "net" / "tcp6").write_text(SAMPLE_TCP6)
    fd_dir = proc / "321" / "fd"
    fd_dir.mkdir(parents=True)
    os.symlink("socket:[4242]", fd_dir / "7")
    os.symlink("/dev/null", fd_dir / "0")
    (proc / "321" / "cmdline").write_bytes(b"nc\0-l\0" + b"43160\0")
    found = ports.holders("127.0.0.1", 0xA898, socket.SOCK_STREAM, proc)
    assert found is not None
    # 127.0.0.2 cannot clash with 127.0.0.1; the IPv6 wildcard can (and ::1 cannot)
    assert [(h.address, h.state, h.pid) for h in found] == [
        ("127.0.0.1", "LISTEN", 321),
        ("127.0.0.1", "TIME_WAIT", None),
        ("::", "LISTEN", None),
    ]
    assert found[0].command == "nc -l 43160"
    verdict = ports.diagnose("127.0.0.1", 0xA898, socket.SOCK_STREAM, proc)
    assert verdict.listening and verdict.lingering == 1
    assert "pid 321 (nc -l 43160)" in str(ports.PortBusy("api", "127.0.0.1", 0xA898, verdict.holders, ""))
    assert ports.holders("127.0.0.1", 1, socket.SOCK_STREAM, tmp_path / "nothing") is None


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    """A listener on another port, for client sockets to connect to."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv
    srv.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_bound_to(port: int, peer: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client socket on local `port`, bound WITHOUT SO_REUSEADDR, connected to `peer`; and the accepted end."""
    cli = socket.socket()
    cli.bind(("127.0.0.1", port))
    cli.connect(peer.getsockname())
    conn, _ = peer.accept()
    return cli, conn


def time_wait_on(port: int, peer: socket.socket) -> None:
    """Leave a connection in TIME_WAIT on local `port`: the client closes first, then the server."""
    cli, conn = client_bound_to(port, peer)
    cli.close()
    assert conn.recv(1) == b""
    conn.close()
    time.sleep(0.05)


def test_time_wait_is_lingering_not_a_program(peer: socket.socket) -> None:
    port = _free_port()
    time_wait_on(port, peer)
    err = ports.try_bind("127.0.0.1", port)
    assert err is not None and err.errno == errno.EADDRINUSE  # the premise: the port really is blocked
    verdict = ports.diagnose("127.0.0.1", port)
    assert not verdict.listening and verdict.lingering >= 1 and verdict.holders == []
    said: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(ports.PortLingering, match="still in use after 1 s"):
        ports.wait_until_bindable("API", "127.0.0.1", port, wait=1.0, say=said.append)
    assert 1.0 <= time.monotonic() - t0 < 5
    assert len(said) == 1 and "TIME_WAIT" in said[0] and "not by a listening program" in said[0], said


def test_a_listening_program_is_refused_at_once_and_named() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(ports.PortBusy) as info:
            ports.wait_until_bindable("API", "127.0.0.1", port, wait=30, say=pytest.fail)
        assert time.monotonic() - t0 < 2
        message = str(info.value)
        assert f"127.0.0.1:{port} is in use by a listening program: pid {os.getpid()} (" in message, message
        assert "python" in message.lower() or "pytest" in message.lower(), message
    finally:
        holder.close()


def test_a_udp_socket_is_a_program() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ports.PortBusy, match=f"pid {os.getpid()}"):
            ports.wait_until_bindable("dns (udp)", "127.0.0.1", port, socket.SOCK_DGRAM, wait=30, say=pytest.fail)
    finally:
        holder.close()


def test_waiting_ends_when_the_connection_goes(peer: socket.socket) -> None:
    """An ESTABLISHED client socket holds the port; once it goes (RST: no TIME_WAIT) the wait ends."""
    port = _free_port()
    cli, conn = client_bound_to(port, peer)
    said: list[str] = []

    def release() -> None:
        time.sleep(0.8)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.close()

    import threading

    threading.Thread(target=release, daemon=True).start()
    try:
        t0 = time.monotonic()
        ports.wait_until_bindable("API", "127.0.0.1", port, wait=20, say=said.append)
        assert 0.7 < time.monotonic() - t0 < 10
        assert len(said) == 1, said
    finally:
        conn.close()


def test_bind_retrying_waits_for_lingering_and_refuses_programs(peer: socket.socket, caplog) -> None:
    port = _free_port()
    cli, conn = client_bound_to(port, peer)

    async def bind() -> socket.socket:
        return ports.listen_socket("127.0.0.1", port)

    async def scenario() -> socket.socket:
        loop = asyncio.get_running_loop()
        loop.call_later(
            0.8, lambda: (cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)), cli.close())
        )
        return await ports.bind_retrying(bind, "API", "127.0.0.1", port, wait=20)

    with caplog.at_level(logging.WARNING, logger="greyproxy.ports"):
        sock = asyncio.run(scenario())
    conn.close()
    try:
        assert sock.getsockname()[1] == port
        waits = [r for r in caplog.records if "waiting up to 20 s" in r.getMessage()]
        assert len(waits) == 1, [r.getMessage() for r in caplog.records]
        sock.listen()  # now a program listens there: a second bind is refused at once, naming us

        async def again() -> None:
            await ports.bind_retrying(bind, "API", "127.0.0.1", port, wait=20)

        t0 = time.monotonic()
        with pytest.raises(ports.PortBusy, match=f"pid {os.getpid()}"):
            asyncio.run(again())
        assert time.monotonic() - t0 < 2
    finally:
        sock.close()


def test_bind_retrying_gives_up_after_the_wait(peer: socket.socket) -> None:
    port = _free_port()
    cli, conn = client_bound_to(port, peer)

    async def bind() -> socket.socket:
        return ports.listen_socket("127.0.0.1", port)

    try:
        with pytest.raises(OSError) as info:
            asyncio.run(ports.bind_retrying(bind, "API", "127.0.0.1", port, wait=0.5))
        assert info.value.errno == errno.EADDRINUSE and not isinstance(info.value, ports.PortBusy)
    finally:
        cli.close()
        conn.close()
