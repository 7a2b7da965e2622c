"""HTTPS interception (SPEC §7): the tunnel hook, the per-request pipeline and transaction capture.

After an allowed CONNECT / SOCKS5 tunnel is connected, `Interceptor` looks at the client's first
bytes. A TLS ClientHello (CA present, `mitmEnabled`, SNI not on `mitm.bypass`) is terminated
with a leaf for the SNI and re-originated upstream with verification; plain HTTP inside the
tunnel is handled alike without TLS. Everything else is piped untouched and the tunnel's log
entry says why (`mitm_skip_reason`).

Inside an intercepted connection every request is recorded as the client sent it, passes the
request hooks (`hooks.py`: the rules re-checked for the host actually contacted, credential
substitution, ...), and goes through the exchange (`exchange.py`, the same one as the forward
proxy's) on this connection's own upstream connection, streaming back as it arrives while a
capped copy is kept. The record names the host contacted (the tunnel's); the request's own Host
is kept as `request_host`, and a Host naming another host is flagged (`host_mismatch`) and
logged. The record leaves the process with its headers redacted, through the journal
(`transaction`). WebSocket upgrades are relayed with each data message recorded (WS_REQ / WS_RESP).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
from dataclasses import dataclass
from time import monotonic
from typing import Any

from greyproxy.certs import CAWatcher
from greyproxy.policy.patterns import DestinationPattern, normalise_host, parse_ip

from . import http1
from .conn import Conn, ConnClosed, FirstDeadlines, wait_either
from .context import Limits, ProxyContext
from .exchange import STALE, Exchange, upstream_version
from .gate import Admission, Gate, Verdict
from .hooks import Flow, resolve
from .httpio import error_response, read_head
from .pipeline import Recorder, Stream, Txn, origin_of, relay
from .settings_watch import SettingsWatch
from .tls import ClientHello, NotClientHello, TlsStream, looks_like_tls, parse_client_hello
from .upstream import UpstreamFailure, connect

log = logging.getLogger("greyproxy.mitm")

NON_TLS = "non_tls"
NO_CERT = "no_cert"
MITM_DISABLED = "mitm_disabled"
MITM_BYPASS = "mitm_bypass"
HANDSHAKE_FAILED = "handshake_failed"
NON_HTTP_AFTER_TLS = "non_http_after_tls"

_norm = functools.lru_cache(maxsize=4096)(normalise_host)  # pure; the same few hosts come back
TLS_SESSIONS = 1024  # origins whose last TLS session is kept for resumption (`Interceptor._sessions`)
# How long a kept session (or an origin's lack of one) stands before a connection's own is read again:
# reading one (`SSLObject.session`) copies it through its encoding, peer certificates included
# (~250 µs); a session resumed is still good, and tickets live minutes to hours (nginx: 5 min).
TLS_SESSION_REFRESH = 60.0
# How long the origin may take to say which protocol it agrees (`Interceptor._origin_alpn`): an
# origin that serves one connection at a time holds the question behind the tunnel's own connection,
# and the answer is then "none" (intercepted).
ALPN_PROBE_TIMEOUT = 3.0
MAX_PEEK = 8192  # bytes of a would-be request line looked at; a line still plausible past them is HTTP


def http_state(buf: bytes | bytearray) -> str:
    """'http' when `buf` starts with an HTTP request line, 'other' when it cannot, 'more' to wait.
    A line still begun like one after MAX_PEEK bytes is 'http': the request path then reads it under
    its own limits (414 past `maxHeaderBytes`), so a long line is never a way around interception."""
    b = buf if type(buf) is bytearray else bytearray(buf[: MAX_PEEK + 1])
    got = _request_line(b)
    if got > 0:
        return "http"
    if got == 0:
        return "other"
    return "more" if len(buf) < MAX_PEEK else _begun(b)


def settled_state(buf: bytes | bytearray) -> str:
    """`http_state` once no more bytes will come in time (the first message's deadline, or the
    client's EOF: Python's http.server serves a last line with no LF): a request line begun and left
    unfinished is 'http' (the request path answers it: 408, 400), so a slow or cut first line is no
    way around interception either; anything else 'other'."""
    if not buf:
        return "other"
    b = buf if type(buf) is bytearray else bytearray(buf[: MAX_PEEK + 1])
    got = _request_line(b)
    if got != -1:
        return "http" if got > 0 else "other"
    return _begun(b)


# What an unfinished first line must look like to be taken for HTTP: a method as HTTP's are
# (upper-case letters, '-', '_'), then printable bytes. A client-first protocol that waits with no LF
# sent (git's `0032git-upload-pack /repo.git\0host=...\0`) is not one, and is piped as before.
_BEGUN = re.compile(rb"[ \t\x0b\x0c\r\n]*[A-Z_-]+(?:[ \t\x0b\x0c\r][^\x00-\x08\x0e-\x1f\x7f]*)?")


def _begun(b: bytearray) -> str:
    """'http' when the first line there, unfinished (no LF in the first MAX_PEEK bytes), is begun
    like a request line (`_BEGUN`), else 'other'."""
    return "http" if _BEGUN.fullmatch(b, 0, MAX_PEEK) is not None else "other"


def _request_line(buf: bytearray) -> int:
    """1 when `buf` starts with an HTTP request line ending within its first MAX_PEEK bytes; 0 when
    it cannot; -1 while what is there (of its first MAX_PEEK bytes) may still begin one.

    Deliberately wider than the request lines this proxy parses, since whatever is called "not
    HTTP" is piped to the origin unread and unrecorded, and origin servers are lenient (nginx skips
    leading CR/LF, takes several spaces and serves HTTP/0.9; Python's http.server splits the line
    on any whitespace, latin-1's too, and takes `HTTP/1.10`; node's parser takes RTSP/ and ICE/
    lines). So: empty lines and whitespace first (RFC 9112 §2.2), a method of token characters
    (RFC 9110 §5.6.2, any length), then up to the line's LF either a last word (split on `_WS`)
    beginning `HTTP/`, `RTSP/` or `ICE/` with a word between it and the method, or HTTP/0.9's
    `GET /path` or `GET http://...` alone. A PROXY protocol header (v1's `PROXY ...` line, v2's
    signature) is one too: the request path refuses it, as a client must not speak for its source
    address to the origin. The request path's parser refuses what it does not take (400, 505 for
    `PRI * HTTP/2.0`). Text protocols that are not HTTP (`SET k v`, `PING`, an SSH banner) end their
    first line otherwise. One pass, byte by byte (compiled: C reads of the bytearray)."""
    n = len(buf)
    limit = n if n < MAX_PEEK else MAX_PEEK
    i = 0
    while i < limit and i < 12 and buf[i] == _PROXY_V2[i]:  # the PROXY protocol v2 signature
        i += 1
    if i == 12:
        return 1
    if i == limit and limit:
        return -1  # (its start so far; a CR LF CR LF begun is also empty lines)
    i = 0
    while i < limit and _WS[buf[i]]:  # empty lines, whitespace before the method
        i += 1
    if i == limit:
        return -1 if limit else 0  # (nothing at all is not the start of one)
    start = i
    upper = True  # a method as HTTP's are: upper-case letters, '-', '_'
    while True:  # the method, up to the first whitespace
        if i == limit:
            return -1
        c = buf[i]
        if _WS[c] and c != 10:
            break
        if not (65 <= c <= 90 or c == 45 or c == 95):
            upper = False
            if not (
                97 <= c <= 122
                or 48 <= c <= 57
                or c in (33, 35, 36, 37, 38, 39, 42, 43, 46, 94, 96, 124, 126)  # !#$%&'*+.^`|~
            ):
                return 0  # (an LF too: a method alone on its line)
        i += 1
    m = i  # the method is buf[start:m]
    while True:  # the rest of the line, up to its LF
        if i == limit:
            return -1
        c = buf[i]
        if c == 10:
            break
        if not upper and (c < 9 or 14 <= c < 32 or c == 127):
            return 0  # a control byte after an odd method: another protocol (git's first pkt-line)
        i += 1
    if m - start == 5 and buf[start : start + 5] == b"PROXY":
        return 1  # a PROXY protocol v1 line
    end = i
    while end > m and _WS[buf[end - 1]]:  # whitespace at the line's end
        end -= 1
    t = end  # the last word is buf[t:end]
    while t > m and not _WS[buf[t - 1]]:
        t -= 1
    if t == m:
        return 0  # the method alone
    j = t  # is there a word between the method and the last one?
    while j > m and _WS[buf[j - 1]]:
        j -= 1
    if j > m:  # three words or more: HTTP when the last names the version
        if end - t > 5 and buf[t : t + 5] == b"HTTP/":
            return 1
        if end - t > 5 and buf[t : t + 5] == b"RTSP/":
            return 1
        if end - t > 4 and buf[t : t + 4] == b"ICE/":
            return 1
        return 0
    # two words: HTTP/0.9's `GET /path` (nginx takes an absolute URI there too)
    if m - start == 3 and buf[start : start + 3] == b"GET":
        if buf[t] == 47 or buf.find(b"://", t, end) > t:
            return 1
    return 0


# What the look takes for whitespace between words: what Python's str.split() splits a request line
# on once read as latin-1 (ASCII whitespace, \x1c-\x1f, NEL, NBSP), a superset of what other servers take.
_WS = bytes(1 if (c == 32 or 9 <= c <= 13 or 28 <= c <= 31 or c == 133 or c == 160) else 0 for c in range(256))
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"  # the PROXY protocol v2 signature


# ALPN names of HTTP (RFC 7301's registry): a client offering one of them speaks HTTP inside its TLS
_HTTP_ALPN = frozenset(
    ["http/0.9", "http/1.0", "http/1.1", "h2", "h2c", "h3", "spdy/1", "spdy/2", "spdy/3", "spdy/3.1"]
)
_refusals = [float("-inf")]  # when `Interceptor._refused_head` last wrote a line
_H2_HINTED: dict[str, None] = {}  # hosts whose clients without http/1.1 were named in the log (the last 256)


@functools.lru_cache(maxsize=64)
def _probe_context(offered: tuple[str, ...]) -> ssl.SSLContext:
    """A client context offering `offered` by ALPN, for `Interceptor._origin_alpn` (no verification:
    it reads the origin's choice of protocol and sends nothing)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(offered))
    return ctx


def _no_http11(container: str, name: str, alpn: tuple[str, ...] | list[str]) -> None:
    """A client offering HTTP/2 but not http/1.1 is intercepted all the same, with no protocol agreed
    (SPEC §7: HTTP/1.1 only): an HTTP/2-only client (gRPC) then fails. Say so once per host, with
    the way out."""
    if name in _H2_HINTED:
        return
    if len(_H2_HINTED) >= 256:
        del _H2_HINTED[next(iter(_H2_HINTED))]
    _H2_HINTED[name] = None
    log.warning(
        "%s offered HTTP/2 but not http/1.1 (ALPN %s) for %s: intercepted as HTTP/1.1, which an"
        " HTTP/2-only client (gRPC) cannot speak; add %s to mitm.bypass to pipe it untouched",
        container,
        ",".join(alpn),
        name,
        name,
    )


@dataclass
class Session:
    """One intercepted tunnel."""

    container: str
    host: str  # the tunnel's destination (what the client CONNECTed to)
    port: int
    scheme: str  # 'https' (TLS terminated) or 'http' (plain HTTP in the tunnel)
    server_name: str  # upstream SNI / verification name
    verdict: Verdict
    client: Stream
    upstream: Stream | None  # None once closed: the next request connects again
    upstream_error: str | None = None
    reused: bool = False  # the upstream served a request before (it may have gone stale since)
    origin: str = ""  # 'scheme://authority' of the host contacted: the start of each record's url
    claimed: bool = False  # the container is a claimed identity this connection proved (SPEC §16)
    method: str = "CONNECT"  # the tunnel's ('CONNECT' or 'SOCKS5'): its admission's, for a reconnect
    session_kept: bool = False  # the upstream's TLS session is kept for resumption (`keep_session`)

    def __post_init__(self) -> None:
        self.origin = origin_of(self.scheme, self.host, self.port)


class QuietLooks(FirstDeadlines):
    """The looks at tunnels' first bytes while nobody has spoken yet, each ended (`wait_either`'s
    False) once it has waited `timeout`: one timer for them all (`FirstDeadlines`). They wait with the
    same timeout (`idleTimeout`), so the order they started in is the order of their deadlines."""

    __slots__ = ()

    async def wait(self, client: Conn, upstream: Conn, timeout: float, loop: asyncio.AbstractEventLoop) -> bool:
        """`wait_either(client, upstream, timeout)`: True when either got bytes, reached EOF or closed,
        False after `timeout`."""
        deadline = monotonic() + timeout  # (the queue's clock, conn.FirstDeadlines)
        if not self.in_order(client, deadline):
            # (out of order: a shorter timeout than those waiting; or a second look at one client)
            return await wait_either(client, upstream, timeout)
        self.waiting[client] = deadline
        self.last = deadline
        if self.timer is None or self.loop is not loop:
            self.timer, self.loop = loop.call_later(timeout, self._fire, loop), loop
        try:
            return await wait_either(client, upstream, None)
        finally:
            self.waiting.pop(client, None)

    def expire(self, client: Conn) -> None:
        fut = client._waiter  # the look's (`wait_either` waits on it; nobody else reads the client)
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError())


class Interceptor:
    """The tunnel hook (`ProxyContext.tunnel_hook`) and its shared state. Compiled, an extension type
    (mitm.pxd): the look at every new tunnel's first bytes (`first_look`, `_skip_reason`, `_skip`)
    calls through a C vtable and reads its fields and the connections' as C struct fields."""

    __slots__ = (
        "gate",
        "recorder",
        "certs",
        "bypass",
        "upstream_ctx",
        "mitm_enabled",
        "counts",
        "_mismatch_logged",
        "_quiet",
        "_sessions",
    )

    def __init__(
        self,
        gate: Gate,
        recorder: Recorder,
        certs: CAWatcher,
        settings: SettingsWatch,
        bypass: list[str],
        upstream_ca_file: str = "",
    ) -> None:
        self.gate = gate
        self.recorder = recorder  # transaction records (shared with the forward proxy)
        self.certs = certs
        self.bypass = self._compile_bypass(bypass)
        self.upstream_ctx = self._upstream_context(upstream_ca_file)
        self.mitm_enabled = True
        self.counts: dict[str, int] = {}  # tunnels by what was done with them (`stats`; `_count`)
        self._mismatch_logged = float("-inf")
        self._quiet = QuietLooks()  # the looks at first bytes while nobody has spoken
        # The last resumable TLS session with each origin, by (verified name, port), and until when it
        # stands (time.monotonic): the next upstream handshake with it offers that session
        # (`_upstream_tls`; None: the origin gave none to resume, asked again after that time;
        # memory only, bounded).
        self._sessions: dict[tuple[str, int], tuple[ssl.SSLSession | None, float]] = {}
        settings.on_change(self._settings_changed)

    # -- configuration --
    @staticmethod
    def _compile_bypass(patterns: list[str]) -> list[DestinationPattern]:
        out = []
        for p in patterns:
            try:
                out.append(DestinationPattern.parse(p))  # the rules' host dialect (SPEC §2.2)
            except ValueError as exc:
                log.warning("mitm.bypass: ignoring %r: %s", p, exc)
        return out

    @staticmethod
    def _upstream_context(ca_file: str) -> ssl.SSLContext:
        """Verification against the system store plus `mitm.upstreamCaFile`; HTTP/1.1 only."""
        ctx = ssl.create_default_context()
        if ca_file:
            try:
                ctx.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                log.error("mitm.upstreamCaFile %s not loaded: %s", ca_file, exc)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def _settings_changed(self, values: dict[str, Any]) -> None:
        enabled = values.get("mitmEnabled", True)
        self.mitm_enabled = enabled if isinstance(enabled, bool) else True

    def stats(self) -> dict[str, Any]:
        return {
            "ca": self.certs.ca is not None,
            "enabled": self.mitm_enabled,
            "leaves": len(self.certs.leaves) if self.certs.leaves is not None else 0,
            **self.counts,
        }

    def bypassed(self, *hosts: str | None) -> bool:
        if not self.bypass:
            return False  # the usual case: no name to normalise
        for h in hosts:
            if not h:
                continue
            host = normalise_host(h)
            ip = parse_ip(host)
            if any(p.matches(host, ip) for p in self.bypass):
                return True
        return False

    # -- the hook --
    async def __call__(
        self,
        ctx: ProxyContext,
        client: Conn,
        upstream: Conn,
        container: str,
        host: str,
        port: int,
        verdict: Verdict,
        method: str,
    ) -> bool:
        kind, hello = await self._peek(client, upstream, ctx.limits)
        reason = self._skip_reason(kind, hello, host)
        if reason is not None:
            return self._skip(verdict, reason)
        sni = hello.sni if hello is not None else None
        if kind == "http":
            self.gate.finish_log(verdict)
            self._count("intercepted_http")
            await self._serve(
                Session(
                    container,
                    host,
                    port,
                    "http",
                    host,
                    verdict,
                    client,
                    upstream,
                    claimed=bool(getattr(client, "claimed", False)),
                    method=method,
                ),
                ctx,
            )
            return True
        assert hello is not None
        leaves = self.certs.leaves
        if leaves is None:
            return self._skip(verdict, NO_CERT)
        name = _valid_name(sni) or host
        alpn = hello.alpn
        if alpn and "http/1.1" not in alpn:
            if any(p not in _HTTP_ALPN for p in alpn):
                # A protocol chosen by ALPN that is not HTTP (MQTT on 443, XMPP, DoT, ...) needs it
                # agreed with the origin, which interception cannot give: piped, when the origin
                # agrees one. What the client offers decides nothing: an origin that ignores ALPN
                # would serve HTTP on such a tunnel, so the origin is asked (`_origin_alpn`) with
                # the client's whole list, as the client's own handshake will offer it (asked
                # without its HTTP names, an origin agreed `x-mqtt`, then chose h2 with the client).
                agreed = await self._origin_alpn(upstream, name if _valid_name(sni) else None, list(alpn), ctx.limits)
                if agreed is not None and agreed not in _HTTP_ALPN:
                    return self._skip(verdict, NON_HTTP_AFTER_TLS)
            if "h2" in alpn or "h3" in alpn:
                _no_http11(container, name, alpn)
        server_ctx = leaves.get(name)
        if server_ctx is None:
            try:
                # Minting signs a certificate: keep that off the event loop.
                server_ctx = await asyncio.get_running_loop().run_in_executor(None, leaves.context_for, name)
            except Exception:
                log.exception("minting a leaf for %s failed", name)
                return self._skip(verdict, NO_CERT)
        tls_client = TlsStream(client, server_ctx, server_side=True)
        try:
            await tls_client.handshake(ctx.limits.header_timeout)
        except (ssl.SSLError, ConnClosed, asyncio.TimeoutError, OSError) as exc:
            log.info("client handshake for %s failed: %s", name, exc)
            self._count(HANDSHAKE_FAILED)
            self.gate.finish_log(verdict, HANDSHAKE_FAILED)
            client.abort()
            return True
        session = Session(
            container,
            host,
            port,
            "https",
            name,
            verdict,
            tls_client,
            None,
            claimed=bool(getattr(client, "claimed", False)),
            method=method,
        )
        session.upstream, session.upstream_error = await self._upstream_tls(upstream, name, port, ctx.limits)
        kind = await self._peek_plaintext(session, ctx.limits)
        if kind != "http":
            self.gate.finish_log(verdict, NON_HTTP_AFTER_TLS)
            self._count(NON_HTTP_AFTER_TLS)
            if session.upstream is not None:
                await relay(session.client, session.upstream, ctx.limits.idle_timeout)
            session.client.close()
            return True
        self.gate.finish_log(verdict)
        self._count("intercepted_tls")
        await self._serve(session, ctx)
        return True

    def first_look(
        self, client: Conn, upstream: Conn, host: str, verdict: Verdict, quiet_over: bool = False
    ) -> bool | None:
        """The hook's answer from what the tunnel's ends have done so far, without waiting (a tunnel
        looked at from the connections' callbacks, keepalive.py): None while nobody has spoken (ask
        again when someone does, or with `quiet_over` once nobody spoke for idleTimeout, as `_peek`
        waits); False when the tunnel is to be piped untouched (its log entry written with why, as
        `__call__` writes it); True when `__call__` must take it (to intercept it, or to wait for the
        rest of a first message begun)."""
        kind, hello = _classify(client.buf)
        if kind == "more":
            if quiet_over or upstream.buf or upstream.eof:
                kind = "other"  # (as `_peek`)
            elif client.eof:
                kind = settled_state(client.buf)  # (as `_peek`)
            elif client.buf:
                return True  # a hello or request line begun: `_peek` waits for its rest, under its deadline
            else:
                return None
        reason = self._skip_reason(kind, hello, host)
        if reason is None:
            return True
        return self._skip(verdict, reason)

    def _skip_reason(self, kind: str, hello: ClientHello | None, host: str) -> str | None:
        """Why a tunnel whose first bytes are `kind` (`_peek`) is piped untouched; None: looked at further."""
        if kind == "other":
            return NON_TLS
        if not self.mitm_enabled:
            return MITM_DISABLED
        if self.bypassed(host, hello.sni if hello is not None else None):
            return MITM_BYPASS
        return None

    def _count(self, what: str) -> None:
        counts = self.counts
        counts[what] = counts.get(what, 0) + 1

    def _skip(self, verdict: Verdict, reason: str) -> bool:
        self._count(reason)
        self.gate.finish_log(verdict, reason)
        return False  # the caller pipes the tunnel untouched (peeked bytes included)

    async def _peek(self, client: Conn, upstream: Conn, limits: Limits) -> tuple[str, ClientHello | None]:
        """('tls', hello) | ('http', None) | ('other', None) from the client's first bytes.

        A server that speaks first (SSH, SMTP...) makes it 'other' at once, so it is never held up.
        """
        loop = client._loop or client._bind_loop()  # (asyncio.get_running_loop() costs a getpid())
        deadline: float | None = None
        while True:
            kind, hello = _classify(client.buf)
            if kind != "more":
                return kind, hello
            if upstream.buf or upstream.eof:
                return "other", None  # the server speaks first: not HTTP
            if client.eof:
                return settled_state(client.buf), None  # (a last line with no LF is served by some)
            if client.buf and deadline is None:
                deadline = loop.time() + limits.header_timeout  # a started hello/line must finish soon
            if deadline is None:
                # Nobody speaking at all is an idle tunnel: after idleTimeout it is piped (and the
                # sweeper closes it). Most clients wait for the 200 before they speak: every tunnel waits here.
                if not await self._quiet.wait(client, upstream, limits.idle_timeout, loop):
                    return "other", None
            elif not await wait_either(client, upstream, max(0.0, deadline - loop.time())):  # (no task per tunnel)
                return settled_state(client.buf), None  # (a first line begun and left unfinished: 'http')

    async def _peek_plaintext(self, s: Session, limits: Limits) -> str:
        """'http' or 'other' from the first decrypted bytes (or the upstream speaking first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.idle_timeout
        client = s.client
        while True:
            state = http_state(client.buf) if client.buf else "more"
            if state != "more":
                return state
            if client.eof:
                return settled_state(client.buf)
            up = s.upstream
            if up is not None and (up.buf or up.eof):
                return "other"
            remaining = deadline - loop.time()
            if remaining <= 0 or not await _either(client, up, remaining):
                return settled_state(client.buf)  # (a first line begun and left unfinished: 'http')

    async def _origin_alpn(self, upstream: Conn, name: str | None, offered: list[str], limits: Limits) -> str | None:
        """The protocol the origin agrees by ALPN when offered `offered` (the client's protocols
        that are not HTTP), asked over a connection of its own to the address the tunnel reached
        (already admitted and connected: the guard's and the rules' judgement stand); None when it
        agrees none, or cannot be asked (then the tunnel is intercepted: what cannot be shown
        not to be HTTP is read). Nothing is sent but the handshake; the certificate is not
        judged (only the answer to ALPN is read). Only for clients offering such protocols."""
        transport = upstream.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if not peer:
            return None
        writer = None
        try:
            ctx = _probe_context(tuple(offered))  # (ValueError, UnicodeError: a name ssl cannot send)
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer[0], peer[1], ssl=ctx, server_hostname=name or ""),
                min(limits.connect_timeout, ALPN_PROBE_TIMEOUT),
            )
            sslobj = writer.get_extra_info("ssl_object")
            agreed = sslobj.selected_alpn_protocol() if sslobj is not None else None
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError, UnicodeError) as exc:
            log.info(
                "asking %s which protocol it agrees (ALPN %r) failed: %s",
                name or peer[0],
                offered,
                exc or type(exc).__name__,
            )
            return None
        finally:
            if writer is not None:
                writer.transport.abort()
        return agreed if agreed in offered else None

    async def _upstream_tls(self, raw: Conn, name: str, port: int, limits: Limits) -> tuple[Stream | None, str | None]:
        """TLS to the origin, verified; (stream, None) or (None, why it failed). The last session kept
        for (name, port) is offered (`keep_session`): a resumed handshake skips the certificate
        chain's verification and the server's signature, which that session's full handshake did
        for the same name with the same context."""
        key = (name, port)
        kept = self._sessions.get(key)
        session = kept[0] if kept is not None else None
        stream = TlsStream(raw, self.upstream_ctx, server_side=False, server_hostname=name, session=session)
        done = False
        try:
            await stream.handshake(limits.connect_timeout)
            done = True
            if session is not None:
                self._count("upstream_tls_resumed" if stream.sslobj.session_reused else "upstream_tls_not_resumed")
        except ssl.SSLCertVerificationError as exc:
            raw.abort()
            return None, f"the upstream certificate of {name} is not trusted: {exc.verify_message or exc}"
        except (ssl.SSLError, OSError) as exc:
            raw.abort()
            return None, f"TLS handshake with {name} failed: {exc}"
        except ConnClosed:
            return None, f"{name} closed the connection during the TLS handshake"
        except asyncio.TimeoutError:
            raw.abort()
            return None, f"TLS handshake with {name} timed out"
        finally:
            if not done and session is not None:
                self._sessions.pop(key, None)  # (not offered again: the next handshake is a full one)
        return stream, None

    def keep_session(self, s: Session) -> None:
        """After `s`'s first exchange on its upstream TLS connection (its TLS 1.3 tickets, sent right
        after the handshake, have come before the answer): keep its session for the next handshake
        with the same origin if it can be resumed, replacing the origin's; else remember there is
        none. Not while the origin's kept one stands (`TLS_SESSION_REFRESH`) and this connection
        resumed it, or the origin gave none."""
        if s.session_kept:
            return
        s.session_kept = True  # (asked once per upstream connection)
        up = s.upstream
        if type(up) is not TlsStream:  # (plain HTTP in the tunnel, or no upstream)
            return
        sslobj = up.sslobj
        key = (s.server_name, s.port)
        sessions = self._sessions
        kept = sessions.get(key)
        now = monotonic()
        if kept is not None and now < kept[1] and (kept[0] is None or sslobj.session_reused):
            return
        session = sslobj.session  # (a copy: see TLS_SESSION_REFRESH)
        if session is not None and not (session.has_ticket or sslobj.version() != "TLSv1.3"):
            session = None  # (TLS 1.3 without a ticket: nothing to resume with)
        if len(sessions) >= TLS_SESSIONS:
            sessions.clear()  # (origins come from clients: bounded, start over)
        sessions[key] = (session, now + TLS_SESSION_REFRESH)

    async def _reconnect(self, s: Session, ctx: ProxyContext) -> Stream:
        """A fresh upstream connection after the previous one closed (raises UpstreamFailure)."""
        # Judged for the tunnel's own admission (the verdict that let it in), as its first connect was.
        admission = Admission(self.gate, s.container, s.host, s.port, s.method, s.verdict)
        raw = await connect(s.host, s.port, ctx.limits.connect_timeout, admission)
        if s.scheme == "http":
            return raw
        tls, err = await self._upstream_tls(raw, s.server_name, s.port, ctx.limits)
        if tls is None:
            raise UpstreamFailure("unreachable", err or "TLS handshake failed")
        s.session_kept = False  # (this connection's session is kept in turn)
        return tls

    # -- requests --
    async def _serve(self, s: Session, ctx: ProxyContext) -> None:
        limits = ctx.limits
        origin = (s.scheme, s.host, s.port)

        # (A partial, not an inner function: no reference cycle with this coroutine's scope, see
        # Exchange.proceed.)
        parse = functools.partial(
            http1.parse_request_head,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            origin=origin,
        )

        first = True
        try:
            while True:
                try:
                    got = await read_head(s.client, limits, parse, None if first else limits.idle_timeout)
                except asyncio.TimeoutError:
                    if first or s.client.buf:
                        s.client.write(
                            error_response(408, "Request Timeout", "Greyproxy: request headers took too long")
                        )
                    return
                except http1.HttpError as exc:
                    s.client.write(error_response(exc.status, exc.reason, f"Greyproxy: {exc}"))
                    self._refused_head(s, exc)
                    return
                if got is None:
                    return
                head, n = got
                del s.client.buf[:n]
                first = False
                if not await self._exchange(s, head, ctx):
                    return
        finally:
            s.client.close()
            if s.upstream is not None:
                s.upstream.close()

    def _refused_head(self, s: Session, exc: http1.HttpError) -> None:
        """A request head the proxy could not take inside an intercepted connection (no record can
        be made of it: there is no request): counted, and said in the log at most once a second,
        so that a client that broke here (an HTTP/2-only one, a line the parser refuses) can be
        told why."""
        self._count("refused_heads")
        now = time.monotonic()
        if now - _refusals[0] >= 1.0:
            _refusals[0] = now
            log.warning(
                "%s: refused a request inside its intercepted connection to %s:%d: %d %s (%s; %d so far)",
                s.container,
                s.host,
                s.port,
                exc.status,
                exc.reason,
                exc,
                self.counts["refused_heads"],
            )

    def _host_mismatch(self, s: Session, head: http1.RequestHead) -> bool:
        """Whether the request's Host names another host than the one contacted. Not when it is the
        name the upstream certificate was verified against (intercepted TLS), nor the name the DNS
        proxy last answered with this address."""
        host = head.host
        if not host or host == s.host or host == s.server_name:
            return False
        name, contacted = _norm(host), _norm(s.host)  # e.g. a trailing dot, a SOCKS5 name's case
        if name == contacted or name == _norm(s.server_name) or self.gate.resolved_name(contacted) == name:
            return False
        now = time.monotonic()
        self._count("host_mismatch")
        if now - self._mismatch_logged >= 1.0:  # at most one line a second
            self._mismatch_logged = now
            log.warning(
                "host mismatch: %s sent Host %r inside its tunnel to %s:%d (recorded as %s, host_mismatch; %d so far)",
                s.container,
                host,
                s.host,
                s.port,
                s.host,
                self.counts["host_mismatch"],
            )
        return True

    async def _exchange(self, s: Session, head: http1.RequestHead, ctx: ProxyContext) -> bool:
        """One request/response on an intercepted connection. True if the client connection stays open."""
        limits = ctx.limits
        t = self.recorder.txn(s.container, s.origin, s.host, s.port, head, host_mismatch=self._host_mismatch(s, head))
        flow = Flow(s.container, s.scheme, s.host, s.port, head, server_name=s.server_name, claimed=s.claimed)
        flow.counted = s.verdict.rule_id  # the tunnel's admission counted its rule's hit
        refusal = await resolve(ctx.hooks.run(flow))
        t.rule_id = flow.verdict.rule_id if flow.verdict is not None else s.verdict.rule_id
        t.credentials_from(flow)
        if refusal is not None:
            s.client.write(refusal.render())
            t.finish(status=refusal.status, result="blocked", block_reason=refusal.reason)
            return False
        request = flow.render(upstream_version(head))
        for _attempt in (1, 2):
            if s.upstream is None or s.upstream.closed:
                if s.upstream_error is not None:
                    return self._fail(s, t, 502, "Bad Gateway", f"Greyproxy: {s.upstream_error}")
                try:
                    s.upstream, s.reused = await self._reconnect(s, ctx), False
                except UpstreamFailure as exc:
                    status, reason, text = exc.http_answer()
                    return self._fail(s, t, status, reason, text)
            ex = Exchange(s.client, s.upstream, head, limits, t, s.reused)
            state = await ex.run(request)
            self.keep_session(s)  # (once per upstream connection: its ticket came with or before the answer)
            if ex.upstream_reusable:
                s.reused = True
            else:
                s.upstream = None  # closed by the exchange
            if state is not STALE:
                return ex.client_keep
        return False  # not reached: a fresh connection is never stale

    def _fail(self, s: Session, t: Txn, status: int, reason: str, text: str) -> bool:
        s.client.write(error_response(status, reason, text))
        t.finish(status=status, error=text.removeprefix("Greyproxy: "))
        return False


def _classify(buf: bytearray) -> tuple[str, ClientHello | None]:
    if not buf:
        return "more", None
    if buf[0] != 0x16:  # not a TLS handshake record (`looks_like_tls`'s first test, without its call)
        return http_state(buf), None
    tls = looks_like_tls(buf)
    if tls is None:
        return "more", None
    if tls:
        try:
            hello = parse_client_hello(buf)
        except NotClientHello:
            return "other", None
        return ("more", None) if hello is None else ("tls", hello)
    return http_state(buf), None


def _valid_name(sni: str | None) -> str | None:
    """The SNI as a certificate name, or None when it is not a usable host name."""
    if not sni:
        return None
    try:
        return http1.canonical_host(sni)
    except ValueError:
        return None


async def _more(stream: Stream, seen: int) -> None:
    # A task starts a loop iteration late: bytes that came in meanwhile count as "more" already.
    if len(stream.buf) == seen and not stream.eof:
        await stream.read_more()


async def _either(a: Stream, b: Stream | None, timeout: float | None) -> bool:
    """Wait until `a` or `b` has more bytes than now (or closes). False on timeout."""
    tasks = [asyncio.ensure_future(_more(a, len(a.buf)))]
    if b is not None:
        tasks.append(asyncio.ensure_future(_more(b, len(b.buf))))
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        # Let each cancelled read finish its cleanup (it resets the Conn's waiter) before anyone
        # reads again: a cleanup running later would wipe out the next reader's waiter.
        await asyncio.gather(*tasks, return_exceptions=True)
    return bool(done)
