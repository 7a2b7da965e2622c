"""The `logs` table (migration 1): its columns, the SQL the recorder writes it with, and the API's queries
(the listing with its exact total, and the statistics of /api/logs/stats and /api/dashboard)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson

from . import sql

COLUMNS = (
    "id",
    "timestamp",
    "container_name",
    "container_id",
    "destination_host",
    "destination_port",
    "resolved_hostname",
    "method",
    "result",
    "rule_id",
    "response_time_ms",
    "reason",
    "mitm_skip_reason",
)
FIELDS = COLUMNS[1:]  # what a `log` journal record fills in

# Hand-written rather than peewee's insert_many: the recorder inserts each batch's log records
# with one executemany of this statement, and bench/run.py's recorder row (records/s) is that
# loop; a peewee query object per batch costs measurably more there.
INSERT = f"INSERT INTO logs ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
# log_counts (migration 3) for rows inserted: `n` more rows of (container_name, result). Since migration 10
# whoever inserts into logs adds these in the same transaction (the recorder: one per container and
# result per batch; a trigger per row cost more than the row); deletes and updates have triggers.
ADD_COUNT = (
    "INSERT INTO log_counts (container_name, result, n) VALUES (?, ?, ?)"
    " ON CONFLICT (container_name, result) DO UPDATE SET n = n + excluded.n"
)


# The API's queries below stay hand-written: GET /api/logs has a benchmarked target (bench/run.py:
# p50 <= 20 ms at 1 000 000 rows), met by reading log_counts (kept with the rows) for its total and
# one indexed page joined with rules for the summary; /api/logs/stats and /api/dashboard are
# aggregates over a time range in one snapshot.


@dataclass(frozen=True)
class LogFilter:
    container: str | None = None  # a substring of the container name (SPEC §5, as the reference)
    destination: str | None = None
    result: str | None = None
    from_ts: float | None = None
    to_ts: float | None = None
    # The container names `container` matches, found in the small log_counts table (one row per
    # name and result) by `with_containers`: the page and total then use the (container_name,
    # timestamp) index with `IN`, never a LIKE over a million rows. None: not resolved (LIKE).
    containers: tuple[str, ...] | None = None


MAX_IN_NAMES = 500  # more matching names than this: filter with LIKE on the rows instead


def with_containers(f: LogFilter) -> LogFilter:
    """`f` with the container names its substring matches (call inside the read transaction)."""
    if not f.container:
        return f
    names = [
        r[0]
        for r in sql.execute(
            "SELECT DISTINCT container_name FROM log_counts WHERE container_name LIKE ? ESCAPE '\\'",
            (sql.like_pattern(f.container),),
        ).fetchall()
    ]
    return f if len(names) > MAX_IN_NAMES else replace(f, containers=tuple(names))


def _container_clause(f: LogFilter, column: str) -> tuple[str, list[Any]]:
    if f.containers is None:
        return f"{column} LIKE ? ESCAPE '\\'", [sql.like_pattern(f.container or "")]
    if not f.containers:
        return "0 = 1", []
    return f"{column} IN ({', '.join('?' * len(f.containers))})", list(f.containers)


def _log_where(f: LogFilter, alias: str = "") -> tuple[str, list[Any]]:
    a = f"{alias}." if alias else ""
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if f.container:
        clause, more = _container_clause(f, f"{a}container_name")
        where.append(clause)
        args.extend(more)
    if f.destination:
        where.append(f"({a}destination_host LIKE ? ESCAPE '\\' OR {a}resolved_hostname LIKE ? ESCAPE '\\')")
        args.extend([sql.like_pattern(f.destination)] * 2)
    if f.result:
        where.append(f"{a}result = ?")
        args.append(f.result)
    if f.from_ts is not None:
        where.append(f"{a}timestamp >= ?")
        args.append(f.from_ts)
    if f.to_ts is not None:
        where.append(f"{a}timestamp <= ?")
        args.append(f.to_ts)
    return " AND ".join(where), args


# A page for several container names: each name's newest offset + limit rows read from the
# (container_name, timestamp) index, merged. With `container_name IN (…)` alone the planner either
# scans the timestamp index and filters (hundreds of ms when the newest rows are another container's:
# 263 ms for 11 names at 1 000 000 rows after 200 000 rows of one busy container) or sorts every
# matching row; the merge reads at most names × (offset + limit) index entries. Beyond this many
# entries (deep pages of many names) the IN form is kept.
MAX_MERGED_ENTRIES = 100_000
MAX_MERGED_NAMES = 400  # SQLite allows 500 terms in a compound SELECT


def _log_page(f: LogFilter, limit: int, offset: int) -> list[dict[str, Any]]:
    cols = ", ".join(f"l.{c}" for c in COLUMNS)
    head = (
        f"SELECT {cols}, CASE WHEN r.id IS NULL THEN NULL ELSE r.container_pattern || ' → ' ||"
        " r.destination_pattern || ':' || COALESCE(NULLIF(r.port_pattern, ''), '*') END AS rule_summary"
        " FROM logs l LEFT JOIN rules r ON r.id = l.rule_id"
    )
    order = " ORDER BY l.timestamp DESC, l.id DESC LIMIT ? OFFSET ?"
    names = f.containers
    if names is not None and 1 < len(names) <= MAX_MERGED_NAMES and len(names) * (limit + offset) <= MAX_MERGED_ENTRIES:
        clause, args = _log_where(replace(f, container=None, containers=None))
        pick = (
            "SELECT id FROM (SELECT id FROM logs INDEXED BY logs_container"
            f" WHERE container_name = ? AND {clause} ORDER BY timestamp DESC, id DESC LIMIT ?)"
        )
        pick_args: list[Any] = []
        for name in names:
            pick_args.extend([name, *args, limit + offset])
        picks = " UNION ALL ".join([pick] * len(names))
        return sql.rows(f"{head} WHERE l.id IN ({picks}){order}", [*pick_args, limit, offset])
    clause, args = _log_where(f, "l")
    return sql.rows(f"{head} WHERE {clause}{order}", [*args, limit, offset])


def _log_total(f: LogFilter) -> int:
    """The exact number of rows the filter matches. Filters on container/result only (or none) sum
    log_counts (migrations 3 and 9: kept with the rows); others count the matching rows."""
    if f.destination is None and f.from_ts is None and f.to_ts is None:
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if f.container:
            clause, more = _container_clause(f, "container_name")
            where.append(clause)
            args.extend(more)
        if f.result:
            where.append("result = ?")
            args.append(f.result)
        return int(sql.scalar(f"SELECT COALESCE(SUM(n), 0) FROM log_counts WHERE {' AND '.join(where)}", args))
    clause, args = _log_where(f)
    return int(sql.scalar(f"SELECT COUNT(*) FROM logs WHERE {clause}", args))


def list_logs(f: LogFilter, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    with sql.read_transaction():  # one snapshot: the total and the page agree
        f = with_containers(f)
        total = _log_total(f)
        rows = _log_page(f, limit, offset)
    return rows, total


BUCKETS = {"hour": (3600.0, 0.0), "day": (86400.0, 0.0), "week": (7 * 86400.0, 4 * 86400.0)}  # weeks start Monday
MAX_FILLED_BUCKETS = 2000  # beyond this many empty slots the timeline lists only non-empty buckets


def bucket_start(ts: float, size: float, origin: float) -> float:
    return (ts - origin) // size * size + origin


def _timeline(from_ts: float, to_ts: float, group_by: str) -> list[dict[str, Any]]:
    size, origin = BUCKETS[group_by]
    rows = sql.execute(
        "SELECT CAST((timestamp - ?) / ? AS INTEGER) AS b, SUM(result = 'allowed'), SUM(result = 'blocked')"
        " FROM logs WHERE timestamp >= ? AND timestamp <= ? GROUP BY b ORDER BY b",
        (origin, size, from_ts, to_ts),
    ).fetchall()
    counts = {float(b) * size + origin: (int(a or 0), int(k or 0)) for b, a, k in rows}
    first, last = bucket_start(from_ts, size, origin), bucket_start(to_ts, size, origin)
    if (last - first) / size <= MAX_FILLED_BUCKETS:
        filled = {first + i * size for i in range(int(round((last - first) / size)) + 1)}
        slots = sorted(filled | set(counts))  # the union: a rounding edge must never drop counted traffic
    else:
        slots = sorted(counts)
    return [{"ts": s, "allowed": counts.get(s, (0, 0))[0], "blocked": counts.get(s, (0, 0))[1]} for s in slots]


def log_stats(
    from_ts: float,
    to_ts: float,
    group_by: str,
    top_containers: int = 20,
    top_destinations: int = 10,
    recent_limit: int = 0,
) -> dict[str, Any]:
    """Totals, per-container counts, top blocked destinations, timeline (and the latest entries)."""
    rng = (from_ts, to_ts)
    with sql.read_transaction():  # one snapshot for every aggregate
        total, allowed, blocked = sql.execute(
            "SELECT COUNT(*), COALESCE(SUM(result = 'allowed'), 0), COALESCE(SUM(result = 'blocked'), 0)"
            " FROM logs WHERE timestamp >= ? AND timestamp <= ?",
            rng,
        ).fetchone()
        containers = sql.rows(
            "SELECT container_name AS name, COUNT(*) AS total, SUM(result = 'allowed') AS allowed,"
            " SUM(result = 'blocked') AS blocked FROM logs WHERE timestamp >= ? AND timestamp <= ?"
            " GROUP BY container_name ORDER BY total DESC, name LIMIT ?",
            (*rng, top_containers),
        )
        destinations = sql.rows(
            "SELECT destination_host AS host, destination_port AS port, MAX(resolved_hostname) AS resolved_hostname,"
            " COUNT(*) AS count, json_group_array(DISTINCT container_name) AS containers"
            " FROM logs WHERE result = 'blocked' AND timestamp >= ? AND timestamp <= ?"
            " GROUP BY destination_host, destination_port ORDER BY count DESC, host, port LIMIT ?",
            (*rng, top_destinations),
        )
        timeline = _timeline(from_ts, to_ts, group_by)
        recent = _log_page(LogFilter(from_ts=from_ts, to_ts=to_ts), recent_limit, 0) if recent_limit else []
    for c in containers:
        c["allowed"], c["blocked"] = int(c["allowed"] or 0), int(c["blocked"] or 0)
        c["percentage"] = round(c["total"] * 100.0 / total, 2) if total else 0.0
    for d in destinations:
        d["containers"] = sorted(orjson.loads(d["containers"] or "[]"))
    return {
        "total": int(total),
        "allowed": int(allowed),
        "blocked": int(blocked),
        "containers": containers,
        "destinations": destinations,
        "timeline": timeline,
        "recent": recent,
    }
