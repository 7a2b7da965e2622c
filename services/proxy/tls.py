"""TLS for interception: a sans-I/O ClientHello reader (SNI, ALPN) and `TlsStream`, TLS over a
`Conn` through `ssl.MemoryBIO`.

Why MemoryBIO and not `loop.start_tls`: by the time we know a tunnel carries TLS we have already
read the ClientHello into the `Conn`'s buffer, and start_tls has no way to be handed bytes that
were read before it. With an `SSLObject` we feed those bytes first and control every read and
write, on any event loop (uvloop included), at the cost of a little Python per TLS read.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from .conn import Conn, ConnClosed

__all__ = ["ClientHello", "NotClientHello", "TlsStream", "looks_like_tls", "parse_client_hello"]

MAX_HELLO = 64 * 1024  # a ClientHello larger than this is not one we will wait for
READ_SIZE = 256 * 1024


class NotClientHello(Exception):
    """The bytes start like TLS but are not a well-formed ClientHello."""


@dataclass(frozen=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]


def looks_like_tls(buf: bytes | bytearray) -> bool | None:
    """True for a TLS handshake record start (0x16 0x03), False for anything else, None: need bytes."""
    if not buf:
        return None
    if buf[0] != 0x16:
        return False
    if len(buf) < 2:
        return None
    return buf[1] == 0x03


def _u(data: bytes, pos: int, n: int) -> int:
    if pos + n > len(data):
        raise NotClientHello("truncated ClientHello")
    return int.from_bytes(data[pos : pos + n], "big")


def parse_client_hello(buf: bytes | bytearray) -> ClientHello | None:
    """SNI and ALPN of the ClientHello at the start of `buf`; None until it is complete."""
    hs = bytearray()
    pos = 0
    while True:
        if len(buf) - pos < 5:
            return None
        if buf[pos] != 0x16 or buf[pos + 1] != 0x03:
            raise NotClientHello("not a TLS handshake record")
        rec_len = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if rec_len == 0 or rec_len > 16384 + 2048:
            raise NotClientHello("bad TLS record length")
        if len(buf) - pos - 5 < rec_len:
            if pos + 5 + rec_len > MAX_HELLO:
                raise NotClientHello("ClientHello too large")
            return None
        hs += buf[pos + 5 : pos + 5 + rec_len]
        pos += 5 + rec_len
        if len(hs) >= 4:
            if hs[0] != 0x01:
                raise NotClientHello("first handshake message is not a ClientHello")
            msg_len = int.from_bytes(hs[1:4], "big")
            if msg_len > MAX_HELLO:
                raise NotClientHello("ClientHello too large")
            if len(hs) >= 4 + msg_len:
                return _hello_fields(bytes(hs[4 : 4 + msg_len]))


def _hello_fields(body: bytes) -> ClientHello:
    pos = 2 + 32  # legacy_version, random
    pos += 1 + _u(body, pos, 1)  # session id
    pos += 2 + _u(body, pos, 2)  # cipher suites
    pos += 1 + _u(body, pos, 1)  # compression methods
    if pos == len(body):
        return ClientHello(None, ())  # no extensions at all
    end = pos + 2 + _u(body, pos, 2)
    if end > len(body):
        raise NotClientHello("extensions overrun the ClientHello")
    pos += 2
    sni: str | None = None
    alpn: list[str] = []
    while pos + 4 <= end:
        ext_type, ext_len = _u(body, pos, 2), _u(body, pos + 2, 2)
        data = body[pos + 4 : pos + 4 + ext_len]
        if len(data) != ext_len:
            raise NotClientHello("truncated extension")
        pos += 4 + ext_len
        if ext_type == 0 and len(data) >= 2:  # server_name
            p, list_end = 2, 2 + _u(data, 0, 2)
            while p + 3 <= min(list_end, len(data)):
                name_type, name_len = data[p], _u(data, p + 1, 2)
                name = data[p + 3 : p + 3 + name_len]
                p += 3 + name_len
                if name_type == 0 and name:
                    try:
                        sni = name.decode("ascii").lower().rstrip(".")
                    except UnicodeDecodeError:
                        raise NotClientHello("non-ASCII server name") from None
                    break
        elif ext_type == 16 and len(data) >= 2:  # ALPN
            p, list_end = 2, min(2 + _u(data, 0, 2), len(data))
            while p < list_end:
                n = data[p]
                alpn.append(data[p + 1 : p + 1 + n].decode("latin-1"))
                p += 1 + n
    return ClientHello(sni or None, tuple(alpn))


class TlsStream:
    """TLS on top of a `Conn`, with the same reading/writing surface (`buf`, `read_more`, `take`,
    `write`, `drain`, `close`), so the HTTP code runs unchanged over plain or TLS connections."""

    def __init__(
        self,
        raw: Conn,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        # `session`: a client's earlier session with the same server, offered for resumption (the
        # server may refuse it: the handshake is then a full one).
        self.sslobj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname, session=session
        )
        self.buf = bytearray()
        self.eof = False  # no more plaintext will come (close_notify or the socket's EOF)

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def _feed(self) -> None:
        if self.raw.buf:
            self._in.write(self.raw.take())

    def _flush(self) -> None:
        pending = self._out.pending
        if pending:
            self.raw.write(self._out.read(pending))

    async def handshake(self, timeout: float) -> None:
        """Run the handshake; bytes already in the raw buffer (a peeked ClientHello) go first.

        ssl.SSLError on a failed handshake, ConnClosed if the peer leaves, TimeoutError.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._feed()
            try:
                self.sslobj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
            except ssl.SSLError:
                self._flush()  # let the peer see our alert
                raise
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError()
            if not await self.raw.read_more(remaining):
                raise ConnClosed()

    @property
    def alpn(self) -> str | None:
        return self.sslobj.selected_alpn_protocol()

    def _decrypt(self) -> None:
        """Move whatever plaintext the buffered records hold into self.buf."""
        self._feed()
        try:
            while True:
                chunk = self.sslobj.read(READ_SIZE)
                if not chunk:
                    self.eof = True
                    break
                self.buf += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.eof = True  # close_notify
        except ssl.SSLError:
            self.eof = True  # a broken record: treat like the peer going away
            self.raw.abort()
        self._flush()  # reading can produce output (key updates, alerts)

    async def read_more(self, timeout: float | None = None) -> bool:
        """Wait until more plaintext arrives. False on EOF/close; TimeoutError on timeout."""
        before = len(self.buf)
        self._decrypt()
        while len(self.buf) == before:
            if self.eof:
                return False
            if not await self.raw.read_more(timeout):
                self._decrypt()
                self.eof = True
                return len(self.buf) > before
            self._decrypt()
        return True

    def take(self, n: int | None = None) -> bytes:
        if n is None or n >= len(self.buf):
            data = bytes(self.buf)
            self.buf.clear()
        else:
            data = bytes(self.buf[:n])
            del self.buf[:n]
        return data

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.raw.closed or not data:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError:
            self.raw.abort()
            return
        self._flush()

    async def drain(self, timeout: float | None = None) -> None:
        await self.raw.drain(timeout)

    async def wait_closed(self) -> None:
        await self.raw.wait_closed()

    def close(self) -> None:
        """Send close_notify (best effort), then close the socket once written."""
        if not self.raw.closed:
            try:
                self.sslobj.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: we do not wait for the peer's close_notify
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()
