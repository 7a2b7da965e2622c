"""The `rules` table (migration 1): its columns, and the recorder's hit-count update."""

from __future__ import annotations

COLUMNS = ("id", "container_pattern", "destination_pattern", "port_pattern", "rule_type", "action", "created_at",
           "expires_at", "last_used_at", "created_by", "notes", "source", "session_id", "hit_count")

# Inside the recorder's batch transaction (its raw sqlite3 cursor).
ADD_HITS = ("UPDATE rules SET hit_count = hit_count + ?, last_used_at = MAX(COALESCE(last_used_at, 0), ?)"
            " WHERE id = ?")
