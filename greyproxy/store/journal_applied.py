"""The `journal_applied` table (migration 1): record ids the recorder has applied (kept a day)."""

from __future__ import annotations

MARK = "INSERT INTO journal_applied (record_id, applied_at) VALUES (?, ?)"


def select_applied(n: int) -> str:
    """Which of n record ids are applied already (n bound parameters)."""
    return f"SELECT record_id FROM journal_applied WHERE record_id IN ({','.join('?' * n)})"
