#!/usr/bin/env python3
"""The logs API's store queries (greyproxy/store/logs.py: list_logs, log_stats) timed on a database of
1 000 000 synthetic rows (bench/harness/greybench.bulk_insert_logs: 50 containers, 80 % allowed,
timestamps over a day), without the API process around them (median ms of --calls calls each):

    python bench/logs_queries.py make /tmp/logs1m.db          # once: the rows, under the tree's schema
    python bench/logs_queries.py time /tmp/logs1m.db /tmp/work.db

`time` copies the database (the tree's migrations then run on the copy: a database of an older tree
is upgraded, and the upgrade timed) and prints each query's median, total and first ids, so two trees'
outputs can be compared for identical results. Timings are wall clock: compare runs on a quiet machine.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from greyproxy.store import logs, open_database  # noqa: E402


def _timed(fn: Any, calls: int) -> tuple[float, Any]:
    out = fn()
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(samples), 2), out


def main() -> int:
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode == "make":
        from harness import greybench

        open_database(path).close()
        print("insert s", round(greybench.bulk_insert_logs(path, 1_000_000), 1))
        return 0
    work = Path(sys.argv[3])
    shutil.copy(path, work)
    t0 = time.perf_counter()
    db = open_database(work)
    print("open (migrations) s", round(time.perf_counter() - t0, 3))
    print(
        "logs indexes",
        [r[0] for r in db.execute_sql("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'logs'")],
    )
    now = db.execute_sql("SELECT MAX(timestamp) FROM logs").fetchone()[0] + 1
    f = logs.LogFilter
    pages = {
        "plain": (f(), 50, 0),
        "plain offset 5000": (f(), 50, 5000),
        "result=blocked": (f(result="blocked"), 50, 0),
        "result=allowed": (f(result="allowed"), 50, 0),
        "container=agent7": (f(container="agent7"), 50, 0),
        "container=agent1 (11 names)": (f(container="agent1"), 50, 0),
        "container=a (50 names)": (f(container="a"), 50, 0),
        "destination=svc42.": (f(destination="svc42."), 50, 0),
        "an hour": (f(from_ts=now - 7200, to_ts=now - 3600), 50, 0),
        "an hour, blocked": (f(result="blocked", from_ts=now - 7200, to_ts=now - 3600), 50, 0),
        "an hour, agent7": (f(container="agent7", from_ts=now - 7200, to_ts=now - 3600), 50, 0),
    }
    out: dict[str, Any] = {}
    for name, (flt, limit, offset) in pages.items():
        ms, (rows, total) = _timed(lambda flt=flt, limit=limit, offset=offset: logs.list_logs(flt, limit, offset), 15)
        out[name] = [ms, total, [r["id"] for r in rows][:3]]
    for name, (lo, hi, group) in {
        "stats: an hour": (now - 3600, now, "hour"),
        "stats: a day": (now - 86400, now, "hour"),
        "stats: a week": (now - 7 * 86400, now, "day"),
    }.items():
        ms, st = _timed(lambda lo=lo, hi=hi, group=group: logs.log_stats(lo, hi, group, recent_limit=10), 5)
        out[name] = [ms, st["total"], st["blocked"], len(st["timeline"]), [r["id"] for r in st["recent"]][:3]]
    print(json.dumps(out, indent=1))
    db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
