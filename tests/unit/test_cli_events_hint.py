"""SPEC §14 (the CLI around the stack): `greyproxy events` says when no bus listens at its endpoint (greyproxy/cli_events.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import zmq

from bus import curve
from conftest import free_port
from harness.curve_peers import curve_server
from greyproxy.cli_events import bus_hint, bus_listening


def test_an_ipc_endpoint_listens_only_while_a_socket_accepts_there(tmp_path: Path) -> None:
    path = tmp_path / "bus-sub.sock"
    assert not bus_listening(f"ipc://{path}")  # no socket file
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        assert bus_listening(f"ipc://{path}")
    finally:
        server.close()
    assert path.exists()  # a socket file left behind by a stack that stopped...
    assert not bus_listening(f"ipc://{path}")  # ...is not a bus
    assert bus_listening("tcp://127.0.0.1:1")  # (tcp: not probed by a bare connect)
    assert "no bus listens there" in (bus_hint(f"ipc://{path}") or "")


def test_a_tcp_bus_that_refuses_this_key_is_named_with_the_allow_command(tmp_path: Path) -> None:
    """SPEC §15: `greyproxy events` against a tcp:// bus on another host says at once that the bus
    refused this host's key, instead of waiting in silence."""
    with curve_server(tmp_path, zmq.XPUB) as bus:
        curve.configure(bus.ours.dir, bus.server_key)
        assert bus_hint(bus.endpoint) is None
        curve.configure(bus.stranger.dir, bus.server_key)
        hint = bus_hint(bus.endpoint) or ""
        assert "refused this host's CURVE key" in hint and bus.stranger.public in hint, hint
        curve.configure(bus.ours.dir, bus.server_key)
        assert "nothing accepts connections" in (bus_hint(f"tcp://127.0.0.1:{free_port()}") or "")
