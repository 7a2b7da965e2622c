"""The HAR export's generator (services/api/export.py, SPEC §14) over a real SQLite database, driven
through a real ApiContext's database pool as the route drives it: memory bounded by what is
decoded (not by what is stored), a body that cannot be read, a failure after the first bytes;
the list's `include_bodies` with such a body; and the truncation a capture records (the proxy's
record → the recorder's row → the HAR entry, whatever capture.maxBodyBytes is later)."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pytest

from bus.reqrep import ControlClient
from greyproxy import har
from greyproxy.bodies import pack
from greyproxy.capture import TRANSACTION_COLUMNS
from greyproxy.config import load_config
from greyproxy.store import database, open_database
from greyproxy.store.transactions import TransactionFilter
from services.api import export
from services.api.app import create_app
from services.api.context import ApiContext

MiB = 1024 * 1024


class NoBus:
    def publish(self, topic: str, data: Any) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ApiContext]:
    db = open_database(tmp_path / "db")
    config = tmp_path / "config.yaml"
    config.write_text("greyproxy: {pathPrefix: /}\n")
    cfg = load_config(config, env={"GREYPROXY_DATA_HOME": str(tmp_path / "data")})
    socks = tempfile.mkdtemp(prefix="gph")
    executor = ThreadPoolExecutor(2)
    clients = [
        ControlClient(f"ipc://{socks}/{name}", name, timeout=0.05, retries=1)
        for name in ("proxy", "recorder", "maintenance")
    ]
    c = ApiContext(
        cfg=cfg,
        publisher=NoBus(),  # type: ignore[arg-type]
        db_executor=executor,
        proxy=clients[0],
        recorder=clients[1],
        maintenance=clients[2],
    )
    try:
        yield c
    finally:
        for client in clients:
            client.close()
        executor.shutdown(wait=True)
        db.close()
        shutil.rmtree(socks, ignore_errors=True)


_COLS = [c for c in TRANSACTION_COLUMNS if c not in ("id", "request_body_base", "response_body_base")]


def insert(n: int, body: bytes | None, container: str = "c", t0: float = 1000.0, **over: Any) -> None:
    packed = pack(body, "application/json") if body is not None else None
    headers = json.dumps({"Content-Type": ["application/json"]})
    rows = []
    for i in range(n):
        values = {
            "timestamp": t0 + i,
            "container_name": container,
            "destination_host": "api.test",
            "destination_port": 443,
            "method": "POST",
            "url": f"https://api.test/v1?i={i}",
            "request_headers": headers,
            "request_body_size": 0,
            "status_code": 200,
            "response_headers": headers,
            "response_body": packed.blob if packed else None,
            "response_body_codec": packed.codec if packed else None,
            "response_body_charset": packed.charset if packed else None,
            "response_body_size": len(body or b""),
            "response_content_type": "application/json",
            "duration_ms": 1.0,
            "result": "allowed",
            "substituted_credentials": "[]",
            "refused_credentials": "[]",
            "host_mismatch": 0,
        }
        values.update(over)
        rows.append([values.get(c) for c in _COLS])
    marks = ",".join("?" * len(_COLS))
    with database.atomic():
        for r in rows:
            database.execute_sql(f"INSERT INTO http_transactions ({', '.join(_COLS)}) VALUES ({marks})", r)


async def collect(stream: Any, on_chunk: Any = None) -> bytes:
    out = bytearray()
    async for chunk in stream:
        out += chunk
        if on_chunk is not None:
            on_chunk(len(out))
    return bytes(out)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def test_memory_is_bounded_by_decoded_bytes_not_stored_ones(ctx: ApiContext) -> None:
    """40 transactions with a 2 MiB JSON body each, stored zstd in a few hundred bytes: the export
    is ~90 MB of HAR; what the generator holds at any time is about one body, not a page of them
    (was: a page of entries built whole, plus its `b",".join` copy: 1.2 GB of RSS for 200).
    Measured as this process's peak RSS (VmHWM, reset first through /proc/self/clear_refs)."""
    body = json.dumps({"content": "x" * (2 * MiB - 32)}).encode()
    insert(40, body)
    stored = database.execute_sql("SELECT MAX(length(response_body)) FROM http_transactions").fetchone()[0]
    assert stored < 2000  # highly compressible: the old bound (stored bytes) let all 40 through at once
    biggest = [0]
    size = [0]

    async def run() -> None:
        async for chunk in export.har_stream(ctx, TransactionFilter()):
            biggest[0] = max(biggest[0], len(chunk))
            size[0] += len(chunk)

    gc.collect()
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    asyncio.run(run())
    growth = _status_mib("VmHWM") - before
    assert size[0] > 40 * 2 * MiB
    assert biggest[0] <= 4 * MiB, f"a chunk of {biggest[0] / MiB:.1f} MiB"
    assert growth < 40, f"the export took {growth:.0f} MiB of RSS at its peak"


def test_a_body_that_cannot_be_read_does_not_break_the_export(ctx: ApiContext, caplog) -> None:
    insert(5, b'{"ok": true}' * 10)
    insert(1, None, t0=1002.5, response_body=b"\x28\xb5\x2f\xfd corrupt", response_body_codec=1)
    doc = orjson.loads(asyncio.run(collect(export.har_stream(ctx, TransactionFilter()))))
    entries = doc["log"]["entries"]
    assert len(entries) == 6
    bad = entries[3]
    assert "could not be read" in bad["response"]["content"]["comment"] and "text" not in bad["response"]["content"]
    assert all(e["response"]["content"]["text"] == '{"ok": true}' * 10 for e in entries if e is not bad)
    assert any("could not be read" in r.getMessage() for r in caplog.records)


def test_the_list_with_bodies_survives_a_body_that_cannot_be_read(ctx: ApiContext) -> None:
    insert(2, b'{"ok": true}')
    insert(1, None, t0=1001.5, response_body=b"\x28\xb5\x2f\xfd corrupt", response_body_codec=1)
    client = falcon.testing.TestClient(create_app(ctx))
    res = client.simulate_get("/api/transactions", params={"include_bodies": "true"}, host="localhost")
    assert res.status_code == 200, res.text  # was: 500 for the whole page
    items = res.json["items"]
    assert len(items) == 3
    bad = next(i for i in items if i["response_body"] is None)
    assert "could not be read" in bad["response_body_error"]
    assert sum(i["response_body"] == '{"ok": true}' for i in items) == 2
    res = client.simulate_get(f"/api/transactions/{bad['id']}", host="localhost")
    assert res.status_code == 200 and res.json["response_body"] is None and res.json["response_body_error"]


def test_a_failure_after_the_first_bytes_is_not_a_clean_end(ctx: ApiContext, monkeypatch) -> None:
    """Once the status line is out, a failure must not end the stream as if it were whole (was: the
    generator returned, the chunked response ended cleanly with half a document and a 200)."""
    monkeypatch.setattr(export, "PAGE_ROWS", 10)
    monkeypatch.setattr(export, "CHUNK_BYTES", 1000)  # a few entries a step
    insert(50, b'{"ok": true}')

    def drop_the_table(n: int) -> None:
        if n > 1000 and not dropped:
            database.execute_sql("ALTER TABLE http_transactions RENAME TO gone")
            dropped.append(n)

    dropped: list[int] = []

    with pytest.raises(Exception) as info:
        asyncio.run(collect(export.har_stream(ctx, TransactionFilter()), drop_the_table))
    assert dropped and isinstance(info.value, export.ExportAborted) and "no such table" in str(info.value)


def test_limit_offset_and_every_row_once(ctx: ApiContext, monkeypatch) -> None:
    monkeypatch.setattr(export, "PAGE_ROWS", 7)
    insert(60, b'{"a": 1}')
    insert(3, None, t0=1020.0)  # same timestamps as others: the id breaks ties across page edges
    every = orjson.loads(asyncio.run(collect(export.har_stream(ctx, TransactionFilter()))))["log"]["entries"]
    ids = [e["_id"] for e in every]
    assert len(ids) == len(set(ids)) == 63
    some = orjson.loads(asyncio.run(collect(export.har_stream(ctx, TransactionFilter(), 9, 5))))["log"]["entries"]
    assert [e["_id"] for e in some] == ids[5:14]


# ----------------------------------------------------------------------------- truncation, end to end


def test_the_capture_records_truncation_and_the_export_keeps_it(tmp_path: Path) -> None:
    """The proxy's record says whether the stored copy is cut (cut on the wire, or its decoding
    stopped at capture.maxBodyBytes); the recorder stores it; the HAR says so under any later cap."""
    from bus import records
    from services.proxy import http1
    from services.proxy.pipeline import Recorder
    from services.recorder import transactions  # noqa: F401 - registers the transaction kind
    from services.recorder.apply import apply_records

    class Journal:
        def __init__(self) -> None:
            self.records: list[Any] = []

        def append(self, kind: str, data: Any, record_id: str | None = None) -> str:
            self.records.append((f"r-{len(self.records)}", kind, orjson.loads(orjson.dumps(data))))
            return str(len(self.records))

    def head(method: str = "GET") -> http1.RequestHead:
        raw = f"{method} http://h/x HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\r\n".encode()
        return http1.parse_request_head(raw, 65536, 100)[0]

    def resp(encoding: str | None) -> http1.ResponseHead:
        extra = f"Content-Encoding: {encoding}\r\n" if encoding else ""
        raw = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}\r\n".encode()
        return http1.parse_response_head(raw, 65536, "GET")[0]

    cap = 65536
    bomb = b"[" + b'"x",' * 100_000 + b'"x"]'  # 400 KB of JSON, gzip'd to ~1 KB: decoded past the cap
    whole = b'{"y": "' + b"y" * 2170 + b'"}'
    cases = [  # (response body on the wire, its coding, stored cut?)
        (gzip.compress(bomb), "gzip", 1),
        (gzip.compress(whole), "gzip", 0),
        (b"z" * (cap + 10), None, 1),
        (whole, None, 0),
    ]

    async def capture() -> list[Any]:
        journal = Journal()
        rec = Recorder(journal, max_body=cap)  # type: ignore[arg-type]
        for wire, coding, _cut in cases:
            t = rec.txn("agent", "http://h", "h", 80, head())
            r = resp(coding)
            t.resp_sink(r)(wire)
            t.finish(r)
        for _ in range(300):
            if len(journal.records) == len(cases):
                break
            await asyncio.sleep(0.01)
        return journal.records

    recs = asyncio.run(capture())
    assert len(recs) == len(cases)
    by_size = {records.transaction_fields(r[2])["response_body_size"]: r for r in recs}
    db = open_database(tmp_path / "t.db")
    try:
        apply_records(db.connection(), [by_size[len(w)] for w, _c, _x in cases])
        cur = db.execute_sql(f"SELECT {', '.join(TRANSACTION_COLUMNS)} FROM http_transactions ORDER BY id")
        rows = [dict(zip(TRANSACTION_COLUMNS, r)) for r in cur.fetchall()]
    finally:
        db.close()
    assert [r["response_body_truncated"] for r in rows] == [c for _w, _e, c in cases]
    for later_cap in (1000, cap, 2 * MiB):  # capture.maxBodyBytes changed after the capture
        entries = [har.entry(r, max_body=later_cap) for r in rows]
        notes = [e["response"]["content"].get("comment", "") for e in entries]
        assert ["truncated" in n for n in notes] == [bool(c) for _w, _e, c in cases], (later_cap, notes)
        sizes = [e["response"]["content"]["size"] for e in entries]
        assert sizes[0] == cap and sizes[1] == len(whole) and sizes[2] == cap + 10 and sizes[3] == len(whole)


def test_the_cli_knows_how_a_har_document_ends() -> None:
    from greyproxy import cli_export

    assert cli_export.TAIL == har.DOCUMENT_TAIL and har.document_head().startswith(cli_export.HEAD)


def test_a_client_that_leaves_stops_the_export(ctx: ApiContext, monkeypatch, caplog) -> None:
    """The real app through Falcon's ASGI conductor: the client reads a little, then disconnects;
    the export stops at its next step instead of building the rest for nobody."""
    monkeypatch.setattr(export, "CHUNK_BYTES", 2000)
    insert(3000, b'{"ok": true}')

    async def main() -> None:
        async with falcon.testing.ASGIConductor(create_app(ctx)) as conductor:
            async with conductor.simulate_get_stream("/api/transactions/export.har", host="localhost") as sr:
                assert sr.status_code == 200
                got = b""
                while len(got) < 20_000:
                    got += await sr.stream.read()
            await asyncio.sleep(0.3)  # (the step under way ends)

    caplog.set_level("INFO", logger="greyproxy.api")
    asyncio.run(main())
    stops = [r.getMessage() for r in caplog.records if "client went away" in r.getMessage()]
    assert stops, [r.getMessage() for r in caplog.records]
    built = int(stops[0].split("after ")[1].split()[0])
    assert built < 1000, stops[0]


def test_the_cli_checks_the_document_before_it_renames_it(tmp_path: Path) -> None:
    from greyproxy import cli_export

    whole = har.document_head("t") + har.entry_bytes({"id": 1, "url": "http://h/"}) + har.DOCUMENT_TAIL
    path = tmp_path / "x.har"
    path.write_bytes(whole)
    cli_export._check(whole[:10], whole[-10:], path)
    half = whole[: len(whole) // 2]
    path.write_bytes(half)
    with pytest.raises(cli_export.Incomplete, match="does not end"):
        cli_export._check(half[:10], half[-10:], path)
    broken = half + har.DOCUMENT_TAIL  # ends as a document ends, yet is not one
    path.write_bytes(broken)
    with pytest.raises(cli_export.Incomplete, match="not valid JSON"):
        cli_export._check(broken[:10], broken[-10:], path)
