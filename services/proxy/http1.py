"""Sans-I/O HTTP/1.x for a forward proxy: request/response head parsing (via httptools), body framing,
and rendering. Bytes in, values out; no sockets, no asyncio.

Strictness is deliberate: anything whose framing two parties could read differently (request
smuggling) is refused with 400 instead of being guessed at.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
from httptools import HttpRequestParser, HttpResponseParser  # (module globals: cheaper to reach than attributes)

from greyproxy.compiled import slotted
from greyproxy.policy.patterns import HOST_LABEL as _LABEL_RE
from greyproxy.policy.patterns import NUMERIC_LABEL as _NUMERIC_LABEL
from greyproxy.policy.patterns import ascii_host, refuse_controls

__all__ = [
    "BodyReader",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "UpstreamError",
    "canonical_host",
    "check_field",
    "parse_basic_user",
    "parse_request_head",
    "parse_response_head",
    "render_request_head",
    "render_response",
    "render_response_head",
]

_HEAD_END = b"\r\n\r\n"
_H2_PREFACE = b"PRI * HTTP/2.0"
_VERSIONS = ("1.0", "1.1")

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones clients still send to proxies.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)
_HOP_BY_HOP_BUT_CONNECTION = _HOP_BY_HOP - {"connection"}
# The hop-by-hop fields but Connection and the Proxy-* ones (`RequestHead.render_upstream` drops those
# itself): a head with none of these renders upstream in one pass.
_HOP_BY_HOP_PLAIN = frozenset(n for n in _HOP_BY_HOP_BUT_CONNECTION if not n.startswith("proxy-"))
# A client must never be able to strip message framing (or Host) by naming it in Connection.
_NEVER_CONNECTION_DROPPED = frozenset({"content-length", "transfer-encoding", "host"})
_BAD_VALUE_CHARS = re.compile(r"[\x00\r\n]")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.S)
_CL_RE = re.compile(r"[0-9]{1,18}")  # what `_content_length_ok` checks (tests compare them)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Every spelling of a credential placeholder (greyproxy.credentials: `greyproxy:credential:` in a
# value, `greyproxy%3Acredential%3A` in a target) starts with this (Basic credentials aside: base64).
# (Looked for in a head's latin-1 text: str.find; bytes' `in` would first try it as an int.)
_PLACEHOLDER_MARK = "greyproxy"


# RFC 9110 wording; older Pythons' HTTPStatus still says 'Request-URI Too Long' and the like.
_REASONS = {413: "Content Too Large", 414: "URI Too Long"}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class HttpError(Exception):
    """The client's request is unacceptable; `status`/`reason` are what to answer it with."""

    def __init__(self, status: int, detail: str = "", reason: str | None = None) -> None:
        if reason is None:
            reason = _REASONS.get(status) or _phrase(status)
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason


class UpstreamError(Exception):
    """The origin server's response is unacceptable (our peer misbehaved, not the client)."""


def _bad(detail: str) -> HttpError:
    return HttpError(400, detail)


# ---------------------------------------------------------------------------- hosts


@functools.lru_cache(maxsize=4096)  # pure, and the same few hosts come back on every request
def canonical_host(raw: str) -> str:
    """Lower-case host, IPv6 without brackets and compressed; ValueError for anything else.

    Names ending in a numeric label must be strict dotted-quad IPv4: resolvers read '127.1' or
    '2130706433' as 127.0.0.1, which would slip past rules written for the address.
    A non-ASCII (UTF-8) name is taken in its IDNA form: `日本.example` is `xn--wgv71a.example`,
    the form rules are stored in and the resolver is asked for.
    """
    host = raw.lower()
    if not host.isascii():
        try:  # request heads are decoded as latin-1: get the UTF-8 text the client sent back
            host = host.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass  # already text (SOCKS5 decodes UTF-8 itself)
        refuse_controls(host, "host")
        host = ascii_host(host)
    if host.startswith("["):
        if not host.endswith("]") or "%" in host:
            raise ValueError("bad IPv6 literal")
        return ipaddress.IPv6Address(host[1:-1]).compressed
    if ":" in host:
        if "%" in host:
            raise ValueError("zone ids are not accepted")
        return ipaddress.IPv6Address(host).compressed
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError("bad host name")
    last = labels[-1]
    if _NUMERIC_LABEL.fullmatch(last):
        return str(ipaddress.IPv4Address(name))  # rejects '127.1', '0x7f.0.0.1', '010.0.0.1'
    return host


@functools.lru_cache(maxsize=4096)  # pure, and the same few authorities come back on every request
def _split_authority(authority: str, port_required: bool, default_port: int) -> tuple[str, int]:
    """'host[:port]' or '[v6][:port]' → (canonical host, port); HttpError(400) on anything odd."""
    if "@" in authority:
        raise _bad("userinfo is not allowed in the request target")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _bad("unterminated IPv6 literal")
        host_part, rest = authority[: close + 1], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad("junk after IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host_part, sep, port_text_raw = authority.partition(":")
        port_text = port_text_raw if sep else None
    if not host_part:
        raise _bad("missing host")
    if port_text is None or port_text == "":
        if port_required:
            raise _bad("target must be host:port")
        port = default_port
    else:
        if not _PORT_RE.fullmatch(port_text):
            raise _bad("bad port")
        port = int(port_text)
        if not 0 < port <= 65535:
            raise _bad("bad port")
    try:
        host = canonical_host(host_part)
    except ValueError:
        raise _bad("bad host") from None
    return host, port


# ---------------------------------------------------------------------------- headers


# Every parsed head carries the set of its field names, lower-cased (`names`): most lookups are for
# fields that are absent (Expect, Upgrade, Transfer-Encoding, ...), and those are answered without a
# scan. None (a head built by hand) means "unknown": scan.
Names = frozenset[str] | None


def _value_at(line: str, start: int) -> str:
    """`line[start:].strip(" \t")`: a field's value from where it starts in its line (compiled: C loops
    over the characters, one slice, no method call; tests compare them)."""
    end = len(line)
    while start < end:
        c = line[start]
        if c != " " and c != "\t":
            break
        start += 1
    while end > start:
        c = line[end - 1]
        if c != " " and c != "\t":
            break
        end -= 1
    return line[start:end]


def _split_tokens(value: str) -> list[str]:
    """A comma-separated field value's tokens, lower-cased, empties dropped."""
    if value == "keep-alive" or value == "close":  # (a Connection field's usual values, as they are)
        return [value]
    if "," not in value:  # (the usual one token: the same, without the list's loop)
        token = value.strip()
        token = token.lower()
        return [token] if token else []
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def _add_tokens(tokens: list[str], value: str) -> None:
    """`tokens += _split_tokens(value)`; a Connection field's usual values (`close`, `keep-alive`) as
    they are."""
    if value == "close" or value == "keep-alive":
        tokens.append(value)
    else:
        tokens += _split_tokens(value)


def _tokens(headers: list[tuple[str, str]], name: str, names: Names = None) -> list[str]:
    """The tokens (`_split_tokens`) of every `name` header (lower-case)."""
    if names is not None and name not in names:
        return []
    out: list[str] = []
    for k, v in headers:
        # (a name that lower-cases to an ASCII one has its length: the other names are not lower-cased)
        if len(k) == len(name) and k.lower() == name:
            out.extend(_split_tokens(v))
    return out


def _first(headers: list[tuple[str, str]], name: str, names: Names = None) -> str | None:
    lname = name.lower()
    if names is not None and lname not in names:
        return None
    for k, v in headers:
        if k.lower() == lname:
            return v
    return None


def _keep_alive(version: str, connection: list[str]) -> bool:
    """HTTP/1.1 is persistent unless 'close'; HTTP/1.0 only with an explicit 'keep-alive'."""
    if "close" in connection:
        return False
    return version == "1.1" or "keep-alive" in connection


def _framing(
    headers: list[tuple[str, str]], err: Callable[[str], Exception], names: Names = None
) -> tuple[bool, int | None, bool]:
    """(chunked, content_length, until_close_if_response) from TE/CL, refusing ambiguous framing."""
    if names is not None and "transfer-encoding" not in names and "content-length" not in names:
        return False, None, True
    te = _tokens(headers, "transfer-encoding")
    has_te = any(k.lower() == "transfer-encoding" for k, _ in headers)
    cls = [v for k, v in headers if k.lower() == "content-length"]
    return _framing_of(te, has_te, cls, err)


def _content_length_ok(value: str) -> bool:
    """`_CL_RE.fullmatch(value)` (1 to 18 ASCII digits) without the regex engine (compiled: a C loop)."""
    if not 0 < len(value) <= 18:
        return False
    for c in value:
        if not "0" <= c <= "9":
            return False
    return True


def _content_length_value(value: str) -> int:
    """A Content-Length value's number: `int(value)` when `_content_length_ok(value)`, else -1
    (compiled: one C loop, without int()'s parse of a str)."""
    if not 0 < len(value) <= 18:
        return -1
    n = 0
    for c in value:
        if not "0" <= c <= "9":
            return -1
        n = n * 10 + (ord(c) - 48)
    return n


def _framing_of(
    te: list[str], has_te: bool, cls: list[str], err: Callable[[str], Exception]
) -> tuple[bool, int | None, bool]:
    """_framing from the Transfer-Encoding tokens, whether that field is present, the Content-Length values."""
    if has_te and cls:
        raise err("both Content-Length and Transfer-Encoding")  # the classic smuggling pair
    if len(cls) > 1:
        raise err("more than one Content-Length")
    if has_te:
        if not te or "chunked" in te[:-1]:
            raise err("bad Transfer-Encoding")
        return te[-1] == "chunked", None, te[-1] != "chunked"
    if cls:
        length = _content_length_value(cls[0])
        if length < 0:
            raise err("bad Content-Length")
        return False, length, False
    return False, None, True


def _names_dropped(names: frozenset[str], tokens: list[str]) -> bool:
    """Whether a Connection field's `tokens` name a field among `names` that it drops (any but framing
    and Host): `not (names.isdisjoint(tokens) or names.intersection(tokens) <= _NEVER_CONNECTION_DROPPED)`
    (compiled: a C loop of set look-ups, no method calls; tests compare them)."""
    for t in tokens:
        if t in names and t not in _NEVER_CONNECTION_DROPPED:
            return True
    return False


def _proxy_names(names: frozenset[str]) -> bool:
    """A Proxy-* field among these (lower-case) names (a loop: `any()` of a generator costs more)."""
    for n in names:
        if n.startswith("proxy-"):
            return True
    return False


def _filter_hop_by_hop(
    headers: list[tuple[str, str]], keep_upgrade: bool, names: Names = None
) -> list[tuple[str, str]]:
    """Drop hop-by-hop fields, all Proxy-*, and whatever Connection names (never framing/Host)."""
    if names is not None and names.isdisjoint(_HOP_BY_HOP_BUT_CONNECTION) and not _proxy_names(names):
        if "connection" not in names:
            return list(headers)  # nothing to drop (no Connection field, so it names nothing either)
        # Only a Connection field (a client's `close`, `keep-alive`): it goes, in one pass; so would
        # the fields it names, when one is here (then the general loop below)
        kept: list[tuple[str, str]] = []
        tokens: list[str] = []
        for k, v in headers:
            if len(k) == 10 and k.lower() == "connection":  # (see `_tokens`)
                tokens += _split_tokens(v)
            else:
                kept.append((k, v))
        if names.isdisjoint(tokens) or names.intersection(tokens) <= _NEVER_CONNECTION_DROPPED:
            return kept
    named = set(_tokens(headers, "connection", names)) - _NEVER_CONNECTION_DROPPED
    if keep_upgrade:
        named.discard("upgrade")
    out: list[tuple[str, str]] = []
    for k, v in headers:
        lk = k.lower()
        if lk == "upgrade" and keep_upgrade:
            out.append((k, v))
        elif lk in _HOP_BY_HOP or lk.startswith("proxy-") or lk in named:
            continue
        else:
            out.append((k, v))
    return out


def parse_basic_user(value: str) -> str | None:
    """The user name of a 'Basic base64(user:pass)' credential; the password is dropped unread."""
    return parse_basic(value)[0]


def parse_basic(value: str) -> tuple[str | None, str | None]:
    """(user, password) of a 'Basic base64(user:pass)' credential; user None when it names no one
    (malformed, empty, the 'proxy' placeholder, a name of the reserved `unknown-…` namespace);
    password None when empty.

    UTF-8 first, else latin-1: python-requests (and pip, which uses it) encode Basic credentials in
    latin-1, curl sends the bytes it was given (UTF-8). A name of the `unknown-…` namespace is the
    proxy's own for a client that gave none (SPEC §1: `unknown-<source ip>`): presented, it would
    stand for the unnamed client at another address (its rules, its pending entries), so it names
    no one here: the connection is its own unnamed client (`unknown-<its address>`, or its
    container's name), as with 'proxy'. SOCKS5 reads its user name the same way (socks5.py)."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None, None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        decoded = raw.decode("latin-1")  # (every byte string decodes: no error to catch)
    user, sep, password = decoded.partition(":")
    if not sep or not user or user == "proxy" or user.startswith("unknown-") or not user.isprintable():
        return None, None
    return user, password or None


# ---------------------------------------------------------------------------- request head


# One per request. Compiled, the heads are extension types (http1.pxd: Cython's dataclass, its fields
# C struct fields that the other compiled modules read directly); as Python they get __slots__ at the
# end of this module (greyproxy.compiled.slotted: what dataclass(slots=True) does, which Cython does not take).
@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    host: str = ""
    port: int = 0
    scheme: str = ""
    path: str = ""
    keep_alive: bool = True
    chunked: bool = False
    content_length: int | None = None
    expect_continue: bool = False
    upgrade: str | None = None
    proxy_user: str | None = None
    # The Proxy-Authorization password: checked against a claimed identity's secret (SPEC §16),
    # never logged or recorded (the field itself is redacted in `headers`).
    proxy_password: str | None = field(default=None, repr=False, compare=False)
    authority: str = field(default="", repr=False)  # Host value for upstream, from the target
    names: frozenset[str] | None = field(default=None, repr=False, compare=False)  # lower-case field names
    # True when the head as received contains no `greyproxy` at all (parse_request_head sets it): no
    # credential placeholder can be in its fields or target (hooks.CredentialSubstitution skips it).
    placeholder_free: bool = field(default=False, repr=False, compare=False)
    # True for a head parse_request_head built: its method, target and every field name and value
    # hold no CR, LF or NUL (the parser and the checks there saw to it), so `render_upstream` need
    # not check them again. A head built by hand is rendered with the checks.
    parsed: bool = field(default=False, repr=False, compare=False)

    def header(self, name: str) -> str | None:
        return _first(self.headers, name, self.names)

    def render_upstream(self, version: str) -> bytes:
        """The head sent upstream when no hook changed it: `render_request_head` of the target's
        path and `upstream_headers()`, without its checks for a parsed head (see `parsed`). A parsed
        head like the one rendered last (its method, path, authority and fields equal: what the
        rendering reads, the names and the upgrade being read from them) gets the same bytes."""
        if not self.parsed:
            return render_request_head(self.method, self.path, version, self.upstream_headers())
        last = _LAST_RENDER[0]  # (one tuple read, one written: threads never see half of one)
        headers = self.headers
        if (
            last is not None
            and last[4] == headers
            and last[1] == self.path
            and last[0] == self.method
            and last[3] == self.authority
            and last[2] == version
        ):
            return last[5]
        out = self._render_parsed(version)
        _LAST_RENDER[0] = (self.method, self.path, version, self.authority, list(headers), out)
        return out

    def _render_parsed(self, version: str) -> bytes:
        """`render_upstream` of a parsed head."""
        names = self.names
        if names is not None and names.isdisjoint(_HOP_BY_HOP_PLAIN):
            # The usual head: no hop-by-hop field but perhaps Proxy-* ones and a Connection field (a
            # client's `close`, `keep-alive`): `upstream_headers()` in one pass over the fields, which
            # drops those (and Host, ours first), unless the Connection field names one that is here
            # (then the general way below drops that too).
            out = [self.method, " ", self.path, " HTTP/", version, "\r\nHost: ", self.authority, "\r\n"]
            tokens: list[str] | None = None
            headers = self.headers
            for kv in headers:
                k = kv[0]
                n = len(k)
                # (a name that lower-cases to an ASCII one has its length: see `_tokens`; the usual
                # spelling is compared first)
                if n == 4 and (k == "Host" or k.lower() == "host"):
                    continue
                if n == 10 and (k == "Connection" or k.lower() == "connection"):
                    if tokens is None:
                        tokens = []
                    _add_tokens(tokens, kv[1])
                    continue
                if n >= 6 and (k[0] == "p" or k[0] == "P") and k[:6].lower() == "proxy-":
                    continue
                out += (k, ": ", kv[1], "\r\n")
            if tokens is None or not _names_dropped(names, tokens):
                out.append("\r\n")
                return "".join(out).encode("latin-1")
        out = [self.method, " ", self.path, " HTTP/", version, "\r\n"]  # (one join of all the pieces)
        for k, v in self.upstream_headers():
            out += (k, ": ", v, "\r\n")
        out.append("\r\n")
        return "".join(out).encode("latin-1")

    def upstream_headers(self) -> list[tuple[str, str]]:
        """Headers to send upstream: end-to-end ones only, with Host taken from the target."""
        # RFC 9112 §3.2.2: a proxy replaces Host with the target's authority (no Host/URI mismatch).
        kept = _filter_hop_by_hop(self.headers, self.upgrade is not None, self.names)
        out = [("Host", self.authority)]
        if self.names is None or "host" in self.names:
            for kv in kept:  # (the pairs themselves, not copies)
                k = kv[0]
                if len(k) != 4 or k.lower() != "host":  # (see `_tokens`)
                    out.append(kv)
        else:
            out += kept
        if self.upgrade is not None:
            out.append(("Connection", "upgrade"))
        return out


class _Collector:
    """httptools callback target: gathers the head pieces."""

    def __init__(self) -> None:
        self.url = bytearray()
        self.status = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, status: bytes) -> None:
        self.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


class _HeadEnd:
    """httptools callback target when the head is read by splitting its text (`_SPLIT_READING`): only its end."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_headers_complete(self) -> None:
        self.complete = True


# Whether this module runs compiled (`_HeadEnd` is then an extension type: see greyproxy.compiled.slotted).
_COMPILED = not _HeadEnd.__flags__ & (1 << 9)


# A head the parser accepts is read by splitting its text at CRLF (its fields: `line.partition(":")`)
# instead of through the parser's callbacks: two string operations a field instead of a callback and
# two decodes. Both readings agree because the parser refuses every head where they would not: a bare
# CR or LF anywhere, a NUL or other control character in a field, a line starting with a space or a
# tab (folded), a space before a field's colon. tests/unit/test_proxy_fast_paths.py pins those
# refusals (an httptools that accepted one would fail there) and checks both readings agree on any
# head; it turns this off to get the callbacks' reading.
_SPLIT_READING = True


_BLANK_LINES = re.compile(rb"(?:\r\n)*")
_METHOD_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # RFC 9110 §9.1: a method is a token


def _unknown_method(problem: str, method: str) -> bool:
    """Whether llhttp refused `method` only for not being one it knows: a token (not CONNECT, which
    it knows) that a forward proxy relays as it is."""
    return "method" in problem.lower() and _METHOD_TOKEN.fullmatch(method) is not None


def _head_end(buf: bytes, start: int, stop: int) -> int:
    """`buf.find(b"\\r\\n\\r\\n", start, stop)` for `start`, `stop` >= 0 (compiled: a C loop that looks at every fourth byte
    outside CRs and LFs, without the method call and its argument parsing; tests compare them)."""
    n = len(buf)
    if stop > n:
        stop = n
    if start < 0:
        start = 0
    i = start + 3  # (where the empty line's LF would be)
    at = buf  # (compiled: the bytes' C pointer, no bounds checks; start <= i - 3 and i < stop <= n)
    while i < stop:
        c = at[i]
        if c == 10:
            if at[i - 1] == 13 and at[i - 2] == 10 and at[i - 3] == 13:
                return i - 3
            i += 1
        elif c == 13:
            i += 1
        else:  # (no CRLF CRLF holds this byte: the next that could end one is 4 on)
            i += 4
    return -1


def _skip_blank_lines(buf: bytes) -> int:
    """RFC 9112 §2.2: empty lines before a request line are ignored (some clients send them)."""
    m = _BLANK_LINES.match(buf)
    return m.end() if m else 0


def _run_parser(parser: httptools.HttpRequestParser | httptools.HttpResponseParser, data: bytes) -> str | None:
    """Feed `data`; None when accepted, else the parser's complaint."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # CONNECT / Upgrade: the head itself was fine
    except httptools.HttpParserError as exc:
        return str(exc) or type(exc).__name__
    return None


def _decode_headers(
    raw: list[tuple[bytes, bytes]], err: Callable[[str], Exception]
) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """A request's fields as text, and the set of their names lower-cased (most lookups in a
    request are for absent fields). Response heads take their own single pass instead."""
    headers = [(name.decode("latin-1"), value.decode("latin-1").strip(" \t")) for name, value in raw]
    # One search over all values at once (joining cannot create a CR, LF or NUL that was not there).
    if _BAD_VALUE_CHARS.search("".join([v for _k, v in headers])):
        raise err("control character in header value")
    return headers, frozenset([name.lower().decode("latin-1") for name, _v in raw])


def _too_big(buf: bytes, start: int, max_header_bytes: int) -> HttpError:
    line_end = buf.find(b"\r\n", start, start + max_header_bytes + 2)
    if line_end < 0:
        return HttpError(414, "request line too long")
    return HttpError(431, "request head too large")


def _idna_request_line(head: bytes, line_end: int) -> bytes:
    """`head` with a UTF-8 host name in its request-target (`CONNECT 日本.example:443`, or an
    absolute-form URL) written in IDNA form, so it parses and is judged like the punycode name.
    Anything else non-ASCII is left for the parser to refuse."""
    parts = head[:line_end].split(b" ")
    if len(parts) != 3:
        return head
    method, target, version = parts
    prefix, rest = b"", target
    if method != b"CONNECT":
        scheme, sep, rest = target.partition(b"://")
        if not sep:
            return head
        prefix = scheme + sep
    slash = rest.find(b"/")
    authority, path = (rest, b"") if slash < 0 else (rest[:slash], rest[slash:])
    if not path.isascii():
        return head
    try:
        text = authority.decode("utf-8")
        host, colon, port = text.rpartition(":") if ":" in text else (text, "", "")
        refuse_controls(host, "host")
        name = (ascii_host(host) + colon + port).encode("ascii")  # (a non-ASCII port: left for the parser)
    except ValueError:  # UnicodeDecodeError and UnicodeEncodeError too
        return head
    return b" ".join((method, prefix + name + path, version)) + head[line_end:]


def parse_request_head(
    buf: bytes, max_header_bytes: int = 65536, max_headers: int = 100, origin: tuple[str, str, int] | None = None
) -> tuple[RequestHead, int] | None:
    """Parse one request head from the start of `buf`: None if incomplete, else (head, bytes used).

    `origin=(scheme, host, port)` parses a request sent to an origin server (inside a tunnel):
    origin-form targets, the authority from Host, and (host, port) when Host is absent (HTTP/1.0).
    """
    start = _skip_blank_lines(buf) if buf[:1] in (b"\r", b"\n") else 0
    if buf.startswith(_H2_PREFACE, start):
        raise HttpError(505, "HTTP/2 is not supported by this proxy")
    # Sizes count from the very start of buf, so endless blank lines are bounded too.
    stop = max_header_bytes + len(_HEAD_END)
    end = _head_end(buf, start, stop) if _COMPILED else buf.find(_HEAD_END, start, stop)
    if end < 0:
        if len(buf) > max_header_bytes:
            raise _too_big(buf, start, max_header_bytes)
        # Catch garbage early (e.g. TLS sent to the HTTP port) instead of waiting for 64 KiB.
        probe = _Collector()
        problem = _run_parser(HttpRequestParser(probe), buf[start:])
        if problem is not None:
            raise _bad(problem)
        if probe.complete:
            raise _bad("head not terminated by CRLF CRLF")
        if len(probe.headers) > max_headers:
            raise HttpError(431, "too many headers")
        return None
    consumed = end + len(_HEAD_END)
    if consumed > max_header_bytes:
        raise _too_big(buf, start, max_header_bytes)

    head_bytes = buf[start:consumed]
    # The head's text (latin-1: the same offsets as its bytes), without the final CRLF CRLF: looked
    # through as text, where `isascii` is a flag and `find` parses no arguments.
    text = head_bytes[:-4].decode("latin-1")
    line_end = text.find("\r\n")
    if line_end < 0:
        line_end = len(text)
    if not text.isascii() and not text[:line_end].isascii():
        head_bytes = _idna_request_line(head_bytes, line_end)  # the parser takes ASCII targets only
        text = head_bytes[:-4].decode("latin-1")
        line_end = text.find("\r\n")
        if line_end < 0:
            line_end = len(text)
    lines: list[str] | None = text.split("\r\n") if _SPLIT_READING else None
    first_line = lines[0] if lines is not None else ""
    request_line: list[str] = first_line.split(" ") if lines is not None else []
    pair: tuple[_HeadEnd, HttpRequestParser] | None = None
    if len(request_line) == 3:  # the usual head: the parser checks it, the split reads it
        pool = _REQUEST_PARSERS
        if pool:  # (a parser a head like this one left where the next head starts: `_REUSE_BLOCKERS`)
            try:
                pair = pool.pop()  # (atomic: two threads' parses never share one)
            except IndexError:
                pair = None
        if pair is None:
            done = _HeadEnd()
            fresh = HttpRequestParser(done)
            # (past a message that does not keep its connection, `Connection: close` or HTTP/1.0, it
            # goes on to the next head instead of refusing data after it: `_REUSE_BLOCKERS`)
            fresh.set_dangerous_leniencies(lenient_keep_alive=True)
            pair = kept = (done, fresh)
        else:
            kept = pair
        col: _Collector | _HeadEnd = kept[0]
        col.complete = False
        parser = kept[1]
    else:
        lines, col = None, _Collector()
        parser = HttpRequestParser(col)
    problem = _run_parser(parser, head_bytes)
    unknown_method: str | None = None
    if problem is not None:
        unknown_method = head_bytes[: head_bytes.find(b" ")].decode("latin-1")
        if not _unknown_method(problem, unknown_method):
            raise _bad(problem)
        # A method llhttp does not know (it knows them by name) but RFC 9110 allows: any token. The
        # head is checked as if it were a PUT's (request framing does not depend on the method) and
        # relayed as it came; the origin says whether it knows the method.
        pair = None
        col = _HeadEnd() if lines is not None else _Collector()
        parser = HttpRequestParser(col)
        problem = _run_parser(parser, b"PUT" + head_bytes[len(unknown_method) :])
        if problem is not None:
            raise _bad(problem)
    if not col.complete:
        raise _bad("incomplete request head")
    if lines is not None:
        if len(lines) - 1 > max_headers:
            raise HttpError(431, "too many headers")
    elif len(col.headers) > max_headers:  # type: ignore[union-attr]
        raise HttpError(431, "too many headers")
    # (the parser read '<protocol>/<digit>.<digit>' at the end of a request line it accepted, and the
    # method as written: it knows methods by their exact spelling)
    version = request_line[2][-3:] if lines is not None else parser.get_http_version()
    if version not in _VERSIONS:
        raise HttpError(505, f"HTTP/{version} is not supported")
    if not text.startswith("HTTP/", line_end - 8, line_end - 3):
        # (the parser also takes RTSP/ and ICE/ as the protocol of a request line)
        raise _bad("not an HTTP request line (the protocol is not HTTP/)")
    if lines is not None:
        method, target = request_line[0], request_line[1]
        headers = []
        raw_names = []
        for line in lines[1:]:  # (`_split_fields`, and the names: one loop)
            colon = line.find(":")
            if colon < 0:  # (`line.partition(":")`'s reading; the parser refuses such a line)
                k, v = line, ""
            else:
                k = line[:colon]
                v = _value_at(line, colon + 1)
            headers.append((k, v))
            raw_names.append(k)
        last = _LAST_NAMES[0]  # (the last head's field names: most heads repeat them; one tuple read)
        if last is not None and last[0] == raw_names:
            names, facts = last[1], last[2]
        else:
            names = frozenset(map(str.lower, raw_names))
            facts = _names_facts(names)
            _LAST_NAMES[0] = (raw_names, names, facts)
    else:
        method = unknown_method or parser.get_method().decode("latin-1")
        target = col.url.decode("latin-1")  # type: ignore[union-attr]
        headers, names = _decode_headers(col.headers, _bad)  # type: ignore[union-attr]
        facts = _names_facts(names)
        if _BAD_VALUE_CHARS.search(target):  # (the parser refuses these too: `parsed` relies on it)
            raise _bad("control character in the request target")
    # What the credential hook looks for, in any spelling it reads, is absent from the whole head.
    placeholder_free = text.find(_PLACEHOLDER_MARK) < 0
    if origin is None:
        parts = _TARGETS.get(target) if method != "CONNECT" and method != "OPTIONS" else None
        if parts is None:
            parts = _target_parts(method, target)  # (raises for a bad one: never remembered)
            if method != "CONNECT" and method != "OPTIONS":
                if len(_TARGETS) >= 4096:
                    _TARGETS.clear()  # (targets come from clients: bounded, start over)
                _TARGETS[target] = parts
    else:
        parts = _origin_parts(method, target, version, headers, names, origin[0], origin[1], origin[2])
    scheme, host, port, path, authority = parts
    # (every field set here: compiled, C struct sets, without the dataclass __init__'s Python call)
    head = RequestHead.__new__(RequestHead)
    head.method, head.target, head.version, head.headers = method, target, version, headers
    head.host, head.port, head.scheme, head.path = host, port, scheme, path
    head.keep_alive, head.chunked, head.content_length, head.expect_continue = version == "1.1", False, None, False
    head.upgrade, head.proxy_user, head.proxy_password, head.authority = None, None, None, authority
    head.names, head.placeholder_free, head.parsed = names, placeholder_free, True
    _derive_request_headers(head, facts & 2 != 0)  # (`_names_facts`; literal bits: compiled, C operations)
    if pair is not None and facts & 1 and method != "CONNECT":
        # The parser took this head whole and is where the next one starts (a request without a body,
        # as llhttp reads it; one that closes its connection too: the parser is lenient about that
        # alone): kept for the next parse, which then makes none (HttpRequestParser's making, its
        # callbacks looked up, costs ~2 500 instructions).
        pool = _REQUEST_PARSERS
        if len(pool) < _REQUEST_PARSERS_MAX:
            pool.append(pair)
    return head, consumed


# The last request head's field names as received, their lower-cased set and what it says
# (`_names_facts`), for `parse_request_head`; and the last parsed head `render_upstream` rendered: (method, path, version, authority, a copy of
# its fields, the bytes). Each one tuple, replaced whole.
_LAST_NAMES: list[tuple[list[str], frozenset[str], int] | None] = [None]
_LAST_RENDER: list[tuple[str, str, str, str, list[tuple[str, str]], bytes] | None] = [None]


def _names_facts(names: frozenset[str]) -> int:
    """What a request head's lower-cased field names say (a pure function of them, remembered with them
    in `_LAST_NAMES`): bit 1, none of them blocks its parser's reuse (`_REUSE_BLOCKERS`); bit 2, none
    is one `_derive_request_headers` reads but Connection (`_REQUEST_FIELDS_BUT_CONNECTION`)."""
    facts = 0
    if names.isdisjoint(_REUSE_BLOCKERS):
        facts |= 1
    if names.isdisjoint(_REQUEST_FIELDS_BUT_CONNECTION):
        facts |= 2
    return facts


# Request parsers left where a new head starts, each with its callback target (`parse_request_head`:
# taken from the end, given back after a head that left it so; a head that failed keeps its parser).
_REQUEST_PARSERS: list[tuple[_HeadEnd, HttpRequestParser]] = []
_REQUEST_PARSERS_MAX = 8
# A head with one of these fields may leave llhttp elsewhere than at the next head's start (a body to
# read, an upgrade), as does CONNECT: its parser is dropped. (The end of a message that closes its
# connection, `Connection: close`, `Proxy-Connection: close` or HTTP/1.0 without keep-alive, would
# leave a strict parser closed, refusing any data after it; the kept parsers are lenient about that
# alone, `lenient_keep_alive`, which llhttp reads nowhere else: they go on to the next head.)
_REUSE_BLOCKERS = frozenset({"content-length", "transfer-encoding", "upgrade"})


def _derive_target(head: RequestHead) -> None:
    """host/port/scheme/path/authority from the request-target (authority- or absolute-form)."""
    head.scheme, head.host, head.port, head.path, head.authority = _target_parts(head.method, head.target)


def _target_parts(method: str, target: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path, authority) of a request-target in authority- or absolute-form."""
    if method == "CONNECT":
        host, port = _split_authority(target, True, 0)
        return "", host, port, "", target
    # `_SCHEME_RE`'s reading of the usual `http://` target without the regex engine (the tests compare
    # them): the authority ends at the first of `/`, `?` and `#`.
    if target.startswith("http://"):
        scheme = "http"
        start = 7
        end = target.find("/", 7)
        if end < 0:
            end = len(target)
        stop = target.find("?", 7, end)
        if stop >= 0:
            end = stop
        stop = target.find("#", 7, end)
        if stop >= 0:
            end = stop
        authority, rest = target[start:end], target[end:]
        hit = _HTTP_AUTHORITIES.get(authority)
        if hit is None:
            hit = _split_authority(authority, False, 80)  # (raises for a bad one: never remembered)
            if len(_HTTP_AUTHORITIES) >= 4096:
                _HTTP_AUTHORITIES.clear()  # (authorities come from clients: bounded, start over)
            _HTTP_AUTHORITIES[authority] = hit
        host, port = hit
    else:
        m = _SCHEME_RE.fullmatch(target)
        if m is None:
            raise HttpError(400, "absolute URI required")
        scheme, authority, rest = m.group(1, 2, 3)
        scheme = scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise _bad(f"unsupported scheme {scheme!r}")
        host, port = _split_authority(authority, False, _DEFAULT_PORTS[scheme])
    stop = rest.find("#")
    path = rest[:stop] if stop >= 0 else rest  # fragments are never sent to a server
    if not path:
        path = "*" if method == "OPTIONS" else "/"  # RFC 9112 §3.2.4
    elif path.startswith("?"):
        path = "/" + path
    return scheme, host, port, path, authority


# A request-target -> `_target_parts(method, target)`, for the methods whose parts depend on the target
# alone (not CONNECT, nor OPTIONS: its empty path is `*`): a client sends the same URLs again and
# again, and the parts cost ~2 500 instructions to read (a dict's look-up: ~200).
_TARGETS: dict[str, tuple[str, str, int, str, str]] = {}

# An http:// target's authority -> `_split_authority(authority, False, 80)` (a dict's look-up: the
# lru_cache's call, which builds and hashes a key of its three arguments, cost ~1 000 instructions)
_HTTP_AUTHORITIES: dict[str, tuple[str, int]] = {}


def _origin_parts(
    method: str,
    target: str,
    version: str,
    headers: list[tuple[str, str]],
    names: Names,
    scheme: str,
    host: str,
    port: int,
) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path, authority) of a request inside a tunnel to (scheme, host, port):
    origin-form (the Host field names the host; HTTP/1.0 without one: the tunnel's), or absolute-form,
    which is legal towards origins too (RFC 9112 §3.2.2)."""
    if method == "CONNECT":
        raise HttpError(405, "CONNECT inside a tunnel is not supported")
    # (a target starting with `/` or `*` is never `_SCHEME_RE`'s: its regex is run for the others only)
    if target.startswith("/"):
        stop = target.find("#")
        path = target[:stop] if stop >= 0 else target  # fragments are never sent to a server
    elif target == "*" and method == "OPTIONS":
        path = target
    elif _SCHEME_RE.fullmatch(target):
        return _target_parts(method, target)
    else:
        raise _bad("bad request target")
    value: str | None = None
    if names is None or "host" in names:
        for kv in headers:
            k = kv[0]
            if len(k) == 4 and (k == "Host" or k.lower() == "host"):
                if value is not None:
                    raise _bad("more than one Host header")
                value = kv[1]
    if value is not None:
        default = _DEFAULT_PORTS.get(scheme, port)
        hit = _ORIGIN_AUTHORITIES.get(value)
        if hit is None or hit[0] != default:
            got = _split_authority(value, False, default)  # (raises for a bad one: never remembered)
            hit = (default, got[0], got[1])
            if len(_ORIGIN_AUTHORITIES) >= 4096:
                _ORIGIN_AUTHORITIES.clear()  # (Host values come from clients: bounded, start over)
            _ORIGIN_AUTHORITIES[value] = hit
        return scheme, hit[1], hit[2], path, value
    if version == "1.0":
        shown = f"[{host}]" if ":" in host else host
        return scheme, host, port, path, shown if port == _DEFAULT_PORTS.get(scheme) else f"{shown}:{port}"
    raise _bad("missing Host header")  # RFC 9112 §3.2: mandatory in HTTP/1.1


# A Host field's value inside a tunnel -> (the default port it was read with, host, port): what
# `_split_authority(value, False, default)` gave (a client sends the same Host on every request).
_ORIGIN_AUTHORITIES: dict[str, tuple[int, str, int]] = {}


# The fields _derive_request_headers reads; a head with none of them (the usual GET) takes the defaults.
_REQUEST_FIELDS = frozenset(
    {"transfer-encoding", "content-length", "connection", "expect", "upgrade", "proxy-authorization"}
)
_REQUEST_FIELDS_BUT_CONNECTION = _REQUEST_FIELDS - {"connection"}


def _derive_request_headers(head: RequestHead, none_derived: bool = False) -> None:
    """keep_alive, chunked, content_length, expect_continue, upgrade and proxy_* from the head's fields
    (`none_derived`: its names are known to hold none of `_REQUEST_FIELDS_BUT_CONNECTION`)."""
    headers, names = head.headers, head.names
    if names is not None and (none_derived or names.isdisjoint(_REQUEST_FIELDS_BUT_CONNECTION)):
        # chunked, content_length, expect_continue, upgrade, proxy_*: their defaults
        if "connection" not in names:
            head.keep_alive = head.version == "1.1"  # _keep_alive without a Connection field
        else:  # (a client closing after this request: `Connection: close`; `_tokens`, inline)
            tokens: list[str] = []
            for kv in headers:
                k = kv[0]
                if len(k) == 10 and (k == "Connection" or k.lower() == "connection"):
                    _add_tokens(tokens, kv[1])
            head.keep_alive = _keep_alive(head.version, tokens)
        return
    chunked, length, _ = _framing(headers, _bad, names)
    if chunked and head.version == "1.0":
        raise _bad("Transfer-Encoding in an HTTP/1.0 request")  # RFC 9112 §6.1: framing is faulty
    if chunked and _tokens(headers, "transfer-encoding", names) != ["chunked"]:
        # Codings before chunked ('gzip, chunked') are legal but no client sends them to a proxy,
        # and servers disagree on them: only exactly 'chunked' is accepted in a request.
        raise _bad("Transfer-Encoding must be exactly 'chunked'")
    if (
        not chunked
        and (names is None or "transfer-encoding" in names)
        and any([k.lower() == "transfer-encoding" for k, _ in headers])  # (a list: cpdef takes no closure)
    ):
        raise _bad("Transfer-Encoding must end with chunked")
    head.chunked, head.content_length = chunked, length
    connection = _tokens(headers, "connection", names)
    head.keep_alive = _keep_alive(head.version, connection)
    expect = _first(headers, "expect", names)
    head.expect_continue = expect is not None and expect.lower() == "100-continue"
    upgrade = _first(headers, "upgrade", names)
    head.upgrade = upgrade if upgrade and "upgrade" in connection and head.method != "CONNECT" else None
    auth = _first(headers, "proxy-authorization", names)
    head.proxy_user, head.proxy_password = parse_basic(auth) if auth is not None else (None, None)
    if auth is not None:
        # The credential is consumed here; keeping it would leak the password into logs and captures.
        head.headers = [(k, "[redacted]") if k.lower() == "proxy-authorization" else (k, v) for k, v in headers]


# ---------------------------------------------------------------------------- response head


@dataclass  # (see RequestHead)
class ResponseHead:
    version: str
    status: int
    reason: str
    # The fields as (name, value) pairs: `headers`. None until first asked for when the head is plain
    # (`text` set): they are then split from its text.
    _headers: list[tuple[str, str]] | None = field(repr=False, compare=False)
    keep_alive: bool
    chunked: bool
    content_length: int | None
    has_body: bool
    until_close: bool
    # The head as received, when it can be relayed as it is: HTTP/1.1 and no hop-by-hop field but
    # at most one `Connection: keep-alive` (`raw_keep_alive`). None: render_response_head rebuilds it.
    raw: bytes | None = field(default=None, repr=False, compare=False)
    raw_keep_alive: bool = field(default=False, repr=False, compare=False)
    # lower-case name -> first value, when the parser's callbacks read the fields (else header() looks in `lower`)
    index: dict[str, str] | None = field(default=None, repr=False, compare=False)
    # The head's text when it is read by splitting it (`_SPLIT_READING`), without the final CRLF CRLF,
    # and the same lower-cased (made by `header` when first asked: the parse reads the text as it
    # is): each field is a line, its name what stands between a CRLF and the line's first colon.
    text: str | None = field(default=None, repr=False, compare=False)
    lower: str | None = field(default=None, repr=False, compare=False)
    # Where in `raw` its one Connection field's line starts (its CRLF before), when read from the text;
    # -1: not known. (A client closing after this answer: `render_response_head` replaces it there.)
    connection_at: int = field(default=-1, repr=False, compare=False)
    # The field lines of `text` (split once by the parse; read, never changed), or None: split `text`.
    lines: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def headers(self) -> list[tuple[str, str]]:
        h = self._headers
        if h is None:
            assert self.text is not None
            lines = self.lines
            h = self._headers = _split_fields(self.text.split("\r\n")[1:] if lines is None else lines)
        return h

    @headers.setter
    def headers(self, value: list[tuple[str, str]]) -> None:
        self._headers = value

    def field_lines(self) -> list[str] | None:
        """The fields as the lines of the head (`name:value`), while `headers` has not been built (nor
        set): for a reader that can take them so (`Redactor.recorded`). Else None: read `headers`."""
        text = self.text
        if self._headers is not None or text is None:
            return None
        lines = self.lines
        return text.split("\r\n")[1:] if lines is None else lines

    def header(self, name: str) -> str | None:
        lower = self.lower
        if lower is None and self.text is not None:
            lower = self.lower = self.text.lower()  # (latin-1: the same length, so the same offsets)
        if lower is not None:
            needles = _NEEDLES
            needle = needles.get(name) or f"\r\n{name.lower()}:"
            i = lower.find(needle)
            if i < 0:
                return None
            text = self.text
            assert text is not None
            start = i + len(needle)
            stop = text.find("\r\n", start)
            value = text[start:stop] if stop >= 0 else text[start:]
            return value.strip(" \t")
        if self.index is not None:
            return self.index.get(name.lower())
        return _first(self.headers, name)


# What `ResponseHead.header` looks for, for the names the proxy asks every response for.
_NEEDLES = {
    n: f"\r\n{n.lower()}:"
    for n in ("content-type", "Content-Type", "content-encoding", "Content-Encoding", "sec-websocket-extensions")
}


def _split_fields(lines: list[str]) -> list[tuple[str, str]]:
    """A plain head's field lines as (name, value) pairs, the value without its surrounding blanks:
    what the parser's callbacks give for them (tests/unit/test_proxy_fast_paths.py)."""
    return [(k, v.strip(" \t")) for k, _, v in [line.partition(":") for line in lines]]


# A plain response head's framing and hop-by-hop fields, in its lower-cased text: the name + `:`
# starts such a field's line (see ResponseHead.text). Proxy-* by prefix. What `_response_field` tells
# apart (tests/unit/test_proxy_fast_paths.py compares them).
_RESPONSE_FIELD_RE = re.compile(
    r"\r\n(content-length|transfer-encoding|connection|keep-alive|te|trailer|upgrade|proxy-[^:]*):"
)
# `_response_field`'s kinds 1-3 (content-length, connection, transfer-encoding): the length of `name:`.
_FIELD_NAME_LENGTHS = (0, 15, 11, 18)


def _at(text: str, start: int, word: str, usual: str) -> bool:
    """Whether `word` (lower-case ASCII) stands in `text` at `start` in any letter case: what
    `text.lower().startswith(word, start)` says of a latin-1 text (whose lower-casing maps no other
    character to an ASCII one, nor changes its length), without lowering the whole text. `usual`:
    the usual spelling (looked for first)."""
    if text.startswith(usual, start):
        return True
    end = start + len(word)
    # (the last character of each `word` has no case: one that is not there rules it out at once)
    if end > len(text) or text[end - 1] != word[len(word) - 1]:
        return False
    return text[start:end].lower() == word


def _response_field(text: str, start: int) -> int:
    """Which field the line of a parsed head's text at `start` is, its name in any letter case:
    1 content-length, 2 connection, 3 transfer-encoding, 4 another hop-by-hop field (te, trailer,
    keep-alive, upgrade, proxy-*), 0 any other. Told by the first letter first: most fields are none
    of these."""
    c = text[start]  # (a field line is never empty: the head ends at the first empty line)
    if c == "C" or c == "c":
        if _at(text, start, "content-length:", "Content-Length:"):
            return 1
        if _at(text, start, "connection:", "Connection:"):
            return 2
    elif c == "T" or c == "t":
        if _at(text, start, "transfer-encoding:", "Transfer-Encoding:"):
            return 3
        if _at(text, start, "te:", "TE:") or _at(text, start, "trailer:", "Trailer:"):
            return 4
    elif c == "K" or c == "k":
        if _at(text, start, "keep-alive:", "Keep-Alive:"):
            return 4
    elif c == "U" or c == "u":
        if _at(text, start, "upgrade:", "Upgrade:"):
            return 4
    elif c == "P" or c == "p":
        if _at(text, start, "proxy-", "Proxy-"):
            return 4
    return 0


# A plain response head: an HTTP/1.0 or 1.1 status line with a three-digit status and a reason of
# printable ASCII and tabs, then fields each a token, a colon and a value of printable ASCII and tabs,
# every line ended by CRLF, then the empty line. The parser accepts every such head but for its
# framing fields (which `_response_head` reads itself, and hands to the parser whenever its own
# reading of them would refuse the head) and a 101 (which it refuses unless the head names its
# upgrade), and reads it as splitting its text does (tests/unit/test_proxy_fast_paths.py: any plain
# head, the parser accepts). `_plain_end` is this without the regex engine.
_PLAIN_RESPONSE_RE = re.compile(
    rb"HTTP/1\.[01] [0-9]{3}(?: [\t\x20-\x7e]*)?(?:\r\n[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*)*\r\n\r\n"
)


def _tchar(c: int) -> bool:
    """A byte of a token (a field name): RFC 9110's tchar (compiled: an inline C test)."""
    return 97 <= c <= 122 or 65 <= c <= 90 or c == 45 or 48 <= c <= 57 or c in b"!#$%&'*+.^_`|~"


def _plain_end(buf: bytes, max_header_bytes: int) -> int:
    """Where the plain response head at the start of `buf` ends (its CRLF CRLF, at most
    `max_header_bytes` in: as `parse_response_head` finds the end of a head), when `buf` starts with
    one (`_PLAIN_RESPONSE_RE` matches there); else -1 (not plain, not all here, too long). Compiled:
    one C loop over its bytes, which finds its end too (tests compare it with the regex)."""
    n = len(buf)
    if n < 16 or not (buf.startswith(b"HTTP/1.1 ") or buf.startswith(b"HTTP/1.0 ")):
        return -1
    for i in range(9, 12):  # (indexes, not a slice: compiled, no copy)
        c = buf[i]
        if not 48 <= c <= 57:  # (bytes: ints; compiled, C chars)
            return -1
    stop = max_header_bytes + 4  # (the CRLF CRLF within the first max_header_bytes + 4 bytes)
    if stop > n:
        stop = n
    # The state (literal numbers: compiled, C comparisons): 0 after the status, 1 in a reason or a
    # value, 2 after a line's CR, 3 at a line's start, 4 in a field's name, 5 after the empty line's CR.
    state = 0
    # (compiled, `at` is the bytes' C pointer: no bounds check per byte; `i` stays below `stop` <= n)
    at = buf
    for i in range(12, stop):
        c = at[i]
        if state == 1:
            if 32 <= c <= 126 or c == 9:  # (printable ASCII, a tab)
                continue
            if c != 13:
                return -1
            state = 2
        elif state == 4:
            if _tchar(c):
                continue
            if c != 58:  # (':')
                return -1
            state = 1
        elif state == 2:
            if c != 10:
                return -1
            state = 3
        elif state == 3:
            if _tchar(c):
                state = 4
            elif c == 13:
                state = 5
            else:
                return -1
        elif state == 5:
            return i - 3 if c == 10 else -1
        elif c == 32:  # (after the status: the reason's space, or the line's end)
            state = 1
        elif c == 13:
            state = 2
        else:
            return -1
    return -1


def _plain_end_re(buf: bytes, max_header_bytes: int) -> int:
    """`_plain_end` by the regex (what the tests compare the loop with)."""
    m = _PLAIN_RESPONSE_RE.match(buf, 0, max_header_bytes + 4)
    return m.end() - 4 if m is not None else -1


def parse_response_head(
    buf: bytes, max_header_bytes: int = 65536, request_method: str = "GET"
) -> tuple[ResponseHead, int] | None:
    """Parse one response head: None if incomplete, else (head, bytes used). UpstreamError if bad.

    The parser checks every head but a plain one (`_PLAIN_RESPONSE_RE`; compiled), which it is known to accept.
    One whose status line has a status (the usual one) is then read from its text (`_SPLIT_READING`):
    version, status and reason from the status line, the framing and hop-by-hop fields by looking for
    them, the field list only when someone asks for it (`ResponseHead.headers`). Any other head is
    read from the parser's callbacks."""
    if _SPLIT_READING and _COMPILED:  # (as Python, the parser's C costs less than a loop or the regex)
        end = _plain_end(buf, max_header_bytes)
        # (a 101 the parser refuses unless the head names its upgrade: its word)
        if end >= 0 and not (buf[9] == 49 and buf[10] == 48 and buf[11] == 49):
            return _response_head(buf, end, request_method, True)
    end = buf.find(_HEAD_END, 0, max_header_bytes + len(_HEAD_END))
    if end < 0:
        if len(buf) > max_header_bytes:
            raise UpstreamError("response head too large")
        probe = _Collector()
        problem = _run_parser(HttpResponseParser(probe), buf)
        if problem is not None:
            raise UpstreamError(problem)
        if probe.complete:
            raise UpstreamError("response head not terminated by CRLF CRLF")
        return None
    if not buf.startswith(b"HTTP/"):
        # (the parser also takes RTSP/ and ICE/ status lines: not an HTTP answer)
        raise UpstreamError("not an HTTP response (the status line does not start with HTTP/)")
    return _response_head(buf, end, request_method, False)


def _response_head(buf: bytes, end: int, request_method: str, plain: bool) -> tuple[ResponseHead, int]:
    """`parse_response_head` of a head that ends at `end` (its CRLF CRLF) and starts with `HTTP/`;
    `plain`: it is a plain head (`_plain_end`), not a 101: read without the parser."""
    consumed = end + len(_HEAD_END)
    whole = buf[:end].decode("latin-1")
    first = whole.find("\r\n")
    line_end = first if first >= 0 else len(whole)
    # The status line's `split(" ", 2)`, by its spaces: version, status and reason.
    space = whole.find(" ", 0, line_end)
    text = whole if space >= 0 and _SPLIT_READING else None
    head_bytes = buf[:consumed]
    if not plain:
        col: _Collector | _HeadEnd = _HeadEnd() if text is not None else _Collector()
        parser = HttpResponseParser(col)
        problem = _run_parser(parser, head_bytes)
        if problem is not None:
            raise UpstreamError(problem)
        if not col.complete:
            raise UpstreamError("incomplete response head")
        # (the parser read 'HTTP/<digit>.<digit>' at the start of a status line it accepted)
        version = whole[space - 3 : space] if text is not None else parser.get_http_version()
        if version not in _VERSIONS:
            raise UpstreamError(f"unsupported response version HTTP/{version}")
        status = parser.get_status_code()
    else:  # (the plain head's: '1.0' or '1.1', three digits)
        version = whole[5:8]
        status = (buf[9] - 48) * 100 + (buf[10] - 48) * 10 + (buf[11] - 48)
    te: list[str] = []
    has_te = False
    cls: list[str] = []
    connection: list[str] = []
    n_connection = 0
    connection_at = -1  # (the split reading's: where the Connection field's line starts)
    headers: list[tuple[str, str]] | None = None
    index: dict[str, str] | None = None
    lower: str | None = None
    lines: list[str] | None = None
    if text is not None:
        space = whole.find(" ", space + 1, line_end)
        reason = whole[space + 1 : line_end] if space >= 0 else ""
        if "\x00" in reason:  # (the parser lets a NUL through in the reason; CR and LF it refuses)
            raise UpstreamError("control character in the response's reason phrase")
        other_hop = False
        # Line by line (`_response_field`): the framing and hop-by-hop fields are told by their first
        # letters; the others cost a comparison each. The lines are kept for the record's reading of
        # the fields (`field_lines`: split once).
        lines = text.split("\r\n")
        pos = len(lines[0])  # (where in the text the CRLF before the next line is)
        del lines[0]  # (the status line: `lines` holds the fields)
        for line in lines:
            kind = _response_field(line, 0)
            if kind != 0:
                if kind > 3:
                    other_hop = True
                else:
                    value = _value_at(line, _FIELD_NAME_LENGTHS[kind])
                    if kind == 1:
                        cls.append(value)
                    elif kind == 2:
                        n_connection += 1
                        connection_at = pos
                        connection.extend(_split_tokens(value))
                    else:
                        has_te = True
                        te.extend(_split_tokens(value))
            pos += len(line) + 2
    else:
        assert not plain
        reason = col.status.decode("latin-1")  # type: ignore[union-attr]
        if _BAD_VALUE_CHARS.search(reason):
            raise UpstreamError("control character in the response's reason phrase")
        headers = [(k.decode("latin-1"), v.decode("latin-1").strip(" \t")) for k, v in col.headers]  # type: ignore[union-attr]
        if _BAD_VALUE_CHARS.search("".join([v for _k, v in headers])):
            raise UpstreamError("control character in header value")
        # lower-case name -> first value (built backwards: the first of a repeated name is kept)
        index = {k.lower(): v for k, v in reversed(headers)}
        # What framing, keep-alive and relaying need: the framing and hop-by-hop fields, every value of each.
        other_hop = any([n.startswith("proxy-") for n in index]) if "proxy-" in "\n".join(index) else False
        special = index.keys() & _RESPONSE_FIELDS
        if special:
            repeated = len(index) != len(headers)
            for lk in special:
                values = [v for k, v in headers if k.lower() == lk] if repeated else [index[lk]]
                if lk == "content-length":
                    cls = values
                elif lk == "transfer-encoding":
                    has_te = True
                    for v in values:
                        te.extend(_split_tokens(v))
                elif lk == "connection":
                    n_connection = len(values)
                    for v in values:
                        connection.extend(_split_tokens(v))
                else:
                    other_hop = True
    try:
        chunked, length, until_close = _framing_of(te, has_te, cls, UpstreamError)
    except UpstreamError:
        if not plain:
            raise
        # The parser refuses some framing the plain head's reading refuses too, with its own words:
        # a plain head refused here is refused as the parser refuses it.
        return _response_head(buf, end, request_method, False)
    # RFC 9112 §6.3: these responses end with the head, whatever their framing headers say.
    method = request_method if request_method == "GET" or request_method.isupper() else request_method.upper()
    bodiless = (
        method == "HEAD" or 100 <= status < 200 or status in (204, 304) or (method == "CONNECT" and 200 <= status < 300)
    )
    if bodiless:
        has_body, until_close = False, False
    else:
        has_body = chunked or until_close or (length or 0) > 0
    keep_alive = _keep_alive(version, connection) and not until_close
    # (every field set here: compiled, C struct sets, without the dataclass __init__'s Python call)
    head = ResponseHead.__new__(ResponseHead)
    head.version, head.status, head.reason, head._headers = version, status, reason, headers
    head.keep_alive, head.chunked, head.content_length = keep_alive, chunked and not bodiless, length
    head.has_body, head.until_close, head.raw, head.raw_keep_alive = has_body, until_close, None, False
    head.index, head.text, head.lower, head.connection_at, head.lines = index, text, lower, -1, lines
    # Relayed as received only when it is exactly a head (httptools tolerates blank lines before it,
    # which the check for `HTTP/` above refused).
    if (
        version == "1.1"
        and not other_hop
        and (n_connection == 0 or (n_connection == 1 and connection == ["keep-alive"]))
    ):
        head.raw, head.raw_keep_alive = head_bytes, n_connection == 1
        if n_connection == 1:
            head.connection_at = connection_at
    return head, consumed


# Response fields the single pass looks at: framing, and the hop-by-hop ones.
_RESPONSE_FIELDS = frozenset({"content-length", "transfer-encoding"}) | _HOP_BY_HOP
# The hop-by-hop fields a plain response head is looked through for that are not read, only seen
# (their presence means the head is not relayed as received); Proxy-* are looked for by prefix.
_OTHER_HOP_NEEDLES = tuple(f"\r\n{n}:" for n in sorted(_HOP_BY_HOP - {"connection"}) if not n.startswith("proxy-"))


# ---------------------------------------------------------------------------- rendering


def _check_field(*parts: str) -> None:
    for part in parts:
        if _BAD_VALUE_CHARS.search(part):
            raise ValueError(f"CR/LF/NUL in an HTTP field: {part!r}")  # header injection guard


check_field = _check_field  # public: request hooks check what they put into a head


def _check_fields(headers: list[tuple[str, str]]) -> None:
    """_check_field on every name and value, in one regex search over them all."""
    if _BAD_VALUE_CHARS.search("".join(itertools.chain.from_iterable(headers))):
        for k, v in headers:
            _check_field(k, v)  # names the offending field


def render_request_head(method: str, path: str, version: str, headers: list[tuple[str, str]]) -> bytes:
    _check_field(method, path, version)
    _check_fields(headers)
    lines = [f"{method} {path} HTTP/{version}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


_THEIR_KEEP_ALIVE = b"\r\nConnection: keep-alive\r\n"


def render_response_head(resp: ResponseHead, keep_alive: bool, body: bytes | bytearray = b"") -> bytes:
    """The upstream response head as relayed to the client: hop-by-hop fields replaced by ours; then
    `body` (what of the body goes out with it: one piece, joined once)."""
    raw = resp.raw
    if raw is not None:
        # Nothing hop-by-hop to drop (the parser checked every field): the bytes as received, with
        # our Connection field, or theirs when it already says what ours would.
        if resp.raw_keep_alive:
            if keep_alive:
                return raw + body if body else raw
            i = resp.connection_at  # (from the parse: no search)
            if i < 0 or not raw.startswith(_THEIR_KEEP_ALIVE, i):
                i = raw.find(_THEIR_KEEP_ALIVE)  # the usual spelling; any other goes the long way below
            if i >= 0:
                return b"".join(
                    (raw[: i + 2], raw[i + len(_THEIR_KEEP_ALIVE) : -2], b"Connection: close\r\n\r\n", body)
                )
        else:
            ours = b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n"
            return b"".join((raw[:-2], ours, body))
    _check_field(resp.reason)
    headers = _filter_hop_by_hop(resp.headers, False)
    _check_fields(headers)
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    lines.append("Connection: keep-alive\r\n\r\n" if keep_alive else "Connection: close\r\n\r\n")
    out = "".join(lines).encode("latin-1")
    return out + body if body else out


def render_response(
    status: int, reason: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None, close: bool = True
) -> bytes:
    """A complete proxy-generated response (403/502/...) framed by Content-Length."""
    extra = [
        (k, v) for k, v in (headers or []) if k.lower() not in ("content-length", "transfer-encoding", "connection")
    ]
    if not any(k.lower() == "content-type" for k, _ in extra):
        extra.append(("Content-Type", "text/plain; charset=utf-8"))
    extra.append(("Content-Length", str(len(body))))
    if close:
        extra.append(("Connection", "close"))
    _check_field(reason)
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for k, v in extra:
        _check_field(k, v)
        lines.append(f"{k}: {v}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + body


# ---------------------------------------------------------------------------- body framing

_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 65536
# Whitespace after the size only before an extension (RFC 9112 §7.1.1 BWS); no bare CR or LF.
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?\r\n")
_TRAILER_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n")

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class BodyReader:
    """Finds where one message body ends while its bytes are relayed untouched.

    Broken framing raises HttpError(400) for a request body, UpstreamError for a response body
    (`response=True`): the error says whose fault it is.
    `sink`, when given, receives the body's payload (chunk framing removed) as it passes, for capture.
    """

    def __init__(
        self,
        content_length: int | None,
        chunked: bool,
        until_close: bool = False,
        sink: Callable[[bytes | memoryview], None] | None = None,
        response: bool = False,
    ) -> None:
        self.sink = sink
        # Whose fault broken framing is: the client's (HttpError 400) or the origin's (UpstreamError).
        self._err: Callable[[str], Exception] = UpstreamError if response else _bad
        self.chunked = chunked
        self.until_close = until_close and not chunked
        self.remaining = 0 if chunked or content_length is None else content_length
        self.done = not chunked and not self.until_close and self.remaining == 0
        self._state = _SIZE
        self._line = bytearray()  # partial chunk-size / trailer line, or the CRLF after chunk data
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """(bytes to forward verbatim, bytes past the end of the body, body finished)."""
        if self.done:
            return b"", data, True
        if self.until_close:
            if self.sink is not None:
                self.sink(data)
            return data, b"", False
        if not self.chunked:
            n = min(self.remaining, len(data))
            self.remaining -= n
            self.done = self.remaining == 0
            body = data[:n]
            if self.sink is not None:
                self.sink(body)
            return body, data[n:], self.done
        end = self._feed_chunked(data)
        return data[:end], data[end:], self.done

    def _feed_chunked(self, data: bytes) -> int:
        """Advance the chunked state machine; the index just past what belongs to this body."""
        pos, n = 0, len(data)
        while pos < n and not self.done:
            if self._state == _DATA:
                take = min(self.remaining, n - pos)
                if self.sink is not None:
                    self.sink(memoryview(data)[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self._state = _DATA_END
            elif self._state == _DATA_END:
                need = 2 - len(self._line)
                self._line += data[pos : pos + need]
                pos += min(need, n - pos)
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise self._err("chunk data not followed by CRLF")
                    self._line.clear()
                    self._state = _SIZE
                elif self._line != b"\r":
                    raise self._err("chunk data not followed by CRLF")
            else:
                pos = self._feed_line(data, pos)
        return pos

    def _feed_line(self, data: bytes, pos: int) -> int:
        """Collect one CRLF-terminated line (chunk size or trailer) and act on it."""
        limit = _MAX_CHUNK_LINE if self._state == _SIZE else _MAX_TRAILERS - self._trailer_bytes
        lf = data.find(b"\n", pos)
        if lf < 0:
            self._line += data[pos:]
            if len(self._line) > limit:
                raise self._err("chunk framing line too long")
            return len(data)
        self._line += data[pos : lf + 1]
        if len(self._line) > limit + 1:
            raise self._err("chunk framing line too long")
        line = bytes(self._line)
        self._line.clear()
        if self._state == _SIZE:
            m = _CHUNK_SIZE_RE.fullmatch(line)
            if m is None:
                raise self._err("malformed chunk size line")
            size = int(m.group(1), 16)
            self.remaining = size
            self._state = _DATA if size else _TRAILER
        elif line == b"\r\n":
            self._state, self.done = _DONE, True
        else:
            if _TRAILER_RE.fullmatch(line) is None:
                raise self._err("malformed trailer field")
            self._trailer_bytes += len(line)
        return lf + 1


slotted(globals(), "RequestHead", "ResponseHead")  # (as Python: __slots__, see RequestHead)
