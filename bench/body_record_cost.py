#!/usr/bin/env python3
"""Cost of a body per request (SPEC §15): the proxy's `Recorder.submit` (decode/pack the body and
serialise the record as the journal does) and the recorder's `apply_records` of those records into
a fresh SQLite file in batches of 500; 5 000 responses with a 1 KiB body, random or JSON.

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
    kinds = (
        ("random 1 KiB text/plain", "text/plain", lambda i: os.urandom(1024)),
        ("JSON 1 KiB", "application/json", lambda i: (b'{"id": %d, "items": [' % i + b'"abc", ' * 140)[:1020] + b'"]}'),
    )
    for name, ctype, make in kinds:
        bodies = [make(i) for i in range(N)]

        async def run(bodies: list[bytes] = bodies, ctype: str = ctype) -> tuple[list[bytes], float]:
            journal = Journal()
            rec = Recorder(journal)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            for b in bodies:
                rec.submit(record(len(b)), None, (b, ctype, None))
            return journal.out, time.perf_counter() - t0

        out, secs = asyncio.run(run())
        db = open_database(Path(tempfile.mkdtemp()) / "b.db")
        conn = db.connection()
        recs = [tuple(orjson.loads(e)) for e in out]
        t0 = time.perf_counter()
        for i in range(0, N, 500):
            apply_records(conn, recs[i : i + 500])
        applied = time.perf_counter() - t0
        db.close()
        print(
            f"{name}: proxy submit {secs / N * 1e6:.1f} µs/request, journal record {sum(map(len, out)) / N:.0f} B,"
            f" recorder {N / applied:,.0f} rec/s"
        )


if __name__ == "__main__":
    main()
