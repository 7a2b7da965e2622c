"""Encryption at rest (SPEC §12.4): AES-256-GCM with the 32-byte `session.key` of the data dir.

A ciphertext is `nonce (12) ‖ ciphertext ‖ tag (16)`; its associated data names its row
(`greyproxy:v1:session:<session_id>`, `greyproxy:v1:global:<id>`), so a ciphertext copied to
another row does not decrypt. The key file is created `O_CREAT|O_EXCL` mode 0600 (a process that
loses the race reads the winner's file), a looser mode is tightened when loaded, and a key file
that exists but cannot be used is never overwritten.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEY_BYTES",
    "KEY_FILE",
    "KeyUnusable",
    "NONCE_BYTES",
    "SealError",
    "aad_global",
    "aad_session",
    "create_key",
    "key_path",
    "load_key",
    "open_sealed",
    "seal",
]

KEY_FILE = "session.key"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class KeyUnusable(Exception):
    """The key file exists but cannot be used; `str()` says why (never overwrite it)."""


class SealError(Exception):
    """A ciphertext does not decrypt with this key for this row."""


def key_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / KEY_FILE


def aad_session(session_id: str) -> bytes:
    return f"greyproxy:v1:session:{session_id}".encode()


def aad_global(credential_id: str) -> bytes:
    return f"greyproxy:v1:global:{credential_id}".encode()


def load_key(path: str | os.PathLike[str]) -> bytes | None:
    """The key, or None when the file does not exist; KeyUnusable when it exists but is unreadable,
    not a regular file or not exactly 32 bytes. A mode looser than 0600 is tightened."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyUnusable("it is a symbolic link") from None
        raise KeyUnusable(exc.strerror or type(exc).__name__) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyUnusable("it is not a regular file")
        if st.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError as exc:
                raise KeyUnusable(
                    f"its mode {stat.S_IMODE(st.st_mode):o} cannot be set to 600: {exc.strerror}"
                ) from None
        data = os.read(fd, KEY_BYTES + 1)
    except OSError as exc:
        raise KeyUnusable(exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise KeyUnusable(
            f"it holds {'more than ' + str(KEY_BYTES) if len(data) > KEY_BYTES else len(data)} bytes, not {KEY_BYTES}"
        )
    return data


def create_key(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """(the key, whether this call created it): a new random key when the file does not exist
    (`O_CREAT|O_EXCL`, 0600), else the existing one (KeyUnusable when it cannot be used)."""
    p = Path(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        # Another process won the race: its file may still be being written, so give it a moment.
        for _ in range(10):
            try:
                got = load_key(p)
            except KeyUnusable:
                if time.time() - _mtime(p) > 2:
                    raise
                time.sleep(0.05)
                continue
            if got is None:  # removed between the two calls: try once more
                return create_key(p)
            return got, False
        return load_key(p) or create_key(p)[0], False
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(key)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return key, True


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SealError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealError("does not decrypt with this key for this row") from None
