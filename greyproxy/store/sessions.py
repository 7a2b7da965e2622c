"""The `sessions` and `session_credentials` tables (migration 5, SPEC §12.2): credential sessions,
their placeholders' labels and hosts in clear, their values sealed in `mappings_sealed`.

Every function runs on peewee's connection for this thread (the API calls them through its
thread pool; the proxy in its worker thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from . import sql
from .db import database

MAX_LIVE = 1000  # live sessions (SPEC §12.2: more → 409)

# Inside the recorder's batch transaction (its raw sqlite3 cursor): one per request substituted.
ADD_USE = (
    "UPDATE sessions SET substitution_count = substitution_count + ?,"
    " last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE session_id = ?"
)


class Conflict(Exception):
    """409: the message says why (a placeholder held by another live session, too many sessions)."""


@dataclass(frozen=True, slots=True)
class SessionCredential:
    placeholder: str
    label: str
    hosts: list[str]


def upsert(
    session_id: str,
    container: str,
    sealed: bytes,
    creds: Sequence[SessionCredential],
    global_labels: Sequence[str],
    metadata: dict[str, str],
    ttl: int,
    now: float,
) -> tuple[dict[str, Any], list[str]]:
    """Create or replace the session (SPEC §12.2 upsert): (the stored row, the ids of expired
    sessions removed on the way: one holding a placeholder, or this id's own expired version).
    Conflict for a placeholder another live session holds, or past MAX_LIVE live sessions."""
    with sql.write_transaction():
        placeholders = [c.placeholder for c in creds]
        removed: list[str] = []
        if placeholders:
            marks = ", ".join("?" * len(placeholders))
            holders = sql.rows(
                f"SELECT DISTINCT c.session_id, s.expires_at FROM session_credentials c JOIN sessions s"
                f" USING (session_id) WHERE c.placeholder IN ({marks}) AND c.session_id != ?",
                [*placeholders, session_id],
            )
            live = sorted(h["session_id"] for h in holders if h["expires_at"] > now)
            if live:
                raise Conflict(f"a placeholder is already registered by live session {live[0]}")
            for h in holders:
                database.execute_sql("DELETE FROM sessions WHERE session_id = ?", (h["session_id"],))
                removed.append(h["session_id"])
        old = sql.rows(
            "SELECT created_at, expires_at, substitution_count, last_used_at FROM sessions WHERE session_id = ?",
            (session_id,),
        )
        if not old or old[0]["expires_at"] <= now:
            n = database.execute_sql("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (now,)).fetchone()[0]
            if n >= MAX_LIVE:
                raise Conflict(f"more than {MAX_LIVE} live sessions")
        keep = old[0] if old and old[0]["expires_at"] > now else None
        created = keep["created_at"] if keep else now
        count = keep["substitution_count"] if keep else 0
        last_used = keep["last_used_at"] if keep else None
        if old:
            if keep is None:
                removed.append(session_id)
            database.execute_sql("DELETE FROM sessions WHERE session_id = ?", (session_id,))  # cascades
        database.execute_sql(
            "INSERT INTO sessions (session_id, container_name, mappings_sealed, global_labels, metadata, ttl_seconds,"
            " created_at, expires_at, last_heartbeat, substitution_count, last_used_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                container,
                sealed,
                orjson.dumps(list(global_labels)).decode(),
                orjson.dumps(metadata).decode(),
                ttl,
                created,
                now + ttl,
                now,
                count,
                last_used,
            ),
        )
        for i, c in enumerate(creds):
            database.execute_sql(
                "INSERT INTO session_credentials (placeholder, session_id, label, hosts, position)"
                " VALUES (?, ?, ?, ?, ?)",
                (c.placeholder, session_id, c.label, orjson.dumps(c.hosts).decode(), i),
            )
    row = get(session_id)
    assert row is not None
    return row, removed


def get(session_id: str) -> dict[str, Any] | None:
    found = sql.rows(
        "SELECT session_id, container_name, global_labels, metadata, ttl_seconds, created_at, expires_at,"
        " last_heartbeat, substitution_count, last_used_at FROM sessions WHERE session_id = ?",
        (session_id,),
    )
    return _decode(found[0]) if found else None


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["global_labels"] = orjson.loads(row["global_labels"])
    row["metadata"] = orjson.loads(row["metadata"])
    return row


def heartbeat(session_id: str, now: float) -> float | None:
    """The new expires_at, or None when the session is unknown or already past its expires_at."""
    with sql.write_transaction():
        found = sql.rows("SELECT ttl_seconds, expires_at FROM sessions WHERE session_id = ?", (session_id,))
        if not found or found[0]["expires_at"] <= now:
            return None
        expires = now + found[0]["ttl_seconds"]
        database.execute_sql(
            "UPDATE sessions SET expires_at = ?, last_heartbeat = ? WHERE session_id = ?", (expires, now, session_id)
        )
    return float(expires)


def delete(session_id: str) -> bool:
    return database.execute_sql("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0


def list_live(now: float) -> list[dict[str, Any]]:
    """Live sessions, newest created_at first, each with `credentials` [{label, hosts}] in order."""
    with sql.read_transaction():
        sessions = [
            _decode(r)
            for r in sql.rows(
                "SELECT session_id, container_name, global_labels, metadata, ttl_seconds, created_at, expires_at,"
                " last_heartbeat, substitution_count, last_used_at FROM sessions WHERE expires_at > ?"
                " ORDER BY created_at DESC, session_id",
                (now,),
            )
        ]
        creds = sql.rows(
            "SELECT c.session_id, c.label, c.hosts FROM session_credentials c JOIN sessions s"
            " USING (session_id) WHERE s.expires_at > ? ORDER BY c.session_id, c.position",
            (now,),
        )
    by_id: dict[str, list[dict[str, Any]]] = {}
    for c in creds:
        by_id.setdefault(c["session_id"], []).append({"label": c["label"], "hosts": orjson.loads(c["hosts"])})
    for s in sessions:
        s["credentials"] = by_id.get(s["session_id"], [])
    return sessions


def remove_expired(now: float) -> list[str]:
    """Delete sessions past their expires_at; their ids (maintenance, every 10 s)."""
    with sql.write_transaction():
        ids = [
            r[0]
            for r in database.execute_sql("SELECT session_id FROM sessions WHERE expires_at <= ?", (now,)).fetchall()
        ]
        if ids:
            database.execute_sql("DELETE FROM sessions WHERE expires_at <= ?", (now,))
    return ids


def sealed_rows() -> list[tuple[str, bytes, float, list[tuple[str, str, list[str]]], list[str]]]:
    """Every session for the proxy's live map: (session_id, mappings_sealed, expires_at,
    [(placeholder, label, hosts)], global_labels). Call inside a read transaction."""
    creds: dict[str, list[tuple[str, str, list[str]]]] = {}
    for ph, sid, label, hosts in database.execute_sql(
        "SELECT placeholder, session_id, label, hosts FROM session_credentials ORDER BY session_id, position"
    ):
        creds.setdefault(sid, []).append((ph, label, orjson.loads(hosts)))
    return [
        (sid, bytes(blob), exp, creds.get(sid, []), orjson.loads(globals_))
        for sid, blob, exp, globals_ in database.execute_sql(
            "SELECT session_id, mappings_sealed, expires_at, global_labels FROM sessions"
        )
    ]


def owners() -> dict[str, str]:
    """session_id → container_name of every session (SPEC §16: a session naming a claimed identity
    substitutes only on that identity's connections). Call inside a read transaction."""
    return {sid: name for sid, name in database.execute_sql("SELECT session_id, container_name FROM sessions")}


def labels_of(session_id: str) -> list[tuple[str, str]]:
    """(placeholder, label) of a session (the key-loss warning names labels, never values)."""
    return [
        (r[0], r[1])
        for r in database.execute_sql(
            "SELECT placeholder, label FROM session_credentials WHERE session_id = ? ORDER BY position", (session_id,)
        )
    ]
