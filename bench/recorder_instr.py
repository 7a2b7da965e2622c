#!/usr/bin/env python3
"""Instructions (callgrind) the recorder spends per proxied keep-alive request: load-independent.

The records of `bench/record_cost.py` (wrk's GET through the forward proxy: a log record and a
transaction per request), batched as the proxy's JournalWriter sends them (`--per` records a
batch) and coalesced as the JournalConsumer takes them (`--coalesce` batches a transaction), are
decoded as the consumer does, applied (`apply_records`, into a fresh database file) and their
events published with nobody subscribed, after the recorder's own `tune_gc`. Run under callgrind
twice, for N1 and N2 requests (their batches built beforehand, outside the measured run): the difference over N2 - N1 is the per-request figure (start-up,
imports and the database's creation cancel out). No checkpointer runs (its timing would vary).

    .venv/bin/python bench/recorder_instr.py [--n1 10000] [--n2 30000] [--per 500] [--coalesce 4] [--unique]

`--unique`: each request its own URL and its answer its own X-Request-Id (the recorder binds a value
all rows of a multi-row INSERT share once: identical records would flatter it; real traffic varies these).

`GREYPROXY_PURE=1` in the environment: the same as pure Python. Run it in another tree to compare
(cd there): it measures the tree it is started from. About a minute per run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(n: int, per: int, path: str, unique: bool = False) -> None:
    """The journal batches of n requests as the proxy sends them, written to `path` (pickled):
    built outside the measured run, which then only loads them."""
    import pickle

    import record_cost as rc

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    writer = rc.JournalWriter("ipc:///nonexistent", outbox_limit=10**9, outbox_bytes=10**12)
    rc.proxy_side(writer, rc.Recorder(writer), n, unique=unique)
    with open(path, "wb") as f:
        pickle.dump(rc.batches(list(writer._queue), per, getattr(writer, "writer", "bench")), f)
    loop.close()


def apply_once(n: int, path: str, coalesce: int) -> None:
    """The measured run: decode, apply and publish the batches built by `build`."""
    import gc
    import pickle

    import record_cost as rc

    try:  # (a tree from before the recorder tuned its collector: the defaults)
        from greyproxy.runtime import tune_gc
        from services.recorder.service import GC_THRESHOLD
    except ImportError:
        tune_gc, GC_THRESHOLD = None, None

    with open(path, "rb") as f:
        bodies = pickle.load(f)
    with tempfile.TemporaryDirectory(prefix="gp-recinstr-") as root:
        db = rc.open_database(Path(root) / "greyproxy.db")
        conn = db.connection()
        pub = rc.Publisher()
        gc.collect()
        if tune_gc is not None:
            tune_gc(GC_THRESHOLD)
        for i in range(0, len(bodies), coalesce):
            records = []
            for body in bodies[i : i + coalesce]:  # as JournalConsumer.serve decodes them
                records.extend(rc.decode(body))
            events = rc.apply_mod.apply_records(conn, records, lazy=True)
            rc.service.publish_events(pub, events)
        stored = conn.execute("SELECT (SELECT COUNT(*) FROM logs), (SELECT COUNT(*) FROM http_transactions)").fetchone()
        assert stored == (n, n), stored
        db.close()


def callgrind(script: str, args: list[str], tmp: str) -> int:
    """Instructions callgrind counted for `python script args...` (its dump goes to tmp)."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", sys.executable, script, *args],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    m = re.search(r"Collected : (\d+)", out)
    assert m, out[-2000:]
    return int(m.group(1))


def instructions(n: int, per: int, coalesce: int, unique: bool = False) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        batches = f"{tmp}/batches.pickle"
        build(n, per, batches, unique)
        return callgrind(__file__, ["--run", str(n), "--batches", batches, "--coalesce", str(coalesce)], tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n1", type=int, default=10_000)
    ap.add_argument("--n2", type=int, default=30_000)
    ap.add_argument("--per", type=int, default=500, help="records per journal batch (JournalWriter.batch_size)")
    ap.add_argument("--coalesce", type=int, default=4, help="batches applied in one transaction")
    ap.add_argument(
        "--unique",
        action="store_true",
        help="each request its own URL and response X-Request-Id (record_cost.proxy_side)",
    )
    ap.add_argument("--run", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run is not None:
        apply_once(args.run, args.batches, args.coalesce)
        return 0
    a = instructions(args.n1, args.per, args.coalesce, args.unique)
    b = instructions(args.n2, args.per, args.coalesce, args.unique)
    pure = " (GREYPROXY_PURE=1)" if os.environ.get("GREYPROXY_PURE") else ""
    unique = " (--unique)" if args.unique else ""
    print(f"{Path.cwd()}{pure}{unique}: recorder {(b - a) / (args.n2 - args.n1):,.0f} instructions per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
