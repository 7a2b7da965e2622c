"""What the recorder stores does not depend on how records arrive: a batch applied as runs (the
multi-row INSERTs) writes byte for byte the rows the same records applied one at a time write, and a
refusal by the credential hook inside a run is told once (issue 18 item 1: the per-row cuts)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from bus import topics
from greyproxy.credentials.reasons import REASONS
from greyproxy.store import open_database
from services.recorder import transactions  # noqa: F401 - registers the `transaction` kind
from services.recorder.apply import apply_records

_TABLES = ("logs", "log_counts", "http_transactions", "journal_ranges")


def _tx(i: int, **extra: Any) -> dict[str, Any]:
    tx = {
        "timestamp": 1000.0 + i,
        "container_name": f"c{i % 2}",
        "destination_host": "h",
        "destination_port": "80" if i % 3 == 0 else 80,
        "method": "POST",
        "url": f"http://h/{i % 3}",
        "request_headers": {"A": ["b"]} if i % 2 else '{"A":["text"]}',
        "response_headers": None,
        "status_code": 200,
        "duration_ms": 2.5,
        "host_mismatch": i % 4 == 0,
    }
    tx.update(extra)
    return tx


def _log(i: int) -> list[Any]:  # shape 2, shorter than the columns: the rest stay null
    return [1000.0 + i, f"c{i % 2}", "", "h", 80, None, "GET", "allowed" if i % 3 else "denied", 7]


def _journal() -> list[tuple[str, str, Any]]:
    small = base64.b64encode(b'{"n": 1}').decode()
    big = base64.b64encode(b'{"messages": ["' + b"x" * 3000 + b'"]}').decode()
    recs: list[tuple[str, str, Any]] = []
    for i in range(40):
        recs.append((f"w-{2 * i + 1:x}", "log", _log(i)))
        extra: dict[str, Any] = {}
        if i % 5 == 1:
            extra = {"request_body": small, "request_body_size": 8, "request_body_charset": "utf-8"}
        elif i % 5 == 2:
            extra = {"request_body": big, "response_body": small, "response_body_size": 8}
        elif i == 8:
            extra = {"result": "blocked", "block_reason": REASONS[0], "refused_credentials": ["K"]}
        recs.append((f"w-{2 * i + 2:x}", "transaction", _tx(i, **extra)))
    return recs


def _dump(path: Path) -> dict[str, list[tuple]]:
    db = open_database(path)
    try:
        conn = db.connection()
        return {
            t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in _TABLES if t != "journal_ranges"
        }
    finally:
        db.close()


def test_runs_store_the_rows_one_at_a_time_stores(tmp_path: Path) -> None:
    journal = _journal()
    db = open_database(tmp_path / "runs.db")
    try:
        events = apply_records(db.connection(), journal)
    finally:
        db.close()
    db = open_database(tmp_path / "each.db")
    try:
        for rec in journal:
            apply_records(db.connection(), [rec])
    finally:
        db.close()
    runs, each = _dump(tmp_path / "runs.db"), _dump(tmp_path / "each.db")
    assert runs == each
    assert len(runs["logs"]) == 40 and len(runs["http_transactions"]) == 40
    # The row types too (== treats 1 and 1.0, b"x" and "x"... alike only partly: be exact).
    assert [[type(v) for v in r] for r in runs["http_transactions"]] == [
        [type(v) for v in r] for r in each["http_transactions"]
    ]
    refused = [d for t, d in events if t == topics.CREDENTIAL_REFUSED]
    assert refused == [
        {
            "transaction_id": 9,
            "container_name": "c0",
            "destination_host": "h",
            "reason": REASONS[0],
            "labels": ["K"],
            "session_id": None,
        }
    ]


def test_rows_without_the_mostly_null_columns_store_the_same(tmp_path: Path) -> None:
    """apply.Lean: statements whose rows all have the mostly-NULL columns NULL leave them out (their
    default, NULL, is stored); a statement with one row that has any of them binds them all."""
    from services.recorder.apply import LOG_LEAN
    from services.recorder.transactions import LEAN

    small = base64.b64encode(b'{"n": 1}').decode()
    recs: list[tuple[str, str, Any]] = []
    for i in range(53):  # 32 plain, 8 with one body among them, 8 plain, 5 plain (the executemany)
        extra: dict[str, Any] = {"session_id": "s1"} if i == 35 else {}
        if i == 36:
            extra = {"response_body": small, "response_body_size": 8, "response_content_type": "text/plain"}
        recs.append((f"w-{2 * i + 1:x}", "transaction", _tx(i, **extra)))
        log = _log(i) + [2.5, "r", "tls-pinned" if i == 3 else None]
        recs.append((f"w-{2 * i + 2:x}", "log", log))
    db = open_database(tmp_path / "runs.db")
    statements: list[str] = []
    try:
        conn = db.connection()
        for table, lean in (("http_transactions", LEAN), ("logs", LOG_LEAN)):  # each left-out column defaults to NULL
            defaults = {r[1]: r[4] for r in conn.execute(f"PRAGMA table_info({table})")}
            left_out = set(defaults) - set(lean.sql.partition("(")[2].partition(")")[0].split(", ")) - {"id"}
            assert left_out and all(defaults[c] is None for c in left_out), (table, left_out)
        conn.set_trace_callback(statements.append)
        apply_records(conn, recs)
    finally:
        db.close()
    db = open_database(tmp_path / "each.db")
    try:
        for rec in recs:
            apply_records(db.connection(), [rec])
    finally:
        db.close()
    runs, each = _dump(tmp_path / "runs.db"), _dump(tmp_path / "each.db")
    assert runs == each and len(runs["http_transactions"]) == 53
    assert [[type(v) for v in r] for r in runs["http_transactions"]] == [
        [type(v) for v in r] for r in each["http_transactions"]
    ]
    inserts = [s.partition(" VALUES ")[0] for s in statements if s.startswith("INSERT INTO http_transactions")]
    head = LEAN.sql.partition(" VALUES ")[0]
    # lean: the first 32, the 8 after the mixed 8, the 5 (executemany: a statement each)
    assert inserts.count(head) == 7 and len(inserts) == 8, inserts
    logs_ = [s.partition(" VALUES ")[0] for s in statements if s.startswith("INSERT INTO logs")]
    assert logs_.count(LOG_LEAN.sql.partition(" VALUES ")[0]) == 7 and len(logs_) == 8, (
        logs_
    )  # row 3: the first 32 full
