"""The `pending` table (migration 1): its columns, the SQL of a sighting (the recorder's upsert) and the API's queries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import peewee as pw

from . import sql
from .models import Pending

COLUMNS = (
    "id",
    "container_name",
    "container_id",
    "destination_host",
    "destination_port",
    "resolved_hostname",
    "first_seen",
    "last_seen",
    "attempt_count",
)

# A sighting runs inside the recorder's batch transaction on its raw sqlite3 cursor (peewee's
# connection is per thread and not the one holding the batch's IMMEDIATE transaction).
# (id, resolved_hostname) of the entry of (container, host, port): a sighting bumps it, a naming names it.
FIND = "SELECT id, resolved_hostname FROM pending WHERE container_name = ? AND destination_host = ? AND destination_port = ?"
# Another IP of the same named host: the newest entry under that name takes the sighting.
FIND_SIBLING = (
    "SELECT id FROM pending WHERE container_name = ? AND resolved_hostname = ? AND destination_port = ?"
    " ORDER BY last_seen DESC LIMIT 1"
)
INSERT = (
    "INSERT INTO pending (container_name, container_id, destination_host, destination_port,"
    " resolved_hostname, first_seen, last_seen, attempt_count) VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
)
BUMP = (
    "UPDATE pending SET last_seen = MAX(last_seen, ?), attempt_count = attempt_count + 1,"
    " resolved_hostname = COALESCE(resolved_hostname, ?) WHERE id = ?"
)
GET = f"SELECT {', '.join(COLUMNS)} FROM pending WHERE id = ?"
DELETE = "DELETE FROM pending WHERE id = ?"
NAME = "UPDATE pending SET resolved_hostname = ? WHERE id = ?"


def count() -> int:
    """How many entries the pending queue holds."""
    return int(Pending.select().count())


def count_and_has(keys: list[tuple[str, str, int]]) -> tuple[int, list[bool]]:
    """(how many entries the queue holds, whether each (container, host, port) has one), in one
    read transaction: proxy.maxPending's look."""
    from .db import database

    with database.atomic():
        has = [
            Pending.select(Pending.id)
            .where((Pending.container_name == c) & (Pending.destination_host == h) & (Pending.destination_port == p))
            .exists()
            for c, h, p in keys
        ]
        return count(), has


# --------------------------------------------------------------------------- the API's queries

GROUP_HOST = "COALESCE(resolved_hostname, destination_host)"  # the host a pending group is shown under
Key = tuple[str, str, int]  # (container, host, port): how the proxy names a held connection


def get(pending_id: int) -> dict[str, Any] | None:
    return cast("dict[str, Any] | None", Pending.select().where(Pending.id == pending_id).dicts().first())


def all_rows() -> list[dict[str, Any]]:
    return list(cast(Iterable[dict[str, Any]], Pending.select().dicts()))


def _filter(container: str | None, destination: str | None) -> tuple[str, list[Any]]:
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if container:
        where.append("container_name LIKE ? ESCAPE '\\'")
        args.append(sql.like_pattern(container))
    if destination:
        where.append("(destination_host LIKE ? ESCAPE '\\' OR resolved_hostname LIKE ? ESCAPE '\\')")
        args.extend([sql.like_pattern(destination)] * 2)
    return " AND ".join(where), args


def list_groups(
    container: str | None, destination: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """Groups of rows sharing (container, resolved-or-raw host, port), newest last_seen first.

    Each group is its latest row with attempts summed, the earliest first_seen and `hosts`
    (every raw host in the group, to count the connections held for any of them). Hand-written:
    one statement with window functions, which reads far plainer as SQL than as peewee's Window."""
    clause, args = _filter(container, destination)
    part = f"PARTITION BY container_name, {GROUP_HOST}, destination_port"
    with sql.read_transaction():
        total = int(
            sql.scalar(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM pending WHERE {clause}"
                f" GROUP BY container_name, {GROUP_HOST}, destination_port)",
                args,
            )
        )
        rows = sql.rows(
            "SELECT id, container_name, container_id, destination_host, destination_port, resolved_hostname,"
            " first_seen, last_seen, attempt_count, hosts FROM ("
            "  SELECT id, container_name, container_id, destination_host, destination_port, resolved_hostname,"
            "   last_seen, MIN(first_seen) OVER w AS first_seen, SUM(attempt_count) OVER w AS attempt_count,"
            "   group_concat(destination_host, char(31)) OVER w AS hosts,"
            f"   ROW_NUMBER() OVER ({part} ORDER BY last_seen DESC, id DESC) AS rn"
            f"  FROM pending WHERE {clause} WINDOW w AS ({part}))"
            " WHERE rn = 1 ORDER BY last_seen DESC, id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
    for row in rows:
        row["hosts"] = sorted(set((row["hosts"] or "").split("\x1f")))
    return rows, total


def group_count() -> int:
    """How many groups the queue shows (what /api/pending/count answers); SQL as list_groups groups."""
    return int(
        sql.scalar(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM pending GROUP BY container_name, {GROUP_HOST}, destination_port)"
        )
    )


def group_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row and its siblings: same container and port, same resolved-or-raw host."""
    host = row["resolved_hostname"] or row["destination_host"]
    query = Pending.select().where(
        (Pending.container_name == row["container_name"])
        & (Pending.destination_port == row["destination_port"])
        & (pw.fn.COALESCE(Pending.resolved_hostname, Pending.destination_host) == host)
    )
    return list(cast(Iterable[dict[str, Any]], query.dicts()))


def delete_rows(rows: Iterable[dict[str, Any]]) -> list[Key]:
    """Delete the rows; the held-connection keys they stood for."""
    rows = list(rows)
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    for i in range(0, len(ids), 500):  # stay far below SQLite's bound-parameter limit
        Pending.delete().where(Pending.id.in_(ids[i : i + 500])).execute()
    return [(r["container_name"], r["destination_host"], int(r["destination_port"])) for r in rows]
