"""SPEC §14 (the CLI around the stack): `greyproxy events` says when no bus listens at its endpoint (greyproxy/cli_events.py)."""

from __future__ import annotations

import socket
from pathlib import Path

from greyproxy.cli_events import bus_listening


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
    assert bus_listening("tcp://127.0.0.1:1")  # (tcp: not probed)
