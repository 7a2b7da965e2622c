"""Measures only this project has: approval latency, the recorder, GET /api/logs at scale, rules."""

from __future__ import annotations

import base64
import collections
import random
import re
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from .loads import pct, pipelined_requests

HOLD_HOST = "127.0.0.2"  # no rule covers it: a request there waits in the pending queue
BENCH = Path(__file__).resolve().parent.parent


def _auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:x".encode()).decode()


# ----------------------------------------------------------------------------- approval latency


def approval_latency(
    api: str, proxy_port: int, origin_port: int, holds: int, deadline_s: float = 120.0
) -> dict[str, Any]:
    """Per hold: a client asks for 127.0.0.2 as a fresh container and waits; we find the pending
    entry, POST /api/pending/:id/allow, and time from the moment the allow call's answer is in
    to the held client's first response byte (and from the moment the call was sent)."""
    nonce = uuid.uuid4().hex[:6]
    from_answer: list[float] = []
    from_call: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + deadline_s
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        for i in range(holds):
            if time.monotonic() > stop:
                errors.append("deadline reached")
                break
            container = f"hold{i}-{nonce}"
            s = socket.create_connection(("127.0.0.1", proxy_port), timeout=15)
            try:
                s.sendall(
                    (
                        f"GET http://{HOLD_HOST}:{origin_port}/1k HTTP/1.1\r\nHost: {HOLD_HOST}:{origin_port}\r\n"
                        f"Proxy-Authorization: {_auth(container)}\r\n\r\n"
                    ).encode()
                )
                entry_id = None
                wait_until = time.monotonic() + 10
                while entry_id is None and time.monotonic() < wait_until:
                    items = client.get(f"{api}/api/pending", params={"container": container}).json().get("items") or []
                    for it in items:
                        if it.get("container_name") == container:
                            entry_id = it["id"]
                    if entry_id is None:
                        time.sleep(0.002)
                if entry_id is None:
                    errors.append(f"{container}: no pending entry")
                    continue
                t_call = time.perf_counter()
                r = client.post(f"{api}/api/pending/{entry_id}/allow", json={})
                t_answer = time.perf_counter()
                if r.status_code != 200:
                    errors.append(f"{container}: allow → {r.status_code}")
                    continue
                first = s.recv(1)
                t_first = time.perf_counter()
                if not first:
                    errors.append(f"{container}: closed without a byte")
                    continue
                from_answer.append(max(0.0, (t_first - t_answer) * 1000.0))
                from_call.append((t_first - t_call) * 1000.0)
            except (OSError, httpx.HTTPError, ValueError) as exc:
                errors.append(f"{container}: {exc!r}"[:200])
            finally:
                s.close()
    return {
        "holds": holds,
        "measured": len(from_answer),
        "p50_ms": pct(from_answer, 50),
        "p99_ms": pct(from_answer, 99),
        "max_ms": max(from_answer, default=None),
        "call_to_byte_p50_ms": pct(from_call, 50),
        "call_to_byte_p99_ms": pct(from_call, 99),
        "errors": errors[:10],
        "error_count": len(errors),
    }


# ----------------------------------------------------------------------------- recorder


def _count_logs(db: Path, container: str) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT COUNT(*) FROM logs WHERE container_name = ?", (container,)).fetchone()[0])
    finally:
        con.close()


def recorder_throughput(
    db: Path, proxy_port: int, origin_port: int, n: int, conns: int = 8, depth: int = 64, settle_s: float = 60.0
) -> dict[str, Any]:
    """N allowed requests as one fresh container; then poll the db until it holds N log rows.

    records/s = N / (time from the first request to the N-th row committed). The load is
    pipelined keep-alive requests, so the proxy (not the client) sets the pace.
    """
    container = f"bench-rec-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    load = pipelined_requests(proxy_port, origin_port, container, n, conns=conns, depth=depth)
    t_load = time.perf_counter()
    stored = at_load_end = _count_logs(db, container)
    stop = time.monotonic() + settle_s
    while stored < load["done"] and time.monotonic() < stop:
        time.sleep(0.02)
        stored = _count_logs(db, container)
    t_stored = time.perf_counter()
    # A little longer: anything beyond N would be a duplicate.
    time.sleep(0.3)
    final = _count_logs(db, container)
    sent = load["done"]
    total = t_stored - t0
    backlog = sent - at_load_end
    drain = t_stored - t_load
    return {
        "requests": n,
        "completed": sent,
        "client_errors": load["errors"],
        "stored": final,
        "loss": max(0, sent - final),
        "duplicates": max(0, final - sent),
        "records_per_s": final / total if total > 0 else None,
        "load_seconds": t_load - t0,
        "load_rps": sent / (t_load - t0) if t_load > t0 else None,
        "backlog_at_load_end": backlog,
        "drain_seconds": drain,
        "drain_records_per_s": backlog / drain if backlog > 100 and drain > 0 else None,
        "seconds_to_all_stored": total,
    }


def journal_endpoint(stack: Any) -> str:
    """The stack's journal endpoint (where its proxy sends records), from its own config."""
    from greyproxy.config import load_config  # the project's code: the bench runs in its venv

    return load_config(stack.cfg_path, env=stack.env).bus["journal"]


def recorder_drain(endpoint: str, db: Path, n: int, settle_s: float = 120.0) -> dict[str, Any]:
    """The recorder's own sustained rate: N log records pushed through the journal (a JournalWriter,
    as the proxy uses, connected to the running stack's recorder) until every one is acknowledged
    (= committed) and present in the logs table. records/s = N / (first send → last ack); loss and
    duplicates from the table. The records are built before the clock starts, so neither the
    proxy nor the record producer sets the pace: the recorder (decode, SQLite, events) does."""
    import asyncio

    import zmq.asyncio

    from bus.journal import JournalWriter

    container = f"bench-journal-{uuid.uuid4().hex[:8]}"
    now = time.time()
    records = [
        {
            "timestamp": now + i * 1e-6,
            "container_name": container,
            "container_id": "",
            "destination_host": f"svc{i % 500}.example.com",
            "destination_port": 443,
            "resolved_hostname": None,
            "method": "CONNECT",
            "result": "allowed" if i % 5 else "blocked",
            "rule_id": None,
            "rule_summary": None,
            "response_time_ms": 0.021,
            "reason": "rule",
            "mitm_skip_reason": None,
        }
        for i in range(n)
    ]

    async def push() -> dict[str, Any]:
        ctx = zmq.asyncio.Context()
        writer = JournalWriter(endpoint, outbox_limit=max(200_000, n + 1000), ctx=ctx)
        task = asyncio.create_task(writer.run())
        try:
            for rec in records:  # serialised into the outbox here; nothing is sent before the await
                writer.append("log", rec)
            t0 = time.perf_counter()
            ok = await writer.flush(settle_s)
            t1 = time.perf_counter()
            return {
                "flushed": ok,
                "seconds": t1 - t0,
                "acked": writer.acked,
                "dropped": writer.dropped,
                "resent": writer.resent,
            }
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            ctx.destroy(linger=0)

    out = asyncio.run(push())
    stored = _count_logs(db, container)
    secs = out["seconds"]
    return {
        "records": n,
        "stored": stored,
        "loss": max(0, n - stored),
        "duplicates": max(0, stored - n),
        "records_per_s": (stored / secs) if secs > 0 and out["flushed"] else None,
        **out,
    }


# ----------------------------------------------------------------------------- GET /api/logs at scale


def bulk_insert_logs(db: Path, rows: int, batch: int = 50_000) -> float:
    """rows synthetic log rows straight into the stack's database (executemany). Returns seconds."""
    rng = random.Random(7)
    now = time.time()
    containers = [f"agent{i}" for i in range(50)]
    hosts = [f"svc{i}.example.com" for i in range(500)]
    t0 = time.perf_counter()
    con = sqlite3.connect(str(db), timeout=30)
    try:
        con.execute("PRAGMA busy_timeout = 30000")
        done = 0
        while done < rows:
            k = min(batch, rows - done)
            data = []
            for j in range(k):
                allowed = rng.random() < 0.8
                data.append(
                    (
                        now - 86400.0 * (done + j) / rows,
                        rng.choice(containers),
                        "",
                        rng.choice(hosts),
                        443,
                        None,
                        "CONNECT",
                        "allowed" if allowed else "blocked",
                        None,
                        round(rng.random() * 5, 3),
                        "rule" if allowed else "default",
                        None,
                    )
                )
            with con:
                con.executemany(
                    "INSERT INTO logs (timestamp, container_name, container_id, destination_host, destination_port,"
                    " resolved_hostname, method, result, rule_id, response_time_ms, reason, mitm_skip_reason)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    data,
                )
                # log_counts, as the recorder keeps it (greyproxy/store/logs.py ADD_COUNT, migration 10)
                counts = collections.Counter((r[1], r[7]) for r in data)
                con.executemany(
                    "INSERT INTO log_counts (container_name, result, n) VALUES (?, ?, ?)"
                    " ON CONFLICT (container_name, result) DO UPDATE SET n = n + excluded.n",
                    [(c, r, n) for (c, r), n in counts.items()],
                )
            done += k
    finally:
        con.close()
    return time.perf_counter() - t0


def logs_api_latency(api: str, db: Path, rows: int, calls: int) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    before = int(con.execute("SELECT COUNT(*) FROM logs").fetchone()[0])
    con.close()
    insert_s = bulk_insert_logs(db, max(0, rows - before)) if rows > before else 0.0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    stored = int(con.execute("SELECT COUNT(*) FROM logs").fetchone()[0])
    con.close()
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        plain = _timed_logs(client, api, {"limit": 50}, calls)
        # ?container= is a substring (SPEC §5): 'agent7' names one container of the fifty, 'agent1'
        # eleven (agent1, agent10..agent19); both must stay on the (container_name, timestamp) index.
        by_container = {
            name: _timed_logs(client, api, {"limit": 50, "container": name}, calls) for name in ("agent7", "agent1")
        }
    return {
        "rows": stored,
        "insert_seconds": insert_s,
        "calls": plain["calls"],
        "errors": plain["errors"],
        "p50_ms": plain["p50_ms"],
        "p99_ms": plain["p99_ms"],
        "api_total": plain["api_total"],
        "container": by_container,
        "container_p50_ms": _worst(c["p50_ms"] for c in by_container.values()),
        "container_p99_ms": _worst(c["p99_ms"] for c in by_container.values()),
    }


def _worst(values: Any) -> float | None:
    vals = list(values)
    return None if any(v is None for v in vals) else max(vals)


def _timed_logs(client: httpx.Client, api: str, params: dict[str, Any], calls: int) -> dict[str, Any]:
    samples: list[float] = []
    errors = 0
    total_seen = None
    for i in range(calls + 3):
        t0 = time.perf_counter()
        r = client.get(f"{api}/api/logs", params=params)
        dt = (time.perf_counter() - t0) * 1000.0
        body = r.json() if r.status_code == 200 else {}
        if r.status_code != 200 or len(body.get("items") or []) != min(50, int(body.get("total") or 0)):
            errors += 1
            continue
        total_seen = body.get("total")
        if i >= 3:  # the first calls warm the page cache and the connection
            samples.append(dt)
    return {
        "calls": len(samples),
        "errors": errors,
        "p50_ms": pct(samples, 50),
        "p99_ms": pct(samples, 99),
        "api_total": total_seen,
    }


# ----------------------------------------------------------------------------- rule decisions

_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s*$")


def rule_decisions(sizes: list[int], queries: int, timeout: float = 300.0) -> dict[str, Any]:
    """Runs bench/rules_bench.py (the rule engine's own micro-benchmark) and reads its table."""
    script = BENCH / "rules_bench.py"
    if not script.exists():
        return {"error": "bench/rules_bench.py is missing"}
    argv = [sys.executable, str(script), "--rules", ",".join(map(str, sizes)), "--queries", str(queries)]
    try:
        p = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return {"error": "rules_bench.py timed out"}
    out: dict[str, Any] = {"sizes": {}, "raw": p.stdout}
    for line in p.stdout.splitlines():
        m = _ROW.match(line)
        if m:
            n = int(m.group(1))
            out["sizes"][str(n)] = {
                "build_ms": float(m.group(2)),
                "hit_median_us": float(m.group(3)),
                "hit_p99_us": float(m.group(4)),
                "miss_median_us": float(m.group(5)),
                "miss_p99_us": float(m.group(6)),
                "hit_rate": int(m.group(7)) / 100.0,
                "median_us": max(float(m.group(3)), float(m.group(5))),
                "p99_us": max(float(m.group(4)), float(m.group(6))),
            }
    if not out["sizes"]:
        out["error"] = f"could not read rules_bench.py output ({p.returncode}): {(p.stdout + p.stderr)[-300:]}"
    return out
