"""The `identities` table (SPEC §16, claimed identities): its columns and its SQL, for the API
(claim, list, rotate, release), the proxy (the claims it loads) and the recorder (last use).
Only an scrypt hash of each secret is stored (greyproxy/identity.py)."""

from __future__ import annotations

import time
from typing import Any

import peewee

from .db import database
from .models import meta_value

COLUMNS = ("name", "secret_hash", "notes", "created_at", "rotated_at", "last_used_at", "version")
PUBLIC = ("name", "notes", "created_at", "rotated_at", "last_used_at", "version")  # never the hash

TOUCH = "UPDATE identities SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE name = ?"
_SELECT = f"SELECT {', '.join(PUBLIC)} FROM identities"


def _row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    return None if row is None else dict(zip(PUBLIC, row))


def list_all() -> list[dict[str, Any]]:
    return [dict(zip(PUBLIC, r)) for r in database.execute_sql(f"{_SELECT} ORDER BY name").fetchall()]


def create(name: str, notes: str | None, secret_hash: str) -> dict[str, Any] | None:
    """The new claim's row, or None when the name is claimed already."""
    with database.atomic():
        try:
            database.execute_sql(
                "INSERT INTO identities (name, secret_hash, notes, created_at, version) VALUES (?, ?, ?, ?, 1)",
                (name, secret_hash, notes, time.time()),
            )
        except peewee.IntegrityError:
            return None
        return _row(database.execute_sql(f"{_SELECT} WHERE name = ?", (name,)).fetchone())


def rotate(name: str, secret_hash: str) -> dict[str, Any] | None:
    """The claim's row with its new hash and version, or None when the name is not claimed."""
    with database.atomic():
        cur = database.execute_sql(
            "UPDATE identities SET secret_hash = ?, version = version + 1, rotated_at = ? WHERE name = ?",
            (secret_hash, time.time(), name),
        )
        if cur.rowcount == 0:
            return None
        return _row(database.execute_sql(f"{_SELECT} WHERE name = ?", (name,)).fetchone())


def delete(name: str) -> bool:
    return database.execute_sql("DELETE FROM identities WHERE name = ?", (name,)).rowcount > 0


def release(name: str) -> list[str] | None:
    """Release the claim on `name` and end the credential sessions that name it (SPEC §16: their
    placeholders substitute only on that identity's connections; released, the name is anyone's,
    so they would substitute for whoever presents it). One transaction: the proxy never loads the
    claim gone with those sessions still there. The ended sessions' ids, or None when `name` is not
    claimed (nothing changed)."""
    with database.atomic("IMMEDIATE"):
        if database.execute_sql("DELETE FROM identities WHERE name = ?", (name,)).rowcount == 0:
            return None
        ended = [
            r[0]
            for r in database.execute_sql(
                "SELECT session_id FROM sessions WHERE container_name = ? ORDER BY session_id", (name,)
            ).fetchall()
        ]
        if ended:
            database.execute_sql("DELETE FROM sessions WHERE container_name = ?", (name,))
    return ended


def claims() -> tuple[list[tuple[str, str, int]], int]:
    """(name, secret_hash, version) of every claim and the identities version, in one read transaction."""
    with database.atomic():
        version = meta_value("identities_version")
        rows = database.execute_sql("SELECT name, secret_hash, version FROM identities").fetchall()
    return [(r[0], r[1], int(r[2])) for r in rows], version
