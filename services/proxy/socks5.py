"""Sans-I/O SOCKS5 server side (RFC 1928) with username/password sub-negotiation (RFC 1929).

Feed it the client's bytes, send back what `feed` returns; once `request` is set, the caller
decides and answers with `reply(code, ...)`. The password is read past and never stored (the
username only names the client), unless the caller holds the authentication to check a claimed
identity's secret (`hold_auth`, SPEC §16).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .http1 import canonical_host

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_BIND",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "METHOD_NO_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "METHOD_USERPASS",
    "REP_ADDRESS_TYPE_NOT_SUPPORTED",
    "REP_COMMAND_NOT_SUPPORTED",
    "REP_CONNECTION_REFUSED",
    "REP_GENERAL_FAILURE",
    "REP_HOST_UNREACHABLE",
    "REP_NETWORK_UNREACHABLE",
    "REP_NOT_ALLOWED",
    "REP_SUCCEEDED",
    "REP_TTL_EXPIRED",
    "Socks5Server",
    "SocksError",
    "SocksRequest",
]

VERSION = 5
AUTH_VERSION = 1

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

REP_SUCCEEDED = 0
REP_GENERAL_FAILURE = 1
REP_NOT_ALLOWED = 2
REP_NETWORK_UNREACHABLE = 3
REP_HOST_UNREACHABLE = 4
REP_CONNECTION_REFUSED = 5
REP_TTL_EXPIRED = 6
REP_COMMAND_NOT_SUPPORTED = 7
REP_ADDRESS_TYPE_NOT_SUPPORTED = 8

_GREETING, _AUTH, _REQUEST, _DONE, _FAILED, _AUTH_WAIT = range(6)


class SocksError(Exception):
    """A protocol violation. Send `reply(exc.reply)` first when `reply` is not None, then close."""

    def __init__(self, reply: int | None, detail: str = "") -> None:
        super().__init__(detail or f"SOCKS5 error (reply {reply})")
        self.reply = reply


@dataclass
class SocksRequest:
    command: int
    host: str
    port: int
    address_type: int
    username: str | None


def _username(raw: bytes) -> str | None:
    """The identity a username names; None for empty, the 'proxy' placeholder, a name of the
    reserved `unknown-…` namespace (the proxy's own for clients that give none: presented, it
    would stand for another address's unnamed client), or unprintable. UTF-8, else latin-1
    (RFC 1929 names no encoding): as the HTTP proxy reads Basic credentials (http1.parse_basic)."""
    name = _text(raw)
    if not name or name == "proxy" or name.startswith("unknown-") or not name.isprintable():
        return None
    return name


def _text(raw: bytes) -> str:
    """A user name's or password's bytes as text: UTF-8, else latin-1 (which decodes any bytes)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Socks5Server:
    """One client's SOCKS5 handshake.

    `feed` returns the bytes to send. With `hold_auth`, a username/password message sets
    `pending_auth` and stops: reply with `answer_auth(ok)`. When no method is acceptable (or NMETHODS is 0) it returns
    [b"\\x05\\xff"] and sets `failed`: send that, then close. Bytes fed after the request is parsed
    are appended to `leftover` (early application data for the upstream).
    """

    def __init__(self, max_buffer: int = 1024, hold_auth: bool = False) -> None:
        self.max_buffer = max_buffer
        # hold_auth: stop after the username/password message until `answer_auth` (the password is
        # kept in `pending_auth` until then); otherwise every credential is accepted at once.
        self.hold_auth = hold_auth
        self.pending_auth: tuple[str | None, str | None] | None = None
        self.request: SocksRequest | None = None
        self.leftover = b""
        self.failed = False
        self.method: int | None = None
        self.username: str | None = None
        self._state = _GREETING
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if self._state == _DONE:
            self.leftover += data
            return []
        if self._state == _FAILED:
            return []
        self._buf += data
        out: list[bytes] = []
        while self._state not in (_DONE, _FAILED, _AUTH_WAIT):
            step = {_GREETING: self._greeting, _AUTH: self._auth, _REQUEST: self._request}[self._state]
            used = step(out)
            if used == 0:
                break
            del self._buf[:used]
        if self._state == _DONE:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        elif len(self._buf) > self.max_buffer:
            raise SocksError(REP_GENERAL_FAILURE, "handshake too large")
        return out

    # Each step returns the bytes it consumed, 0 while its message is still incomplete.

    def _greeting(self, out: list[bytes]) -> int:
        buf = self._buf
        if not buf:
            return 0
        if buf[0] != VERSION:
            raise SocksError(None, f"not SOCKS5 (version byte {buf[0]})")
        if len(buf) < 2:
            return 0
        n = buf[1]
        if len(buf) < 2 + n:
            return 0
        methods = set(buf[2 : 2 + n])
        if METHOD_USERPASS in methods:
            self.method, self._state = METHOD_USERPASS, _AUTH  # a username is how a client names itself
        elif METHOD_NO_AUTH in methods:
            self.method, self._state = METHOD_NO_AUTH, _REQUEST
        else:
            self.method, self._state, self.failed = METHOD_NO_ACCEPTABLE, _FAILED, True
        out.append(bytes((VERSION, self.method)))
        return 2 + n

    def _auth(self, out: list[bytes]) -> int:
        buf = self._buf
        if not buf:
            return 0
        if buf[0] != AUTH_VERSION:
            raise SocksError(None, f"bad auth sub-negotiation version {buf[0]}")
        if len(buf) < 2:
            return 0
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return 0
        plen = buf[2 + ulen]
        total = 3 + ulen + plen
        if len(buf) < total:
            return 0
        self.username = _username(bytes(buf[2 : 2 + ulen]))
        if self.hold_auth:
            # The caller judges the credential (claimed identities, SPEC §16): answer_auth replies.
            password = bytes(buf[3 + ulen : total])
            self.pending_auth = (self.username, _text(password) if password else None)
            buf[3 + ulen : total] = b"\x00" * plen
            self._state = _AUTH_WAIT
            return total
        buf[3 + ulen : total] = b"\x00" * plen  # scrub the password before the buffer is trimmed
        out.append(bytes((AUTH_VERSION, 0)))  # identity only: every credential is accepted
        self._state = _REQUEST
        return total

    def answer_auth(self, ok: bool) -> bytes:
        """The RFC 1929 reply to the credential in `pending_auth` (forgotten now): success, then
        feed on (bytes already received are parsed by the next `feed`, even b""); or failure
        (0x01), then close."""
        if self._state != _AUTH_WAIT:
            raise RuntimeError("no credential is waiting for an answer")
        self.pending_auth = None
        if ok:
            self._state = _REQUEST
            return bytes((AUTH_VERSION, 0))
        self._state, self.failed = _FAILED, True
        self._buf.clear()
        return bytes((AUTH_VERSION, 1))

    def _request(self, out: list[bytes]) -> int:
        buf = self._buf
        if not buf:
            return 0
        if buf[0] != VERSION:
            raise SocksError(None, f"bad request version {buf[0]}")
        if len(buf) >= 2 and buf[1] not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
            raise SocksError(REP_COMMAND_NOT_SUPPORTED, f"unknown command {buf[1]}")
        if len(buf) < 4:
            return 0
        atyp = buf[3]  # RSV (buf[2]) is ignored: some clients do not zero it
        if atyp == ATYP_IPV4:
            addr_end = 8
        elif atyp == ATYP_IPV6:
            addr_end = 20
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return 0
            if buf[4] == 0:
                raise SocksError(REP_GENERAL_FAILURE, "empty domain name")
            addr_end = 5 + buf[4]
        else:
            raise SocksError(REP_ADDRESS_TYPE_NOT_SUPPORTED, f"unknown address type {atyp}")
        total = addr_end + 2
        if len(buf) < total:
            return 0
        raw = bytes(buf[4:addr_end])
        if atyp == ATYP_IPV4:
            host = str(ipaddress.IPv4Address(raw))
        elif atyp == ATYP_IPV6:
            host = ipaddress.IPv6Address(raw).compressed
        else:
            host = self._domain(raw[1:])
        port = int.from_bytes(buf[addr_end:total], "big")
        if port == 0 and buf[1] == CMD_CONNECT:
            raise SocksError(REP_GENERAL_FAILURE, "port 0")
        self.request = SocksRequest(command=buf[1], host=host, port=port, address_type=atyp, username=self.username)
        self._state = _DONE
        return total

    @staticmethod
    def _domain(raw: bytes) -> str:
        """Lower-cased name (or IP literal); SocksError(1) for bytes no resolver should see."""
        try:
            return canonical_host(raw.decode("utf-8"))  # a UTF-8 name becomes its IDNA form
        except (UnicodeDecodeError, ValueError):
            raise SocksError(REP_GENERAL_FAILURE, "bad domain name") from None

    def reply(self, code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """VER REP RSV ATYP BND.ADDR BND.PORT; a non-IP bind_host is sent as a domain name."""
        try:
            ip = ipaddress.ip_address(bind_host.strip("[]"))
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv4Address):
            addr = bytes((ATYP_IPV4,)) + ip.packed
        elif isinstance(ip, ipaddress.IPv6Address):
            addr = bytes((ATYP_IPV6,)) + ip.packed
        else:
            name = bind_host.encode("utf-8")[:255]
            addr = bytes((ATYP_DOMAIN, len(name))) + name
        return bytes((VERSION, code, 0)) + addr + bind_port.to_bytes(2, "big")
