#!/usr/bin/env python3
"""The rows a tree's recorder stores for a fixed journal, to compare two trees byte for byte.

    .venv/bin/python bench/record_rows.py OUT.pickle [--journal J.pickle]          # in this tree
    cd /work/main && PYTHONPATH=. .venv/bin/python /path/to/bench/record_rows.py OUT2.pickle --journal J.pickle
    cmp OUT.pickle OUT2.pickle

The journal (3 000 requests as bench/record_cost.py builds them, in batches of 25 requests, then
tests/unit/test_recorder_rows.py's mixed records: bodies small and over the delta threshold,
shape-1 and shape-2 records, a refusal) is written to J.pickle on the first run and read by the
next, so both trees apply the same records (timestamps included). The output is the pickled rows
of logs, log_counts, http_transactions and journal_ranges (writer, lo, hi): values and types.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import pickle
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "unit"))

import record_cost as rc  # noqa: E402
from bus.journal import JournalWriter  # noqa: E402
from greyproxy.store import open_database  # noqa: E402
from services.proxy.pipeline import Recorder  # noqa: E402
from services.recorder import apply as apply_mod  # noqa: E402
from test_recorder_rows import _journal  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--journal", default=str(Path(tempfile.gettempdir()) / "greyproxy-record-rows-journal.pickle"))
    args = ap.parse_args()
    jpath = Path(args.journal)
    if not jpath.exists():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        writer = JournalWriter("ipc:///nonexistent", outbox_limit=10**9, outbox_bytes=10**12)
        rc.proxy_side(writer, Recorder(writer), 3000)
        jpath.write_bytes(pickle.dumps((rc.batches(list(writer._queue), 50), _journal())))
        loop.close()
    bodies, mixed = pickle.loads(jpath.read_bytes())
    with tempfile.TemporaryDirectory(prefix="gp-recrows-") as root:
        db = open_database(Path(root) / "greyproxy.db")
        try:
            conn = db.connection()
            for body in bodies:
                apply_mod.apply_records(conn, rc.decode(body))
            apply_mod.apply_records(conn, mixed)
            out = {
                t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("logs", "log_counts", "http_transactions")
            }
            out["journal_ranges"] = conn.execute("SELECT writer, lo, hi FROM journal_ranges ORDER BY 1, 2").fetchall()
        finally:
            db.close()
    blob = pickle.dumps(out)
    Path(args.out).write_bytes(blob)
    where = Path(apply_mod.__file__).parent
    counts = {k: len(v) for k, v in out.items()}
    print(f"{args.out} ({where}): {counts} sha256 {hashlib.sha256(blob).hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
