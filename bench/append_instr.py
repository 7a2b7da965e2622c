#!/usr/bin/env python3
"""Instructions (callgrind) the proxy's `JournalWriter.append` spends per proxied keep-alive request.

`bench/tunnel_instr.py`'s loads hand their records to a NullJournal (orjson-encoded, not the real
writer), so the real writer's cost per record is measured here: the records of `bench/record_cost.py`
(a log record and a transaction per request, `--unique`: each request its own URL and X-Request-Id),
built beforehand, appended to a JournalWriter (not running: what `append` does, encoding and
queueing, without the send). Run under callgrind for N1 and N2 requests, each less a run that only
loads the records; the difference over N2 - N1 is the per-request figure.

    .venv/bin/python bench/append_instr.py [--n1 20000] [--n2 60000] [--unique]

Run it in another tree to compare (cd there): it measures the tree it is started from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(n: int, path: str, unique: bool) -> None:
    import record_cost as rc

    class Capture(rc.JournalWriter):
        def append(self, kind, data, record_id=None):  # type: ignore[no-untyped-def]
            got.append((kind, data))
            return 0

    got: list = []
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    w = Capture("ipc:///nonexistent")
    rc.proxy_side(w, rc.Recorder(w), n, unique=unique)
    loop.close()
    with open(path, "wb") as f:
        pickle.dump(got, f)


def append_all(path: str, load_only: bool = False) -> None:
    from bus.journal import JournalWriter

    with open(path, "rb") as f:
        recs = pickle.load(f)
    if load_only:
        return
    w = JournalWriter("ipc:///nonexistent", outbox_limit=10**9, outbox_bytes=10**12)
    append = w.append
    for kind, data in recs:
        append(kind, data)
    assert len(w._queue) == len(recs)


def instructions(n: int, unique: bool) -> int:
    """The appends' instructions for n requests: a run that appends less one that only loads the records."""
    from recorder_instr import callgrind

    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/records.pickle"
        build(n, path, unique)
        for mode in ("--run", "--load"):
            counts.append(callgrind(__file__, [mode, path], tmp))
    return counts[0] - counts[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n1", type=int, default=20_000)
    ap.add_argument("--n2", type=int, default=60_000)
    ap.add_argument("--unique", action="store_true")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run or args.load:
        append_all(args.run or args.load, load_only=bool(args.load))
        return 0
    a = instructions(args.n1, args.unique)
    b = instructions(args.n2, args.unique)
    pure = " (GREYPROXY_PURE=1)" if os.environ.get("GREYPROXY_PURE") else ""
    unique = " (--unique)" if args.unique else ""
    print(
        f"{Path.cwd()}{pure}{unique}: JournalWriter.append {(b - a) / (args.n2 - args.n1):,.0f} instructions per request"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
