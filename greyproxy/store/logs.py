"""The `logs` table (migration 1): its columns, and the SQL the recorder writes it with."""

from __future__ import annotations

COLUMNS = ("id", "timestamp", "container_name", "container_id", "destination_host", "destination_port",
           "resolved_hostname", "method", "result", "rule_id", "response_time_ms", "reason", "mitm_skip_reason")
FIELDS = COLUMNS[1:]  # what a `log` journal record fills in

# Hand-written rather than peewee's insert_many: the recorder inserts each batch's log records
# with one executemany of this statement, and bench/run.py's recorder row (records/s) is that
# loop; a peewee query object per batch costs measurably more there.
INSERT = f"INSERT INTO logs ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
