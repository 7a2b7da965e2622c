"""Where the CPU of one proxied plain-HTTP request goes, process by process.

Starts nginx and the whole greyproxy stack (as `run.py` does), runs wrk through the forward proxy
(20 connections, 1 KiB, kept alive and/or a new connection per request) and prints, for each of
the stack's processes, its share of a core and its user/system CPU time per request, plus how busy
the machine was. This is the evidence behind bench/analysis.md's per-request accounting.

    .venv/bin/python bench/cpu_split.py [--duration S] [--workers N] [--tinyproxy] [LOAD ...]

Loads: `keepalive`, `newconn` (the default pair), `tunnels` (new CONNECT tunnels with
bench/harness/tunnelbench.c, as `run.py` drives them: CONNECT, one plain GET through the tunnel,
close; with the default settings greyproxy reads that GET as plain HTTP inside the tunnel and
records it) and `tunnels-splice` (the same with `mitmEnabled` off: every tunnel is only spliced).
For the tunnel loads the figure is µs per tunnel. `--tinyproxy` runs each load against tinyproxy
too, right after greyproxy, in the same run, with its CPU per request/tunnel.

Needs nginx and wrk (bench/setup.sh system), a C compiler for the tunnel loads.
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

from harness.loads import lua_absolute, run_tunnelbench, run_wrk, tunnelbench_binary  # noqa: E402
from harness.origin import NginxOrigin  # noqa: E402
from harness.procs import stop_all  # noqa: E402
from harness.proxies import GreyProxy, Tinyproxy, Unavailable  # noqa: E402

LOADS = ("keepalive", "newconn", "tunnels", "tunnels-splice")

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def machine() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def run_load(load: str, port: int, origin_port: int, conns: int, secs: float, root: Path, tb: str | None) -> dict:
    if load.startswith("tunnels"):
        assert tb is not None
        return run_tunnelbench(tb, port, origin_port, conns, secs)
    return run_wrk(port, lua_absolute(origin_port, close=load == "newconn"), conns, secs, root)


def measure(
    label: str, load: str, pids: dict[str, int], port: int, origin_port: int, args, root: Path, tb: str | None
) -> None:
    """One load against one proxy: its rate, how idle the machine was, and CPU per request per process."""
    run_load(load, port, origin_port, 20, 2, root, tb)  # warm-up
    before, m0 = {k: cpu(p) for k, p in pids.items()}, machine()
    res = run_load(load, port, origin_port, 20, args.duration, root, tb)
    after, m1 = {k: cpu(p) for k, p in pids.items()}, machine()
    if "error" in res:
        print(f"{label} {load}: {res['error']}")
        return
    dm = [b - a for a, b in zip(m0, m1)]
    n, secs = res["requests"], res["duration_s"]
    unit = "tunnel" if load.startswith("tunnels") else "request"
    print(
        f"{label} {load}: {res['rps']:,.0f} {unit}s/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
        f"{res['errors']} errors; machine idle {100 * dm[3] / sum(dm):.1f}%",
        flush=True,
    )
    for name in pids:
        du, ds = after[name][0] - before[name][0], after[name][1] - before[name][1]
        print(
            f"  {name:12s} {100 * (du + ds) / secs:5.1f}% of a core  {1e6 * (du + ds) / n:6.1f} µs/{unit}"
            f"  (user {1e6 * du / n:6.1f}, system {1e6 * ds / n:6.1f})",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("loads", nargs="*", help=f"{', '.join(LOADS)} (default: keepalive newconn)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per load (default 8)")
    ap.add_argument("--workers", type=int, default=1, help="proxy.workers (default 1): each worker is listed")
    ap.add_argument("--tinyproxy", action="store_true", help="run each load against tinyproxy as well")
    args = ap.parse_args(argv)
    bad = [x for x in args.loads if x not in LOADS]
    if bad:
        ap.error(f"unknown load {bad[0]!r} ({', '.join(LOADS)})")
    loads = args.loads or ["keepalive", "newconn"]
    if not shutil.which("wrk") or not shutil.which("nginx"):
        print("cpu_split: needs wrk and nginx (bench/setup.sh system)", file=sys.stderr)
        return 2
    tb = None
    if any(x.startswith("tunnels") for x in loads):
        tb, why = tunnelbench_binary(BENCH / "out" / "bin")
        if tb is None:
            print(f"cpu_split: {why}", file=sys.stderr)
            return 2
    root = Path(tempfile.mkdtemp(prefix="gp-cpu-"))
    origin = NginxOrigin(root / "origin", 1 << 20, None).start()
    grey = GreyProxy(root / "grey", workers=args.workers)
    tiny = Tinyproxy(root / "tiny") if args.tinyproxy else None
    try:
        grey.start()
        _, health = grey.stack.health()
        pids = {
            name: s["pid"] for name, s in health["services"].items() if s.get("pid") and not s.get("workers")
        }  # "proxy" stands for its workers: each is listed
        if tiny is not None:
            try:
                tiny.start()
            except Unavailable as exc:
                print(f"tinyproxy: {exc}")
                tiny = None
        mitm = True
        for load in loads:
            want = load != "tunnels-splice"
            if want != mitm:
                why = grey.set_mitm(want, 2.5)
                if why:
                    print(f"{load}: mitmEnabled {want} not set: {why}")
                    continue
                mitm = want
            measure("greyproxy", load, pids, grey.port, origin.port, args, root, tb)
            time.sleep(1)
            if tiny is not None and load != "tunnels-splice":
                measure("tinyproxy", load, {"tinyproxy": tiny.main_pid()}, tiny.port, origin.port, args, root, tb)
                time.sleep(1)
    finally:
        if tiny is not None:
            tiny.stop()
        grey.stop()
        origin.stop()
        stop_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
