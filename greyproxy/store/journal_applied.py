"""Which journal records the recorder has applied: `journal_ranges` (migration 9), id ranges per
writer, one row per batch; and `journal_applied` (migration 1), one row per record id, written by
recorders before migration 9 and still read while it holds rows (both kept a day)."""

from __future__ import annotations

import re

# A record id is `<writer>-<sequence in lower-case hex>` (bus/journal.py); the ranges of one writer
# never overlap, so those overlapping [lo, hi] are the last one starting at or before lo and any
# starting inside it.
RANGES_OVERLAPPING = (
    "SELECT lo, hi FROM journal_ranges WHERE writer = ?1 AND lo <= ?3 AND lo >= COALESCE("
    "(SELECT lo FROM journal_ranges WHERE writer = ?1 AND lo <= ?2 ORDER BY lo DESC LIMIT 1), ?2)"
)
MARK_RANGE = "INSERT INTO journal_ranges (writer, lo, hi, applied_at) VALUES (?, ?, ?, ?)"

ANY_LEGACY = "SELECT 1 FROM journal_applied LIMIT 1"
MARK = "INSERT INTO journal_applied (record_id, applied_at) VALUES (?, ?)"


def select_applied(n: int) -> str:
    """Which of n record ids are applied already (n bound parameters)."""
    return f"SELECT record_id FROM journal_applied WHERE record_id IN ({','.join('?' * n)})"


_ID = re.compile(r"(.*)-([1-9a-f][0-9a-f]*|0)", re.S)  # canonical hex only: '0a' and 'a' must not be one record


def writer_seq(record_id: str) -> tuple[str, int]:
    """(writer, sequence) of a record id; an id of another form is a writer of its own (sequence 0)."""
    m = _ID.fullmatch(record_id)
    return (m[1], int(m[2], 16)) if m is not None else (record_id, 0)
