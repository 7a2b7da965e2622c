"""Where the CPU of one proxied plain-HTTP request goes, process by process.

Starts nginx and the whole greyproxy stack (as `run.py` does), runs wrk through the forward proxy
(20 connections, 1 KiB, kept alive and/or a new connection per request) and prints, for each of
the stack's processes, its share of a core and its user/system CPU time per request, plus how busy
the machine was. This is the evidence behind bench/analysis.md's per-request accounting.
`bench/run.py` takes the same figures with `Meter` below for every load of its greyproxy columns.

    .venv/bin/python bench/cpu_split.py [--duration S] [--workers N] [--tinyproxy] [LOAD ...]

Loads: `keepalive`, `newconn` (the default pair), `tunnels` (new CONNECT tunnels with
bench/harness/tunnelbench.c, as `run.py` drives them: CONNECT, one plain GET through the tunnel,
close; with the default settings greyproxy reads that GET as plain HTTP inside the tunnel and
records it) and `tunnels-splice` (the same with `mitmEnabled` off: every tunnel is only spliced).
For the tunnel loads the figure is µs per tunnel. `--tinyproxy` runs each load against tinyproxy
too, right after greyproxy, in the same run, with its CPU per request/tunnel.

Each process's line also says how much of the run it spent ready to run but waiting for a CPU (its
threads' run-queue time, /proc schedstat): on a host with few cores, the share of the time a
process lost to the others, not to its own work.

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
from harness.procs import stop_all, tree  # noqa: E402
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


def tree_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of pid and its descendants, with the children it has reaped (a peer
    that forks a process per connection)."""
    user = system = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += (int(fields[11]) + int(fields[13])) / TICK
        system += (int(fields[12]) + int(fields[14])) / TICK
    return user, system


def waited(pids: list[int]) -> float:
    """Seconds the threads of these processes have spent runnable but not running, waiting on a
    CPU's run queue (/proc/PID/task/TID/schedstat, second field; 0 where schedstats are missing).
    Threads that ended meanwhile are not counted."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def stack_pids(stack: object) -> dict[str, int]:
    """service -> pid of each of the stack's processes from /api/health; "proxy" stands for its
    workers (proxy-0, proxy-1 ...), each listed under its own name."""
    _, health = stack.health()  # type: ignore[attr-defined]
    return {name: s["pid"] for name, s in health["services"].items() if s.get("pid") and not s.get("workers")}


class Meter:
    """CPU time each of a set of processes spends over one load, per request served.

    `pids`: name -> pid; `tree` counts each pid with its descendants (peers). `stop(requests, seconds)`
    returns {"idle_pct": the machine's idle share, "processes": {name: {"core_pct", "us", "user_us",
    "system_us", "waiting_pct"}}}; with `client=True` the CPU of the children this process reaped
    meanwhile (the load generator: wrk, curl, tunnelbench) is reported too, as "client".
    `waiting_pct`: the share of the wall time the process's threads (summed) spent ready to run but
    waiting for a CPU: time it would have run on a machine with a core free for it.
    """

    def __init__(self, pids: dict[str, int], tree: bool = False, client: bool = False) -> None:
        self.pids, self.read, self.client, self.with_children = pids, (tree_cpu if tree else cpu), client, tree

    def start(self) -> "Meter":
        import resource

        self.before = {k: self.read(p) for k, p in self.pids.items()}
        self.w0 = {k: self._waited(p) for k, p in self.pids.items()}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.c0, self.m0 = (ru.ru_utime, ru.ru_stime), machine()
        return self

    def stop(self, requests: float, seconds: float) -> dict:
        import resource

        after, m1 = {k: self.read(p) for k, p in self.pids.items()}, machine()
        waits = {k: self._waited(p) - self.w0[k] for k, p in self.pids.items()}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        deltas = {k: (after[k][0] - self.before[k][0], after[k][1] - self.before[k][1]) for k in self.pids}
        if self.client:
            deltas["client"] = (ru.ru_utime - self.c0[0], ru.ru_stime - self.c0[1])
        dm = [b - a for a, b in zip(self.m0, m1)]
        n, secs = max(1.0, requests), max(1e-9, seconds)
        return {
            "idle_pct": 100 * dm[3] / max(1, sum(dm)),
            "requests": requests,
            "processes": {
                k: {
                    "core_pct": 100 * (du + ds) / secs,
                    "us": 1e6 * (du + ds) / n,
                    "user_us": 1e6 * du / n,
                    "system_us": 1e6 * ds / n,
                    **({"waiting_pct": 100 * waits[k] / secs} if k in waits else {}),
                }
                for k, (du, ds) in deltas.items()
            },
        }

    def _waited(self, pid: int) -> float:
        return waited(tree(pid) if self.with_children else [pid])


def split_lines(split: dict, unit: str = "request") -> list[str]:
    """One line per process of a `Meter.stop` result."""
    return [
        f"  {name:12s} {f['core_pct']:5.1f}% of a core  {f['us']:6.1f} µs/{unit}"
        f"  (user {f['user_us']:6.1f}, system {f['system_us']:6.1f})"
        + (f"  waiting for a CPU {f['waiting_pct']:4.1f}%" if "waiting_pct" in f else "")
        for name, f in split["processes"].items()
    ]


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
    meter = Meter(pids).start()
    res = run_load(load, port, origin_port, 20, args.duration, root, tb)
    if "error" in res:
        print(f"{label} {load}: {res['error']}")
        return
    split = meter.stop(res["requests"], res["duration_s"])
    unit = "tunnel" if load.startswith("tunnels") else "request"
    print(
        f"{label} {load}: {res['rps']:,.0f} {unit}s/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
        f"{res['errors']} errors; machine idle {split['idle_pct']:.1f}%",
        flush=True,
    )
    print("\n".join(split_lines(split, unit)), flush=True)


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
        pids = stack_pids(grey.stack)
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
