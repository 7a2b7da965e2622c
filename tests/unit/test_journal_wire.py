"""The journal as it travels (docs/events.md, "The journal"): a batch names its writer once and each
record carries its sequence number; every record kind comes out of `decode_batch` as it went into
`JournalWriter.append` (bodies, text and binary, reach the recorder's row as the bytes packed); a
batch of before (text ids, no writer) still reads and names the same records, so a resend in either
shape is applied once; a malformed batch is refused with a reason, and the consumer goes on."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import records
from bus.journal import JournalConsumer, JournalWriter, MalformedBatch, batch_body, decode_batch, id_text
from greyproxy.bodies import pack, to_record
from greyproxy.store import journal_applied, open_database
from services.recorder import transactions
from services.recorder.apply import apply_records

I64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what JSON integers carry here (orjson's range)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # any unicode but lone surrogates (orjson refuses them)
OPT_TEXT = st.none() | TEXT
SCALAR = st.none() | st.booleans() | I64 | FLOATS | TEXT


def _log(d: st.DrawFn) -> list[Any]:
    return records.log_values(
        d(TEXT),
        d(TEXT),
        d(I64),
        d(TEXT),
        d(st.sampled_from([records.ALLOWED, records.BLOCKED])),
        d(OPT_TEXT),
        d(st.none() | I64),
        d(OPT_TEXT),
        d(st.none() | st.floats(min_value=0, max_value=1e9)),
        d(OPT_TEXT),
        d(OPT_TEXT),
        d(TEXT),
        d(st.none() | FLOATS),
    )


def _transaction(d: st.DrawFn) -> tuple[list[Any], dict[str, bytes]]:
    rec: dict[str, Any] = {name: d(SCALAR) for name in records.TRANSACTION_FIELDS}
    rec.update(
        timestamp=d(FLOATS),
        destination_port=d(I64),
        request_body_size=d(I64),
        response_body_size=d(st.none() | I64),
        container_name=d(TEXT),
        destination_host=d(TEXT),
        method=d(TEXT),
        url=d(TEXT),
        request_headers={d(TEXT): [d(TEXT)]},
        response_headers=d(st.dictionaries(TEXT, st.lists(TEXT, max_size=3), max_size=4)),
        substituted_credentials=d(st.lists(TEXT, max_size=3)),
        refused_credentials=[],
    )
    blobs = {}
    for side in ("request", "response"):
        kind = d(st.sampled_from(["none", "text", "binary"]))
        if kind == "none":
            for col in (f"{side}_body", f"{side}_body_codec", f"{side}_body_charset"):
                rec[col] = None
            continue
        data = d(TEXT).encode() if kind == "text" else d(st.binary(max_size=3000))
        packed = pack(data, "text/plain; charset=utf-8" if kind == "text" else "application/octet-stream")
        to_record(rec, side, packed)
        blobs[side] = packed.blob
    return records.transaction_values(rec), blobs


@st.composite
def record(draw: st.DrawFn) -> tuple[str, Any, dict[str, bytes]]:
    kind = draw(st.sampled_from(records.KINDS))
    if kind == records.LOG:
        return kind, _log(draw), {}
    if kind == records.TRANSACTION:
        values, blobs = _transaction(draw)
        return kind, values, blobs
    if kind == records.PENDING:
        data: Any = records.pending_record(draw(TEXT), draw(TEXT), draw(I64), draw(OPT_TEXT), draw(I64), draw(FLOATS))
    elif kind == records.RULE_HIT:
        data = records.rule_hit_record(draw(I64), draw(I64), draw(FLOATS))
    elif kind == records.DNS:
        data = records.dns_record(draw(TEXT), draw(TEXT), draw(FLOATS))
    elif kind == records.CREDENTIAL_USE:
        data = records.credential_use_record(draw(OPT_TEXT), draw(OPT_TEXT), draw(I64), draw(FLOATS))
    else:
        data = records.identity_used_record(draw(TEXT), draw(FLOATS))
    return kind, data, {}


def _sent(w: JournalWriter, bid: int = 1) -> bytes:
    """The writer's queued records as `_fill` sends them: one batch."""
    recs, _n = w._take_batch()
    return batch_body(bid, w.writer, recs)


@settings(max_examples=300, deadline=None)
@given(st.lists(record(), min_size=1, max_size=8), st.integers(min_value=0, max_value=2**48))
def test_every_record_kind_arrives_as_appended(recs: list[tuple[str, Any, dict[str, bytes]]], start: int) -> None:
    w = JournalWriter("ipc:///nonexistent", batch_size=100)
    w._seq = start  # (a writer that has been running a while)
    seqs = [w.append(kind, data) for kind, data, _ in recs]
    bid, got = decode_batch(_sent(w, 7))
    assert bid == 7
    assert [r[0] for r in got] == [(w.writer, s) for s in seqs]
    assert [(r[1], r[2]) for r in got] == [(kind, data) for kind, data, _ in recs]  # equal values, equal types
    for (_id, kind, data), (_k, _d, blobs) in zip(got, recs):
        if kind == records.TRANSACTION:
            row = transactions._params(list(data), 0.0)  # the recorder's row: bodies as the bytes packed
            at = {c: i for i, c in enumerate(transactions._COLUMNS)}
            for side in ("request", "response"):
                assert row[at[f"{side}_body"]] == blobs.get(side)
                assert type(row[at[f"{side}_body"]]) is (bytes if side in blobs else type(None))
    # The same records in a batch of before (text ids, no writer) read the same, naming the same records.
    old = orjson.dumps({"b": 7, "r": [[id_text(r[0]), r[1], r[2]] for r in got]})
    _bid, before = decode_batch(old)
    assert [(r[1], r[2]) for r in before] == [(r[1], r[2]) for r in got]
    assert journal_applied.writer_seqs([r[0] for r in before]) == [r[0] for r in got]


def test_a_record_with_its_own_id_travels_with_it() -> None:
    w = JournalWriter("ipc:///nonexistent")
    a = w.append("dns", records.dns_record("1.2.3.4", "h", 1.0))
    b = w.append("dns", records.dns_record("1.2.3.5", "h", 1.0), record_id="elsewhere-7")
    assert b == "elsewhere-7"
    _bid, got = decode_batch(_sent(w))
    assert [r[0] for r in got] == [(w.writer, a), "elsewhere-7"]
    assert journal_applied.writer_seqs([r[0] for r in got]) == [(w.writer, a), ("elsewhere", 7)]


def test_a_resend_in_the_other_shape_is_applied_once(tmp_path: Path) -> None:
    """A batch applied as sent (pairs), then resent by a proxy of before (text ids), then again: stored once."""
    w = JournalWriter("ipc:///nonexistent")
    for i in range(5):
        w.append(records.LOG, records.log_values("c", "h", 80, "GET", records.ALLOWED, timestamp=1000.0 + i))
    _bid, new = decode_batch(_sent(w))
    old = [(id_text(rid), kind, data) for rid, kind, data in new]
    db = open_database(tmp_path / "g.db")
    try:
        conn = db.connection()
        apply_records(conn, new[:3])
        apply_records(conn, old)  # the first three again, in text, with two new ones
        apply_records(conn, new)
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 5
        assert conn.execute("SELECT writer, lo, hi FROM journal_ranges").fetchall() == [(w.writer, 1, 5)]
    finally:
        db.close()


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\x93\x01\x02", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"r": []}', 'batch id "b"'),
        (b'{"b": "1", "r": []}', 'batch id "b"'),
        (b'{"b": 1}', 'record array "r"'),
        (b'{"b": 1, "w": "", "s": []}', 'writer "w"'),
        (b'{"b": 1, "w": "a", "r": []}', 'no record array "s"'),
        (b'{"b": 1, "w": "a", "s": [[1, "log"]]}', "record 0 is not"),
        (b'{"b": 1, "w": "a", "s": [[1, "log", 1], [0, "log", 1]]}', "record 1: bad id 0"),
        (b'{"b": 1, "w": "a", "s": [[true, "log", 1]]}', "bad id True"),
        (b'{"b": 1, "r": [[5, "log", 1]]}', "bad id 5"),  # a sequence number needs its writer
        (b'{"b": 1, "r": [["a-1", 3, 1]]}', "record 0 is not"),
    ],
)
def test_a_malformed_batch_says_what_is_wrong(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedBatch, match=reason):
        decode_batch(body)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200)
    | st.recursive(
        SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from("bwrs"), c), max_leaves=12
    ).map(orjson.dumps)
)
def test_decode_batch_refuses_or_reads_anything(body: bytes) -> None:
    try:
        bid, recs = decode_batch(body)
    except MalformedBatch:
        return
    assert type(bid) is int
    for rid, kind, _data in recs:
        assert type(kind) is str and (type(rid) is str or (type(rid) is tuple and rid[1] > 0))


def test_the_consumer_refuses_a_malformed_batch_logs_it_and_goes_on(caplog) -> None:
    d = tempfile.mkdtemp(prefix="gp-jw-", dir="/tmp")
    applied: list[Any] = []

    async def scenario() -> list[bytes]:
        ctx = zmq.asyncio.Context()
        ep = f"ipc://{d}/j.sock"
        acks = []
        with ThreadPoolExecutor(1) as ex:
            cons = JournalConsumer(ep, applied.extend, ex, ctx=ctx)
            serving = asyncio.ensure_future(cons.serve())
            sock = ctx.socket(zmq.DEALER)
            sock.connect(ep)
            await sock.send_multipart([b"", b'{"b": 1, "w": "a", "s": [["x"]]}'])
            await sock.send_multipart([b"", b'{"b": 2, "w": "a", "s": [[1, "dns", {"ip": "1.2.3.4"}]]}'])
            acks.append((await asyncio.wait_for(sock.recv_multipart(), 5))[-1])
            assert not serving.done()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            sock.close(linger=0)
            cons.close()
        ctx.destroy(linger=0)
        return acks

    try:
        with caplog.at_level(logging.WARNING, "greyproxy.journal"):
            acks = uvloop.run(scenario())
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert [orjson.loads(a) for a in acks] == [{"a": 2}]  # the malformed batch is not acknowledged
    assert applied == [(("a", 1), "dns", {"ip": "1.2.3.4"})]
    assert any(
        "refusing a malformed batch" in r.getMessage() and "record 0 is not" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    "bad",
    [{35: "null"}, {5: "null", 36: "null"}, {29: "unbindable"}, {17: "null", 29: "unbindable"}],
    ids=["second-statement", "both-statements", "unbindable", "null-and-unbindable"],
)
def test_rows_sqlite_refuses_mid_run_are_dropped_alone(tmp_path: Path, caplog, bad: dict[int, str]) -> None:
    """The fast pass writes runs without savepoints (INSERT OR ROLLBACK): a row SQLite refuses undoes
    the batch, applied again carefully; only the bad records are dropped, each of the others stored once
    (40 log rows: statements of 32 and 8)."""
    w = JournalWriter("ipc:///nonexistent", batch_size=1000)
    for i in range(40):
        container = None if bad.get(i) == "null" else "c"  # logs.container_name is NOT NULL
        reason = {"not": "text"} if bad.get(i) == "unbindable" else f"r{i}"
        w.append(records.LOG, records.log_values(container, "h", 80, "GET", records.ALLOWED, reason=reason))  # type: ignore[arg-type]
        if i % 10 == 0:
            rec = {"timestamp": 1.0, "container_name": "c", "destination_host": "h", "destination_port": 80}
            rec.update(method="GET", url=f"http://h/{i}", request_headers={}, response_headers={})
            w.append(records.TRANSACTION, records.transaction_values(rec))
    _bid, recs = decode_batch(_sent(w))
    db = open_database(tmp_path / "g.db")
    try:
        conn = db.connection()
        with caplog.at_level(logging.INFO, "greyproxy.recorder"):
            events = apply_records(conn, recs)
        messages = [r.getMessage() for r in caplog.records]
        assert any("applied again, carefully" in m for m in messages)
        assert sum("dropped" in m for m in messages) == len(bad)
        reasons = [r[0] for r in conn.execute("SELECT reason FROM logs ORDER BY id")]
        assert reasons == [f"r{i}" for i in range(40) if i not in bad]
        assert conn.execute("SELECT url FROM http_transactions ORDER BY id").fetchall() == [
            (f"http://h/{i}",) for i in range(0, 40, 10)
        ]
        assert conn.execute("SELECT SUM(n) FROM log_counts").fetchone()[0] == 40 - len(bad)
        assert len([e for e in events if e[0] == "log.new"]) == 40 - len(bad)
        assert apply_records(conn, recs) == []  # all marked applied, the dropped ones too
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 40 - len(bad)
    finally:
        db.close()
