"""Claimed identities (SPEC §16): a name whose connections must prove themselves.

A client names itself with the proxy user name (HTTP `Proxy-Authorization: Basic`, the SOCKS5
username). Anyone may use a name nobody claimed. Once a name is claimed, a connection presenting
it must present the claim's secret as its password. The secret (32 random bytes, URL-safe
base64) is shown once, when it is made; only an scrypt hash of it is stored.

`Claims` is the proxy's view: the stored hashes by name, plus, per name, a fingerprint of the one
secret already verified against the current hash, so scrypt's cost is paid once per (name,
secret) in a process, not once per connection. Fingerprints live in memory only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SECRET_BYTES = 32
MAX_NAME = 128
MAX_NOTES = 10_000
RESERVED = ("proxy",)  # the user name clients send when they mean no one (SPEC §3.1)
# scrypt cost: about 16 MiB and tens of milliseconds, paid once per (name, secret) per process.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
MAX_REFUSED = 4096  # wrong (name, secret) fingerprints remembered, so a wrong secret costs scrypt once


def check_name(name: object) -> str:
    """The name a claim may take; ValueError saying what is wrong with it."""
    if not isinstance(name, str) or not name:
        raise ValueError("name is required and must be a non-empty string")
    if len(name) > MAX_NAME:
        raise ValueError(f"name must be at most {MAX_NAME} characters")
    if ":" in name or not name.isprintable() or name != name.strip():
        raise ValueError("name must be printable, without ':' or surrounding spaces (it is a proxy user name)")
    if name in RESERVED or name.startswith("unknown-"):
        raise ValueError(f"name {name!r} is reserved")
    return name


def new_secret() -> str:
    """32 random bytes, URL-safe base64 without padding (43 characters)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _kdf(salt: bytes, n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=SCRYPT_LEN, n=n, r=r, p=p)


def hash_secret(secret: str) -> str:
    """'scrypt$n$r$p$salt$hash' (base64 parts): what is stored in place of the secret."""
    salt = os.urandom(16)
    digest = _kdf(salt, SCRYPT_N, SCRYPT_R, SCRYPT_P).derive(secret.encode("utf-8"))
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether `secret` is the one `stored` was made from (constant time in the comparison)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        _kdf(_unb64(salt), int(n), int(r), int(p)).verify(secret.encode("utf-8"), _unb64(digest))
        return True
    except InvalidKey:
        return False
    except (ValueError, TypeError):
        return False  # a malformed stored hash verifies nothing


def fingerprint(name: str, secret: str) -> bytes:
    """A fast keyed digest of a presented (name, secret): the key of the verified/refused caches."""
    return hashlib.sha256(name.encode("utf-8") + b"\x00" + secret.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Claim:
    name: str
    secret_hash: str
    version: int  # bumped by every rotation: a verification holds for one version only


class Claims:
    """The claims a proxy process knows, and the secrets it has already verified.

    `judge` answers at once when it can: True (unclaimed name, or the secret verified before
    for this version), False (a secret already refused for this version), None (scrypt needed:
    call `verify` off the event loop, then `judge` answers).
    """

    def __init__(self) -> None:
        self.by_name: dict[str, Claim] = {}
        self.version = -1  # the identities_version of the loaded rows
        self._ok: dict[str, tuple[int, bytes]] = {}  # name -> (claim version, fingerprint verified)
        self._refused: dict[tuple[str, bytes], int] = {}  # (name, fingerprint) -> claim version

    def replace(self, claims: list[Claim], version: int) -> list[str]:
        """Swap in the stored claims; the names whose claim went away or changed (rotated)."""
        new = {c.name: c for c in claims}
        changed = [n for n, c in self.by_name.items() if new.get(n) != c]
        self.by_name = new
        self.version = version
        for n in changed:
            self._ok.pop(n, None)
        if changed:
            self._refused = {k: v for k, v in self._refused.items() if k[0] not in changed}
        return changed

    def claimed(self, name: str | None) -> bool:
        return name is not None and name in self.by_name

    def judge(self, name: str, secret: str | None) -> bool | None:
        claim = self.by_name.get(name)
        if claim is None:
            return True
        if not secret:
            return False
        fp = fingerprint(name, secret)
        ok = self._ok.get(name)
        if ok is not None and ok[0] == claim.version and hmac.compare_digest(ok[1], fp):
            return True
        if self._refused.get((name, fp)) == claim.version:
            return False
        return None

    def verify(self, name: str, secret: str) -> bool:
        """The slow check (scrypt), remembered for this claim version. Thread-safe enough: it only
        replaces dict entries."""
        claim = self.by_name.get(name)
        if claim is None:
            return True
        fp = fingerprint(name, secret)
        good = verify_secret(secret, claim.secret_hash)
        if good:
            self._ok[name] = (claim.version, fp)
        else:
            if len(self._refused) >= MAX_REFUSED:
                self._refused.clear()
            self._refused[(name, fp)] = claim.version
        return good


def load_claims(view: Any = None) -> tuple[list[Claim], int]:
    """The stored claims and the identities version, in one read transaction: from this database,
    or from `view` (the proxy's store view: the database, or the recorder's over the bus)."""
    if view is not None:
        rows, version = view.claims()
    else:
        from greyproxy.store import identities

        rows, version = identities.claims()
    return [Claim(str(r[0]), str(r[1]), int(r[2])) for r in rows], int(version)
