"""Instructions (callgrind) or system calls (strace -c) per new CONNECT tunnel of the proxy's HTTP
listener, in process, over loopback sockets.

The listener is `bench/conn_path.py`'s (real gate, interception hook, log records encoded and
dropped), served in a child process; nginx is the origin; bench/harness/tunnelbench.c drives it from
outside (CONNECT, one GET through the tunnel, close); `--load newconn`: wrk drives plain-HTTP
requests with `Connection: close` instead (a new connection per request), `--load keepalive` the
same requests on one kept-alive connection (the per-request part of `newconn`). Instruction counts do not change with the
machine's load, unlike CPU times: old and new code can be compared on a busy machine.

- `--tool callgrind` (default): the child runs under valgrind; after a warm-up its counters are
  zeroed, tunnelbench runs with `--conns` connections (default 1: one tunnel at a time) for
  `--duration` seconds, the counters are dumped, and the instructions are divided by the tunnels.
  Single runs of the same tree agree within ~1-2 % (more when few tunnels were made).
- `--tool strace`: `strace -c -p` on the child during the run (20 connections): calls per tunnel.

    .venv/bin/python bench/tunnel_instr.py [--root DIR] [--tool callgrind|strace]
        [--load tunnels-splice|tunnels|newconn|keepalive|bare]
        [--conns N] [--duration S] [--keep FILE] [--uvloop-table ours|standard]

`--root` imports the proxy from another checkout (e.g. a `git archive` of main); `--keep` keeps the
callgrind dump (`callgrind_annotate FILE`). Needs valgrind or strace, nginx and a C compiler.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def serve(root: str, load: str, table: str) -> None:
    """The child: the listener on a free port (printed), until killed."""
    import asyncio
    import gc
    import logging

    sys.path.insert(0, root)
    if load != "bare" and table == "ours":
        # as the services import it (greyproxy.runtime); a checkout without it: uvloop as it is
        try:
            from greyproxy.transport_table import import_uvloop
        except ImportError:
            pass
        else:
            import_uvloop()
    import conn_path
    import uvloop

    logging.disable(logging.WARNING)

    async def main() -> None:
        tmp = Path(tempfile.mkdtemp(prefix="gp-instr-"))
        server = await (
            conn_path.bare_listener() if load == "bare" else conn_path.proxy_listener(load == "tunnels", tmp)
        )
        gc.collect()  # as the proxy's service does once started (runtime.tune_gc)
        gc.freeze()
        gc.set_threshold(5000, 10, 10)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(1e6)

    uvloop.run(main())


def measure(args: argparse.Namespace) -> int:
    from harness.loads import lua_absolute, run_tunnelbench, run_wrk, tunnelbench_binary
    from harness.origin import NginxOrigin
    from harness.procs import stop_all

    tool = args.tool
    if shutil.which("valgrind" if tool == "callgrind" else "strace") is None:
        print(f"tunnel_instr: needs {'valgrind' if tool == 'callgrind' else 'strace'}", file=sys.stderr)
        return 2
    tb, why = tunnelbench_binary(BENCH / "out" / "bin")
    if tb is None:
        print(f"tunnel_instr: {why}", file=sys.stderr)
        return 2
    conns = args.conns or (1 if tool == "callgrind" else 20)
    work = Path(tempfile.mkdtemp(prefix="gp-instr-"))
    origin = NginxOrigin(work / "origin", 1 << 20, None, unique_heads=args.unique_heads).start()
    cmd = [
        sys.executable,
        __file__,
        "--serve",
        "--root",
        args.root,
        "--load",
        args.load,
        "--uvloop-table",
        args.uvloop_table,
    ]
    if tool == "callgrind":
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={work}/cg.%p",
            "--compress-strings=no",
            "--compress-pos=no",
        ] + cmd
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def drive(duration: float) -> dict:
        if args.load in ("newconn", "keepalive"):
            return run_wrk(port, lua_absolute(origin.port, close=args.load == "newconn"), conns, duration, work)
        return run_tunnelbench(tb, port, origin.port, conns, duration)

    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        drive(2.0)  # warm-up
        time.sleep(0.5)
        if tool == "callgrind":
            subprocess.run(["callgrind_control", "-z", str(child.pid)], capture_output=True, timeout=60)
            res = drive(args.duration)
            time.sleep(0.5)
            subprocess.run(["callgrind_control", "-d", str(child.pid)], capture_output=True, timeout=60)
            time.sleep(1.0)
            dumps = sorted(glob.glob(f"{work}/cg.{child.pid}.*"), key=os.path.getmtime)
            if "error" in res or not dumps:
                print(f"tunnel_instr: no figure ({res.get('error', 'no dump')})", file=sys.stderr)
                return 1
            total = next(
                int(line.split()[1]) for line in Path(dumps[-1]).read_text().splitlines() if line.startswith("summary:")
            )
            n = res["requests"]
            what = {"newconn": "connections", "keepalive": "requests"}.get(args.load, "tunnels")
            print(f"{args.root} {args.load}: {n} {what}, {total:,} instructions, {total / n:,.0f} each")
            if args.keep:
                shutil.copy(dumps[-1], args.keep)
        else:
            out = work / "strace.txt"
            st = subprocess.Popen(["strace", "-c", "-p", str(child.pid), "-o", str(out)], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            res = drive(args.duration)
            time.sleep(0.3)
            st.send_signal(2)
            st.wait(10)
            if "error" in res:
                print(f"tunnel_instr: {res['error']}", file=sys.stderr)
                return 1
            n = res["requests"]
            print(f"{args.root} {args.load}: {n} tunnels, system calls per tunnel:")
            total = 0
            for line in out.read_text().splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                if m and m.group(2) != "total":
                    total += int(m.group(1))
                    print(f"  {m.group(2):16s} {int(m.group(1)) / n:6.2f}")
            print(f"  {'total':16s} {total / n:6.2f}")
    finally:
        child.kill()
        child.wait()
        origin.stop()
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(BENCH.parent), help="checkout to import the proxy from")
    ap.add_argument("--tool", choices=("callgrind", "strace"), default="callgrind")
    ap.add_argument(
        "--load", choices=("tunnels-splice", "tunnels", "newconn", "keepalive", "bare"), default="tunnels-splice"
    )
    ap.add_argument("--conns", type=int, default=0, help="connections at once (default: 1 callgrind, 20 strace)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds measured (default 8)")
    ap.add_argument("--keep", help="keep the callgrind dump here")
    ap.add_argument(
        "--unique-heads",
        action="store_true",
        help="the origin adds an X-Request-Id of its own to each answer (no two response heads alike)",
    )
    ap.add_argument(
        "--uvloop-table",
        choices=("ours", "standard"),
        default="ours",
        help="the proxy's loop keeps its transports in greyproxy.transport_table's table, as the services "
        "do (default), or in uvloop's own WeakValueDictionary; the bare tunnel always uses uvloop's",
    )
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.root, args.load, args.uvloop_table)
        return 0
    return measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
