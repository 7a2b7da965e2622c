"""What the per-table modules share for their hand-written SQL: rows as dicts, LIKE escaping, write transactions.

Every function runs on peewee's connection for this thread (never on an event loop: the API
calls them through its thread pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .db import database


def rows(sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cur = database.execute_sql(sql, tuple(args))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def one(sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
    found = rows(sql, args)
    return found[0] if found else None


def scalar(sql: str, args: Sequence[Any] = ()) -> Any:
    row = database.execute_sql(sql, tuple(args)).fetchone()
    return row[0] if row else None


def execute(sql: str, args: Sequence[Any] = ()) -> Any:
    """Run one statement; the cursor (for lastrowid)."""
    return database.execute_sql(sql, tuple(args))


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` as a plain substring (its % and _ taken literally)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def write_transaction():  # noqa: ANN201 - peewee's context manager
    """IMMEDIATE: take SQLite's write lock at BEGIN, so check-then-insert cannot race another writer."""
    return database.atomic("IMMEDIATE")


def read_transaction():  # noqa: ANN201 - peewee's context manager
    """One snapshot for several reads (a total that agrees with its page)."""
    return database.atomic()
