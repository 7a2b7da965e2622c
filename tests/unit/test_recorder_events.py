"""The recorder's events: per-request payloads are deferred and built only for topics someone wants,
and the deferred ones are exactly the payloads built eagerly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bus import topics
from greyproxy.store import open_database
from services.recorder import transactions  # noqa: F401 - registers the `transaction` kind
from services.recorder.apply import Deferred, Rows, apply_records, materialize
from services.recorder.service import publish_events


def _log(i: int) -> dict[str, Any]:
    return {
        "timestamp": 1000.0 + i,
        "container_name": "c",
        "destination_host": "h",
        "destination_port": 80,
        "method": "GET",
        "result": "allowed",
        "reason": f"r{i}",
        "response_time_ms": 1.23456,
        "rule_summary": "c → h:80",
    }


def _tx(i: int) -> dict[str, Any]:
    return {
        "timestamp": 1000.0 + i,
        "container_name": "c",
        "destination_host": "h",
        "destination_port": 80,
        "method": "GET",
        "url": f"http://h/{i}",
        "request_headers": {"A": ["b"]},
        "response_headers": {},
        "status_code": 200,
        "response_body": "secret body",
        "response_body_size": 11,
        "duration_ms": 2.5,
    }


def _batch(tag: str) -> list[tuple[str, str, Any]]:
    pend = {"container_name": "c", "destination_host": "held", "destination_port": 443, "ts": 1000.0, "waiting": 2}
    return (
        [(f"{tag}l{i}", "log", _log(i)) for i in range(5)]
        + [(f"{tag}t{i}", "transaction", _tx(i)) for i in range(4)]
        + [(f"{tag}p", "pending", pend)]
    )


def test_lazy_events_are_the_eager_ones_deferred(tmp_path: Path) -> None:
    eager_db, lazy_db = open_database(tmp_path / "e.db"), open_database(tmp_path / "l.db")
    try:
        eager = apply_records(eager_db.connection(), _batch("a"))
        lazy = apply_records(lazy_db.connection(), _batch("a"), lazy=True)
        # Single records (no run) are deferred too.
        eager += apply_records(eager_db.connection(), [("b1", "log", _log(9)), ("b2", "transaction", _tx(9))])
        lazy += apply_records(lazy_db.connection(), [("b1", "log", _log(9)), ("b2", "transaction", _tx(9))], lazy=True)
    finally:
        eager_db.close()
        lazy_db.close()
    assert not any(isinstance(d, Deferred) for _t, d in eager)
    deferred = {t for t, d in lazy if isinstance(d, Deferred)}
    assert deferred == {topics.LOG_NEW, topics.TRANSACTION_NEW}
    pending = [d for t, d in lazy if t == topics.PENDING_CREATED]
    assert len(pending) == 1 and not isinstance(pending[0], Deferred)
    assert materialize(lazy) == eager
    logs = [d for t, d in eager if t == topics.LOG_NEW]
    txs = [d for t, d in eager if t == topics.TRANSACTION_NEW]
    assert len(logs) == 6 and len(txs) == 5
    assert logs[0]["rule_summary"] == "c → h:80" and logs[0]["response_time_ms"] == 1  # integer (issue 13 item 9)
    assert logs[0]["response_time_us"] == 1235
    assert "response_body" not in txs[0] and txs[0]["request_headers"] == {"A": ["b"]}
    assert [e["id"] for e in logs] == [1, 2, 3, 4, 5, 6] and [e["id"] for e in txs] == [1, 2, 3, 4, 5]


def test_resends_and_repeats_are_applied_once(tmp_path: Path) -> None:
    """A batch of only new ids is marked applied in one go; one with an old id (a resend) or an id
    twice takes the slow path, and either way each record is applied exactly once."""
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        assert len(apply_records(conn, _batch("x"))) == 10
        again = _batch("x")[3:] + _batch("y") + _batch("y")[:2]
        events = apply_records(conn, again)
        assert len(events) == 10
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 10
        assert conn.execute("SELECT COUNT(*) FROM http_transactions").fetchone()[0] == 8
        assert conn.execute("SELECT SUM(hi - lo + 1) FROM journal_ranges").fetchone()[0] == 20
        assert conn.execute("SELECT attempt_count FROM pending").fetchone()[0] == 2
    finally:
        db.close()


class FakePublisher:
    def __init__(self, wanted: set[str]) -> None:
        self.want = wanted
        self.asked: list[str] = []
        self.sent: list[tuple[str, Any]] = []
        self.seq = 0
        self.skipped = 0

    def wanted(self, topic: str) -> bool:
        self.asked.append(topic)
        return topic in self.want

    def skip(self, n: int = 1) -> None:
        self.seq += n
        self.skipped += n

    def publish(self, topic: str, data: Any, *, check: bool = True) -> None:
        assert not check
        self.seq += 1
        self.sent.append((topic, data))


def test_only_wanted_topics_are_built_and_published() -> None:
    built: list[int] = []

    def payload(row: dict[str, Any], data: Any) -> dict[str, Any]:
        built.append(row["id"])
        return {"id": row["id"]}

    events = [
        (topics.LOG_NEW, Deferred(payload, {"id": 1}, None)),
        (topics.TRANSACTION_NEW, Deferred(payload, {"id": 2}, None)),
        (topics.PENDING_CREATED, {"id": 3}),
        (topics.LOG_NEW, Deferred(payload, {"id": 4}, None)),
        (topics.TRANSACTION_NEW, Deferred(payload, {"id": 5}, None)),
    ]
    pub = FakePublisher({topics.TRANSACTION_NEW, topics.PENDING_CREATED})
    publish_events(pub, events)  # type: ignore[arg-type]
    assert pub.sent == [
        (topics.TRANSACTION_NEW, {"id": 2}),
        (topics.PENDING_CREATED, {"id": 3}),
        (topics.TRANSACTION_NEW, {"id": 5}),
    ]
    assert built == [2, 5]  # log.new payloads never built
    # + transactions.stored, once per batch with transactions (nobody here wants it)
    assert pub.seq == 6 and pub.skipped == 3  # seq counts skipped events as before
    assert sorted(pub.asked) == sorted(
        {topics.LOG_NEW, topics.TRANSACTION_NEW, topics.PENDING_CREATED, topics.TRANSACTIONS_STORED}
    )

    nobody = FakePublisher(set())
    publish_events(nobody, events * 100)  # type: ignore[arg-type]
    assert nobody.sent == [] and nobody.skipped == 501 and built == [2, 5]
    assert len(nobody.asked) == 4  # once per topic per batch, not per event

    assembler = FakePublisher({topics.TRANSACTIONS_STORED})
    publish_events(assembler, events)  # type: ignore[arg-type]
    assert assembler.sent == [(topics.TRANSACTIONS_STORED, {"last_id": 5})]  # the batch's highest id
    publish_events(assembler, events[2:3])  # type: ignore[arg-type]
    assert len(assembler.sent) == 1  # a batch without transactions: no event


def test_a_run_of_rows_is_one_entry_built_only_when_wanted(tmp_path: Path) -> None:
    """A batch's run of log/transaction rows comes back as one Rows entry: published as one event
    per row when wanted, counted as skipped (one per row) when not, and never built then."""
    db = open_database(tmp_path / "t.db")
    try:
        events = apply_records(db.connection(), _batch("r"), lazy=True)
    finally:
        db.close()
    runs = {t: d for t, d in events if isinstance(d, Rows)}
    assert set(runs) == {topics.LOG_NEW, topics.TRANSACTION_NEW}
    assert len(runs[topics.LOG_NEW]) == 5 and len(runs[topics.TRANSACTION_NEW]) == 4
    nobody = FakePublisher(set())
    publish_events(nobody, events)  # type: ignore[arg-type]
    assert nobody.sent == [] and nobody.skipped == 11  # 5 + 4 + the pending one + transactions.stored
    watcher = FakePublisher({topics.LOG_NEW, topics.TRANSACTIONS_STORED})
    publish_events(watcher, events)  # type: ignore[arg-type]
    logs = [d for t, d in watcher.sent if t == topics.LOG_NEW]
    assert [e["id"] for e in logs] == [1, 2, 3, 4, 5] and [e["reason"] for e in logs] == [f"r{i}" for i in range(5)]
    assert watcher.sent[-1] == (topics.TRANSACTIONS_STORED, {"last_id": 4})
    assert watcher.skipped == 5  # the transactions and the pending entry
