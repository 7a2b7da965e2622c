"""The `rules` table (migration 1): its columns, and the recorder's hit-count update."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

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
