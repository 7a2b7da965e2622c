"""Placeholders (SPEC §12.1): `greyproxy:credential:v1:<scope>:<32 lowercase hex>`.

`<scope>` is `global` for a global credential, else by convention the session's id. Detection
is by the case-sensitive prefix `greyproxy:credential:`; every occurrence of it in what the proxy
checks must begin a well-formed placeholder.
"""

from __future__ import annotations

import re
import secrets

__all__ = [
    "GLOBAL_SCOPE",
    "PLACEHOLDER_RE",
    "PREFIX",
    "SCOPE_RE",
    "default_label",
    "is_placeholder",
    "mint",
    "scope_of",
    "shown",
]

PREFIX = "greyproxy:credential:"
GLOBAL_SCOPE = "global"
SCOPE_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
PLACEHOLDER_RE = re.compile(r"greyproxy:credential:v1:([A-Za-z0-9._-]{1,128}):([0-9a-f]{32})")


def mint(scope: str) -> str:
    """A new placeholder of `scope` (16 random bytes)."""
    if not SCOPE_RE.fullmatch(scope):
        raise ValueError("a placeholder scope is 1-128 of A-Z a-z 0-9 . _ -")
    return f"greyproxy:credential:v1:{scope}:{secrets.token_hex(16)}"


def is_placeholder(text: str) -> bool:
    return isinstance(text, str) and PLACEHOLDER_RE.fullmatch(text) is not None


def scope_of(placeholder: str) -> str:
    m = PLACEHOLDER_RE.fullmatch(placeholder)
    if m is None:
        raise ValueError("not a placeholder")
    return m.group(1)


def default_label(placeholder: str) -> str:
    """The label of a session mapping given none: `unlabeled-<last 8 hex>`."""
    return f"unlabeled-{placeholder[-8:]}"


def shown(placeholder: str) -> str:
    """How a placeholder may be named to a person: its scope, never its full hex."""
    m = PLACEHOLDER_RE.match(placeholder)
    return f"scope {m.group(1)}" if m else "malformed"
