"""Host and Origin checks: only pages and clients on this machine (or named hosts) may drive the API.

A browser page on another site can reach 127.0.0.1 too: by DNS rebinding (its own name
resolving to loopback, so the Host header carries that name) or by a cross-site request or
WebSocket (the Origin header names the other site). Refusing foreign Host names and foreign
Origins closes both. The predicates here are pure, so the /ws upgrade and an HTTP middleware
share them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost"})
ORIGIN_SCHEMES = frozenset({"http", "https", "ws", "wss"})


def split_host(value: str) -> str | None:
    """The host part of a Host header value ('name', 'name:port', '[v6]:port'), lowercased; None if malformed."""
    value = value.strip()
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:] if end > 0 else None
        if rest is None or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
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
    elif not port.isdigit() or not host or ":" in host:
        return None  # an unbracketed IPv6 literal or a bad port
    return host.lower().rstrip(".") or None


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


def origin_allowed(origin: str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """Absent (not a browser) or same-origin: its host is local or configured, any port."""
    if origin is None:
        return True
    origin = origin.strip()
    if origin == "" or origin.lower() == "null":
        return False  # sandboxed frames and file:// pages send "null": never ours
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    if parts.scheme.lower() not in ORIGIN_SCHEMES or not parts.hostname or parts.username or parts.password:
        return False
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return False
    name = parts.hostname.lower().rstrip(".")
    return is_local_host(name) or name in allowed or _canonical_ip(name) in allowed


def request_allowed(host: str | None, origin: str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """The whole check for one request or WebSocket upgrade."""
    return host_allowed(host, allowed) and origin_allowed(origin, allowed)


def _canonical_ip(name: str) -> str | None:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None
