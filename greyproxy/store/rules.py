"""The `rules` table (migration 1): its columns, and the recorder's hit-count update."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from . import sql

COLUMNS = ("id", "container_pattern", "destination_pattern", "port_pattern", "rule_type", "action", "created_at",
           "expires_at", "last_used_at", "created_by", "notes", "source", "session_id", "hit_count")

# Inside the recorder's batch transaction (its raw sqlite3 cursor).
ADD_HITS = ("UPDATE rules SET hit_count = hit_count + ?, last_used_at = MAX(COALESCE(last_used_at, 0), ?)"
            " WHERE id = ?")


def snapshot() -> tuple[int, list[tuple[Any, ...]]]:
    """(rules_version, the rows the proxy's rule set needs) in one read transaction, so they match:
    (id, container_pattern, destination_pattern, port_pattern, action, source, expires_at, session_id)."""
    from .db import database
    from .models import Rule, meta_value

    with database.atomic():
        version = meta_value("rules_version")
        query = Rule.select(Rule.id, Rule.container_pattern, Rule.destination_pattern, Rule.port_pattern,
                            Rule.action, Rule.source, Rule.expires_at, Rule.session_id).tuples()
        rows = list(cast(Iterable[tuple[Any, ...]], query))  # .tuples(): peewee's types still say models
    return version, rows


# --------------------------------------------------------------------------- the API's queries

SELECT = f"SELECT {', '.join(COLUMNS)} FROM rules"
ACTIVE = "(expires_at IS NULL OR expires_at > ?)"  # with now


def get(rule_id: int) -> dict[str, Any] | None:
    return sql.one(f"{SELECT} WHERE id = ?", (rule_id,))


def list_page(container: str | None, destination: str | None, action: str | None, include_expired: bool,
              limit: int, offset: int, now: float) -> tuple[list[dict[str, Any]], int]:
    """Newest first, with the exact total of the filter (one snapshot)."""
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if not include_expired:
        where.append(ACTIVE)
        args.append(now)
    if container:
        where.append("container_pattern LIKE ? ESCAPE '\\'")
        args.append(sql.like_pattern(container))
    if destination:
        where.append("destination_pattern LIKE ? ESCAPE '\\'")
        args.append(sql.like_pattern(destination))
    if action:
        where.append("action = ?")
        args.append(action)
    clause = " AND ".join(where)
    with sql.read_transaction():  # one snapshot: total agrees with the page
        total = int(sql.scalar(f"SELECT COUNT(*) FROM rules WHERE {clause}", args))
        rows = sql.rows(f"{SELECT} WHERE {clause} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
                        [*args, limit, offset])
    return rows, total


def find_active(container_p: str, dest_p: str, port_p: str, action: str, now: float) -> dict[str, Any] | None:
    """The oldest active rule with exactly these patterns and action."""
    return sql.one(f"{SELECT} WHERE container_pattern = ? AND destination_pattern = ? AND port_pattern = ?"
                   f" AND action = ? AND {ACTIVE} ORDER BY id LIMIT 1", (container_p, dest_p, port_p, action, now))


def find_expired(container_p: str, dest_p: str, port_p: str, action: str, now: float) -> list[dict[str, Any]]:
    """Expired rules with exactly these patterns and action (the unique index would refuse a new twin)."""
    return sql.rows(f"{SELECT} WHERE container_pattern = ? AND destination_pattern = ? AND port_pattern = ?"
                    " AND action = ? AND expires_at IS NOT NULL AND expires_at <= ?",
                    (container_p, dest_p, port_p, action, now))


def insert(container_p: str, dest_p: str, port_p: str, action: str, created_at: float, expires_at: float | None,
           created_by: str, notes: str | None) -> int:
    cur = sql.execute(
        "INSERT INTO rules (container_pattern, destination_pattern, port_pattern, rule_type, action,"
        " created_at, expires_at, created_by, notes, source) VALUES (?, ?, ?, 'glob', ?, ?, ?, ?, ?, 'global')",
        (container_p, dest_p, port_p, action, created_at, expires_at, created_by, notes))
    return int(cur.lastrowid)


def update(rule_id: int, changes: dict[str, Any]) -> None:
    """Set the given columns (validated names) of one rule."""
    if changes:
        sql.execute(f"UPDATE rules SET {', '.join(f'{c} = ?' for c in changes)} WHERE id = ?",
                    [*changes.values(), rule_id])


def delete(rule_ids: list[int]) -> None:
    for i in range(0, len(rule_ids), 500):  # stay far below SQLite's bound-parameter limit
        chunk = rule_ids[i:i + 500]
        sql.execute(f"DELETE FROM rules WHERE id IN ({','.join('?' * len(chunk))})", chunk)


def active_rows(now: float) -> list[dict[str, Any]]:
    """What a RuleSet needs of every active rule."""
    return sql.rows("SELECT id, container_pattern, destination_pattern, port_pattern, action, source, expires_at,"
                    f" session_id FROM rules WHERE {ACTIVE}", (now,))
