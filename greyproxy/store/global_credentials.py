"""The `global_credentials` table (migration 5, SPEC §12.3): labelled credentials any request may
use, their values sealed per row (`value_sealed`), label, placeholder, preview and hosts in clear."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from . import sql
from .db import database

COLUMNS = ("id", "label", "placeholder", "value_preview", "hosts", "created_at", "substitution_count", "last_used_at")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM global_credentials"

# Inside the recorder's batch transaction (its raw sqlite3 cursor): one per request substituted.
ADD_USE = (
    "UPDATE global_credentials SET substitution_count = substitution_count + ?,"
    " last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?"
)


class LabelTaken(Exception):
    pass


def _items(query: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows as dicts, `hosts` decoded."""
    out = sql.rows(query, args)
    for r in out:
        r["hosts"] = orjson.loads(r["hosts"])
    return out


def list_all() -> list[dict[str, Any]]:
    """Newest first."""
    return _items(f"{_SELECT} ORDER BY created_at DESC, id")


def get(cred_id: str) -> dict[str, Any] | None:
    found = _items(f"{_SELECT} WHERE id = ?", (cred_id,))
    return found[0] if found else None


def insert(
    cred_id: str, label: str, placeholder: str, sealed: bytes, preview: str, hosts: list[str], now: float
) -> dict[str, Any]:
    try:
        with sql.write_transaction():
            database.execute_sql(
                "INSERT INTO global_credentials (id, label, placeholder, value_sealed, value_preview, hosts, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cred_id, label, placeholder, sealed, preview, orjson.dumps(hosts).decode(), now),
            )
    except Exception as exc:  # peewee wraps sqlite3's IntegrityError
        if isinstance(exc, sqlite3.IntegrityError) or type(exc).__name__ == "IntegrityError":
            raise LabelTaken(label) from None
        raise
    row = get(cred_id)
    assert row is not None
    return row


def delete(cred_id: str) -> dict[str, Any] | None:
    """The deleted row (id, label), or None when there was none."""
    with sql.write_transaction():
        row = get(cred_id)
        if row is not None:
            database.execute_sql("DELETE FROM global_credentials WHERE id = ?", (cred_id,))
    return row


def placeholders_of(labels: Sequence[str]) -> dict[str, str]:
    """{label: placeholder} of the labels that exist."""
    if not labels:
        return {}
    marks = ", ".join("?" * len(labels))
    return {
        r[0]: r[1]
        for r in database.execute_sql(
            f"SELECT label, placeholder FROM global_credentials WHERE label IN ({marks})", tuple(labels)
        )
    }


def existing_labels() -> set[str]:
    return {r[0] for r in database.execute_sql("SELECT label FROM global_credentials")}


def sealed_rows() -> list[tuple[str, str, str, bytes, list[str]]]:
    """(id, label, placeholder, value_sealed, hosts) of every global credential (the proxy's live
    map; call inside a read transaction)."""
    return [
        (i, label, ph, bytes(blob), orjson.loads(hosts))
        for i, label, ph, blob, hosts in database.execute_sql(
            "SELECT id, label, placeholder, value_sealed, hosts FROM global_credentials"
        )
    ]
