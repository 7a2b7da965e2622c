"""The per-request pipeline shared by the forward proxy and interception (services/proxy/pipeline.py),
without sockets: the recording relay's idle rule, the transaction record, and where bodies are decoded."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import records
from greyproxy.bodies import from_record, read_side
from greyproxy.capture import is_text_like
from greyproxy.redaction import Redactor
from services.proxy import http1, pipeline
from services.proxy.pipeline import INLINE_DECODE_MAX, Recorder, relay


class FakeStream:
    """The `Stream` surface over in-memory buffers: `feed` delivers bytes, `written` collects output."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.closed = False
        self.written = bytearray()
        self._more = asyncio.Event()

    def feed(self, data: bytes) -> None:
        self.buf += data
        self._more.set()

    def end(self) -> None:
        self.eof = True
        self._more.set()

    async def read_more(self, timeout: float | None = None) -> bool:
        before = len(self.buf)
        while len(self.buf) == before and not self.eof:
            self._more.clear()
            await asyncio.wait_for(self._more.wait(), timeout)
        return len(self.buf) > before

    def take(self, n: int | None = None) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeJournal:
    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def append(self, kind: str, data: Any, record_id: str | None = None) -> str:
        # What the real writer does with it: one orjson dump (a Fragment passes through as is).
        data = orjson.loads(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))
        if kind == records.TRANSACTION:  # shape 2 (an array) read back by name
            data = records.transaction_fields(data)
        self.records.append((kind, data))
        return str(len(self.records))


def test_relay_lives_while_one_direction_is_busy_and_closes_when_both_are_idle() -> None:
    async def main() -> tuple[float, float, bytes]:
        loop = asyncio.get_running_loop()
        a, b = FakeStream(), FakeStream()
        seen: list[bytes] = []
        idle = 0.3
        task = asyncio.ensure_future(relay(a, b, idle, None, seen.append))
        t0 = loop.time()
        for i in range(12):  # 1.2 s of server→client traffic, four idle periods; the client says nothing
            b.feed(b"tick %d;" % i)
            await asyncio.sleep(0.1)
            assert not task.done(), f"closed after {loop.time() - t0:.2f} s of a one-way stream"
        quiet_from = loop.time()
        await asyncio.wait_for(task, 5)
        return loop.time() - t0, loop.time() - quiet_from, bytes(a.written)

    total, after_quiet, delivered = asyncio.run(main())
    assert delivered == b"".join(b"tick %d;" % i for i in range(12))
    assert 0.15 <= after_quiet <= 1.0, after_quiet  # ~idle after the last byte (it came 0.1 s before)
    assert total >= 1.2


def test_relay_ends_when_a_side_ends_and_closes_both() -> None:
    async def main() -> tuple[FakeStream, FakeStream]:
        a, b = FakeStream(), FakeStream()
        task = asyncio.ensure_future(relay(a, b, 10.0))
        a.feed(b"hello")
        await asyncio.sleep(0.01)
        a.end()
        await asyncio.wait_for(task, 2)
        return a, b

    a, b = asyncio.run(main())
    assert bytes(b.written) == b"hello" and a.closed and b.closed


def _head() -> http1.RequestHead:
    raw = (
        b"POST http://api.example/v1/x?y=1 HTTP/1.1\r\nHost: api.example\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-secret\r\nx-my-token: t\r\nAccept: a\r\naccept: b\r\nContent-Length: 2\r\n\r\n"
    )
    head, _n = http1.parse_request_head(raw, 65536, 100)
    return head


def _resp(ctype: str, encoding: str | None = None) -> http1.ResponseHead:
    extra = f"Content-Encoding: {encoding}\r\n" if encoding else ""
    raw = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nSet-Cookie: s=1\r\n{extra}Content-Length: 0\r\n\r\n"
    resp, _n = http1.parse_response_head(raw.encode(), 65536, "GET")
    return resp


def _body(rec: dict[str, Any], side: str) -> str | None:
    """A journal record's body as the recorder stores it and the API reads it (greyproxy.bodies)."""
    row = dict(rec)
    from_record(row, side)
    stored = read_side(row, side)
    return stored.text if stored is not None else None


def test_record_shape_redaction_and_inline_body() -> None:
    async def main() -> list[tuple[str, Any]]:
        journal = FakeJournal()
        rec = Recorder(journal)  # type: ignore[arg-type]
        t = rec.txn("agent", "http://api.example", "api.example", 80, _head(), rule_id=7)
        t.req_sink()(b"{}")
        resp = _resp("application/json")
        t.resp_sink(resp)(b'{"ok": true}')
        t.finish(resp)
        t.finish(resp)  # once only
        return journal.records

    records = asyncio.run(main())
    assert len(records) == 1
    kind, r = records[0]
    assert kind == "transaction"
    assert (
        r["url"] == "http://api.example/v1/x?y=1" and r["method"] == "POST" and r["destination_host"] == "api.example"
    )
    assert r["destination_port"] == 80 and r["rule_id"] == 7 and r["container_name"] == "agent"
    assert r["request_headers"]["Authorization"] == ["[REDACTED]"]
    assert r["request_headers"]["X-My-Token"] == ["[REDACTED]"]
    assert r["request_headers"]["Accept"] == ["a", "b"]  # same name, any case: one key, values in order
    assert r["response_headers"]["Set-Cookie"] == ["[REDACTED]"]
    assert _body(r, "request") == "{}" and r["request_body_size"] == 2
    assert json.loads(_body(r, "response") or "") == {"ok": True} and r["response_body_size"] == 12
    assert r["status_code"] == 200 and r["result"] == "allowed" and r["duration_ms"] >= 0


def test_binary_bodies_are_counted_not_copied() -> None:
    async def main() -> tuple[Any, list[tuple[str, Any]]]:
        journal = FakeJournal()
        rec = Recorder(journal)  # type: ignore[arg-type]
        t = rec.txn("agent", "http://h", "h", 80, _head())
        resp = _resp("application/octet-stream")
        sink = t.resp_sink(resp)
        for _ in range(10):
            sink(b"\x00" * 1000)
        cap = t.resp
        t.finish(resp)
        return cap, journal.records

    cap, records = asyncio.run(main())
    assert cap.size == 10_000 and len(cap.data) == 0
    assert records[0][1]["response_body"] is None and records[0][1]["response_body_size"] == 10_000


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.text(max_size=40),
        st.sampled_from(["text/html; charset=utf-8", "Application/JSON", "image/png", "application/x+json", ""]),
    )
)
def test_which_bodies_are_stored_is_is_text_like_remembered(content_type: str | None) -> None:
    """`pipeline._text_like` (which response bodies a record stores, SPEC §7) says what
    `capture.is_text_like` says, asked once or again, and what it remembers stays bounded."""
    want = is_text_like(content_type)
    assert pipeline._text_like(content_type) is want
    assert pipeline._text_like(content_type) is want  # (remembered)
    assert len(pipeline._TEXT_LIKE) <= 1024


def test_the_remembered_content_types_are_bounded() -> None:
    """Content-Type values come from origins (SPEC §7, the record's stored bodies): `_text_like`
    remembers at most 1 024, then starts over."""
    for i in range(3000):
        assert pipeline._text_like(f"text/x-{i}") is True
        assert pipeline._text_like(f"image/x-{i}") is False
        assert len(pipeline._TEXT_LIKE) <= 1024


def test_compressed_or_big_bodies_are_decoded_off_the_loop() -> None:
    async def main() -> list[tuple[str, Any]]:
        journal = FakeJournal()
        rec = Recorder(journal)  # type: ignore[arg-type]
        for resp, body in (
            (_resp("text/plain", "gzip"), gzip.compress(b"zipped text")),
            (_resp("text/plain"), b"x" * (INLINE_DECODE_MAX + 1)),
        ):
            t = rec.txn("agent", "http://h", "h", 80, _head())
            t.resp_sink(resp)(body)
            t.finish(resp)
        assert journal.records == []  # not yet: a worker thread decodes (and serialises) them
        for _ in range(200):
            if len(journal.records) == 2:
                break
            await asyncio.sleep(0.01)
        return journal.records

    records = asyncio.run(main())
    bodies = sorted(_body(r, "response") or "" for _k, r in records)
    assert bodies == sorted(["zipped text", "x" * (INLINE_DECODE_MAX + 1)])


def test_redactor_cache_follows_each_redactor() -> None:
    pairs = [("X-Custom", "v"), ("x-custom", "w")]
    assert Redactor().headers(pairs) == {"X-Custom": ["v", "w"]}
    assert Redactor(["x-custom"]).headers(pairs) == {"X-Custom": ["[REDACTED]", "[REDACTED]"]}


def test_recorder_applies_a_run_of_transactions_at_once_and_drops_only_bad_ones(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from greyproxy.store import open_database
    from services.recorder import transactions  # noqa: F401 - registers the transaction kind
    from services.recorder.apply import apply_records

    def rec(i: int) -> dict[str, Any]:
        return {
            "timestamp": 1000.0 + i,
            "container_name": "c",
            "destination_host": "h",
            "destination_port": 80,
            "method": "GET",
            "url": f"http://h/{i}",
            "request_headers": {"Authorization": ["[REDACTED]"]},
            "response_headers": {},
            "status_code": 200,
            "response_body": f"body {i}",
            "response_body_size": 6,
        }

    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        conn.execute(
            "INSERT INTO http_transactions (timestamp, container_name, destination_host, destination_port,"
            " method, url) VALUES (1, 'old', 'h', 80, 'GET', 'http://h/old')"
        )
        conn.execute("DELETE FROM http_transactions")  # the AUTOINCREMENT sequence stays ahead of MAX(id)
        records = [(f"t-{i}", "transaction", rec(i)) for i in range(40)]
        records.append(
            (
                "log-1",
                "log",
                {
                    "timestamp": 1.0,
                    "container_name": "c",
                    "destination_host": "h",
                    "destination_port": 80,
                    "method": "HTTP",
                    "result": "allowed",
                },
            )
        )

        from services.recorder import apply as apply_mod

        one_at_a_time = apply_mod._apply_each

        def one_by_one(cur: Any, recs: list, events: list) -> None:
            if any(kind == "transaction" for _rid, kind, _data in recs):
                raise AssertionError("a good run must go in with one executemany")
            one_at_a_time(cur, recs, events)

        with monkeypatch.context() as m:
            m.setattr(apply_mod, "_apply_each", one_by_one)
            events = apply_records(conn, records)
        # A run with a bad record falls back to one at a time: only the bad one is dropped.
        more = [(f"t-{i}", "transaction", rec(i)) for i in range(40, 50)]
        more.insert(3, ("bad", "transaction", {"container_name": "c"}))
        events += apply_records(conn, more)
        records += more
        tx_events = [e for e in events if e[0] == "transaction.new"]
        assert len(tx_events) == 50 and len(events) == 51
        rows = conn.execute(
            "SELECT id, url, response_body, request_headers FROM http_transactions ORDER BY id"
        ).fetchall()
        assert [r[1] for r in rows] == [f"http://h/{i}" for i in range(50)]
        assert [e[1]["id"] for e in tx_events] == [r[0] for r in rows]  # event ids are the rows' ids
        assert [e[1]["url"] for e in tx_events] == [r[1] for r in rows]
        assert rows[0][0] > 1 and rows[3][2] == "body 3" and json.loads(rows[0][3]) == {"Authorization": ["[REDACTED]"]}
        assert apply_records(conn, records) == []  # idempotent on record id
    finally:
        db.close()
