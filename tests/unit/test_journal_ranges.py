"""Applied journal records remembered as id ranges per writer (migration 10): every record applied
exactly once whatever order batches and resends arrive in; ids applied by a recorder from before
(journal_applied) still count; log_counts kept with the rows by the recorder."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from greyproxy.store import journal_applied, open_database
from services.recorder import transactions  # noqa: F401 - registers the `transaction` kind
from services.recorder.apply import apply_records


def _log(i: int, container: str = "c", result: str = "allowed") -> dict[str, Any]:
    return {
        "timestamp": 1000.0 + i,
        "container_name": container,
        "container_id": "",
        "destination_host": "h",
        "destination_port": 80,
        "method": "GET",
        "result": result,
        "reason": f"r{i}",
    }


def _rec(writer: str, seq: int) -> tuple[str, str, Any]:
    return (f"{writer}-{seq:x}", "log", _log(seq, container=writer))


def test_writer_seq_takes_canonical_hex_only() -> None:
    assert journal_applied.writer_seq("ab12-1f") == ("ab12", 31)
    assert journal_applied.writer_seq("a-b-0") == ("a-b", 0)
    # Anything else is a writer of its own: '0a' and 'a' must not be the same record.
    for odd in ("w-0a", "w-A", "w-", "plain", "w-1_0", "w- 1", "w-0x1"):
        assert journal_applied.writer_seq(odd) == (odd, 0)


def test_writer_seqs_is_writer_seq_of_each() -> None:
    usual = [f"w{i % 2}-{i:x}" for i in range(300)] + ["a-b-0", "-1f"]
    assert journal_applied.writer_seqs(usual) == [journal_applied.writer_seq(i) for i in usual]
    for odd in ("w-0a", "w-A", "w-", "plain", "w-1_0", "w- 1", "w-0x1", "w-+1", "w-\u0661"):
        ids = usual[:5] + [odd] + usual[5:9]
        assert journal_applied.writer_seqs(ids) == [journal_applied.writer_seq(i) for i in ids], odd
        assert journal_applied.writer_seqs(ids)[5] == (odd, 0)


def test_consecutive_is_one_writers_run_in_order() -> None:
    assert journal_applied.consecutive([f"ab-{s:x}" for s in range(9, 40)]) == ("ab", 9)
    assert journal_applied.consecutive(["a-b-f", "a-b-10"]) == ("a-b", 15)
    for ids in (
        [],
        ["w-1", "w-3"],  # a gap
        ["w-2", "w-1"],  # out of order
        ["w-1", "w-1"],  # twice
        ["w-1", "x-2"],  # another writer
        ["w-9", "w-0a"],  # not canonical
        ["w-0", "w-1"],  # sequence 0: bus/journal.py never writes it
        ["plain", "plain"],
    ):
        assert journal_applied.consecutive(ids) is None, ids


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["w-1", "w-2", "w-3", "w-a", "w-b", "w-02", "x-2", "w-0", "w-", "w-c"]), max_size=6))
def test_consecutive_agrees_with_writer_seqs(ids: list[str]) -> None:
    keys = journal_applied.writer_seqs(ids)
    run = journal_applied.consecutive(ids)
    expected = (
        keys[0]
        if keys and keys[0][1] > 0 and all(k == (keys[0][0], keys[0][1] + i) for i, k in enumerate(keys))
        else None
    )
    assert run == expected


def test_batches_in_any_order_with_resends_apply_each_record_once(tmp_path: Path) -> None:
    """Two writers, batches cut differently on resend, later ones before earlier ones (a recorder
    restart while a batch was in flight), drops in the sequence (a full outbox): stored once each."""
    rng = random.Random(7)
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        seqs = {"wa": [s for s in range(1, 400) if s % 37], "wb": list(range(1, 250))}  # wa: gaps
        records = [_rec(w, s) for w in seqs for s in seqs[w]]
        expected = len(records)
        applied = 0
        for _round in range(6):
            batch_recs = rng.sample(records, rng.randint(1, 120))
            batch_recs.sort(key=lambda r: (r[0].split("-")[0], int(r[0].split("-")[1], 16)))
            if rng.random() < 0.5:
                batch_recs += batch_recs[: rng.randint(0, 5)]  # a resend coalesced with its original
            applied += len(apply_records(conn, batch_recs))
        applied += len(apply_records(conn, list(reversed(records))))  # everything resent
        assert applied == expected
        assert apply_records(conn, records) == []
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == expected
        ranges = conn.execute("SELECT writer, lo, hi FROM journal_ranges ORDER BY writer, lo").fetchall()
        covered = {(w, s) for w, lo, hi in ranges for s in range(lo, hi + 1)}
        assert covered == {(w, s) for w in seqs for s in seqs[w]}  # exactly the ids applied: no overlap
        assert sum(hi - lo + 1 for _w, lo, hi in ranges) == expected
    finally:
        db.close()


def test_a_usual_batch_is_one_range_row(tmp_path: Path) -> None:
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        apply_records(conn, [_rec("w", s) for s in range(1, 41)])
        assert conn.execute("SELECT writer, lo, hi FROM journal_ranges ORDER BY lo").fetchall() == [("w", 1, 40)]
        apply_records(conn, [_rec("w", s) for s in range(41, 81)])  # the next batch extends it
        assert conn.execute("SELECT writer, lo, hi FROM journal_ranges ORDER BY lo").fetchall() == [("w", 1, 80)]
    finally:
        db.close()


def test_a_writers_next_batch_is_not_parsed_id_by_id(tmp_path: Path, monkeypatch) -> None:
    """The usual batch (one writer's ids continuing its last range) takes `consecutive`'s path;
    ids are told one by one only for a batch that may hold applied ones."""
    told: list[int] = []
    each = journal_applied.writer_seqs
    monkeypatch.setattr(journal_applied, "writer_seqs", lambda ids: told.append(len(ids)) or each(ids))
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        for start in (1, 41, 81):
            assert len(apply_records(conn, [_rec("w", s) for s in range(start, start + 40)])) == 40
        assert told == []
        assert len(apply_records(conn, [_rec("w", s) for s in range(100, 131)])) == 10  # 100-120 applied
        assert told == [31]
        assert conn.execute("SELECT writer, lo, hi FROM journal_ranges").fetchall() == [("w", 1, 130)]
    finally:
        db.close()


def test_ids_applied_before_migration_9_are_not_applied_again(tmp_path: Path) -> None:
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        conn.executemany(journal_applied.MARK, [(f"w-{s:x}", time.time()) for s in range(1, 6)])
        events = apply_records(conn, [_rec("w", s) for s in range(1, 11)])  # 1-5 applied by the old recorder
        assert sorted(e["reason"] for _t, e in events) == sorted(f"r{s}" for s in range(6, 11))
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 5
    finally:
        db.close()


def test_log_counts_are_kept_with_the_rows(tmp_path: Path) -> None:
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        batch = [
            (f"w-{i + 1:x}", "log", _log(i, container=f"c{i % 3}", result="blocked" if i % 4 == 0 else "allowed"))
            for i in range(50)
        ]
        apply_records(conn, batch)
        apply_records(conn, [(f"x-{i + 1:x}", "log", _log(i, container="c9")) for i in range(1)])  # one alone
        apply_records(conn, batch[:10])  # a resend: nothing counted twice
        group = "SELECT container_name, result, COUNT(*) FROM logs GROUP BY 1, 2 ORDER BY 1, 2"
        counts = "SELECT container_name, result, n FROM log_counts WHERE n > 0 ORDER BY 1, 2"
        assert conn.execute(counts).fetchall() == conn.execute(group).fetchall()
        conn.execute("DELETE FROM logs WHERE container_name = 'c1'")  # maintenance: the delete trigger
        assert conn.execute(counts).fetchall() == conn.execute(group).fetchall()
    finally:
        db.close()


def test_a_resend_starting_inside_an_applied_range_skips_its_applied_part(tmp_path: Path) -> None:
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        assert len(apply_records(conn, [_rec("w", s) for s in range(1, 41)])) == 40
        assert len(apply_records(conn, [_rec("w", s) for s in range(61, 71)])) == 10
        # Re-cut on resend: 20-40 applied (a range starting before), 41-60 new, 61-65 applied (one inside).
        events = apply_records(conn, [_rec("w", s) for s in range(20, 66)])
        assert sorted(int(e["reason"][1:]) for _t, e in events) == list(range(41, 61))
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 70
    finally:
        db.close()


def test_a_writer_in_order_keeps_one_range_row(tmp_path: Path) -> None:
    """Batches that continue their writer's last range extend its row (one row per writer while
    records arrive in order, not one per batch); a gap starts a new row; resends stay skipped."""
    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        for start in range(1, 1001, 50):  # twenty batches of one writer, in order
            assert len(apply_records(conn, [_rec("wa", s) for s in range(start, start + 50)])) == 50
        rows = conn.execute("SELECT writer, lo, hi FROM journal_ranges ORDER BY writer, lo").fetchall()
        assert rows == [("wa", 1, 1000)]
        assert apply_records(conn, [_rec("wa", 500), _rec("wa", 1000)]) == []  # resends inside it
        apply_records(conn, [_rec("wa", s) for s in range(1100, 1110)])  # records 1001..1099 lost
        apply_records(conn, [_rec("wb", 1)])
        rows = conn.execute("SELECT writer, lo, hi FROM journal_ranges ORDER BY writer, lo").fetchall()
        assert rows == [("wa", 1, 1000), ("wa", 1100, 1109), ("wb", 1, 1)]
        assert len(apply_records(conn, [_rec("wa", 1050), _rec("wa", 1110)])) == 2  # a late one, the next one
        rows = conn.execute("SELECT writer, lo, hi FROM journal_ranges ORDER BY writer, lo").fetchall()
        assert rows == [("wa", 1, 1000), ("wa", 1050, 1050), ("wa", 1100, 1110), ("wb", 1, 1)]
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 1000 + 10 + 1 + 2
    finally:
        db.close()
