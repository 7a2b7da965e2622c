"""Stored bodies as deltas (greyproxy.bodies, migration 9): the recorder stores a body against the
earlier body of its stream; every read resolves the chain; dropping bodies or rows (retention, the
size cap) never leaves a body unreadable. Through the recorder's real `apply_records` on a real
SQLite file."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greyproxy import bodies as B
from greyproxy import har
from greyproxy.capture import transaction_json
from greyproxy.store import open_database
from services.maintenance import jobs
from services.recorder import transactions as T
from services.recorder.apply import apply_records
from harness.fuzz import examples


def record(i: int, container: str, url: str, req: bytes | None, resp: bytes | None, ts: float) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "timestamp": ts,
        "container_name": container,
        "destination_host": "api.example",
        "destination_port": 443,
        "method": "POST",
        "url": url,
        "request_headers": {},
        "request_body": None,
        "request_body_size": len(req or b""),
        "request_content_type": "application/json",
        "status_code": 200,
        "response_headers": {},
        "response_body": None,
        "response_body_size": len(resp or b""),
        "response_content_type": "application/octet-stream; charset=utf-8",
        "duration_ms": 1.0,
        "rule_id": None,
        "result": "allowed",
    }
    for side, data, ct in (("request", req, "application/json"), ("response", resp, "text/plain; charset=utf-8")):
        if data is not None:
            B.to_record(rec, side, B.pack(data, ct))
    return rec


class Store:
    """A store fed by the recorder, remembering what each row's bodies were."""

    def __init__(self, path: Path) -> None:
        self.db = open_database(path)
        self.conn = self.db.connection()
        T.DELTAS.forget()
        self.sent: dict[int, tuple[bytes | None, bytes | None]] = {}
        self.n = 0

    def add(self, recs: list[tuple[dict[str, Any], bytes | None, bytes | None]]) -> None:
        batch = []
        for rec, _req, _resp in recs:
            self.n += 1
            batch.append((f"r{self.n}", "transaction", rec))
        top = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM http_transactions").fetchone()[0]
        apply_records(self.conn, batch)
        ids = [r[0] for r in self.conn.execute("SELECT id FROM http_transactions WHERE id > ? ORDER BY id", (top,))]
        assert len(ids) == len(recs)
        for tid, (_rec, req, resp) in zip(ids, recs):
            self.sent[tid] = (req, resp)

    def check(self) -> None:
        """Every row left reads back what was sent (its bodies, or None where they were dropped)."""
        reader = B.Reader(self.conn.execute)
        rows = self.conn.execute(
            "SELECT id, request_body, request_body_codec, request_body_charset, response_body,"
            " response_body_codec, response_body_charset FROM http_transactions ORDER BY id DESC"
        ).fetchall()
        for tid, rb, rbc, rbs, sb, sbc, sbs in rows:
            row = {
                "id": tid,
                "request_body": rb,
                "request_body_codec": rbc,
                "request_body_charset": rbs,
                "response_body": sb,
                "response_body_codec": sbc,
                "response_body_charset": sbs,
            }
            req, resp = self.sent[tid]
            for side, want, stored in (("request", req, rb), ("response", resp, sb)):
                got = B.read_side(row, side, reader)
                if stored is None:
                    assert got is None
                else:
                    assert got is not None and got.data == want, (tid, side)
            fresh = B.Reader(self.conn.execute)  # a cold reader (no cache) agrees
            for side, want, stored in (("request", req, rb), ("response", resp, sb)):
                if stored is not None:
                    assert fresh.content(tid, side) == want

    def codecs(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT request_body_codec FROM http_transactions ORDER BY id")]

    def depths(self, side: str) -> dict[int, int]:
        """Each row's frames to decode beyond the first (0: self-contained)."""
        base = dict(self.conn.execute(f"SELECT id, {side}_body_base FROM http_transactions"))
        out: dict[int, int] = {}
        for tid in base:
            d, b = 0, base[tid]
            while b is not None:
                d, b = d + 1, base[b]
            out[tid] = d
        return out

    def add_one(self, container: str, url: str, req: bytes | None, resp: bytes | None, ts: float) -> None:
        """One transaction (its own batch) with these bodies."""
        self.add([(record(0, container, url, req, resp, ts), req, resp)])

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def conversation(turns: int, seed: int, size: int = 3000) -> list[bytes]:
    """LLM-shaped request bodies: each repeats the last one's messages and adds a turn."""
    rnd = random.Random(seed)
    system = bytes(rnd.getrandbits(8) for _ in range(size)).hex().encode()
    msgs: list[bytes] = []
    out = []
    for _ in range(turns):
        msgs.append(b'{"role":"user","content":"%s"}' % os.urandom(rnd.randint(20, 600)).hex().encode())
        out.append(b'{"system":"%s","messages":[%s],"stream":true}' % (system, b",".join(msgs)))
        msgs.append(b'{"role":"assistant","content":"%s"}' % os.urandom(rnd.randint(20, 400)).hex().encode())
    return out


def test_a_conversation_is_stored_as_a_chain_and_reads_back(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as s:
        bodies = conversation(40, 1)
        resp = os.urandom(5000)  # binary, with a text label: stored as bytes, charset NULL
        for i, b in enumerate(bodies):
            s.add_one("claude", "https://api.example/v1/messages", b, resp, 1000 + i)
        codecs = s.codecs()
        assert codecs[0] == B.ZSTD and codecs.count(B.ZSTD_DELTA) >= 35
        # bounded chains: reading any body takes at most DELTA_CHAIN frames
        assert max(s.depths("request").values()) == B.DELTA_CHAIN - 1
        stored = s.conn.execute("SELECT SUM(length(request_body)) FROM http_transactions").fetchone()[0]
        alone = sum(len(B.pack(b, "application/json").blob) for b in bodies)
        assert stored * 4 < alone, (stored, alone)
        s.check()
        # The API's and HAR's views (rows inlined in the store layer) are the bytes sent.
        row = s.conn.execute("SELECT * FROM http_transactions ORDER BY id DESC LIMIT 1")
        names = [d[0] for d in row.description]
        last = dict(zip(names, row.fetchone()))
        assert last["request_body_codec"] == B.ZSTD_DELTA
        B.Reader(s.conn.execute).inline([last])
        assert transaction_json(last, include_bodies=True)["request_body"] == bodies[-1].decode()
        item = transaction_json(last, include_bodies=True)
        assert item["response_body_encoding"] == "base64"
        assert har.entry(last)["request"]["postData"]["text"] == bodies[-1].decode()
        with pytest.raises(ValueError, match="Reader"):
            B.read_side(dict(last, request_body_codec=B.ZSTD_DELTA, request_body=b"x"), "request")


def test_a_wrong_base_fails_instead_of_giving_other_bytes() -> None:
    a = os.urandom(5000)
    b = a + b"b" * 10
    z = B.delta(b, a)
    assert B.undelta(z, a) == b
    with pytest.raises(Exception):  # noqa: B017,PT011 - zstd's error: checksum or corrupt frame
        B.undelta(z, a[:-1] + bytes([a[-1] ^ 1]))  # one byte of the base changed


def test_common_prefix() -> None:
    for a, b in [(b"", b""), (b"abc", b"abd"), (b"a" * 10000, b"a" * 10000), (b"a" * 9000 + b"b", b"a" * 9001)]:
        n = B.common_prefix(a, b)
        assert a[:n] == b[:n] and (n == min(len(a), len(b)) or a[n] != b[n])


def test_streams_interleaved_pick_the_base_sharing_the_longest_prefix(tmp_path: Path) -> None:
    """A main conversation and a subagent's on the same stream (same container, URL): each body is
    a delta against the earlier body of its own conversation."""
    with Store(tmp_path / "i.db") as s:
        main, sub = conversation(10, 2), conversation(10, 3)
        for i in range(10):
            for b in (main[i], sub[i]):
                s.add_one("claude", "https://api.example/v1/messages?beta=true", b, None, 1000 + i)
        rows = s.conn.execute("SELECT id, request_body_base FROM http_transactions ORDER BY id").fetchall()
        for (tid, base), prev in zip(rows[2:], rows):
            assert base == prev[0], (tid, base)  # two rows back: the same conversation
        s.check()


def test_a_rolled_back_batch_is_not_used_as_a_base(tmp_path: Path) -> None:
    with Store(tmp_path / "r.db") as s:
        bodies = conversation(6, 4)
        s.add_one("c", "https://api.example/v1/m", bodies[0], None, 1000)
        # A batch whose transaction is rolled back after the encoder saw it (e.g. the disk filled).
        cur = s.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        T.apply_transaction(cur, record(1, "c", "https://api.example/v1/m", bodies[1], None, 1001), [])
        cur.execute("ROLLBACK")
        # The same id is taken again by another body of the stream: it must not be read against the lost one.
        other = conversation(3, 9)[2]
        s.add_one("c", "https://api.example/v1/m", other, None, 1002)
        s.add_one("c", "https://api.example/v1/m", bodies[2], None, 1003)
        s.check()


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_random_streams_with_retention_always_read_back(tmp_path_factory, data) -> None:
    """Random bodies on a few streams (growing conversations, fresh text, binary, small ones),
    interleaved with what retention does (the size cap dropping the oldest bodies or rows, the
    30-day prune, deleting any rows): every body left reads back as sent, after every step."""
    s = Store(tmp_path_factory.mktemp("h") / "h.db")
    chain = B.DELTA_CHAIN
    B.DELTA_CHAIN = data.draw(st.sampled_from([2, 3, 16]))
    T.DELTAS.chain = B.DELTA_CHAIN
    T.DELTAS.sides = data.draw(st.sampled_from([("request",), ("request", "response")]))  # responses too
    try:
        convs = {k: conversation(30, k, size=data.draw(st.sampled_from([1500, 4000]))) for k in range(3)}
        pos = dict.fromkeys(convs, 0)
        ts = time.time() - 40 * 86400
        for _step in range(data.draw(st.integers(3, 12))):
            op = data.draw(st.sampled_from(["add", "add", "add", "bodies", "rows", "prune", "delete"]))
            if op == "add":
                recs = []
                for _ in range(data.draw(st.integers(1, 6))):
                    k = data.draw(st.sampled_from(sorted(convs)))
                    kind = data.draw(st.sampled_from(["conv", "conv", "conv", "binary", "small", "none"]))
                    if kind == "conv":
                        body = convs[k][pos[k] % 30]
                        pos[k] += 1
                    elif kind == "binary":
                        body = os.urandom(data.draw(st.integers(2048, 6000)))
                    elif kind == "small":
                        body = b"tiny %d" % k
                    else:
                        body = None
                    resp = data.draw(st.sampled_from([None, b"ok", convs[k][0], convs[k][pos[k] % 30]]))
                    ts += data.draw(st.sampled_from([1.0, 86400.0]))
                    recs.append((record(0, f"c{k % 2}", f"https://api.example/v{k}", body, resp, ts), body, resp))
                s.add(recs)
            else:
                ids = [r[0] for r in s.conn.execute("SELECT id FROM http_transactions ORDER BY id")]
                if not ids:
                    continue
                if op == "bodies":  # the size cap's first step: the oldest bodies
                    k = data.draw(st.integers(1, len(ids)))
                    jobs.drop_transactions(
                        s.conn, ids[:k], f"UPDATE http_transactions SET {jobs._NO_BODIES} WHERE id IN ({{marks}})"
                    )
                elif op == "rows":  # its second: the oldest rows
                    k = data.draw(st.integers(1, len(ids)))
                    jobs.drop_transactions(s.conn, ids[:k], "DELETE FROM http_transactions WHERE id IN ({marks})")
                elif op == "prune":  # 30-day retention
                    list(jobs.prune(s.conn, {"retention_days": 30}))
                else:
                    gone = data.draw(st.sets(st.sampled_from(ids), min_size=1))
                    jobs.drop_transactions(s.conn, sorted(gone), "DELETE FROM http_transactions WHERE id IN ({marks})")
            s.check()
        # No delta points to a base that is gone or has no body.
        for side in ("request", "response"):
            orphans = s.conn.execute(
                f"SELECT COUNT(*) FROM http_transactions t WHERE {side}_body_codec = 2 AND NOT EXISTS"
                f" (SELECT 1 FROM http_transactions b WHERE b.id = t.{side}_body_base AND b.{side}_body IS NOT NULL)"
            ).fetchone()[0]
            assert orphans == 0
    finally:
        B.DELTA_CHAIN = chain
        T.DELTAS.chain = chain
        T.DELTAS.sides = B.DELTA_SIDES
        s.close()


def _cap_keeping(conn: Any, share: float) -> float:
    """A cap (MiB) under which the size-cap job keeps about `share` of the data (a small cap: its
    -wal room is a quarter of it, services/maintenance/jobs.py wal_room)."""
    return jobs._data_bytes(conn) * share / (jobs.CAP_LOW_WATER - 0.25) / jobs.MIB


def _chains_capped(s: Store, ts: Callable[[int, int], float]) -> tuple[int, int, int]:
    """Twelve 10-turn chains whose first (self-contained) bodies hold most of the bytes (the i-th
    body of chain k at ts(k, i)), then the size cap keeping about 70% of the data: (rows kept,
    request bodies dropped, request deltas left)."""
    for k in range(12):
        recs = []
        for i, b in enumerate(conversation(10, 10 + k, size=30000)):
            resp = os.urandom(3000) if i % 5 == 0 else None
            recs.append((record(i, f"c{k}", "https://api.example/v1/messages", b, resp, ts(k, i)), b, resp))
        s.add(recs)
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    list(jobs.size_cap(s.conn, {"max_database_mib": _cap_keeping(s.conn, 0.7)}))
    return s.conn.execute(
        "SELECT COUNT(*), SUM(request_body IS NULL), SUM(request_body_codec = 2) FROM http_transactions"
    ).fetchone()


def test_size_cap_keeps_every_remaining_body_readable(tmp_path: Path) -> None:
    """The cap drops the oldest bodies first: a chain cut in the middle leaves its later bodies readable."""
    with Store(tmp_path / "c.db") as s:
        kept, dropped, deltas = _chains_capped(s, lambda k, i: 1000 + i)
        assert kept == 120 and 0 < dropped < kept and deltas > 0
        s.check()


def test_size_cap_dropping_whole_rows_keeps_every_remaining_body_readable(tmp_path: Path) -> None:
    """Recent transactions keep their bodies: the cap deletes the oldest rows, cutting chains in the
    middle (their bases among the deleted rows); every body left still reads back identical."""
    now = time.time()
    with Store(tmp_path / "c.db") as s:
        kept, dropped, deltas = _chains_capped(s, lambda k, i: now - 600 + k * 45 + i * 5)  # one chain after another
        assert 0 < kept < 120 and dropped == 0 and deltas > 0  # rows went, no body alone
        assert kept % 10, kept  # a chain was cut in the middle: its first rows (the bases) went
        s.check()


def test_detach_reencodes_the_first_dependent(tmp_path: Path) -> None:
    with Store(tmp_path / "d.db") as s:
        bodies = conversation(5, 5)
        for i, b in enumerate(bodies):
            s.add_one("c", "https://api.example/v1/m", b, None, 1000 + i)
        ids = sorted(s.sent)
        assert s.codecs() == [B.ZSTD] + [B.ZSTD_DELTA] * 4
        n = jobs.drop_transactions(s.conn, ids[:2], "DELETE FROM http_transactions WHERE id IN ({marks})")
        assert n == 2
        assert s.codecs() == [B.ZSTD, B.ZSTD_DELTA, B.ZSTD_DELTA]  # the first left is self-contained now
        s.check()


def test_responses_are_stored_alone(tmp_path: Path) -> None:
    """Only request bodies are compressed against earlier ones (DELTA_SIDES): an answer is new text."""
    with Store(tmp_path / "s.db") as s:
        for i, b in enumerate(conversation(4, 6)):
            s.add_one("c", "https://api.example/x", None, b, 1000 + i)
        assert {r[0] for r in s.conn.execute("SELECT response_body_codec FROM http_transactions")} == {B.ZSTD}
        s.check()


def test_no_delta_for_small_or_unrelated_bodies(tmp_path: Path) -> None:
    with Store(tmp_path / "u.db") as s:
        for i in range(5):
            small, rand = b'{"n": %d}' % i, os.urandom(4096)
            s.add_one("c", "https://api.example/x", small, rand, 1000 + i)
        assert set(s.codecs()) == {B.RAW}
        assert {r[0] for r in s.conn.execute("SELECT response_body_codec FROM http_transactions")} == {B.RAW}
        s.check()


def test_a_partial_common_prefix_makes_a_delta(tmp_path: Path) -> None:
    """Bodies that differ after their first 3 000 bytes (of 5 000): enough of a prefix, a delta."""
    with Store(tmp_path / "p.db") as s:
        common = os.urandom(1500).hex().encode()  # 3000 bytes
        for i in range(3):
            body = common + os.urandom(1000).hex().encode()
            s.add_one("c", "https://api.example/x", body, None, 1000 + i)
        assert s.codecs() == [B.ZSTD, B.ZSTD_DELTA, B.ZSTD_DELTA]
        s.check()
