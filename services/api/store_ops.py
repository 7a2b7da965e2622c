"""Synchronous database work of the REST areas; every function runs in the API's thread pool.

Resources call these through `await ctx.db(fn, ...)`, never on the event loop. Writes run in
one IMMEDIATE transaction each (the write lock is taken up front, so two API threads cannot
both read "no identical rule" and insert twins). Rows come back as plain dicts with stored
values (epoch floats); greyproxy.shapes turns them into the JSON of the SPEC.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from greyproxy.policy import Rule, RuleSet, scope_patterns, validate_port_pattern
from greyproxy.store import database
from greyproxy.store import logs as logs_table
from greyproxy.store import pending as pending_table
from greyproxy.store import rules as rules_table
from greyproxy.store import settings as settings_table

Key = tuple[str, str, int]  # (container, host, port): how the proxy names a held connection

RULE_COLUMNS = rules_table.COLUMNS  # each table's columns are defined with it, under greyproxy/store/
PENDING_COLUMNS = pending_table.COLUMNS
LOG_COLUMNS = logs_table.COLUMNS

_RULE_SELECT = f"SELECT {', '.join(RULE_COLUMNS)} FROM rules"
_PENDING_SELECT = f"SELECT {', '.join(PENDING_COLUMNS)} FROM pending"
_GROUP_HOST = "COALESCE(resolved_hostname, destination_host)"  # the host a pending group is shown under
_ACTIVE = "(expires_at IS NULL OR expires_at > ?)"


class InvalidInput(ValueError):
    """Input that only turns out bad once stored rows are read (answered as 400)."""


def _rows(sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cur = database.execute_sql(sql, tuple(args))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def _one(sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
    rows = _rows(sql, args)
    return rows[0] if rows else None


def _scalar(sql: str, args: Sequence[Any] = ()) -> Any:
    row = database.execute_sql(sql, tuple(args)).fetchone()
    return row[0] if row else None


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` as a plain substring (its % and _ taken literally)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _write():  # noqa: ANN202 - peewee's context manager
    # IMMEDIATE: take SQLite's write lock at BEGIN, so check-then-insert cannot race another writer.
    return database.atomic("IMMEDIATE")


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class RuleSpec:
    """A validated rule to create (patterns already normalised by greyproxy.policy)."""
    container_pattern: str
    destination_pattern: str
    port_pattern: str = "*"
    action: str = "allow"
    expires_at: float | None = None
    notes: str | None = None
    created_by: str = "api"


@dataclass
class CreateResult:
    rule: dict[str, Any]
    created: bool
    replaced: list[dict[str, Any]] = field(default_factory=list)  # expired twins deleted to make room


def get_rule(rule_id: int) -> dict[str, Any] | None:
    return _one(f"{_RULE_SELECT} WHERE id = ?", (rule_id,))


def list_rules(container: str | None, destination: str | None, action: str | None, include_expired: bool,
               limit: int, offset: int, now: float | None = None) -> tuple[list[dict[str, Any]], int]:
    now = time.time() if now is None else now
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if not include_expired:
        where.append(_ACTIVE)
        args.append(now)
    if container:
        where.append("container_pattern LIKE ? ESCAPE '\\'")
        args.append(like_pattern(container))
    if destination:
        where.append("destination_pattern LIKE ? ESCAPE '\\'")
        args.append(like_pattern(destination))
    if action:
        where.append("action = ?")
        args.append(action)
    clause = " AND ".join(where)
    with database.atomic():  # one snapshot: total agrees with the page
        total = int(_scalar(f"SELECT COUNT(*) FROM rules WHERE {clause}", args))
        rows = _rows(f"{_RULE_SELECT} WHERE {clause} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
                     [*args, limit, offset])
    return rows, total


def _find_identical(spec: RuleSpec, now: float) -> dict[str, Any] | None:
    return _one(
        f"{_RULE_SELECT} WHERE container_pattern = ? AND destination_pattern = ? AND port_pattern = ?"
        f" AND action = ? AND {_ACTIVE} ORDER BY id LIMIT 1",
        (spec.container_pattern, spec.destination_pattern, spec.port_pattern, spec.action, now),
    )


def _create_in_tx(spec: RuleSpec, now: float) -> CreateResult:
    existing = _find_identical(spec, now)
    if existing is not None:
        return CreateResult(existing, False)
    identity = (spec.container_pattern, spec.destination_pattern, spec.port_pattern, spec.action)
    replaced = _rows(
        f"{_RULE_SELECT} WHERE container_pattern = ? AND destination_pattern = ? AND port_pattern = ?"
        " AND action = ? AND expires_at IS NOT NULL AND expires_at <= ?", (*identity, now))
    if replaced:
        database.execute_sql(f"DELETE FROM rules WHERE id IN ({','.join('?' * len(replaced))})",
                             [r["id"] for r in replaced])
    cur = database.execute_sql(
        "INSERT INTO rules (container_pattern, destination_pattern, port_pattern, rule_type, action,"
        " created_at, expires_at, created_by, notes, source) VALUES (?, ?, ?, 'glob', ?, ?, ?, ?, ?, 'global')",
        (*identity[:3], spec.action, now, spec.expires_at, spec.created_by, spec.notes),
    )
    rule = get_rule(cur.lastrowid)
    assert rule is not None
    return CreateResult(rule, True, replaced)


def create_rule(spec: RuleSpec, now: float | None = None) -> CreateResult:
    now = time.time() if now is None else now
    with _write():
        return _create_in_tx(spec, now)


UPDATABLE = ("container_pattern", "destination_pattern", "port_pattern", "action", "notes", "expires_at")


def update_rule(rule_id: int, changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(before, after) for an existing rule, or None. `changes` holds validated UPDATABLE columns."""
    cols = [c for c in UPDATABLE if c in changes]
    with _write():
        before = get_rule(rule_id)
        if before is None:
            return None
        if cols:
            database.execute_sql(f"UPDATE rules SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
                                 [*(changes[c] for c in cols), rule_id])
        after = get_rule(rule_id)
    assert after is not None
    return before, after


def delete_rule(rule_id: int) -> dict[str, Any] | None:
    with _write():
        rule = get_rule(rule_id)
        if rule is not None:
            database.execute_sql("DELETE FROM rules WHERE id = ?", (rule_id,))
    return rule


def _active_ruleset(now: float) -> RuleSet:
    rows = _rows("SELECT id, container_pattern, destination_pattern, port_pattern, action, source, expires_at,"
                 f" session_id FROM rules WHERE {_ACTIVE}", (now,))
    return RuleSet((Rule.from_row(r) for r in rows), skip_invalid=True)


@dataclass
class IngestResult:
    imported: list[dict[str, Any]]
    skipped: int
    replaced: list[dict[str, Any]]
    cleaned: list[tuple[int, dict[str, Any]]]  # (pending id, the allow rule now covering it)
    cleaned_keys: list[Key]


def ingest_rules(specs: Sequence[RuleSpec], now: float | None = None) -> IngestResult:
    """Create every rule not already active (one transaction), then drop pending entries an allow covers."""
    now = time.time() if now is None else now
    imported: list[dict[str, Any]] = []
    replaced: list[dict[str, Any]] = []
    skipped = 0
    keys: list[Key] = []
    cleaned: list[tuple[int, dict[str, Any]]] = []
    with _write():
        for spec in specs:
            res = _create_in_tx(spec, now)
            if res.created:
                imported.append(res.rule)
                replaced.extend(res.replaced)
            else:
                skipped += 1
        if imported:
            rules = _active_ruleset(now)
            by_id = {r["id"]: r for r in imported}
            covered = []
            for row in _rows(_PENDING_SELECT):
                d = rules.decide(row["container_name"], row["destination_host"], int(row["destination_port"]),
                                 resolved_hostname=row["resolved_hostname"], now=now)
                if d.allowed and d.rule is not None:
                    covered.append(row)
                    rule = by_id.get(d.rule.id) or get_rule(d.rule.id)
                    if rule is not None:
                        cleaned.append((int(row["id"]), rule))
            keys = _delete_pending(covered)
    return IngestResult(imported, skipped, replaced, cleaned, keys)


# --------------------------------------------------------------------------- pending


def get_pending(pending_id: int) -> dict[str, Any] | None:
    return _one(f"{_PENDING_SELECT} WHERE id = ?", (pending_id,))


def _pending_filter(container: str | None, destination: str | None) -> tuple[str, list[Any]]:
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if container:
        where.append("container_name LIKE ? ESCAPE '\\'")
        args.append(like_pattern(container))
    if destination:
        where.append("(destination_host LIKE ? ESCAPE '\\' OR resolved_hostname LIKE ? ESCAPE '\\')")
        args.extend([like_pattern(destination)] * 2)
    return " AND ".join(where), args


def list_pending(container: str | None, destination: str | None, limit: int,
                 offset: int) -> tuple[list[dict[str, Any]], int]:
    """Groups of rows sharing (container, resolved-or-raw host, port), newest last_seen first.

    Each group is its latest row with attempts summed, the earliest first_seen and `hosts`
    (every raw host in the group, to count the connections held for any of them)."""
    clause, args = _pending_filter(container, destination)
    part = f"PARTITION BY container_name, {_GROUP_HOST}, destination_port"
    with database.atomic():
        total = int(_scalar(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM pending WHERE {clause}"
            f" GROUP BY container_name, {_GROUP_HOST}, destination_port)", args))
        rows = _rows(
            "SELECT id, container_name, container_id, destination_host, destination_port, resolved_hostname,"
            " first_seen, last_seen, attempt_count, hosts FROM ("
            "  SELECT id, container_name, container_id, destination_host, destination_port, resolved_hostname,"
            "   last_seen, MIN(first_seen) OVER w AS first_seen, SUM(attempt_count) OVER w AS attempt_count,"
            "   group_concat(destination_host, char(31)) OVER w AS hosts,"
            f"   ROW_NUMBER() OVER ({part} ORDER BY last_seen DESC, id DESC) AS rn"
            f"  FROM pending WHERE {clause} WINDOW w AS ({part}))"
            " WHERE rn = 1 ORDER BY last_seen DESC, id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset])
    for row in rows:
        row["hosts"] = sorted(set((row["hosts"] or "").split("\x1f")))
    return rows, total


def pending_count() -> int:
    return int(_scalar(f"SELECT COUNT(*) FROM (SELECT 1 FROM pending"
                       f" GROUP BY container_name, {_GROUP_HOST}, destination_port)"))


def _group_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row and its siblings: same container and port, same resolved-or-raw host."""
    host = row["resolved_hostname"] or row["destination_host"]
    return _rows(f"{_PENDING_SELECT} WHERE container_name = ? AND destination_port = ? AND {_GROUP_HOST} = ?",
                 (row["container_name"], row["destination_port"], host))


def _delete_pending(rows: Iterable[dict[str, Any]]) -> list[Key]:
    rows = list(rows)
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    for i in range(0, len(ids), 500):  # stay far below SQLite's bound-parameter limit
        chunk = ids[i:i + 500]
        database.execute_sql(f"DELETE FROM pending WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    return [(r["container_name"], r["destination_host"], int(r["destination_port"])) for r in rows]


@dataclass
class PendingDecision:
    pending_id: int
    rule: dict[str, Any]
    created: bool
    replaced: list[dict[str, Any]]
    keys: list[Key]  # held-connection keys of every pending row removed


def _decide_in_tx(row: dict[str, Any], action: str, scope: str, expires_at: float | None, notes: str | None,
                  created_by: str, now: float) -> PendingDecision:
    host = row["resolved_hostname"] or row["destination_host"]
    try:
        container_p, dest_p, port_p = scope_patterns(scope, row["container_name"], host, row["destination_port"])
        port_p = validate_port_pattern(port_p)
    except ValueError as exc:
        raise InvalidInput(f"pending {row['id']}: {exc}") from None
    res = _create_in_tx(RuleSpec(container_p, dest_p, port_p, action, expires_at, notes, created_by), now)
    keys = _delete_pending(_group_of(row))
    return PendingDecision(int(row["id"]), res.rule, res.created, res.replaced, keys)


def decide_pending(pending_id: int, action: str, scope: str, expires_at: float | None, notes: str | None,
                   created_by: str = "api", now: float | None = None) -> PendingDecision | None:
    """Turn a pending entry into a rule (an identical active one is reused) and remove its group."""
    now = time.time() if now is None else now
    with _write():
        row = get_pending(pending_id)
        if row is None:
            return None
        return _decide_in_tx(row, action, scope, expires_at, notes, created_by, now)


def bulk_decide(pending_ids: Sequence[int], action: str, scope: str, expires_at: float | None,
                notes: str | None, created_by: str = "api",
                now: float | None = None) -> tuple[list[PendingDecision], list[int]]:
    """decide_pending for many ids in one transaction; ids already removed as siblings count as done."""
    now = time.time() if now is None else now
    decisions: list[PendingDecision] = []
    not_found: list[int] = []
    gone: set[int] = set()
    with _write():
        for pid in pending_ids:
            row = get_pending(pid)
            if row is None:
                if pid not in gone:
                    not_found.append(pid)
                continue
            before = {r["id"] for r in _group_of(row)}
            decisions.append(_decide_in_tx(row, action, scope, expires_at, notes, created_by, now))
            gone |= before
    return decisions, not_found


def dismiss_pending(pending_id: int) -> list[Key] | None:
    """Remove the entry and its siblings without a rule; None when the id is unknown."""
    with _write():
        row = get_pending(pending_id)
        if row is None:
            return None
        return _delete_pending(_group_of(row))


def bulk_dismiss(pending_ids: Sequence[int]) -> tuple[list[int], list[Key], list[int]]:
    """(removed ids, held-connection keys, unknown ids)."""
    removed: list[int] = []
    keys: list[Key] = []
    not_found: list[int] = []
    gone: set[int] = set()
    with _write():
        for pid in pending_ids:
            row = get_pending(pid)
            if row is None:
                if pid in gone:
                    removed.append(pid)
                else:
                    not_found.append(pid)
                continue
            group = _group_of(row)
            gone |= {r["id"] for r in group}
            keys.extend(_delete_pending(group))
            removed.append(pid)
    return removed, keys, not_found


# --------------------------------------------------------------------------- logs


@dataclass(frozen=True)
class LogFilter:
    container: str | None = None
    destination: str | None = None
    result: str | None = None
    from_ts: float | None = None
    to_ts: float | None = None


def _log_where(f: LogFilter, alias: str = "") -> tuple[str, list[Any]]:
    a = f"{alias}." if alias else ""
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if f.container:
        where.append(f"{a}container_name = ?")  # exact: served by the (container_name, timestamp) index
        args.append(f.container)
    if f.destination:
        where.append(f"({a}destination_host LIKE ? ESCAPE '\\' OR {a}resolved_hostname LIKE ? ESCAPE '\\')")
        args.extend([like_pattern(f.destination)] * 2)
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


def _log_page(f: LogFilter, limit: int, offset: int) -> list[dict[str, Any]]:
    clause, args = _log_where(f, "l")
    cols = ", ".join(f"l.{c}" for c in LOG_COLUMNS)
    return _rows(
        f"SELECT {cols}, CASE WHEN r.id IS NULL THEN NULL ELSE r.container_pattern || ' → ' ||"
        " r.destination_pattern || ':' || COALESCE(NULLIF(r.port_pattern, ''), '*') END AS rule_summary"
        f" FROM logs l LEFT JOIN rules r ON r.id = l.rule_id WHERE {clause}"
        " ORDER BY l.timestamp DESC, l.id DESC LIMIT ? OFFSET ?", [*args, limit, offset])


def _log_total(f: LogFilter) -> int:
    """The exact number of rows the filter matches. Filters on container/result only (or none) sum
    the trigger-maintained log_counts (migration 3); others count the matching rows."""
    if f.destination is None and f.from_ts is None and f.to_ts is None:
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if f.container:
            where.append("container_name = ?")
            args.append(f.container)
        if f.result:
            where.append("result = ?")
            args.append(f.result)
        return int(_scalar(f"SELECT COALESCE(SUM(n), 0) FROM log_counts WHERE {' AND '.join(where)}", args))
    clause, args = _log_where(f)
    return int(_scalar(f"SELECT COUNT(*) FROM logs WHERE {clause}", args))


def list_logs(f: LogFilter, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    with database.atomic():  # one snapshot: the total and the page agree
        total = _log_total(f)
        rows = _log_page(f, limit, offset)
    return rows, total


BUCKETS = {"hour": (3600.0, 0.0), "day": (86400.0, 0.0), "week": (7 * 86400.0, 4 * 86400.0)}  # weeks start Monday
MAX_FILLED_BUCKETS = 2000  # beyond this many empty slots the timeline lists only non-empty buckets


def bucket_start(ts: float, size: float, origin: float) -> float:
    return (ts - origin) // size * size + origin


def _timeline(from_ts: float, to_ts: float, group_by: str) -> list[dict[str, Any]]:
    size, origin = BUCKETS[group_by]
    rows = database.execute_sql(
        "SELECT CAST((timestamp - ?) / ? AS INTEGER) AS b, SUM(result = 'allowed'), SUM(result = 'blocked')"
        " FROM logs WHERE timestamp >= ? AND timestamp <= ? GROUP BY b ORDER BY b",
        (origin, size, from_ts, to_ts)).fetchall()
    counts = {float(b) * size + origin: (int(a or 0), int(k or 0)) for b, a, k in rows}
    first, last = bucket_start(from_ts, size, origin), bucket_start(to_ts, size, origin)
    if (last - first) / size <= MAX_FILLED_BUCKETS:
        filled = {first + i * size for i in range(int(round((last - first) / size)) + 1)}
        slots = sorted(filled | set(counts))  # the union: a rounding edge must never drop counted traffic
    else:
        slots = sorted(counts)
    return [{"ts": s, "allowed": counts.get(s, (0, 0))[0], "blocked": counts.get(s, (0, 0))[1]} for s in slots]


def log_stats(from_ts: float, to_ts: float, group_by: str, top_containers: int = 20,
              top_destinations: int = 10, recent_limit: int = 0) -> dict[str, Any]:
    """Totals, per-container counts, top blocked destinations, timeline (and the latest entries)."""
    rng = (from_ts, to_ts)
    with database.atomic():  # one snapshot for every aggregate
        total, allowed, blocked = database.execute_sql(
            "SELECT COUNT(*), COALESCE(SUM(result = 'allowed'), 0), COALESCE(SUM(result = 'blocked'), 0)"
            " FROM logs WHERE timestamp >= ? AND timestamp <= ?", rng).fetchone()
        containers = _rows(
            "SELECT container_name AS name, COUNT(*) AS total, SUM(result = 'allowed') AS allowed,"
            " SUM(result = 'blocked') AS blocked FROM logs WHERE timestamp >= ? AND timestamp <= ?"
            " GROUP BY container_name ORDER BY total DESC, name LIMIT ?", (*rng, top_containers))
        destinations = _rows(
            "SELECT destination_host AS host, destination_port AS port, MAX(resolved_hostname) AS resolved_hostname,"
            " COUNT(*) AS count, json_group_array(DISTINCT container_name) AS containers"
            " FROM logs WHERE result = 'blocked' AND timestamp >= ? AND timestamp <= ?"
            " GROUP BY destination_host, destination_port ORDER BY count DESC, host, port LIMIT ?",
            (*rng, top_destinations))
        timeline = _timeline(from_ts, to_ts, group_by)
        recent = _log_page(LogFilter(from_ts=from_ts, to_ts=to_ts), recent_limit, 0) if recent_limit else []
    for c in containers:
        c["allowed"], c["blocked"] = int(c["allowed"] or 0), int(c["blocked"] or 0)
        c["percentage"] = round(c["total"] * 100.0 / total, 2) if total else 0.0
    for d in destinations:
        d["containers"] = sorted(orjson.loads(d["containers"] or "[]"))
    return {"total": int(total), "allowed": int(allowed), "blocked": int(blocked), "containers": containers,
            "destinations": destinations, "timeline": timeline, "recent": recent}


# --------------------------------------------------------------------------- settings


def read_settings() -> dict[str, Any]:
    """Every stored setting, JSON-decoded; a value that does not decode is skipped."""
    return settings_table.read_all()


def write_settings(changes: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Upsert each key as a JSON value; returns every stored setting afterwards."""
    with _write():
        settings_table.write(changes, now)
        return settings_table.read_all()
