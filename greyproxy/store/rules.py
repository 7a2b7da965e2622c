"""The `rules` table (migration 1): its columns, the recorder's hit-count update, and the proxy's and
the API's queries (through the peewee model)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import peewee as pw

from .db import database
from .models import Rule, meta_value

if TYPE_CHECKING:
    from greyproxy.policy import RuleSet

COLUMNS = (
    "id",
    "container_pattern",
    "destination_pattern",
    "port_pattern",
    "rule_type",
    "action",
    "created_at",
    "expires_at",
    "last_used_at",
    "created_by",
    "notes",
    "source",
    "session_id",
    "hit_count",
)

# Inside the recorder's batch transaction (its raw sqlite3 cursor).
GET = f"SELECT {', '.join(COLUMNS)} FROM rules WHERE id = ?"
ADD_HITS = "UPDATE rules SET hit_count = hit_count + ?, last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?"


def snapshot() -> tuple[int, list[tuple[Any, ...]]]:
    """(rules_version, the rows the proxy's rule set needs) in one read transaction, so they match:
    (id, container_pattern, destination_pattern, port_pattern, action, source, expires_at, session_id)."""
    with database.atomic():
        version = meta_value("rules_version")
        query = Rule.select(
            Rule.id,
            Rule.container_pattern,
            Rule.destination_pattern,
            Rule.port_pattern,
            Rule.action,
            Rule.source,
            Rule.expires_at,
            Rule.session_id,
        ).tuples()
        rows = list(cast(Iterable[tuple[Any, ...]], query))  # .tuples(): peewee's types still say models
    return version, rows


def build(rows: Iterable[Sequence[Any]], builtins: bool = True) -> RuleSet:
    """The RuleSet the proxy decides with, from `snapshot()` rows (local, or the recorder's over the
    bus): the proxy's RuleLoader and GET /api/rules/explain both build it here, so both judge the
    same rules. `builtins` False leaves the seeded loopback allows out (greyproxy.builtinRules);
    malformed rows are left out (RuleSet.rejected)."""
    from greyproxy.policy import Rule as PolicyRule
    from greyproxy.policy import RuleSet

    rules = [
        PolicyRule(
            id=r[0],
            container_pattern=r[1],
            destination_pattern=r[2],
            port_pattern=r[3] or "*",
            action=r[4],
            source=r[5] or "global",
            expires_at=r[6],
            session_id=r[7],
        )
        for r in rows
        if builtins or r[5] != "builtin"
    ]
    return RuleSet(rules, skip_invalid=True)


def rule_set(builtins: bool = True) -> tuple[int, RuleSet]:
    """(rules_version, the RuleSet) from this database, in one read transaction."""
    version, rows = snapshot()
    return version, build(rows, builtins)


# --------------------------------------------------------------------------- the API's queries
# Rows come back as dicts of the stored values, keyed by COLUMNS.


def _active(now: float) -> pw.Expression:
    return Rule.expires_at.is_null() | (Rule.expires_at > now)


def _dicts(query: pw.ModelSelect[Any]) -> list[dict[str, Any]]:
    return list(cast(Iterable[dict[str, Any]], query.dicts()))


def get(rule_id: int) -> dict[str, Any] | None:
    return cast("dict[str, Any] | None", Rule.select().where(Rule.id == rule_id).dicts().first())


def get_many(rule_ids: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(0, len(rule_ids), 500):  # within SQLite's bound-parameter limit
        out += _dicts(Rule.select().where(Rule.id.in_(rule_ids[i : i + 500])))
    return out


def list_page(
    container: str | None,
    destination: str | None,
    action: str | None,
    include_expired: bool,
    limit: int,
    offset: int,
    now: float,
) -> tuple[list[dict[str, Any]], int]:
    """Newest first, with the exact total of the filter (one snapshot)."""
    query = Rule.select()
    if not include_expired:
        query = query.where(_active(now))
    if container:
        query = query.where(Rule.container_pattern.contains(container))  # LIKE, its wildcards escaped
    if destination:
        query = query.where(Rule.destination_pattern.contains(destination))
    if action:
        query = query.where(Rule.action == action)
    with database.atomic():  # one snapshot: total agrees with the page
        total = query.count()
        rows = _dicts(query.order_by(Rule.created_at.desc(), Rule.id.desc()).limit(limit).offset(offset))
    return rows, total


def _identical(container_p: str, dest_p: str, port_p: str, action: str) -> pw.Expression:
    return (
        (Rule.container_pattern == container_p)
        & (Rule.destination_pattern == dest_p)
        & (Rule.port_pattern == port_p)
        & (Rule.action == action)
    )


def find_active(
    container_p: str, dest_p: str, port_p: str, action: str, now: float, exclude_id: int | None = None
) -> dict[str, Any] | None:
    """The oldest active rule with exactly these patterns and action (other than `exclude_id`), not
    a builtin one: those may be switched off (greyproxy.builtinRules: false), and a user's own rule
    must then stand on its own, not be answered with the ignored builtin (outside tester C)."""
    where = _identical(container_p, dest_p, port_p, action) & _active(now) & (Rule.source != "builtin")
    if exclude_id is not None:
        where &= Rule.id != exclude_id
    query = Rule.select().where(where).order_by(Rule.id)
    return cast("dict[str, Any] | None", query.dicts().first())


def find_expired(container_p: str, dest_p: str, port_p: str, action: str, now: float) -> list[dict[str, Any]]:
    """Expired rules with exactly these patterns and action (the unique index would refuse a new twin)."""
    return _dicts(
        Rule.select().where(
            _identical(container_p, dest_p, port_p, action) & Rule.expires_at.is_null(False) & (Rule.expires_at <= now)
        )
    )


def insert(
    container_p: str,
    dest_p: str,
    port_p: str,
    action: str,
    created_at: float,
    expires_at: float | None,
    created_by: str,
    notes: str | None,
) -> int:
    return int(
        Rule.insert(
            container_pattern=container_p,
            destination_pattern=dest_p,
            port_pattern=port_p,
            rule_type="glob",
            action=action,
            created_at=created_at,
            expires_at=expires_at,
            created_by=created_by,
            notes=notes,
            source="global",
        ).execute()
    )


def update(rule_id: int, changes: dict[str, Any]) -> None:
    """Set the given columns (validated names) of one rule."""
    if changes:
        Rule.update({getattr(Rule, c): v for c, v in changes.items()}).where(Rule.id == rule_id).execute()


def delete(rule_ids: list[int]) -> None:
    for i in range(0, len(rule_ids), 500):  # stay far below SQLite's bound-parameter limit
        Rule.delete().where(Rule.id.in_(rule_ids[i : i + 500])).execute()


def active_rows(now: float) -> list[dict[str, Any]]:
    """What a RuleSet needs of every active rule."""
    return _dicts(
        Rule.select(
            Rule.id,
            Rule.container_pattern,
            Rule.destination_pattern,
            Rule.port_pattern,
            Rule.action,
            Rule.source,
            Rule.expires_at,
            Rule.session_id,
        ).where(_active(now))
    )
