"""Host and Origin checks: only pages and clients on this machine (or named hosts) may drive the API.

A browser page on another site can reach 127.0.0.1 too: by DNS rebinding (its own name
resolving to loopback, so the Host header carries that name) or by a cross-site request or
WebSocket (the Origin header names the other site). Refusing foreign Host names and foreign
Origins closes both. The predicates here are pure (`refusal` is the whole decision); the
`LocalOnly` middleware at the bottom applies it to every HTTP request and WebSocket upgrade,
and the /ws resource calls the same function again as a second line.

- A Host that is not ours → 421 Misdirected Request (a rebinding page, or a request meant for
  another server); an absent or malformed Host (a port out of range, two names) → 400.
- An Origin that is not ours → 403, whatever the method: without CORS a foreign page cannot
  read our answers anyway, so nothing legitimate is lost, and it cannot even make us work.
  "Ours" is the API's own origin: scheme http, a loopback host form (or a name in
  greyproxy.allowedHosts) AND the API's port; any other origin must be listed exactly in
  greyproxy.allowedOrigins. A page on http://localhost:3000 is another origin (ports are not
  part of a *site*, so Sec-Fetch-Site alone cannot tell it apart).
- A write with a body that comes from a browser (it sends an Origin or any Sec-Fetch-* header)
  must say `Content-Type: application/json` → 415 otherwise: such a request always needs a CORS
  preflight, which a foreign page never gets answered. curl and scripts send neither header and
  keep working with any content type.
- A state-changing request (and a WebSocket upgrade, which can send commands) that the
  browser marks `Sec-Fetch-Site: cross-site` → 403, even when its Origin is a loopback one:
  a page on http://127.0.0.1:3000 is another *site* than http://localhost:43080.
- No Origin at all (curl, scripts, SDKs) is fine: only browsers send it, and they always do
  on cross-origin requests that could change state.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("greyproxy.api")

LOCAL_NAMES = frozenset({"localhost"})
ORIGIN_SCHEMES = frozenset({"http", "https", "ws", "wss"})
# Methods that may change state; WEBSOCKET stands for an upgrade (the socket takes commands).
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE", "WEBSOCKET"})
MISDIRECTED = 421
FORBIDDEN = 403
BAD_REQUEST = 400
UNSUPPORTED_MEDIA = 415
JSON_MEDIA = "application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
LOG_EVERY = 10.0  # seconds between two log lines for refusals of one kind (a hostile page may loop)


def split_host(value: str) -> str | None:
    """The host part of a Host header value ('name', 'name:port', '[v6]:port'), lowercased; None if malformed."""
    value = value.strip()
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else None
        if rest is None or (
            rest
            and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit() and 0 < int(rest[1:]) <= 65535)
        ):
            return None
        host = value[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return host.lower()
    host, sep, port = value.rpartition(":")
    if not sep:
        host = value
    elif not port.isascii() or not port.isdigit() or not host or ":" in host or not 0 < int(port) <= 65535:
        return None  # an unbracketed IPv6 literal or a bad port
    return host.lower().rstrip(".") or None


def configured_hosts(cfg: Any) -> list[str]:
    """greyproxy.allowedHosts, plus the API's own bind address when it is a specific one.

    An IP literal cannot be rebound, and the CLI calls the API at its bind address
    (`--host 192.168.1.5` must not lock `greyproxy cert reload` out).
    """
    names = [str(n) for n in (cfg.section("greyproxy").get("allowedHosts") or [])]
    bind = getattr(getattr(cfg, "api", None), "host", "") or ""
    if bind not in ("", "0.0.0.0", "::") and not is_local_host(bind.lower()):
        names.append(bind)
    return names


def normalize_allowed(names: Iterable[str]) -> frozenset[str]:
    """The configured extra names (greyproxy.allowedHosts), in the form split_host() returns."""
    out: set[str] = set()
    for name in names:
        host = split_host(name)
        if host is None:
            try:  # a bare IPv6 address is a fair thing to write in the config
                host = str(ipaddress.IPv6Address(name.strip()))
            except ValueError:
                continue
        out.add(_canonical_ip(host) or host)
    return frozenset(out)


def is_local_host(host: str) -> bool:
    """localhost, *.localhost (RFC 6761: always loopback in browsers) or a loopback IP literal."""
    if host in LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def host_allowed(host: str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """Whether a request's Host header names this machine or a configured host (absent: refused)."""
    if host is None:
        return False
    name = split_host(host)
    if name is None:
        return False
    return is_local_host(name) or name in allowed or _canonical_ip(name) in allowed


def normalize_origin(origin: str) -> str | None:
    """'scheme://host:port' (lowercased, default port written out, IPv6 in brackets) or None if malformed."""
    origin = origin.strip()
    if origin == "" or origin.lower() == "null":
        return None  # sandboxed frames and file:// pages send "null": never ours
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ORIGIN_SCHEMES or not parts.hostname or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    name = parts.hostname.lower().rstrip(".")
    name = _canonical_ip(name) or name
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}:{port if port is not None else DEFAULT_PORTS[scheme]}"


def normalize_origins(origins: Iterable[str]) -> frozenset[str]:
    """greyproxy.allowedOrigins in normalize_origin() form (malformed entries are dropped)."""
    return frozenset(o for o in (normalize_origin(str(x)) for x in origins) if o is not None)


def origin_allowed(
    origin: str | None,
    allowed: frozenset[str] = frozenset(),
    own_port: int | None = None,
    allowed_origins: frozenset[str] = frozenset(),
) -> bool:
    """Absent (not a browser), the API's own origin, or listed in greyproxy.allowedOrigins.

    Own origin: http on a local or configured host, on `own_port` (any port when it is None,
    for callers that do not know it).
    """
    if origin is None:
        return True
    norm = normalize_origin(origin)
    if norm is None:
        return False
    if norm in allowed_origins:
        return True
    parts = urlsplit(norm)
    name = (parts.hostname or "").lower()
    if not (is_local_host(name) or name in allowed or _canonical_ip(name) in allowed):
        return False
    if own_port is None:
        return True
    return parts.scheme in ("http", "ws") and parts.port == own_port


def is_browser(headers: Iterable[str]) -> bool:
    """A browser sends Origin on cross-origin writes and Sec-Fetch-* on every request; scripts send neither."""
    return any(h.lower() == "origin" or h.lower().startswith("sec-fetch-") for h in headers)


def json_media(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == JSON_MEDIA


def request_allowed(host: str | None, origin: str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """The whole check for one request or WebSocket upgrade."""
    return host_allowed(host, allowed) and origin_allowed(origin, allowed)


@dataclass(frozen=True)
class Refusal:
    status: int  # BAD_REQUEST, MISDIRECTED, FORBIDDEN or UNSUPPORTED_MEDIA
    message: str
    kind: str  # "host" | "origin" | "fetch-site" | "content-type": what was wrong, for logs and tests


def _shown(value: str | None) -> str:
    return "(none)" if value is None else repr(value[:100])


def refusal(
    method: str,
    host: str | None,
    origin: str | None,
    fetch_site: str | None = None,
    allowed: frozenset[str] = frozenset(),
    *,
    own_port: int | None = None,
    allowed_origins: frozenset[str] = frozenset(),
    browser: bool = False,
    has_body: bool = False,
    content_type: str | None = None,
) -> Refusal | None:
    """Why this request (method "WEBSOCKET" for an upgrade) must be refused; None when it may pass.

    `browser`: the request carries Origin or a Sec-Fetch-* header; `has_body`: it has a body.
    """
    if host is None or split_host(host) is None:
        return Refusal(
            BAD_REQUEST,
            f"bad request: Host {_shown(host)} is missing or malformed (one host[:port], port 1-65535)",
            "host",
        )
    if not host_allowed(host, allowed):
        return Refusal(
            MISDIRECTED,
            f"misdirected request: this API does not answer for Host {_shown(host)};"
            " use localhost, a loopback IP or a name in greyproxy.allowedHosts",
            "host",
        )
    if not origin_allowed(origin, allowed, own_port, allowed_origins):
        return Refusal(
            FORBIDDEN,
            f"cross-origin request refused: Origin {_shown(origin)} is not this API's own"
            " origin nor listed in greyproxy.allowedOrigins",
            "origin",
        )
    if method.upper() in STATE_CHANGING and (fetch_site or "").strip().lower() == "cross-site":
        return Refusal(FORBIDDEN, "cross-site request refused (Sec-Fetch-Site: cross-site)", "fetch-site")
    if (browser or origin is not None) and has_body and method.upper() in BODY_METHODS and not json_media(content_type):
        return Refusal(
            UNSUPPORTED_MEDIA,
            f"a browser request with a body must be Content-Type: {JSON_MEDIA} (got {_shown(content_type)})",
            "content-type",
        )
    return None


class LocalOnly:
    """Falcon middleware: every HTTP request and WebSocket upgrade must pass `refusal` first.

    It runs before routing, so unknown paths are covered too. A refused HTTP request gets the
    status and `{"error": ...}`; a refused upgrade is closed (code 3000 + status) before it is
    accepted, which uvicorn answers with an HTTP 403 whatever the status was.
    """

    def __init__(
        self, allowed_hosts: Iterable[str] = (), own_port: int | None = None, allowed_origins: Iterable[str] = ()
    ) -> None:
        self.allowed = normalize_allowed(allowed_hosts)
        self.own_port = own_port
        self.allowed_origins = normalize_origins(allowed_origins)
        self._logged: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> LocalOnly:
        """greyproxy.allowedHosts (+ a specific bind IP), the API's port and greyproxy.allowedOrigins."""
        api = getattr(cfg, "api", None)
        origins = cfg.section("greyproxy").get("allowedOrigins") or []
        return cls(configured_hosts(cfg), getattr(api, "port", None) or None, [str(o) for o in origins])

    def refusal_for(self, req: Any, method: str) -> Refusal | None:
        """The whole decision for one Falcon request (method "WEBSOCKET" for an upgrade)."""
        length = req.content_length
        has_body = bool(length) or req.get_header("Transfer-Encoding") is not None
        return refusal(
            method,
            req.get_header("Host"),
            req.get_header("Origin"),
            req.get_header("Sec-Fetch-Site"),
            self.allowed,
            own_port=self.own_port,
            allowed_origins=self.allowed_origins,
            browser=is_browser(req.headers),
            has_body=has_body,
            content_type=req.content_type,
        )

    def check(self, req: Any, method: str) -> None:
        r = self.refusal_for(req, method)
        if r is None:
            return
        now = time.monotonic()
        if now - self._logged.get(r.kind, -LOG_EVERY) >= LOG_EVERY:
            self._logged[r.kind] = now
            log.warning("refused %s %s from %s: %s", method, req.path, req.remote_addr, r.message)
        from .errors import ApiError  # late: errors imports the bus client, origin stays importable alone

        raise ApiError(r.status, r.message)

    async def process_request(self, req: Any, resp: Any) -> None:
        self.check(req, req.method)

    async def process_request_ws(self, req: Any, ws: Any) -> None:
        self.check(req, "WEBSOCKET")


def _canonical_ip(name: str) -> str | None:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None
