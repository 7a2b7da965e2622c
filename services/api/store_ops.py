"""Synchronous database work of the REST areas; every function runs in the API's thread pool.

The SQL itself lives with each table under greyproxy/store/ (rules.py, pending.py, logs.py,
settings.py); here are the API's operations made of it: a rule that reuses an identical active
one, a decision that turns a pending group into a rule, an ingest that cleans the queue.

Resources call these through `await ctx.db(fn, ...)`, never on the event loop. Writes run in
one IMMEDIATE transaction each (the write lock is taken up front, so two API threads cannot
both read "no identical rule" and insert twins). Rows come back as plain dicts with stored
values (epoch floats); greyproxy.shapes turns them into the JSON of the SPEC.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from greyproxy.policy import Rule, RuleSet, scope_patterns, validate_port_pattern
from greyproxy.store import sql
from greyproxy.store.logs import (  # noqa: F401 - the API's logs queries, with their table
    BUCKETS,
    MAX_FILLED_BUCKETS,
    LogFilter,
    bucket_start,
    list_logs,
    log_stats,
)
from greyproxy.store import pending as pending_table
from greyproxy.store import rules as rules_table
from greyproxy.store import settings as settings_table

Key = pending_table.Key  # (container, host, port): how the proxy names a held connection

like_pattern = sql.like_pattern  # (services/api/transactions.py imports it from here)


class InvalidInput(ValueError):
    """Input that only turns out bad once stored rows are read (answered as 400)."""


class DuplicateRule(ValueError):
    """A change would make a rule identical to another active one (answered as 409)."""

    def __init__(self, existing: dict[str, Any]) -> None:
        super().__init__(f"rule {existing['id']} has these patterns and action already")
        self.existing = existing


def _write():  # noqa: ANN202 - peewee's context manager
    return sql.write_transaction()


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


# (pending id, the rule that now decides it) of each pending entry a new or changed rule withdrew
Cleaned = list[tuple[int, dict[str, Any]]]


@dataclass
class CreateResult:
    rule: dict[str, Any]
    created: bool
    replaced: list[dict[str, Any]] = field(default_factory=list)  # expired twins deleted to make room
    cleaned: Cleaned = field(default_factory=list)  # pending entries the new rule decides, removed


def get_rule(rule_id: int) -> dict[str, Any] | None:
    return rules_table.get(rule_id)


def list_rules(
    container: str | None,
    destination: str | None,
    action: str | None,
    include_expired: bool,
    limit: int,
    offset: int,
    now: float | None = None,
) -> tuple[list[dict[str, Any]], int]:
    now = time.time() if now is None else now
    return rules_table.list_page(container, destination, action, include_expired, limit, offset, now)


def _create_in_tx(spec: RuleSpec, now: float) -> CreateResult:
    identity = (spec.container_pattern, spec.destination_pattern, spec.port_pattern, spec.action)
    existing = rules_table.find_active(*identity, now)
    if existing is not None:
        return CreateResult(existing, False)
    replaced = rules_table.find_expired(*identity, now)
    if replaced:
        rules_table.delete([r["id"] for r in replaced])
    rule = get_rule(rules_table.insert(*identity, now, spec.expires_at, spec.created_by, spec.notes))
    assert rule is not None
    return CreateResult(rule, True, replaced)


def create_rule(spec: RuleSpec, now: float | None = None) -> CreateResult:
    """Create the rule (or reuse an identical active one); a new rule withdraws the pending entries
    it now decides (`cleaned`)."""
    now = time.time() if now is None else now
    with _write():
        res = _create_in_tx(spec, now)
        if res.created:
            res.cleaned, _ = _clean_decided([res.rule], now)
        return res


UPDATABLE = ("container_pattern", "destination_pattern", "port_pattern", "action", "notes", "expires_at")


_IDENTITY = ("container_pattern", "destination_pattern", "port_pattern", "action")  # what makes rules identical


def _active_row(rule: dict[str, Any], now: float) -> bool:
    return rule["expires_at"] is None or rule["expires_at"] > now


@dataclass
class UpdateResult:
    before: dict[str, Any]
    after: dict[str, Any]
    cleaned: Cleaned = field(default_factory=list)  # pending entries the changed rule now decides, removed


def update_rule(rule_id: int, changes: dict[str, Any], now: float | None = None) -> UpdateResult | None:
    """The rule before and after the change, or None for an unknown id. `changes` holds validated
    UPDATABLE columns. DuplicateRule when the rule would become identical (SPEC §2.4: same three
    patterns and action) to another active rule: POST reuses such a rule instead of making a twin,
    and a PUT must not make one either. A changed rule withdraws the pending entries it now decides."""
    now = time.time() if now is None else now
    cols = [c for c in UPDATABLE if c in changes]
    with _write():
        before = get_rule(rule_id)
        if before is None:
            return None
        merged = {**before, **{c: changes[c] for c in cols}}
        changed = any(merged[c] != before[c] for c in _IDENTITY) or not _active_row(before, now)
        if changed and _active_row(merged, now):  # (notes alone may still be edited on an older twin)
            c_p, d_p, p_p, action = (merged[c] for c in _IDENTITY)
            twin = rules_table.find_active(c_p, d_p, p_p, action, now, exclude_id=rule_id)
            if twin is not None:
                raise DuplicateRule(twin)
        rules_table.update(rule_id, {c: changes[c] for c in cols})
        after = get_rule(rule_id)
        assert after is not None
        cleaned: Cleaned = []
        if after != before:
            cleaned, _ = _clean_decided([after], now)
    return UpdateResult(before, after, cleaned)


def delete_rule(rule_id: int) -> dict[str, Any] | None:
    with _write():
        rule = get_rule(rule_id)
        if rule is not None:
            rules_table.delete([rule_id])
    return rule


def _active_ruleset(now: float, builtins: bool = True) -> RuleSet:
    """The active rules as the proxy judges with them (`builtins` False: greyproxy.builtinRules off)."""
    rows = rules_table.active_rows(now)
    return RuleSet((Rule.from_row(r) for r in rows if builtins or r["source"] != "builtin"), skip_invalid=True)


@dataclass
class IngestResult:
    imported: list[dict[str, Any]]
    skipped: int
    replaced: list[dict[str, Any]]
    cleaned: list[tuple[int, dict[str, Any]]]  # (pending id, the allow rule now covering it)
    cleaned_keys: list[Key]


def _clean_decided(new_rules: Sequence[dict[str, Any]], now: float, builtins: bool = True) -> tuple[Cleaned, list[Key]]:
    """Delete the pending entries one of `new_rules` (just created or changed) decides and the
    rules as a whole now decide the same way: the proxy's reload releases (allow) or refuses (deny)
    their held connections, so they are decided and leave the queue (SPEC §2.4's ingest cleanup;
    §11: entries leave when decided anywhere). An entry another rule decides otherwise stays.
    `builtins`: greyproxy.builtinRules, as the proxy judges (a builtin rule never beats a global
    one that matches, so it changes nothing for the API's rules). Inside the caller's transaction."""
    mine_set = RuleSet((Rule.from_row(r) for r in new_rules), skip_invalid=True)
    if not len(mine_set):
        return [], []
    by_id = {r["id"]: r for r in new_rules}
    candidates: list[tuple[dict[str, Any], Rule]] = []
    for row in pending_table.all_rows():
        where = (row["container_name"], row["destination_host"], int(row["destination_port"]))
        mine = mine_set.decide(*where, resolved_hostname=row["resolved_hostname"], now=now)
        if mine.rule is not None:
            candidates.append((row, mine.rule))
    if not candidates:
        return [], []  # the common case: no need to build the whole rule set
    rules = _active_ruleset(now, builtins)
    covered: list[dict[str, Any]] = []
    cleaned: Cleaned = []
    for row, rule in candidates:
        where = (row["container_name"], row["destination_host"], int(row["destination_port"]))
        if rules.decide(*where, resolved_hostname=row["resolved_hostname"], now=now).action != rule.action:
            continue
        name = row["resolved_hostname"]
        if name and name != row["destination_host"]:
            # The entry stands for its name's group (SPEC §3.1: another IP of the name bumps it and
            # has no row of its own): it leaves only when the name is decided, else a rule for one
            # IP would take the entry of the others' held connections with it (nobody could decide
            # them). A rule naming one IP releases that IP's connections; the entry stays.
            if rules.decide(where[0], name, where[2], now=now).action != rule.action:
                continue
        covered.append(row)
        cleaned.append((int(row["id"]), by_id[rule.id]))
    return cleaned, _delete_pending(covered)


def ingest_rules(specs: Sequence[RuleSpec], now: float | None = None, builtins: bool = True) -> IngestResult:
    """Create every rule not already active (one transaction), then drop the pending entries an
    imported allow rule covers and the rules as a whole now allow (SPEC §2.4; `builtins`:
    greyproxy.builtinRules, as the proxy judges). An entry another rule covers stays: its held
    connections were not released by this import."""
    now = time.time() if now is None else now
    imported: list[dict[str, Any]] = []
    replaced: list[dict[str, Any]] = []
    skipped = 0
    keys: list[Key] = []
    cleaned: Cleaned = []
    with _write():
        for spec in specs:
            res = _create_in_tx(spec, now)
            if res.created:
                imported.append(res.rule)
                replaced.extend(res.replaced)
            else:
                skipped += 1
        allows = [r for r in imported if r["action"] == "allow"]
        if allows:
            cleaned, keys = _clean_decided(allows, now, builtins)
    return IngestResult(imported, skipped, replaced, cleaned, keys)


# --------------------------------------------------------------------------- pending


def get_pending(pending_id: int) -> dict[str, Any] | None:
    return pending_table.get(pending_id)


def list_pending(
    container: str | None, destination: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """Groups of rows sharing (container, resolved-or-raw host, port), newest last_seen first."""
    return pending_table.list_groups(container, destination, limit, offset)


def pending_count() -> int:
    return pending_table.group_count()


_group_of = pending_table.group_of
_delete_pending = pending_table.delete_rows


def _delete_group(row: dict[str, Any]) -> list[Key]:
    """Delete the row's group; the keys of the connections held for it: every row's, and the
    group's own (container, resolved-or-raw host, port), which the proxy takes for the connections
    held under that name too: another IP of the same host bumps the entry (SPEC §3.1), so a
    connection held for it has no row of its own (`Gate.block_holds`)."""
    keys = _delete_pending(_group_of(row))
    keys.append(
        (row["container_name"], row["resolved_hostname"] or row["destination_host"], int(row["destination_port"]))
    )
    return keys


@dataclass
class PendingDecision:
    pending_id: int
    rule: dict[str, Any]
    created: bool
    replaced: list[dict[str, Any]]
    keys: list[Key]  # held-connection keys of every pending row removed, and the group's (`_delete_group`)
    cleaned: Cleaned = field(default_factory=list)  # other entries the new rule decides, removed too


def _decide_in_tx(
    row: dict[str, Any],
    action: str,
    scope: str,
    expires_at: float | None,
    notes: str | None,
    created_by: str,
    now: float,
) -> PendingDecision:
    host = row["resolved_hostname"] or row["destination_host"]
    try:
        container_p, dest_p, port_p = scope_patterns(scope, row["container_name"], host, row["destination_port"])
        port_p = validate_port_pattern(port_p)
    except ValueError as exc:
        raise InvalidInput(f"pending {row['id']}: {exc}") from None
    res = _create_in_tx(RuleSpec(container_p, dest_p, port_p, action, expires_at, notes, created_by), now)
    keys = _delete_group(row)
    cleaned: Cleaned = []
    if res.created:  # a wider scope (all_containers, any_port...) decides other entries too
        cleaned, more = _clean_decided([res.rule], now)
        keys += more
    return PendingDecision(int(row["id"]), res.rule, res.created, res.replaced, keys, cleaned)


def decide_pending(
    pending_id: int,
    action: str,
    scope: str,
    expires_at: float | None,
    notes: str | None,
    created_by: str = "api",
    now: float | None = None,
) -> PendingDecision | None:
    """Turn a pending entry into a rule (an identical active one is reused) and remove its group."""
    now = time.time() if now is None else now
    with _write():
        row = get_pending(pending_id)
        if row is None:
            return None
        return _decide_in_tx(row, action, scope, expires_at, notes, created_by, now)


def bulk_decide(
    pending_ids: Sequence[int],
    action: str,
    scope: str,
    expires_at: float | None,
    notes: str | None,
    created_by: str = "api",
    now: float | None = None,
) -> tuple[list[PendingDecision], list[int]]:
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
            decision = _decide_in_tx(row, action, scope, expires_at, notes, created_by, now)
            decisions.append(decision)
            gone |= before | {pid for pid, _ in decision.cleaned}
    return decisions, not_found


def dismiss_pending(pending_id: int) -> list[Key] | None:
    """Remove the entry and its siblings without a rule; None when the id is unknown."""
    with _write():
        row = get_pending(pending_id)
        if row is None:
            return None
        return _delete_group(row)


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
            gone |= {r["id"] for r in _group_of(row)}
            keys.extend(_delete_group(row))
            removed.append(pid)
    return removed, keys, not_found


# --------------------------------------------------------------------------- settings


def read_settings() -> dict[str, Any]:
    """Every stored setting, JSON-decoded; a value that does not decode is skipped."""
    return settings_table.read_all()


def write_settings(changes: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Upsert each key as a JSON value; returns every stored setting afterwards."""
    with _write():
        settings_table.write(changes, now)
        return settings_table.read_all()
