"""The `http_transactions` table (migration 2): its columns, and the SQL the recorder writes it with."""

from __future__ import annotations

COLUMNS = (
    "id", "timestamp", "container_name", "destination_host", "destination_port", "method", "url",
    "request_headers", "request_body", "request_body_size", "request_content_type", "status_code",
    "response_headers", "response_body", "response_body_size", "response_content_type", "duration_ms",
    "rule_id", "result", "conversation_id", "substituted_credentials", "session_id",
)
FIELDS = COLUMNS[1:]  # what a `transaction` journal record fills in
JSON_COLUMNS = ("request_headers", "response_headers", "substituted_credentials")  # stored as JSON text
BODY_COLUMNS = ("request_body", "response_body")  # left out of listings

# Hand-written rather than peewee's insert_many, as for logs: one executemany per batch in the
# recorder (bench/run.py's recorder rows), where a query object per batch costs measurably more.
INSERT = f"INSERT INTO http_transactions ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
