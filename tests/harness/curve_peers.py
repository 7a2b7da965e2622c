"""A CURVE server socket on loopback tcp:// with three key pairs, for tests of bus/curve.py's
checks in one process: the server's, ``ours`` (allowed by it) and a ``stranger``'s (not allowed).

``curve.configure(peers.ours.dir, peers.server_key)`` then makes the sockets this process opens
connect as ``ours``; the same with ``peers.stranger.dir`` as the stranger."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq

from bus import curve

from .util import free_port


@dataclass
class KeyPair:
    dir: Path
    public: str


@dataclass
class CurvePeers:
    endpoint: str
    server_key: str
    ours: KeyPair
    stranger: KeyPair
    server_dir: Path  # its authorized/ decides who may connect (read at each handshake)
    sock: zmq.Socket  # the bound server socket


@contextlib.contextmanager
def curve_server(tmp_path: Path, kind: int = zmq.ROUTER) -> Iterator[CurvePeers]:
    pairs = {}
    for name in ("server", "ours", "stranger"):
        public, _ = curve.ensure_keypair(tmp_path / name)
        pairs[name] = KeyPair(tmp_path / name, public.decode())
    (tmp_path / "server" / "authorized" / "ours.key").write_text(f'public-key = "{pairs["ours"].public}"\n')
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    try:
        curve.configure(pairs["server"].dir)
        curve.secure(sock, endpoint, server=True)
        sock.bind(endpoint)
        yield CurvePeers(endpoint, pairs["server"].public, pairs["ours"], pairs["stranger"], pairs["server"].dir, sock)
    finally:
        sock.close(linger=0)
        curve.configure(None)
        auth = curve._State.authenticators.pop(id(ctx), None)
        if auth is not None:
            auth.stop()
        ctx.term()
