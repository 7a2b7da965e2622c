#!/usr/bin/env python3
"""Greyproxy benchmark harness: one run, one machine, this project against its peers.

    bench/run.py            full run (~10 s per load; 256 MiB download; 1 000 000 log rows)
    bench/run.py --quick    under a minute (2 s loads, 16 MiB, 100 000 rows)
    bench/run.py --quick --smoke
                            CI-sized: greyproxy (and the bare uvloop tunnel) only, a Python origin and
                            Python load loops, no nginx/wrk/peers needed, nothing installed
                            (tests/integration/test_bench_smoke.py)

It starts an nginx origin on loopback, then each proxy in turn (greyproxy = the whole stack via
tests/conftest.py's Stack; tinyproxy; mitmdump; proxy.py) and drives the same loads through
each, and a bare uvloop CONNECT tunnel on the CONNECT loads (harness/bare_tunnel.py: the floor the
CONNECT download target is judged against, not a peer); then the measures only this project has
(approval latency, recorder, GET /api/logs at scale, rule decisions via bench/rules_bench.py). It
prints one table and writes bench/results.md (full) or bench/out/results-<mode>.md, and
bench/out/results.json.

Missing tools are installed on demand by bench/setup.sh (apt: nginx wrk tinyproxy curl; pip into
bench/.venv-peers: mitmproxy proxy.py py-spy) unless --no-install; whatever is still missing is
reported as "n/a (not installed: ...)". All traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from cpu_split import Meter, stack_pids  # noqa: E402
from harness import greybench, loads, report  # noqa: E402
from harness.origin import NginxOrigin, PyOrigin, make_tls, nginx_binary, nginx_version  # noqa: E402
from harness.procs import Managed, cpu_seconds, fd_count, run_capture, stop_all, system_busy  # noqa: E402
from harness.proxies import (  # noqa: E402
    PEERS_VENV,
    BareUvloop,
    GreyProxy,
    Mitmdump,
    ProxyPy,
    ProxyUnderTest,
    Tinyproxy,
    Unavailable,
    pyspy_binary,
    tool_version,
)

MiB = 1 << 20


@dataclass
class Plan:
    mode: str
    duration: int  # seconds per wrk load
    warmup: int  # seconds of warm-up before the first load of each proxy (0 = none)
    conns: int  # concurrent connections of the HTTP loads
    big_bytes: int  # the download file
    downloads: int  # downloads per proxy per kind (median reported)
    idle_tunnels: int
    holds: int  # approval measures
    recorder_n: int  # records driven through the recorder
    log_rows: int  # rows in the db for GET /api/logs
    log_calls: int
    rule_sizes: list[int]
    rule_queries: int
    https_seconds: float
    peers: bool
    python_loads: bool  # smoke: Python origin and Python clients instead of nginx/wrk/curl
    connect_runs: int = 1  # CONNECT downloads each of greyproxy and the bare uvloop tunnel, alternating


PLANS = {
    "full": Plan(
        "full",
        10,
        2,
        20,
        256 * MiB,
        3,
        1000,
        100,
        100_000,
        1_000_000,
        50,
        [100, 10_000, 100_000],
        20_000,
        10.0,
        True,
        False,
        5,
    ),
    "quick": Plan(
        "quick", 2, 0, 20, 16 * MiB, 1, 500, 20, 5_000, 100_000, 20, [100, 10_000], 1_000, 2.0, True, False, 3
    ),
    "smoke": Plan("smoke", 1, 0, 8, 2 * MiB, 1, 50, 5, 300, 5_000, 5, [100, 10_000], 300, 1.0, False, True, 1),
}
CONNECT_ONLY = "a CONNECT-only tunnel (the floor, bench/harness/bare_tunnel.py)"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- set-up


def missing_system() -> list[str]:
    out = []
    if not nginx_binary():
        out.append("nginx")
    for tool in ("wrk", "curl"):
        if not shutil.which(tool):
            out.append(tool)
    if not (shutil.which("tinyproxy") or os.path.exists("/usr/bin/tinyproxy") or os.path.exists("/usr/sbin/tinyproxy")):
        out.append("tinyproxy")
    return out


def missing_peers() -> list[str]:
    out = []
    if not (PEERS_VENV / "bin" / "mitmdump").exists():
        out.append("mitmproxy")
    if not (PEERS_VENV / "bin" / "proxy").exists():
        out.append("proxy.py")
    return out


def ensure_installed(plan: Plan, allow: bool, notes: list[str]) -> float:
    """Runs bench/setup.sh for what is missing. Returns the seconds it took (not part of the bench)."""
    if plan.python_loads or not allow:
        return 0.0
    t0 = time.monotonic()
    parts = []
    if missing_system():
        parts.append("system")
    if plan.peers and missing_peers():
        parts.append("peers")
    for part in parts:
        log(
            f"installing ({part}): bench/setup.sh {part} — missing {missing_system() if part == 'system' else missing_peers()}"
        )
        try:
            p = subprocess.run(
                ["bash", str(BENCH / "setup.sh"), part],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=900,
                stdin=subprocess.DEVNULL,
            )
            if p.returncode != 0:
                notes.append(f"bench/setup.sh {part} failed ({p.returncode}): {p.stdout.strip()[-300:]}")
                log(f"setup.sh {part} failed: {p.stdout.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            notes.append(f"bench/setup.sh {part} timed out")
    return time.monotonic() - t0


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------------- machine / versions


def machine_info() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    os_name = None
    with contextlib.suppress(OSError):
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "mem_total_mb": mem,
        "kernel": platform.release(),
        "os": os_name,
        "hostname": platform.node(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _word(text: str | None, i: int) -> str | None:
    parts = (text or "").split()
    return parts[i] if len(parts) > i else text


def versions(plan: Plan, grey: GreyProxy | None) -> dict[str, str | None]:
    v: dict[str, str | None] = {"python": platform.python_version()}
    g = grey or GreyProxy(Path("/tmp"))
    v["greyproxy"] = g.version()
    v["uvloop"] = (BareUvloop(Path("/tmp")).version() or "").replace("uvloop ", "") or None
    # whether the proxy's hot modules ran compiled (greyproxy/compiled.py), as the stack imports them
    _, said = run_capture([sys.executable, "-c", "import greyproxy.compiled as c; raise SystemExit(c.main())"])
    v["hot modules"] = (said.strip().splitlines() or [None])[-1]
    if not plan.python_loads:
        v["nginx"] = nginx_version()
        v["wrk"] = _word(tool_version(["wrk", "-v"]), 1)
        v["curl"] = _word(tool_version(["curl", "--version"]), 1)
    if plan.peers:
        v["tinyproxy"] = Tinyproxy(Path("/tmp")).version()
        v["mitmproxy"] = Mitmdump(Path("/tmp")).version()
        v["proxy.py"] = ProxyPy(Path("/tmp")).version()
    return v


# ----------------------------------------------------------------------------- per-proxy loads


def _flag(res: dict[str, Any], what: str, notes: list[str], who: str) -> dict[str, Any]:
    """Turn a load with a high error rate into n/a (and note moderate ones)."""
    if "error" in res:
        return res
    rate = res.get("error_rate") or 0.0
    if rate > 0.5:
        return {"error": f"{rate:.0%} of requests failed", **{k: v for k, v in res.items() if k != "rps"}}
    if rate > 0.01:
        notes.append(f"{who} {what}: {rate:.1%} of requests failed (figure counts successes only)")
    closes = (res.get("socket_errors") or {}).get("read", 0)
    if what == "keep-alive" and closes > 0.5 * max(1, res.get("requests", 0)):
        notes.append(
            f"{who} {what}: the proxy closed the client connection after each response ({closes} closes "
            f"for {res.get('requests')} responses): it does not keep client connections alive, so its "
            "keep-alive figure is really a new-connection figure"
        )
    return res


def metered(p: ProxyUnderTest, origin: Any, load: Any) -> dict[str, Any]:
    """Run `load()` with the CPU each process spends per request served (cpu_split.Meter) put into
    its result as "cpu": greyproxy's five processes (each proxy worker apart), a peer's process tree,
    the nginx origin ("origin") and the load generator this process ran ("client")."""
    pids: dict[str, int] = {}
    try:
        if isinstance(p, GreyProxy):
            if p.stack is not None:
                pids = stack_pids(p.stack)
        elif p.main_pid():
            pids = {"proxy": p.main_pid()}  # type: ignore[dict-item]
    except Exception:  # noqa: BLE001 - no split, the load still runs
        pids = {}
    if isinstance(origin, NginxOrigin) and origin.proc is not None:
        pids["origin"] = origin.proc.pid
    meter = Meter(pids, tree=True, client=True).start() if pids else None
    res = load()
    secs = res.get("duration_s") or res.get("seconds")
    if meter is not None and "error" not in res and res.get("rps") and secs:
        res["cpu"] = meter.stop(res["rps"] * secs, secs)
    return res


def http_loads(p: ProxyUnderTest, origin: Any, plan: Plan, work: Path, notes: list[str]) -> dict[str, Any]:
    """Plain HTTP through the forward proxy: keep-alive and a new connection per request."""
    r: dict[str, Any] = {}
    port = p.port
    if plan.python_loads:
        r["keepalive"] = _flag(
            loads.py_http_load(port, origin.port, plan.conns, plan.duration), "keep-alive", notes, p.name
        )
        r["newconn"] = _flag(
            loads.py_http_load(port, origin.port, plan.conns, plan.duration, close=True),
            "new-connection",
            notes,
            p.name,
        )
        return r
    if not shutil.which("wrk"):
        return {"keepalive": {"na": "not installed: wrk"}, "newconn": {"na": "not installed: wrk"}}
    if plan.warmup:
        loads.run_wrk(port, loads.lua_absolute(origin.port), plan.conns, plan.warmup, work)
    log(f"  {p.name}: keep-alive {plan.duration}s")
    r["keepalive"] = _flag(
        metered(
            p, origin, lambda: loads.run_wrk(port, loads.lua_absolute(origin.port), plan.conns, plan.duration, work)
        ),
        "keep-alive",
        notes,
        p.name,
    )
    log(f"  {p.name}: new connection per request {plan.duration}s")
    r["newconn"] = _flag(
        metered(
            p,
            origin,
            lambda: loads.run_wrk(port, loads.lua_absolute(origin.port, close=True), plan.conns, plan.duration, work),
        ),
        "new-connection",
        notes,
        p.name,
    )
    time.sleep(0.5)
    return r


def download(p: ProxyUnderTest, origin: Any, plan: Plan, tunnel: bool) -> dict[str, Any]:
    """One download of the big file through p: CONNECT (tunnel) or an absolute-URI GET."""
    if plan.python_loads:
        return loads.py_download(origin.port, p.port, tunnel, plan.big_bytes)
    limit = max(30.0, plan.big_bytes / 5e6)  # slower than 5 MB/s counts as a failure
    return loads.curl_download(f"http://127.0.0.1:{origin.port}/big", p.port, tunnel=tunnel, timeout=limit)


def connect_downloads(ps: list[ProxyUnderTest], origin: Any, plan: Plan, runs: int) -> dict[str, dict[str, Any]]:
    """The CONNECT download through each of ps, `runs` times, the proxies taking turns (p1, p2, p1, p2 ...)
    so that each meets the same machine (single downloads swing 2× on a busy one); the median each."""
    if not plan.python_loads and not shutil.which("curl"):
        return {p.name: {"na": "not installed: curl"} for p in ps}
    turns = ", taking turns" if len(ps) > 1 else ""
    log(f"  {', '.join(p.name for p in ps)}: CONNECT downloads {plan.big_bytes // MiB} MiB x{runs}{turns}")
    got: dict[str, list[dict[str, Any]]] = {p.name: [] for p in ps}
    for _ in range(runs):
        for p in ps:
            got[p.name].append(download(p, origin, plan, tunnel=True))
    return {name: _median_download(x) for name, x in got.items()}


def tunnel_loads(
    p: ProxyUnderTest,
    origin: Any,
    plan: Plan,
    work: Path,
    notes: list[str],
    connect: dict[str, Any] | None = None,
    plain: bool = True,
) -> dict[str, Any]:
    """CONNECT: tunnel and plain downloads of the big file, idle tunnels' memory, new tunnels per second
    (last: it opens the most connections). `connect`: the CONNECT download already taken (alternating
    with the bare uvloop tunnel's); `plain=False`: a CONNECT-only tunnel, no plain download."""
    r: dict[str, Any] = {}
    port = p.port
    r["connect_download"] = connect or connect_downloads([p], origin, plan, plan.downloads)[p.name]
    if not plain:
        r["http_download"] = {"na": CONNECT_ONLY}
    elif not plan.python_loads and not shutil.which("curl"):
        r["http_download"] = {"na": "not installed: curl"}
    else:
        log(f"  {p.name}: plain downloads {plan.big_bytes // MiB} MiB x{plan.downloads}")
        r["http_download"] = _median_download([download(p, origin, plan, tunnel=False) for _ in range(plan.downloads)])
    r["idle_tunnels"] = idle_tunnels(p, origin.port, plan.idle_tunnels, 1.0 if plan.mode == "full" else 0.5)
    log(f"  {p.name}: new CONNECT tunnels {plan.duration}s")
    tb, why = (None, "smoke mode") if plan.python_loads else loads.tunnelbench_binary(BENCH / "out" / "bin")
    if tb:
        r["tunnels"] = _flag(
            metered(p, origin, lambda: loads.run_tunnelbench(tb, port, origin.port, plan.conns, plan.duration)),
            "tunnels",
            notes,
            p.name,
        )
    else:
        r["tunnels"] = _flag(
            loads.py_connect_load(port, origin.port, plan.conns, plan.duration), "tunnels", notes, p.name
        )
        r["tunnels"]["client"] = f"python ({why})"
    time.sleep(0.5)
    return r


def _median_download(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [x["mbps"] for x in runs if "mbps" in x]
    if not ok:
        return {"error": runs[0].get("error", "failed") if runs else "not run"}
    ok.sort()
    return {"mbps": ok[len(ok) // 2], "runs_mbps": [round(x, 1) for x in ok], "failed": len(runs) - len(ok)}


def idle_tunnels(p: ProxyUnderTest, origin_port: int, n: int, hold: float = 1.0) -> dict[str, Any]:
    log(f"  {p.name}: {n} idle tunnels")
    base = p.rss_kb()
    socks, err = loads.open_idle_tunnels(p.port, origin_port, n)
    try:
        if err and len(socks) < n:
            return {"error": f"only {len(socks)} of {n} tunnels opened: {err}", "opened": len(socks)}
        time.sleep(hold)
        rss = p.rss_kb()
    finally:
        loads.close_all(socks)
    if rss is None:
        return {"error": "could not read the proxy's RSS"}
    return {
        "tunnels": n,
        "rss_mb": rss / 1024.0,
        "baseline_mb": (base or 0) / 1024.0,
        # (None when the process shrank meanwhile, freeing what earlier loads left: no figure per tunnel)
        "per_tunnel_kb": (rss - base) / n if base and rss >= base else None,
        "pid_scope": "proxy processes only (every worker)" if isinstance(p, GreyProxy) else "process tree",
    }


# ----------------------------------------------------------------------------- HTTPS through interception


def https_load(p: ProxyUnderTest, tls_url: str, ca: Path, plan: Plan, origin: Any = None) -> dict[str, Any]:
    ok, why = loads.curl_probe_https(p.port, tls_url, ca)
    if not ok:
        return {"na": f"interception probe failed: {why}"}
    cal = loads.curl_https_load(p.port, tls_url, ca, 300 if plan.mode == "full" else 150, parallel=plan.conns)
    if "error" in cal:
        return cal
    n = int(min(200_000, max(500, cal["rps"] * plan.https_seconds)))
    log(f"  {p.name}: HTTPS intercepted, {n} requests")
    res = metered(
        p,
        origin,
        lambda: loads.curl_https_load(
            p.port, tls_url, ca, n, parallel=plan.conns, timeout=max(60.0, plan.https_seconds * 6)
        ),
    )
    if "error" not in res and res["error_rate"] > 0.5:
        return {"error": f"{res['error_rate']:.0%} of HTTPS requests failed"}
    return res


# ----------------------------------------------------------------------------- profiling (optional)


def profile(pid: int, seconds: int, out: Path, load: Any) -> list[str]:
    """py-spy record (raw collapsed stacks) on pid while `load()` runs; top frames as text lines."""
    spy = pyspy_binary()
    if not spy:
        return ["py-spy not installed (bench/setup.sh peers)"]
    rec = Managed(
        "py-spy",
        [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw", "--nonblocking", "-o", str(out)],
        out.with_suffix(".log"),
    ).start()
    time.sleep(0.5)
    try:
        load()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            assert rec.proc is not None
            rec.proc.wait(seconds + 20)
        rec.stop()
    if not out.exists():
        return [f"py-spy produced nothing: {rec.tail(5)}"]
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in out.read_text(errors="replace").splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit():
            continue
        c = int(cnt)
        total += c
        frames = stack.split(";")
        leaf = frames[-1] if frames else "?"
        self_t[leaf] = self_t.get(leaf, 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    if not total:
        return ["py-spy: no samples"]
    lines = [f"{total} samples; top self time:"]
    for f, c in sorted(self_t.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"  {100.0 * c / total:5.1f}%  {f}")
    lines.append("top inclusive (project code):")
    proj = [(f, c) for f, c in incl.items() if any(s in f for s in ("services/", "greyproxy/", "bus/"))]
    for f, c in sorted(proj, key=lambda kv: -kv[1])[:12]:
        lines.append(f"  {100.0 * c / total:5.1f}%  {f}")
    return lines


# ----------------------------------------------------------------------------- main


def method_text(plan: Plan) -> list[str]:
    big = f"{plan.big_bytes // MiB} MiB"
    tool = "a Python asyncio client (smoke mode)" if plan.python_loads else "wrk (1 thread) with a Lua script"
    return [
        f"- **keep-alive / new connection**: {tool}, {plan.conns} connections, {plan.duration} s, `GET "
        "http://127.0.0.1:<nginx>/1k` in absolute form to the proxy (new-connection: `Connection: close`). "
        "req/s counts 2xx answers; p50/p99 from wrk's latency histogram.",
        f"- **downloads**: curl, {big} file (`/big`, sparse), median of {plan.downloads}; CONNECT = `curl -p` "
        "(tunnel), plain = absolute-URI GET. MB = 10^6 bytes. Direct = curl straight to nginx. greyproxy's "
        f"(workers 1) and the bare uvloop tunnel's CONNECT downloads take turns, {plan.connect_runs} each "
        "(median), so the CONNECT target's ≥ 90 % compares downloads taken side by side.",
        "- **bare-uvloop**: `bench/harness/bare_tunnel.py` as its own process (this project's Python and uvloop; "
        "a CONNECT head parsed, `create_connection`, 200, a relay with flow control; no rules, log, caps or "
        "timers), started before greyproxy and idle until its rows: its CONNECT downloads alternate with "
        "greyproxy's; idle tunnels and new tunnels/s (metered like the peers) after the greyproxy stacks "
        "have stopped. The floor for a Python proxy on uvloop, not a peer: never the best peer.",
        "- **HTTPS intercepted**: nginx TLS listener (throwaway CA); one curl process, `-Z --parallel-max "
        f"{plan.conns}` keep-alive connections through CONNECT, trusting only the proxy's CA (so a success proves "
        "interception); req/s = successes / wall time over ~"
        f"{plan.https_seconds:.0f} s. mitmdump verifies the origin against its CA.",
        f"- **new tunnels/s**: bench/harness/tunnelbench.c (built with cc on first use; epoll, {plan.conns} "
        f"connections, {plan.duration} s): connect, `CONNECT`, wait for the 200, `GET /1k` with `Connection: close` "
        "through the tunnel, read until the origin closes: one count = one tunnel set up, used once and torn down "
        "(smoke mode: the same in Python).",
        f"- **approval**: {plan.holds} holds, each a fresh container asking for 127.0.0.2 (no rule covers it); "
        "the harness polls /api/pending, POSTs /api/pending/:id/allow and times from the moment the answer is "
        "read to the held client's first byte (clamped at 0 when the byte was already there).",
        f"- **rule decisions**: bench/rules_bench.py (sizes {', '.join(map(str, plan.rule_sizes))}; "
        f"{plan.rule_queries} queries per kind); the figure is the worse of the hit and miss medians/p99s.",
        f"- **recorder**: {plan.recorder_n} allowed requests as one fresh container (pipelined keep-alive, 8 "
        "connections × 64 deep), then the logs table is polled until it holds them all; records/s = stored / "
        "(first request → last row committed); loss = completed requests − rows. That figure is bounded by the "
        "proxy's request rate; the recorder's own rate (the target row) is taken by pushing "
        f"{plan.recorder_n} log records (built and appended to the outbox beforehand) through the journal into the running stack's "
        "recorder with the proxy's JournalWriter: records/s = records / (first send → last acknowledgement, i.e. "
        "committed); "
        "loss and duplicates counted in the logs table.",
        f"- **GET /api/logs**: logs table filled to {plan.log_rows} rows by sqlite3 executemany into the stack's "
        f"database, then {plan.log_calls} timed calls of `GET /api/logs?limit=50` after 3 warm-up calls.",
        f"- **memory**: {plan.idle_tunnels} CONNECT tunnels to nginx opened and held idle "
        f"{'1' if plan.mode == 'full' else '0.5'} s; VmRSS from /proc "
        "(greyproxy: the proxy process, pid from /api/health; peers: the whole process tree).",
    ]


def run(args: argparse.Namespace) -> int:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = PLANS[mode]
    if args.no_peers:
        plan.peers = False
    if args.duration:
        plan.duration = args.duration
    out_dir = Path(args.out) if args.out else BENCH / "out"
    md_path = (
        Path(args.results_md)
        if args.results_md
        else (BENCH / "results.md" if mode == "full" else out_dir / f"results-{mode}.md")
    )
    notes: list[str] = []
    fds = raise_fd_limit()
    install_s = ensure_installed(plan, not args.no_install, notes)
    if install_s > 1:
        notes.append(f"installing missing tools took {install_s:.0f} s before the run (not counted)")

    started = dt.datetime.now(dt.timezone.utc).astimezone()
    t_start = time.monotonic()
    busy0 = system_busy()
    work = Path(tempfile.mkdtemp(prefix="gpb", dir="/tmp"))
    res: dict[str, Any] = {
        "mode": mode,
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "proxies": {},
        "greyproxy_only": {},
        "notes": notes,
        "settings": {},
        "fd_limit": fds,
    }
    details: list[str] = []
    origin: Any = None
    try:
        # -- origin --
        tls = None if plan.python_loads else make_tls(work / "tls")
        if not plan.python_loads and nginx_binary():
            origin = NginxOrigin(work / "nginx", plan.big_bytes, tls).start()
            res["origin"] = {"kind": "nginx", "port": origin.port, "tls_port": origin.tls_port}
        else:
            if not plan.python_loads:
                notes.append(
                    "nginx not installed: a Python origin was used for the greyproxy-only measures; proxy loads are n/a"
                )
            origin = PyOrigin(plan.big_bytes).start()
            res["origin"] = {"kind": "python http.server", "port": origin.port}
        log(f"origin: {res['origin']}")
        nginx_ok = isinstance(origin, NginxOrigin)

        # -- direct download (the CONNECT target's reference) --
        if nginx_ok and shutil.which("curl"):
            res["direct"] = _median_download(
                [loads.curl_download(f"http://127.0.0.1:{origin.port}/big") for _ in range(plan.downloads)]
            )
        elif plan.python_loads:
            res["direct"] = loads.py_download(origin.port, None, False, plan.big_bytes)
        else:
            res["direct"] = {"na": "nginx/curl not installed"}
        d = res["direct"]
        log(f"direct download: {report._fmt(d['mbps']) + ' MB/s' if 'mbps' in d else d}")

        # -- the floor: a bare uvloop CONNECT tunnel, its own process, started now so that its CONNECT
        # downloads alternate with greyproxy's; its other rows are measured after greyproxy's --
        bare = BareUvloop(work / "bare")
        res["settings"][bare.name] = bare.settings
        fres = res["proxies"][bare.name] = {"status": "ok"}
        floor: BareUvloop | None = None
        if not (nginx_ok or plan.python_loads):
            fres["status"] = "n/a: nginx not installed"
        else:
            try:
                bare.start()
                floor, fres["pid"] = bare, bare.main_pid()
            except Unavailable as exc:
                fres["status"] = f"n/a: {exc}"

        # -- this project --
        grey = GreyProxy(work / "grey", upstream_ca=tls.ca_pem if tls else None, want_mitm=tls is not None)
        res["settings"]["greyproxy"] = grey.settings
        log("greyproxy: starting the stack")
        try:
            grey.start()
        except Unavailable as exc:
            res["proxies"]["greyproxy"] = {"status": f"n/a: {exc}"}
            grey.stop()
            grey = None  # type: ignore[assignment]
        if grey is not None:
            try:
                g = res["proxies"]["greyproxy"] = {"status": "ok", "pid": grey.main_pid()}
                settle = 0.5 if plan.mode != "full" else 2.2
                if nginx_ok or plan.python_loads:
                    g.update(http_loads(grey, origin, plan, work, notes))
                    # Tunnels are measured as tunnels: interception (which would parse the plain HTTP inside
                    # them) is switched off for these rows and back on for the HTTPS row.
                    why = grey.set_mitm(False, settle)
                    if why:
                        notes.append(f"greyproxy: could not switch interception off for the tunnel rows: {why}")
                    else:
                        g["tunnel_mode"] = "mitmEnabled=false (raw tunnels)"
                    pid0 = grey.main_pid()
                    fd0 = fd_count(pid0) if pid0 else None
                    connect = None
                    if floor is not None:
                        both = connect_downloads([grey, floor], origin, plan, plan.connect_runs)
                        connect, fres["connect_download"] = both[grey.name], both[floor.name]
                    g.update(tunnel_loads(grey, origin, plan, work, notes, connect))
                    time.sleep(1.0)
                    fd1 = fd_count(pid0) if pid0 else None
                    g["proxy_fds"] = {"before_tunnel_rows": fd0, "after_tunnel_rows": fd1}
                    if not why:
                        grey.set_mitm(True, settle)
                    if fd0 is not None and fd1 is not None and fd1 - fd0 > 200:
                        # Descriptors still held after every tunnel was closed by both ends: a leak. Left as
                        # is it would exhaust the limit and spoil every later measure, so start afresh.
                        notes.append(
                            f"greyproxy: the proxy process held {fd1 - fd0} more file descriptors after "
                            "the tunnel rows than before, with every tunnel closed (a descriptor leak: "
                            "once the limit is reached upstream connects fail with 502 'Too many open "
                            "files'); the stack was restarted before the remaining measures"
                        )
                        log(f"greyproxy: {fd1 - fd0} descriptors leaked by the tunnel rows; restarting the stack")
                        grey.stop()
                        grey = GreyProxy(
                            work / "grey2", upstream_ca=tls.ca_pem if tls else None, want_mitm=tls is not None
                        )
                        try:
                            grey.start()
                            g["pid_after_restart"] = grey.main_pid()
                        except Unavailable as exc:
                            notes.append(f"greyproxy: the restart failed: {exc}")
                if grey.stack is None:
                    raise Unavailable("the stack is gone")
                # HTTPS interception
                if tls is None or not nginx_ok:
                    g["https_intercept"] = {"na": "no TLS origin in this mode"}
                elif grey.mitm_ca is None:
                    g["https_intercept"] = {"na": grey.mitm_na}
                else:
                    g["https_intercept"] = https_load(
                        grey, f"https://127.0.0.1:{origin.tls_port}/1k", grey.mitm_ca, plan, origin
                    )
                gd = res["greyproxy_only"]
                log(f"greyproxy: approval latency, {plan.holds} holds")
                gd["approval"] = greybench.approval_latency(grey.stack.api, grey.port, origin.port, plan.holds)
                log(f"greyproxy: recorder, {plan.recorder_n} records")
                rec_pid = grey.service_pid("recorder")
                cpu0 = {k: cpu_seconds(pid) for k, pid in (("proxy", grey.main_pid()), ("recorder", rec_pid)) if pid}
                gd["recorder"] = greybench.recorder_throughput(
                    grey.stack.db_path, grey.port, origin.port, plan.recorder_n
                )
                cpu1 = {k: cpu_seconds(pid) for k, pid in (("proxy", grey.main_pid()), ("recorder", rec_pid)) if pid}
                secs = gd["recorder"].get("seconds_to_all_stored") or 0
                if secs:
                    gd["recorder"]["cpu_pct"] = {k: round(100 * (cpu1[k] - cpu0[k]) / secs) for k in cpu1 if k in cpu0}
                # The figure above is bounded by the proxy's request rate; this one is the recorder's own.
                log(f"greyproxy: recorder drain, {plan.recorder_n} records pushed through the journal")
                cpu0 = cpu_seconds(rec_pid) if rec_pid else None
                try:
                    gd["recorder_journal"] = greybench.recorder_drain(
                        greybench.journal_endpoint(grey.stack), grey.stack.db_path, plan.recorder_n
                    )
                except Exception as exc:  # noqa: BLE001 - reported as n/a
                    gd["recorder_journal"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                secs = gd["recorder_journal"].get("seconds") or 0
                if cpu0 is not None and secs:
                    gd["recorder_journal"]["recorder_cpu_pct"] = round(100 * (cpu_seconds(rec_pid) - cpu0) / secs)
                log(f"greyproxy: GET /api/logs at {plan.log_rows} rows")
                gd["logs_api"] = greybench.logs_api_latency(
                    grey.stack.api, grey.stack.db_path, plan.log_rows, plan.log_calls
                )
                if args.profile and nginx_ok and shutil.which("wrk"):
                    prof = out_dir / "profile"
                    prof.mkdir(parents=True, exist_ok=True)
                    log("profiling the proxy under keep-alive load (py-spy)")
                    lines = profile(
                        grey.main_pid(),
                        plan.duration,
                        prof / "proxy-keepalive.txt",
                        lambda: loads.run_wrk(
                            grey.port, loads.lua_absolute(origin.port), plan.conns, plan.duration, work
                        ),
                    )
                    details += ["### py-spy: proxy under the keep-alive load", "", "```", *lines, "```", ""]
                    log("profiling the recorder under the recorder load (py-spy)")
                    lines = profile(
                        grey.service_pid("recorder") or 0,
                        max(3, plan.duration // 2),
                        prof / "recorder.txt",
                        lambda: greybench.recorder_throughput(
                            grey.stack.db_path, grey.port, origin.port, plan.recorder_n // 2
                        ),
                    )
                    details += ["### py-spy: recorder under the recorder load", "", "```", *lines, "```", ""]
            except Unavailable as exc:
                res["greyproxy_only"].setdefault("approval", {"error": str(exc)})
                res["greyproxy_only"].setdefault("recorder", {"error": str(exc)})
                res["greyproxy_only"].setdefault("logs_api", {"error": str(exc)})
            finally:
                log("greyproxy: stopping the stack")
                grey.stop()
        res["versions"] = versions(plan, grey)

        # -- greyproxy with more proxy workers (--workers 1,2): the request and tunnel rows, a stack each --
        for n in [w for w in getattr(args, "worker_counts", [1]) if w != 1]:
            gw = GreyProxy(
                work / f"grey-w{n}", upstream_ca=tls.ca_pem if tls else None, want_mitm=tls is not None, workers=n
            )
            res["settings"][gw.name] = gw.settings
            log(f"{gw.name}: starting the stack with proxy.workers {n}")
            try:
                gw.start()
            except Unavailable as exc:
                res["proxies"][gw.name] = {"status": f"n/a: {exc}"}
                gw.stop()
                continue
            try:
                pw = res["proxies"][gw.name] = {"status": "ok", "pid": gw.main_pid(), "workers": n}
                if nginx_ok or plan.python_loads:
                    pw.update(http_loads(gw, origin, plan, work, notes))
                    settle = 0.5 if plan.mode != "full" else 2.2
                    why = gw.set_mitm(False, settle)
                    if not why:
                        pw["tunnel_mode"] = "mitmEnabled=false (raw tunnels)"
                    pw.update(tunnel_loads(gw, origin, plan, work, notes))
                    if not why:
                        gw.set_mitm(True, settle)
                if tls is None or not nginx_ok:
                    pw["https_intercept"] = {"na": "no TLS origin in this mode"}
                elif gw.mitm_ca is None:
                    pw["https_intercept"] = {"na": gw.mitm_na}
                else:
                    pw["https_intercept"] = https_load(
                        gw, f"https://127.0.0.1:{origin.tls_port}/1k", gw.mitm_ca, plan, origin
                    )
            except Unavailable as exc:
                pw["status"] = f"n/a: {exc}"
            finally:
                gw.stop()

        # -- the floor's own rows (the stacks are stopped, as for the peers) --
        if floor is not None:
            log(f"{floor.name}: CONNECT rows")
            try:
                for k in ("keepalive", "newconn", "https_intercept"):
                    fres[k] = {"na": CONNECT_ONLY}
                fres.update(tunnel_loads(floor, origin, plan, work, notes, fres.get("connect_download"), plain=False))
            finally:
                floor.stop()

        # -- peers --
        if plan.peers:
            for cls in (Tinyproxy, Mitmdump, ProxyPy):
                p = cls(work / cls.name.replace(".", ""))
                res["settings"][p.name] = p.settings
                log(f"{p.name}: starting")
                try:
                    p.start()
                except Unavailable as exc:
                    res["proxies"][p.name] = {"status": f"n/a: {exc}"}
                    log(f"{p.name}: n/a: {exc}")
                    continue
                try:
                    pr = res["proxies"][p.name] = {"status": "ok"}
                    if nginx_ok:
                        pr.update(http_loads(p, origin, plan, work, notes))
                        pr.update(tunnel_loads(p, origin, plan, work, notes))
                    else:
                        pr["status"] = "n/a: nginx not installed"
                    pr["https_intercept"] = {"na": "not an intercepting peer in this bench (mitmdump is)"}
                finally:
                    p.stop()
            # The intercepting mitmdump: its own instance (no ignore_hosts).
            mres = res["proxies"].get("mitmdump")
            if mres is not None and mres.get("status") == "ok":
                if tls is None or not nginx_ok:
                    mres["https_intercept"] = {"na": "no TLS origin"}
                else:
                    mi = Mitmdump(work / "mitm-intercept", intercept=True, upstream_ca=tls.ca_pem)
                    res["settings"]["mitmdump (intercepting)"] = mi.settings
                    try:
                        mi.start()
                        if mi.ca_cert is None or not mi.ca_cert.exists():
                            mres["https_intercept"] = {"na": "mitmdump wrote no CA certificate"}
                        else:
                            mres["https_intercept"] = https_load(
                                mi, f"https://127.0.0.1:{origin.tls_port}/1k", mi.ca_cert, plan, origin
                            )
                    except Unavailable as exc:
                        mres["https_intercept"] = {"na": str(exc)}
                    finally:
                        mi.stop()
        else:
            reason = "peers skipped in smoke mode" if plan.python_loads else "peers skipped (--no-peers)"
            for name in report.PEERS:
                res["proxies"][name] = {"status": f"n/a: {reason}"}

        # -- rule decisions (no stack needed) --
        log(f"rule decisions: bench/rules_bench.py --rules {','.join(map(str, plan.rule_sizes))}")
        rules = res["greyproxy_only"]["rules"] = greybench.rule_decisions(plan.rule_sizes, plan.rule_queries)
        for n in (100, 10_000, 100_000):
            if n not in plan.rule_sizes and "sizes" in rules:
                rules["sizes"][str(n)] = {"na": f"not run in {mode} mode"}
    finally:
        if origin is not None:
            origin.stop()
        stop_all()
        shutil.rmtree(work, ignore_errors=True)

    busy1 = system_busy()
    res["machine"]["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    db, dtot = busy1[0] - busy0[0], busy1[1] - busy0[1]
    res["machine"]["busy_pct"] = round(100 * db / dtot) if dtot > 0 else None
    res["duration_s"] = time.monotonic() - t_start
    res["finished_at"] = dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")
    la = float(res["machine"]["loadavg_before"].split()[0])
    if la > 0.5:
        notes.append(
            f"the machine was not idle when the run started (load average {la:.2f} on "
            f"{res['machine']['cores']} cores): other work competed for the CPU, figures are lower "
            "and noisier than on an idle machine"
        )
    notes.append(
        "everything (load generator, proxy, origin, and for greyproxy its recorder/api/bus) shares "
        f"the same {res['machine']['cores']} cores, so each figure is a whole-system figure"
    )
    res["rows"] = report.build_rows(res)
    res["targets"] = report.apply_targets(res["rows"], res)
    res["predictions"] = report.predictions(res)
    res["floor"] = report.floor(res, res["predictions"])
    details = _details(res) + details
    res["details_md"] = details
    res["method_md"] = method_text(plan)
    analysis = BENCH / "analysis.md"  # hand-written: what limits each missed target (kept across runs)
    if mode == "full" and analysis.exists():
        res["analysis_md"] = analysis.read_text().rstrip("\n").splitlines()
    report.write_outputs(res, out_dir, md_path)
    print()
    print(report.text_table(res))
    print()
    cpu = report.cpu_markdown(res)
    if cpu:
        print("\n".join(cpu))
        print()
    missed = [t for t in res["targets"] if t["met"] is False]
    print(
        f"targets: {sum(1 for t in res['targets'] if t['met'])} met, {len(missed)} missed, "
        f"{sum(1 for t in res['targets'] if t['met'] is None)} n/a"
    )
    print(f"wrote {out_dir / 'results.json'} and {md_path} ({res['duration_s']:.0f} s)")
    return 0


def _details(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    g = res["greyproxy_only"]
    a = g.get("approval") or {}
    if a:
        out.append(
            f"- approval: {a.get('measured')}/{a.get('holds')} holds measured; allow call sent → first byte "
            f"p50 {report._fmt(a.get('call_to_byte_p50_ms'))} ms, p99 {report._fmt(a.get('call_to_byte_p99_ms'))}"
            f" ms; answer → first byte max {report._fmt(a.get('max_ms'))} ms"
            + (f"; errors: {a.get('errors')}" if a.get("error_count") else "")
        )
    r = g.get("recorder") or {}
    if r:
        out.append(
            f"- recorder: {r.get('completed')} requests completed in {report._fmt(r.get('load_seconds'))} s "
            f"({report._fmt(r.get('load_rps'))} req/s offered by the proxy); {r.get('backlog_at_load_end')} "
            f"rows still to write when the load ended, all stored {report._fmt(r.get('drain_seconds'))} s "
            + (
                f"later (recorder drain rate {report._fmt(r['drain_records_per_s'])} rec/s); stored "
                if r.get("drain_records_per_s") is not None
                else "later (no drain rate: fewer than 100 rows were left to write); stored "
            )
            + f"{r.get('stored')}, lost {r.get('loss')}, duplicates {r.get('duplicates')}; CPU during the "
            f"measure: {r.get('cpu_pct')} (% of one core)"
        )
    rj = g.get("recorder_journal") or {}
    if rj and "error" not in rj:
        out.append(
            f"- recorder through the journal: {rj.get('records')} records acknowledged in "
            f"{report._fmt(rj.get('seconds'))} s; stored {rj.get('stored')}, lost {rj.get('loss')}, duplicates "
            f"{rj.get('duplicates')}, writer drops {rj.get('dropped')}, resent {rj.get('resent')}; recorder CPU "
            f"{rj.get('recorder_cpu_pct')}% of one core"
        )
    lg = g.get("logs_api") or {}
    if lg:
        out.append(
            f"- GET /api/logs: {lg.get('rows')} rows (bulk insert {report._fmt(lg.get('insert_seconds'))} s), "
            f"{lg.get('calls')} calls, errors {lg.get('errors')}, total reported {lg.get('api_total')}"
        )
    rules = g.get("rules") or {}
    if rules.get("raw"):
        out += ["- rules_bench.py output:", "", "```", *rules["raw"].rstrip().splitlines(), "```"]
    for name, pres in res["proxies"].items():
        if not isinstance(pres, dict) or pres.get("status") != "ok":
            continue
        bits = []
        for k in ("keepalive", "newconn", "tunnels"):
            x = pres.get(k) or {}
            if "requests" in x:
                bits.append(f"{k}: {x['requests']} requests, {x.get('errors', 0)} errors")
        it = pres.get("idle_tunnels") or {}
        if "rss_mb" in it:
            bits.append(
                f"RSS {report._fmt(it['baseline_mb'])} MB idle → {report._fmt(it['rss_mb'])} MB with "
                f"{it['tunnels']} tunnels ("
                + (
                    f"{report._fmt(it['per_tunnel_kb'])} KiB/tunnel"
                    if it.get("per_tunnel_kb") is not None
                    else "no figure per tunnel: the process shrank meanwhile, freeing what earlier loads left"
                )
                + f", {it['pid_scope']})"
            )
        for k in ("connect_download", "http_download"):
            x = pres.get(k) or {}
            if "runs_mbps" in x:
                bits.append(f"{k} runs MB/s {x['runs_mbps']}")
        hx = pres.get("https_intercept") or {}
        if "ok" in hx:
            bits.append(f"https: {hx['ok']}/{hx['requests']} ok in {report._fmt(hx['seconds'])} s")
        if bits:
            out.append(f"- {name}: " + "; ".join(bits))
    d = res.get("direct") or {}
    if "mbps" in d:
        out.append(f"- direct download (no proxy): {report._fmt(d['mbps'])} MB/s (runs {d.get('runs_mbps')})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short loads, small sizes: under a minute")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI-sized: greyproxy only, Python origin and load loops; needs no extra packages",
    )
    ap.add_argument("--no-install", action="store_true", help="never run bench/setup.sh; missing tools are n/a")
    ap.add_argument("--no-peers", action="store_true", help="measure greyproxy only")
    ap.add_argument("--profile", action="store_true", help="also profile the proxy and recorder with py-spy")
    ap.add_argument("--duration", type=int, help="seconds per load (overrides the mode's)")
    ap.add_argument(
        "--workers",
        default="1",
        metavar="N[,M...]",
        help="proxy.workers values to measure greyproxy with (e.g. 1,2: a column per value; "
        "counts past 1 get the request and tunnel rows)",
    )
    ap.add_argument("--out", help="directory for results.json (default bench/out)")
    ap.add_argument(
        "--results-md",
        help="where to write the markdown report "
        "(default: bench/results.md for a full run, <out>/results-<mode>.md otherwise)",
    )
    args = ap.parse_args(argv)
    try:
        args.worker_counts = sorted({int(x) for x in args.workers.split(",") if x.strip()})
        if not args.worker_counts or min(args.worker_counts) < 1 or max(args.worker_counts) > 64:
            raise ValueError
    except ValueError:
        ap.error(f"--workers {args.workers!r}: want counts from 1 to 64, like 1,2")

    def on_signal(signum: int, _frame: Any) -> None:
        stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    atexit.register(stop_all)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
