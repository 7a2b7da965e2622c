"""The `pending` table (migration 1): its columns, and the SQL of a sighting (the recorder's upsert)."""

from __future__ import annotations

COLUMNS = ("id", "container_name", "container_id", "destination_host", "destination_port", "resolved_hostname",
           "first_seen", "last_seen", "attempt_count")

# A sighting runs inside the recorder's batch transaction on its raw sqlite3 cursor (peewee's
# connection is per thread and not the one holding the batch's IMMEDIATE transaction).
FIND = "SELECT id FROM pending WHERE container_name = ? AND destination_host = ? AND destination_port = ?"
# Another IP of the same named host: the newest entry under that name takes the sighting.
FIND_SIBLING = ("SELECT id FROM pending WHERE container_name = ? AND resolved_hostname = ? AND destination_port = ?"
                " ORDER BY last_seen DESC LIMIT 1")
INSERT = ("INSERT INTO pending (container_name, container_id, destination_host, destination_port,"
          " resolved_hostname, first_seen, last_seen, attempt_count) VALUES (?, ?, ?, ?, ?, ?, ?, 1)")
BUMP = ("UPDATE pending SET last_seen = MAX(last_seen, ?), attempt_count = attempt_count + 1,"
        " resolved_hostname = COALESCE(resolved_hostname, ?) WHERE id = ?")
GET = f"SELECT {', '.join(COLUMNS)} FROM pending WHERE id = ?"


def count() -> int:
    """How many entries the pending queue holds."""
    from .models import Pending

    return int(Pending.select().count())
