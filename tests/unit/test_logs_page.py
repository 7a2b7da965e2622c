"""`GET /api/logs?container=` pages for a substring that names several containers
(greyproxy/store/logs.py): each name's newest rows merged from the (container_name, timestamp)
index must give exactly the page the plain `IN (…)` query gives, for any filter and offset, and must
be planned on that index, not on a scan of the timestamp index (which took 263 ms at 1 000 000 rows
when the newest rows were another container's)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from greyproxy.store import logs, open_database, sql


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory):
    path = Path(tmp_path_factory.mktemp("logs")) / "greyproxy.db"
    db = open_database(path)
    rng = random.Random(3)
    now = time.time()
    rows = []
    # the newest rows: one busy container the filters below never name
    rows += [(now - i * 0.01, "busy", "h.example", 443, "allowed") for i in range(3000)]
    # older rows: twenty agents, ties in timestamps included (the page orders by timestamp, then id)
    for i in range(6000):
        rows.append(
            (
                now - 100 - (i // 3),
                f"agent{rng.randrange(20)}",
                f"svc{rng.randrange(9)}.example",
                443,
                rng.choice(("allowed", "blocked")),
            )
        )
    db.execute_sql("BEGIN")
    for ts, name, host, port, result in rows:
        db.execute_sql(
            "INSERT INTO logs (timestamp, container_name, container_id, destination_host, destination_port,"
            " method, result, reason) VALUES (?, ?, '', ?, ?, 'CONNECT', ?, 'rule')",
            (ts, name, host, port, result),
        )
        db.execute_sql(logs.ADD_COUNT, (name, result, 1))
    db.execute_sql("COMMIT")
    yield db
    db.close()


def _page(f: logs.LogFilter, limit: int, offset: int, merged: bool) -> list[dict]:
    old = logs.MAX_MERGED_ENTRIES
    logs.MAX_MERGED_ENTRIES = old if merged else 0
    try:
        rows, _total = logs.list_logs(f, limit, offset)
    finally:
        logs.MAX_MERGED_ENTRIES = old
    return rows


@pytest.mark.parametrize("container", ["agent1", "agent", "gent1", "agent7", "nobody"])
@pytest.mark.parametrize(("limit", "offset"), [(50, 0), (7, 3), (100, 900), (50, 5990)])
@pytest.mark.parametrize(
    "extra",
    [{}, {"result": "blocked"}, {"destination": "svc3"}, {"from_ts": time.time() - 1500, "to_ts": time.time() - 300}],
)
def test_the_merged_page_is_the_in_page(filled, container: str, limit: int, offset: int, extra: dict) -> None:
    f = logs.LogFilter(container=container, **extra)
    merged = _page(f, limit, offset, merged=True)
    assert merged == _page(f, limit, offset, merged=False)
    if container == "agent1" and offset == 0 and not extra:
        assert merged and {r["container_name"] for r in merged} <= {"agent1", *(f"agent1{i}" for i in range(10))}


def test_the_merged_page_reads_each_name_from_its_index(filled) -> None:
    f = logs.with_containers(logs.LogFilter(container="agent1"))
    assert f.containers is not None and len(f.containers) > 1
    captured: list[str] = []
    real = sql.rows

    def spy(query: str, args=()):  # the page's statement, planned by SQLite
        captured.append(query)
        return real(query, args)

    logs.sql.rows = spy  # type: ignore[assignment]
    try:
        logs.list_logs(logs.LogFilter(container="agent1"), 50, 0)
    finally:
        logs.sql.rows = real  # type: ignore[assignment]
    page = [q for q in captured if "FROM logs l" in q][0]
    args = [n for name in f.containers for n in (name, 50)] + [50, 0]
    plan = " | ".join(str(r[3]) for r in filled.execute_sql(f"EXPLAIN QUERY PLAN {page}", args).fetchall())
    assert plan.count("USING INDEX logs_container") + plan.count("USING COVERING INDEX logs_container") >= len(
        f.containers
    ), plan
    assert "logs_timestamp" not in plan, plan
