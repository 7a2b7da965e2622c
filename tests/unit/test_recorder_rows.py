"""What the recorder stores does not depend on how records arrive: a batch applied as runs (the
multi-row INSERTs) writes byte for byte the rows the same records applied one at a time write, and a
refusal by the credential hook inside a run is told once (issue 18 item 1: the per-row cuts)."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bus import topics
from greyproxy.credentials.reasons import REASONS
from greyproxy.store import open_database
from services.recorder import transactions  # noqa: F401 - registers the `transaction` kind
from services.recorder.apply import apply_records, insert_run, shape_of

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


def test_columns_shared_by_a_statement_s_rows_are_bound_once(tmp_path: Path) -> None:
    """apply.Shape: in a multi-row INSERT a column with one value in all its rows is bound once (or
    written NULL), the others per row; the rows stored are those the records applied one at a time
    store, whatever mix of shared and varying columns (a body, a session, a skip reason here and there)."""
    small = base64.b64encode(b'{"n": 1}').decode()
    recs: list[tuple[str, str, Any]] = []
    for i in range(53):  # statements of 32, 8, 8 and 5 rows
        extra: dict[str, Any] = {"session_id": "s1"} if i == 35 else {}
        if i == 36:
            extra = {"response_body": small, "response_body_size": 8, "response_content_type": "text/plain"}
        recs.append((f"w-{2 * i + 1:x}", "transaction", _tx(i, **extra)))
        log = _log(i) + [2.5, "r", "tls-pinned" if i == 3 else None]
        recs.append((f"w-{2 * i + 2:x}", "log", log))
    db = open_database(tmp_path / "runs.db")
    try:
        apply_records(db.connection(), recs)
    finally:
        db.close()
    db = open_database(tmp_path / "each.db")
    try:
        for rec in recs:
            apply_records(db.connection(), [rec])
    finally:
        db.close()
    runs, each = _dump(tmp_path / "runs.db"), _dump(tmp_path / "each.db")
    assert runs == each and len(runs["http_transactions"]) == 53 and len(runs["logs"]) == 53
    for table in ("http_transactions", "logs"):
        assert [[type(v) for v in r] for r in runs[table]] == [[type(v) for v in r] for r in each[table]]


def test_shape_binds_a_shared_column_once() -> None:
    sql = "INSERT INTO t (a, b, c, d, e, f) VALUES (?, ?, ?, ?, ?, ?)"
    rows = [
        ["x", i, None, "same", float(f"1.{5 if i < 9 else 0}"), 7 if i % 2 else 7.0]  # 7 == 7.0, not one value
        for i in range(4)
    ]
    shape = shape_of(sql, rows)
    assert shape.bound == (0, 3, 4)  # "x", "same", 1.5 (equal floats); None is written NULL
    assert shape.varying == (1, 5)
    assert shape.sql.count("?1,") == 4 and shape.sql.count("NULL") == 4
    assert shape.values(rows) == ["x", "same", 1.5, 0, 7.0, 1, 7, 2, 7.0, 3, 7]
    assert [type(v) for v in shape.values(rows)[4::2]] == [float, int, float, int]
    one = shape_of(sql, rows[:1])  # a statement of one row: its None values written NULL, the rest bound
    assert one.sql.count("NULL") == 1 and one.values(rows[:1]) == ["x", 0, "same", 1.5, 7.0]
    signed = shape_of(sql, [[*r[:4], -0.0 if i else 0.0, 1] for i, r in enumerate(rows)])
    assert 4 in signed.varying and 5 in signed.bound  # 0.0 == -0.0: never shared


_AFFINITIES = ("TEXT", "INTEGER", "REAL", "NUMERIC", "BLOB", "")
_VALUES = (None, 0, 1, -1, True, False, 0.0, -0.0, 1.0, 2.5, float("nan"), "", "1", "a", "1.0", b"", b"1", 2**62)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from(_VALUES), min_size=len(_AFFINITIES), max_size=len(_AFFINITIES)),
        min_size=1,
        max_size=300,
    )
)
def test_insert_run_stores_what_one_row_statements_store(rows: list[list[Any]]) -> None:
    """Any rows, of values equal across types (1, 1.0, True, "1"...), into columns of every affinity:
    insert_run (shared columns bound once, statements of 128, 64, 32... rows and the rest) stores each value as the
    one-row INSERT of each row does, and gives the new rows' ids."""
    cols = [f"c{i}" for i in range(len(_AFFINITIES))]
    ddl = ", ".join(f"{c} {a}".strip() for c, a in zip(cols, _AFFINITIES))
    one = f"INSERT INTO t ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    stored = []
    for multi in (True, False):
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.execute(f"CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, {ddl})")
        conn.execute("INSERT INTO t (c0) VALUES ('first')")
        cur = conn.cursor()
        conn.execute("BEGIN IMMEDIATE")
        if multi:
            assert list(insert_run(cur, "t", one, [list(r) for r in rows])) == list(range(2, len(rows) + 2))
        else:
            cur.executemany(one, rows)
        conn.execute("COMMIT")
        q = ", ".join(f"quote({c}), typeof({c})" for c in cols)
        stored.append(conn.execute(f"SELECT id, {q} FROM t ORDER BY id").fetchall())
        conn.close()
    assert stored[0] == stored[1]


def test_insert_run_keeps_under_sqlites_variable_limit() -> None:
    """A statement of more parameters than the connection takes (SQLITE_LIMIT_VARIABLE_NUMBER: 999 before
    SQLite 3.32) is never made: the rows go in smaller ones, stored the same."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, a, b, c, d, e, f)")
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)  # 16 rows of 6 varying values at most
    rows = [[i, f"s{i}", i * 0.5, -i, f"t{i}", i % 7] for i in range(300)]
    one = "INSERT INTO t (a, b, c, d, e, f) VALUES (?, ?, ?, ?, ?, ?)"
    cur = conn.cursor()
    conn.execute("BEGIN IMMEDIATE")
    assert list(insert_run(cur, "t", one, rows)) == list(range(1, 301))
    conn.execute("COMMIT")
    assert conn.execute("SELECT a, b, c, d, e, f FROM t ORDER BY id").fetchall() == [tuple(r) for r in rows]
