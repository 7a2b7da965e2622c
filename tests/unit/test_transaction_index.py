"""The transactions listing on its one index (migration 11: `http_transactions_time_names` on
(timestamp, id, container_name, destination_host) instead of one on timestamp and one on the two
names, an index entry fewer per recorded request): every listing and count of
`greyproxy.store.transactions` is planned on that index (no scan of the table, no sort of the
matching rows), its pages are what sorting the rows gives, and a database of before is upgraded
with its rows intact."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from greyproxy.store import migrations, open_database, sql
from greyproxy.store import transactions as tx

INDEX = "http_transactions_time_names"


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory):
    path = Path(tmp_path_factory.mktemp("tx")) / "greyproxy.db"
    db = open_database(path)
    rng = random.Random(5)
    now = time.time()
    db.execute_sql("BEGIN")
    for i in range(3000):
        db.execute_sql(
            "INSERT INTO http_transactions (timestamp, container_name, destination_host, destination_port,"
            " method, url, session_id) VALUES (?, ?, ?, 443, ?, ?, ?)",
            (
                now - (i // 4),  # ties: the page orders by timestamp, then id
                f"agent{rng.randrange(12)}",
                f"svc{rng.randrange(7)}.example",
                rng.choice(("GET", "POST")),
                f"https://svc/{i}",
                "s1" if i % 50 == 0 else None,
            ),
        )
    db.execute_sql("COMMIT")
    yield db, now
    db.close()


def _filters(now: float) -> list[tx.TransactionFilter]:
    return [
        tx.TransactionFilter(),
        tx.TransactionFilter(container="agent1"),
        tx.TransactionFilter(destination="svc3"),
        tx.TransactionFilter(container="agent", destination="svc3"),
        tx.TransactionFilter(method="POST"),
        tx.TransactionFilter(from_ts=now - 500, to_ts=now - 100),
        tx.TransactionFilter(container="agent2", from_ts=now - 600),
    ]


def _captured(f: tx.TransactionFilter, limit: int, offset: int) -> tuple[list[tuple[str, tuple]], list[dict], int]:
    """The listing's statements (as run, with their arguments), its page and its total."""
    seen: list[tuple[str, tuple]] = []
    real_rows, real_scalar = sql.rows, sql.scalar

    def rows(query: str, args=()):
        seen.append((query, tuple(args)))
        return real_rows(query, args)

    def scalar(query: str, args=()):
        seen.append((query, tuple(args)))
        return real_scalar(query, args)

    tx.sql.rows, tx.sql.scalar = rows, scalar  # type: ignore[assignment]
    try:
        page, total = tx.list_transactions(f, limit, offset, include_bodies=False)
    finally:
        tx.sql.rows, tx.sql.scalar = real_rows, real_scalar  # type: ignore[assignment]
    return seen, page, total


def test_the_schema_has_one_index_for_time_and_names(filled) -> None:
    db, _now = filled
    names = {r[0] for r in db.execute_sql("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()}
    assert INDEX in names
    assert not {"http_transactions_timestamp", "http_transactions_names"} & names


@pytest.mark.parametrize(("limit", "offset"), [(50, 0), (20, 700)])
def test_every_listing_is_planned_on_the_index(filled, limit: int, offset: int) -> None:
    db, now = filled
    for f in _filters(now):
        seen, _page, _total = _captured(f, limit, offset)
        assert len(seen) == 2, seen  # the count and the page
        for query, args in seen:
            plan = " | ".join(str(r[3]) for r in db.execute_sql(f"EXPLAIN QUERY PLAN {query}", args).fetchall())
            if f.method and "COUNT(*)" in query:  # no index holds the method (none did before either)
                assert plan == "SCAN http_transactions", plan
                continue
            assert f"USING COVERING INDEX {INDEX}" in plan or f"USING INDEX {INDEX}" in plan, (f, plan)
            assert "TEMP B-TREE" not in plan, (f, plan)  # in index order: no sort of the matching rows


def test_pages_are_the_sorted_rows(filled) -> None:
    db, now = filled
    every = sql.rows("SELECT id, timestamp, container_name, destination_host, method FROM http_transactions")
    for f in _filters(now):

        def keep(r: dict, f: tx.TransactionFilter = f) -> bool:
            return (
                (not f.container or f.container in r["container_name"])
                and (not f.destination or f.destination in r["destination_host"])
                and (not f.method or r["method"] == f.method)
                and (f.from_ts is None or r["timestamp"] >= f.from_ts)
                and (f.to_ts is None or r["timestamp"] <= f.to_ts)
            )

        want = sorted((r for r in every if keep(r)), key=lambda r: (r["timestamp"], r["id"]), reverse=True)
        for limit, offset in ((50, 0), (30, 400), (10, len(want) - 5)):
            _seen, page, total = _captured(f, limit, offset)
            assert total == len(want), f
            assert [r["id"] for r in page] == [r["id"] for r in want[offset : offset + limit]], (f, offset)


def test_a_database_of_before_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    conn.execute("BEGIN")
    for version, name, statements in migrations.MIGRATIONS:
        if version >= 11:
            continue
        for stmt in statements:
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, 0.0))
    for i in range(100):
        conn.execute(
            "INSERT INTO http_transactions (timestamp, container_name, destination_host, destination_port, method, url)"
            " VALUES (?, 'c', 'h', 80, 'GET', ?)",
            (1000.0 + i, f"http://h/{i}"),
        )
    conn.execute("COMMIT")
    before = conn.execute("SELECT * FROM http_transactions ORDER BY id").fetchall()
    columns = ", ".join(r[1] for r in conn.execute("PRAGMA table_info(http_transactions)"))
    conn.close()
    db = open_database(path)
    try:
        c = db.connection()
        # (later migrations may add columns: the ones there before hold what they held)
        assert c.execute(f"SELECT {columns} FROM http_transactions ORDER BY id").fetchall() == before
        idx = {r[1] for r in c.execute("PRAGMA index_list(http_transactions)")}
        assert INDEX in idx and "http_transactions_timestamp" not in idx and "http_transactions_names" not in idx
        cols = [r[2] for r in c.execute(f"PRAGMA index_info({INDEX})")]
        assert cols == ["timestamp", "id", "container_name", "destination_host"]
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
