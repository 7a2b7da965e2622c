"""Turning a pending decision (scope + duration, SPEC §3.2) into rule patterns and an expiry."""

from __future__ import annotations

import re
import threading
from typing import Literal

from publicsuffixlist import PublicSuffixList

from .patterns import escape_glob, normalise_host, parse_ip

Scope = Literal["exact", "any_port", "subdomain_wildcard", "all_containers"]
SCOPES: tuple[str, ...] = ("exact", "any_port", "subdomain_wildcard", "all_containers")
DURATION_PRESETS: tuple[str, ...] = ("once", "1h", "12h", "24h", "7d", "30d", "permanent")

ONCE_SECONDS = 30.0  # long enough for the held connections and their immediate retries
MAX_DURATION_SECONDS = 3650 * 86400.0
_UNIT_SECONDS = {"m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"([0-9]+)([mhd])\Z")


def parse_duration(text: str) -> float | None:
    """Seconds until the rule expires, or None for 'permanent'; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("duration must be a string such as '1h', '7d' or 'permanent'")
    value = text.strip().lower()
    if value == "permanent":
        return None
    if value == "once":
        return ONCE_SECONDS
    m = _DURATION.match(value)
    if m is None:
        choices = ", ".join(DURATION_PRESETS)
        raise ValueError(f"duration {text!r} is not one of {choices} or '<N>m', '<N>h', '<N>d'")
    count = int(m.group(1))
    if count <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    seconds = count * _UNIT_SECONDS[m.group(2)]
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {text!r} is longer than 3650 days; use 'permanent'")
    return seconds


_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()


def _public_suffix_list() -> PublicSuffixList:
    # Loading the list parses a large file, so do it once, on first use, from any thread.
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                _psl = PublicSuffixList()
    return _psl


def registrable_domain(host: str) -> str:
    """The public-suffix-plus-one domain ('a.b.co.uk' → 'b.co.uk').

    IPs, single labels and hosts that are themselves public suffixes come back
    unchanged (normalised), as there is no wider owner to widen to.
    """
    h = normalise_host(host)
    if not h or "." not in h or parse_ip(h) is not None:
        return h
    return _public_suffix_list().privatesuffix(h) or h


def scope_patterns(scope: str, container: str, host: str, port: int | str) -> tuple[str, str, str]:
    """(container_pattern, destination_pattern, port_pattern) for a pending entry and a scope.

    Names are glob-escaped so a container or host that happens to contain '*', '?'
    or '[' produces a rule matching only itself, never a wildcard.
    """
    h = normalise_host(str(host))
    if not h or "/" in h or any(ch.isspace() for ch in h):
        raise ValueError(f"host {host!r} cannot be turned into a rule")
    dest = escape_glob(h)
    cont = escape_glob(container)
    port_text = str(port).strip()
    if scope == "exact":
        return cont, dest, port_text
    if scope == "any_port":
        return cont, dest, "*"
    if scope == "subdomain_wildcard":
        if parse_ip(h) is not None:
            return cont, dest, "*"  # an IP has no subdomains: the IP itself, any port
        domain = _public_suffix_list().privatesuffix(h) if "." in h else None
        if domain is None:
            # A host that is itself a public suffix (co.uk, github.io) or a single label has no
            # registrable domain: `**.github.io` would allow every GitHub Pages site, someone
            # else's too. As for an IP: the host itself, any port.
            return cont, dest, "*"
        return cont, "**." + escape_glob(domain), "*"
    if scope == "all_containers":
        return "*", dest, port_text
    raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
