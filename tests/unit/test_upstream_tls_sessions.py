"""TLS session resumption towards origins (SPEC §15, issue 18 item 1: the cost of a new intercepted
tunnel; services/proxy/mitm.py: `Interceptor._upstream_tls`,
`keep_session`): an intercepted tunnel's upstream handshake offers the last session kept for the same
verified name and port, over real loopback sockets to a real TLS 1.3 origin (trustme), on asyncio's
loop and on uvloop."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from services.proxy import mitm as mitm_mod
from services.proxy import upstream
from services.proxy.conn import Conn
from services.proxy.context import Limits
from services.proxy.gate import Verdict
from services.proxy.mitm import Interceptor, Session
from services.proxy.tls import TlsStream

NAME = "origin.test"
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


class _Settings:
    def on_change(self, fn: Any) -> None:
        fn({"mitmEnabled": True})


class _Certs:
    leaves = None


class TlsOrigin:
    """An HTTPS origin on 127.0.0.1 (TLS 1.3, session tickets on: the ssl module's default) that
    answers every request line with a short 200; `handshakes` counts the connections it took.
    `async with` it: listening on `port` (0: a free one) inside the block."""

    def __init__(self, ca: trustme.CA, tickets: bool = True, port: int = 0) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(NAME).configure_cert(self.ctx)
        if not tickets:
            self.ctx.options |= ssl.OP_NO_TICKET
            self.ctx.num_tickets = 0
        self.handshakes = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = port

    async def __aenter__(self) -> TlsOrigin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def _interceptor(ca_file: Path) -> Interceptor:
    return Interceptor(None, None, _Certs(), _Settings(), [], str(ca_file))  # type: ignore[arg-type]


async def _handshake(mitm: Interceptor, port: int, name: str = NAME) -> tuple[TlsStream | None, str | None]:
    raw = await upstream.connect("127.0.0.1", port, 5.0, lambda ip, p: None)
    return await mitm._upstream_tls(raw, name, port, Limits())  # type: ignore[return-value]


async def _exchange(stream: TlsStream) -> None:
    """One request and its answer (the TLS 1.3 tickets come with or before it)."""
    stream.write(b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    while not stream.buf.endswith(b"ok"):
        assert await stream.read_more(5.0)
    stream.buf.clear()


async def _first_kept(mitm: Interceptor, port: int) -> TlsStream:
    """A first connection to the origin, one exchange on it, and its session kept."""
    first, err = await _handshake(mitm, port)
    assert first is not None and err is None
    await _exchange(first)
    mitm.keep_session(_session(first, port))
    return first


def _session(stream: TlsStream, port: int) -> Session:
    return Session("a", NAME, port, "https", NAME, Verdict(True, "rule", 1), Conn(), stream)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_the_next_handshake_with_an_origin_resumes_its_kept_session(loop_kind: str, ca: Any) -> None:
    async def main() -> None:
        mitm = _interceptor(ca[1])
        async with TlsOrigin(ca[0]) as origin:
            first, err = await _handshake(mitm, origin.port)
            assert first is not None and err is None
            assert not first.sslobj.session_reused and "upstream_tls_resumed" not in mitm.counts
            s = _session(first, origin.port)
            await _exchange(first)
            mitm.keep_session(s)
            assert s.session_kept
            kept = mitm._sessions[(NAME, origin.port)]
            assert kept[0] is not None and kept[0].has_ticket
            for n in (1, 2):  # a kept session is offered to every later handshake with the origin
                again, err = await _handshake(mitm, origin.port)
                assert again is not None and err is None
                assert again.sslobj.session_reused
                assert mitm.counts["upstream_tls_resumed"] == n
                await _exchange(again)  # the resumed connection works
                mitm.keep_session(_session(again, origin.port))
                assert mitm._sessions[(NAME, origin.port)] is kept  # resumed: the kept one stands
                again.raw.close()
            first.raw.close()
            assert origin.handshakes == 3

    LOOPS[loop_kind](main())


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_a_session_is_kept_per_name_and_port_and_bounded(loop_kind: str, ca: Any, monkeypatch: Any) -> None:
    """Another port of the same name (another origin) is not offered the session; nor is another
    name; the kept sessions start over when TLS_SESSIONS is reached."""

    async def main() -> None:
        mitm = _interceptor(ca[1])
        async with TlsOrigin(ca[0]) as a, TlsOrigin(ca[0]) as b:
            first = await _first_kept(mitm, a.port)
            other, _ = await _handshake(mitm, b.port)
            assert other is not None and not other.sslobj.session_reused
            assert "upstream_tls_resumed" not in mitm.counts and "upstream_tls_not_resumed" not in mitm.counts
            monkeypatch.setattr(mitm_mod, "TLS_SESSIONS", 1)
            await _exchange(other)
            mitm.keep_session(_session(other, b.port))
            assert list(mitm._sessions) == [(NAME, b.port)]  # full: started over
            assert mitm._sessions[(NAME, b.port)][0] is not None
            for s in (first, other):
                s.raw.close()

    LOOPS[loop_kind](main())


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_a_refused_session_means_a_full_handshake_and_a_failed_one_is_dropped(loop_kind: str, ca: Any) -> None:
    """An origin that no longer resumes (its tickets' key changed: a restart) gets a full, verified
    handshake and the new session is kept; a handshake that fails with a session offered drops it."""

    async def main() -> None:
        mitm = _interceptor(ca[1])
        async with TlsOrigin(ca[0]) as origin:
            first = await _first_kept(mitm, origin.port)
            kept = mitm._sessions[(NAME, origin.port)][0]
            assert kept is not None
            first.raw.close()
            port = origin.port
        async with TlsOrigin(ca[0], port=port):  # a restarted origin on the same port: new ticket keys
            again, err = await _handshake(mitm, port)
            assert again is not None and err is None and not again.sslobj.session_reused
            assert mitm.counts["upstream_tls_not_resumed"] == 1
            await _exchange(again)
            mitm.keep_session(_session(again, port))
            assert mitm._sessions[(NAME, port)][0] not in (None, kept)  # the new one (not resumed: read)
            again.raw.close()

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()  # at once: no handshake at all

        dead = await asyncio.start_server(hang_up, "127.0.0.1", port)
        try:
            gone, err = await _handshake(mitm, port)
            assert gone is None and err is not None and "closed the connection" in err
            assert (NAME, port) not in mitm._sessions
        finally:
            dead.close()

    LOOPS[loop_kind](main())


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_a_kept_session_is_never_offered_for_another_name(loop_kind: str, ca: Any, tmp_path: Path) -> None:
    """The certificate check a resumed handshake skips was made for the session's own name: a
    handshake for a name the origin's certificate does not cover is verified in full, and fails."""

    async def main() -> None:
        mitm = _interceptor(ca[1])
        async with TlsOrigin(ca[0]) as origin:
            first = await _first_kept(mitm, origin.port)
            other, err = await _handshake(mitm, origin.port, name="other.test")
            assert other is None and err is not None and "not trusted" in err
            first.raw.close()

    LOOPS[loop_kind](main())


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_an_origin_without_tickets_is_asked_again_only_after_the_refresh(
    loop_kind: str, ca: Any, monkeypatch: Any
) -> None:
    """Reading a connection's session copies it (its certificates too): an origin that gives no
    ticket is remembered as such and not read again until TLS_SESSION_REFRESH has passed; then a
    kept session is read again from the next connection, resumed or not."""

    async def main() -> None:
        mitm = _interceptor(ca[1])
        reads: list[int] = []
        real = mitm_mod.TlsStream

        class Counting(real):  # type: ignore[misc, valid-type]
            @property
            def sslobj(self) -> Any:  # noqa: D401 - counts the session reads through it
                return _Reads(self._sslobj, reads)

            @sslobj.setter
            def sslobj(self, value: Any) -> None:
                self._sslobj = value

        monkeypatch.setattr(mitm_mod, "TlsStream", Counting)
        async with TlsOrigin(ca[0], tickets=False) as origin:
            key = (NAME, origin.port)
            for i in range(3):
                up, _ = await _handshake(mitm, origin.port)
                assert up is not None and not up.sslobj.session_reused
                await _exchange(up)
                mitm.keep_session(_session(up, origin.port))
                assert mitm._sessions[key][0] is None  # nothing to resume with
                assert len(reads) == 1, i  # read once: the first connection's
                up.raw.close()
            assert "upstream_tls_resumed" not in mitm.counts and "upstream_tls_not_resumed" not in mitm.counts
            mitm._sessions[key] = (None, 0.0)  # the refresh time has come
            up, _ = await _handshake(mitm, origin.port)
            assert up is not None
            await _exchange(up)
            mitm.keep_session(_session(up, origin.port))
            assert len(reads) == 2
            up.raw.close()

    LOOPS[loop_kind](main())


class _Reads:
    """An SSLObject whose `session` reads are counted."""

    def __init__(self, obj: Any, reads: list[int]) -> None:
        self._obj, self._reads = obj, reads

    @property
    def session(self) -> Any:
        self._reads.append(1)
        return self._obj.session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)
