"""CURVE keys and the ZAP check (bus/curve.py), in one process on loopback tcp://."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from bus import curve
from bus.reqrep import ControlClient, ControlServer, ServiceUnavailable
from conftest import free_port
from harness.curve_peers import curve_server


def test_keypair_made_once_even_when_raced(tmp_path: Path) -> None:
    got: list[tuple[bytes, bytes]] = []
    threads = [threading.Thread(target=lambda: got.append(curve.ensure_keypair(tmp_path / "k"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(threads)  # no thread failed (an exception in a thread only warns)
    assert len(set(got)) == 1  # everyone reads the one pair that won
    assert (tmp_path / "k" / curve.SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert curve.read_cert(tmp_path / "k" / curve.KEY_FILE) == (got[0][0], None)


@pytest.mark.parametrize("bad", ["", "short", "~" * 40, "a" * 41])
def test_bad_public_keys_are_refused(bad: str) -> None:
    with pytest.raises(curve.CurveError):
        curve.check_public_key(bad)


def test_known_key_served_unknown_key_refused_and_logged(tmp_path: Path, caplog) -> None:
    """SPEC §15: a peer with an unknown key is refused and the refusal logged, naming the endpoint
    it came to, once per key however often it retries."""
    server_dir, client_dir, stranger_dir = tmp_path / "s", tmp_path / "c", tmp_path / "x"
    server_pub, _ = curve.ensure_keypair(server_dir)
    client_pub, client_sec = curve.ensure_keypair(client_dir)
    stranger_pub, stranger_sec = curve.ensure_keypair(stranger_dir)
    (server_dir / "authorized" / "client.key").write_text(f'public-key = "{client_pub.decode()}"\n')
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    second = f"tcp://127.0.0.1:{free_port()}"  # a second server in the same ZeroMQ context

    async def call_as(ctx: zmq.asyncio.Context, public: bytes, secret: bytes, endpoint: str = endpoint) -> object:
        client = ControlClient(endpoint, "srv", 0.5, 1, ctx=ctx)
        orig = client._open

        def open_with_keys():  # noqa: ANN202 - this client's own key pair, not the process's
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_pub
            sock.connect(endpoint)
            return sock

        client._open = open_with_keys  # type: ignore[method-assign]
        assert orig is not None
        try:
            return await client.call("ping")
        finally:
            client.close()

    async def go() -> None:
        curve.configure(server_dir)
        ctx = zmq.asyncio.Context()
        server = ControlServer(endpoint, {}, ctx=ctx)
        server2 = ControlServer(second, {}, ctx=ctx)
        tasks = [asyncio.ensure_future(server.serve()), asyncio.ensure_future(server2.serve())]
        try:
            assert (await call_as(ctx, client_pub, client_sec))["pong"] is True
            assert (await call_as(ctx, client_pub, client_sec, second))["pong"] is True
            for _ in range(3):  # a refused peer tries again and again
                with pytest.raises(ServiceUnavailable):
                    await call_as(ctx, stranger_pub, stranger_sec, second)
        finally:
            for t in tasks:
                t.cancel()
            server.close()
            server2.close()
            curve.configure(None)

    with caplog.at_level(logging.WARNING, logger="greyproxy.bus.curve"):
        asyncio.run(go())
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # one line for the stranger's key, however often it came back; naming the endpoint it came to
    # (before: the first endpoint bound in the process's ZeroMQ context, whichever it came to)
    assert len(refusals) == 1 and stranger_pub.decode() in refusals[0], refusals
    assert f"on {second}:" in refusals[0] and endpoint not in refusals[0]
    assert curve.refused() >= 3
    assert not any(client_pub.decode() in r.getMessage() for r in caplog.records)


def test_handshakes_failing_before_the_key_check_are_logged_by_the_bound_side(tmp_path: Path, caplog) -> None:
    """SPEC §15: a peer with no CURVE at all, or with another server key, is refused before ZAP is
    asked: the process that bound the endpoint says so (once per endpoint and reason, however often
    the peer retries), from the socket's ZeroMQ monitor. Before: nothing was logged on this side."""
    import time

    curve.configure(tmp_path / "s")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    peers: list[zmq.Socket] = []
    try:
        with caplog.at_level(logging.WARNING, logger="greyproxy.bus.curve"):
            curve.secure(server, endpoint, server=True)
            server.bind(endpoint)
            before = curve.refused()
            plain = ctx.socket(zmq.DEALER)  # no CURVE: a peer without bus keys
            wrong = ctx.socket(zmq.DEALER)  # CURVE, sealed for another server's key
            wrong.curve_publickey, wrong.curve_secretkey = zmq.curve_keypair()
            wrong.curve_serverkey = zmq.curve_keypair()[0]
            for sock in (plain, wrong):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RECONNECT_IVL, 50)  # it comes back again and again
                sock.connect(endpoint)
                peers.append(sock)
            deadline = time.monotonic() + 10
            while curve.refused() - before < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert curve.refused() - before >= 6  # every failed handshake counted...
        lines = [r.getMessage() for r in caplog.records if "handshake failed" in r.getMessage()]
        assert len(lines) == 2, lines  # ...and one line per reason
        assert all(f"refused a bus peer on {endpoint}:" in line for line in lines)
        assert any("does not use CURVE" in line for line in lines)
        assert any("another server key" in line for line in lines)
    finally:
        for sock in peers:
            sock.close(linger=0)
        server.close(linger=0)
        curve.configure(None)


def test_diagnose_names_why_a_tcp_endpoint_does_not_answer(tmp_path: Path) -> None:
    """SPEC §15: a proxy on another host says why the central bus does not answer it: its key
    refused (with the allow command, the key quoted for a shell), a wrong bus.serverKey, or nothing
    listening; None once the handshake succeeds (the transport is fine)."""
    with curve_server(tmp_path) as peers:
        endpoint = peers.endpoint
        curve.configure(peers.ours.dir, peers.server_key)
        assert curve.diagnose(endpoint, timeout=3.0) is None
        assert curve.diagnose(f"ipc://{tmp_path}/nothing.sock") is None  # ipc: the file mode guards it

        curve.configure(peers.stranger.dir, peers.server_key)
        why = curve.diagnose(endpoint, timeout=3.0, name="proxy-x")
        assert why is not None and "refused this host's CURVE key" in why
        assert f"greyproxy keys allow proxy-x '{peers.stranger.public}'" in why

        curve.configure(peers.ours.dir, peers.stranger.public)  # ours trusts the wrong server key
        why = curve.diagnose(endpoint, timeout=1.0)
        assert why is not None and "bus.serverKey" in why

        curve.configure(peers.ours.dir, peers.server_key)
        unused = free_port()
        why = curve.diagnose(f"tcp://127.0.0.1:{unused}", timeout=0.5)
        assert why == f"nothing accepts connections at tcp://127.0.0.1:{unused}"


def test_a_secret_key_of_another_pair_is_said_at_load(tmp_path: Path) -> None:
    """An outside run pieced a key file from two pairs: the proxy started, every handshake failed,
    and both sides blamed bus.serverKey (which was right). Now the pair is checked when it is read."""
    keys = tmp_path / "k"
    public, _secret = curve.ensure_keypair(keys)
    _other_public, other_secret = zmq.curve_keypair()
    path = keys / curve.SECRET_FILE
    path.write_text(path.read_text().replace(_secret.decode(), other_secret.decode()))
    with pytest.raises(curve.CurveError, match="does not belong to its public-key"):
        curve.ensure_keypair(keys)
    path.write_text(path.read_text().replace(other_secret.decode(), "~" * 40))  # not z85 at all
    with pytest.raises(curve.CurveError, match=str(path)):
        curve.ensure_keypair(keys)


def test_a_bad_authorized_file_is_said_once_until_it_changes(tmp_path: Path, caplog) -> None:
    """The authorized directory is read at every connecting peer and every heartbeat: an outside run
    saw one bad file logged ~3 times a second by the bus and the recorder, for as long as it stayed."""
    import os

    keys = tmp_path / "k"
    curve.ensure_keypair(keys)
    good_public, _ = zmq.curve_keypair()
    (keys / curve.AUTHORIZED_DIR / "good.key").write_text(good_public.decode())
    bad = keys / curve.AUTHORIZED_DIR / "bad.key"
    bad.write_text("not a key\n")
    with caplog.at_level(logging.WARNING, logger="greyproxy.bus.curve"):
        for _ in range(20):
            assert curve.authorized_entries(keys) == [("good", good_public)]
        said = [r for r in caplog.records if "ignoring authorized key" in r.getMessage()]
        assert len(said) == 1 and str(bad) in said[0].getMessage()
        bad.write_text("still not a key, but another one\n")
        os.utime(bad, ns=(1, 1))
        curve.authorized_entries(keys)
        curve.authorized_entries(keys)
    assert len([r for r in caplog.records if "ignoring authorized key" in r.getMessage()]) == 2
