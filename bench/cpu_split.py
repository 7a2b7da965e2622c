"""Where the CPU of one proxied plain-HTTP request goes, process by process.

Starts nginx and the whole greyproxy stack (as `run.py` does), runs wrk through the forward proxy
(20 connections, 1 KiB, kept alive and/or a new connection per request) and prints, for each of
the stack's processes, its share of a core and its user/system CPU time per request, plus how busy
the machine was. This is the evidence behind bench/analysis.md's per-request accounting.

    .venv/bin/python bench/cpu_split.py [--duration S] [--workers N] [keepalive] [newconn]

Needs nginx and wrk (bench/setup.sh system).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness.loads import lua_absolute, run_wrk  # noqa: E402
from harness.origin import NginxOrigin  # noqa: E402
from harness.procs import stop_all  # noqa: E402
from harness.proxies import GreyProxy  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def machine() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("loads", nargs="*", help="keepalive and/or newconn (default: both)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per load (default 8)")
    ap.add_argument("--workers", type=int, default=1, help="proxy.workers (default 1): each worker is listed")
    args = ap.parse_args(argv)
    bad = [x for x in args.loads if x not in ("keepalive", "newconn")]
    if bad:
        ap.error(f"unknown load {bad[0]!r} (keepalive, newconn)")
    if not shutil.which("wrk") or not shutil.which("nginx"):
        print("cpu_split: needs wrk and nginx (bench/setup.sh system)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="gp-cpu-"))
    origin = NginxOrigin(root / "origin", 1 << 20, None).start()
    grey = GreyProxy(root / "grey", workers=args.workers)
    try:
        grey.start()
        _, health = grey.stack.health()
        pids = {
            name: s["pid"] for name, s in health["services"].items() if s.get("pid") and not s.get("workers")
        }  # "proxy" stands for its workers: each is listed
        for load in args.loads or ["keepalive", "newconn"]:
            lua = lua_absolute(origin.port, close=load == "newconn")
            run_wrk(grey.port, lua, 20, 2, root)  # warm-up
            before, m0 = {k: cpu(p) for k, p in pids.items()}, machine()
            res = run_wrk(grey.port, lua, 20, args.duration, root)
            after, m1 = {k: cpu(p) for k, p in pids.items()}, machine()
            if "error" in res:
                print(f"{load}: {res['error']}")
                continue
            dm = [b - a for a, b in zip(m0, m1)]
            n, secs = res["requests"], res["duration_s"]
            print(
                f"{load}: {res['rps']:,.0f} req/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                f"{res['errors']} errors; machine idle {100 * dm[3] / sum(dm):.1f}%"
            )
            for name in pids:
                du, ds = after[name][0] - before[name][0], after[name][1] - before[name][1]
                print(
                    f"  {name:12s} {100 * (du + ds) / secs:5.1f}% of a core  {1e6 * (du + ds) / n:6.1f} µs/request"
                    f"  (user {1e6 * du / n:6.1f}, system {1e6 * ds / n:6.1f})"
                )
            time.sleep(1)
    finally:
        grey.stop()
        origin.stop()
        stop_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
