#!/usr/bin/env python3
"""Cost of a body per request (SPEC §15): the proxy's `Recorder.submit` (decode/pack the body and
serialise the record as the journal does) and the recorder's `apply_records` of those records into
a fresh SQLite file in batches of 500; 5 000 responses with a 1 KiB body, random or JSON; 2 000
different 8 KiB JSON responses (bodies past the size where the recorder looks for a delta); and 400
LLM request bodies (10 agents, each in its own container, turn by turn through bench/body_storage.py's
40-turn session: the bodies the recorder stores as deltas, greyproxy.bodies), with the recorder's
CPU per record and the request bytes stored.

    .venv/bin/python bench/body_record_cost.py        (another tree: cd there, PYTHONPATH=.)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path.cwd()))

import greyproxy  # noqa: E402
from greyproxy.store import open_database  # noqa: E402
from services.proxy.pipeline import Recorder  # noqa: E402
from services.recorder import transactions  # noqa: E402,F401 - registers the transaction kind
from services.recorder.apply import apply_records  # noqa: E402

N = 5000


class Journal:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def append(self, kind: str, data: Any, record_id: str | None = None) -> None:
        self.out.append(orjson.dumps([f"r{len(self.out)}", kind, data], option=orjson.OPT_NON_STR_KEYS))


def record(size: int) -> dict[str, Any]:
    return {
        "timestamp": time.time(),
        "container_name": "c",
        "destination_host": "h",
        "destination_port": 80,
        "method": "GET",
        "url": "http://h/x",
        "request_headers": {"Accept": ["*/*"]},
        "request_body": None,
        "request_body_size": 0,
        "request_content_type": None,
        "status_code": 200,
        "response_headers": {"Content-Type": ["text/plain"]},
        "response_body": None,
        "response_body_size": size,
        "response_content_type": "text/plain",
        "duration_ms": 1.0,
        "rule_id": None,
        "result": "allowed",
        "conversation_id": None,
        "substituted_credentials": [],
        "session_id": None,
        "request_host": "h",
        "host_mismatch": False,
        "error": None,
    }


def main() -> None:
    print(f"tree: {Path(greyproxy.__file__).resolve().parent.parent}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from body_storage import session_bodies

    session = session_bodies(40)
    kinds = (
        ("random 1 KiB text/plain", "text/plain", [os.urandom(1024) for i in range(N)], 1),
        (
            "JSON 1 KiB",
            "application/json",
            [(b'{"id": %d, "items": [' % i + b'"abc", ' * 140)[:1020] + b'"]}' for i in range(N)],
            1,
        ),
        (
            "8 KiB JSON, each different (one URL)",
            "application/json",
            [b'{"id": %d, "data": "%s"}' % (i, os.urandom(4080).hex().encode()) for i in range(2000)],
            1,
        ),
        (
            "LLM request bodies (40-turn session x 10 agents)",
            "application/json",
            [b for b in session for _a in range(10)],
            10,
        ),
    )
    for name, ctype, bodies, agents in kinds:
        n = len(bodies)

        async def run(
            bodies: list[bytes] = bodies, ctype: str = ctype, agents: int = agents
        ) -> tuple[list[bytes], float]:
            journal = Journal()
            rec = Recorder(journal)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            for i, b in enumerate(bodies):
                if agents == 1:
                    rec.submit(record(len(b)), None, (b, ctype, None))
                else:
                    r = record(0) | {
                        "method": "POST",
                        "container_name": f"agent{i % agents}",
                        "request_body_size": len(b),
                    }
                    rec.submit(r, (b, ctype, None), None)
            return journal.out, time.perf_counter() - t0

        out, secs = asyncio.run(run())
        db = open_database(Path(tempfile.mkdtemp()) / "b.db")
        conn = db.connection()
        recs = [tuple(orjson.loads(e)) for e in out]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, n, 500):
            apply_records(conn, recs[i : i + 500])
        applied, cpu = time.perf_counter() - t0, time.process_time() - c0
        stored = conn.execute(
            "SELECT COALESCE(SUM(length(request_body)), 0) + COALESCE(SUM(length(response_body)), 0) FROM http_transactions"
        ).fetchone()[0]
        db.close()
        print(
            f"{name}: proxy submit {secs / n * 1e6:.1f} µs/request, journal record {sum(map(len, out)) / n:.0f} B,"
            f" recorder {n / applied:,.0f} rec/s, {cpu / n * 1e6:.0f} µs CPU/record, body bytes stored {stored / n:,.0f}/request"
        )


if __name__ == "__main__":
    main()
