"""Bytes stored per request (SPEC §15, issue 18 item 4): through the whole stack, and how well an
LLM session's bodies compress.

1. Through the proxy (tests/conftest.py's Stack, plain-HTTP origin on loopback, httpx keep-alive):
   N GETs of 1 KiB `text/plain` random bytes, N GETs of 1 KiB English-like text (Python source
   and docstrings), and an LLM session: a Claude-Code-shaped `POST /v1/messages` whose body
   repeats the whole conversation each turn (a ~14 KiB system prompt, ~8 KiB of tool schemas, every
   earlier turn; the turns' text is taken from the standard library's source so it does not repeat
   itself). Bytes stored per request = growth of the database's pages in use (page_count −
   freelist_count, after a TRUNCATE checkpoint) / requests: the row, its log entry, the indexes.
2. Offline, the same session's request bodies: per-row zstd at levels 1/3/9/19 (level 3 is
   the proxy's), a zstd dictionary trained on the container's earlier bodies, and each body
   compressed against the previous one (raw-content dictionary, a delta).
3. Offline, what the recorder stores (greyproxy.bodies.DeltaEncoder through the recorder's real
   `apply_records` into a SQLite file): the session with chains of at most N frames for several N,
   bytes stored and the CPU to read a body back (cold `bodies.Reader`, mean and worst); and a
   session whose stream interleaves a main conversation, a subagent's and one-off utility calls,
   with 1 or 4 remembered bodies per stream (4: the one sharing the longest prefix is the base),
   against keying by the conversation itself (each in its own container).

    .venv/bin/python bench/body_storage.py [--n 300] [--turns 40] [--offline]

Run from another tree (PYTHONPATH=that tree, cwd = that tree) to measure it: it prints which.
"""

from __future__ import annotations

import argparse
import http.server
import inspect
import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import zstandard

REPO = Path.cwd()
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import Stack, wait_for  # noqa: E402

ANSWER = json.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [{"type": "text", "text": "Done."}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 2},
    }
).encode()


def _corpus() -> list[str]:
    """Paragraph-sized pieces of real text (the standard library's source), deterministic."""
    import argparse as a
    import asyncio.base_events as ab
    import email.message as m
    import http.server as hs
    import json.decoder as j
    import logging as lg
    import subprocess as sp
    import textwrap as t
    import typing as ty
    import unittest.case as uc
    import pydoc as pd
    import tarfile as tf

    pieces: list[str] = []
    for mod in (lg, a, m, j, t, ab, hs, sp, ty, uc, pd, tf):
        src = inspect.getsource(mod)
        pieces += [src[i : i + 700] for i in range(0, len(src) - 700, 700)]
    return pieces


CORPUS = _corpus()
assert len(CORPUS) > 1000, len(CORPUS)
TEXT_1K = [p.encode()[:1024].ljust(1024) for p in (CORPUS[i] + CORPUS[i + 1] for i in range(0, 600, 2))]


def session_bodies(turns: int) -> list[bytes]:
    system = [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
        {"type": "text", "text": "\n".join(CORPUS[900:920]), "cache_control": {"type": "ephemeral"}},
    ]
    tools = [
        {
            "name": f"Tool{i}",
            "description": CORPUS[950 + i][:400],
            "input_schema": {
                "type": "object",
                "properties": {
                    f"arg{k}": {"type": "string", "description": CORPUS[970 + i + k][:80]} for k in range(4)
                },
                "required": ["arg0"],
            },
        }
        for i in range(12)
    ]
    msgs: list[dict[str, Any]] = []
    out = []
    for turn in range(turns):
        msgs.append({"role": "user", "content": [{"type": "text", "text": CORPUS[(2 * turn) % 800]}]})
        out.append(
            json.dumps(
                {
                    "model": "claude-opus-4-6",
                    "max_tokens": 32000,
                    "stream": False,
                    "system": system,
                    "messages": msgs,
                    "tools": tools,
                    "metadata": {"user_id": "user_abc_account__session_1234"},
                }
            ).encode()
        )
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": CORPUS[(2 * turn + 1) % 800]}]})
    return out


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/rand"):
            self._send(os.urandom(1024), "text/plain")
        else:
            self._send(TEXT_1K[int(self.path.rsplit("/", 1)[1]) % len(TEXT_1K)], "text/plain; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(ANSWER, "application/json")

    def log_message(self, *args: object) -> None:
        pass


def data_bytes(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size, count, free = (
            conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count", "freelist_count")
        )
        return (count - free) * size
    finally:
        conn.close()


def through_stack(n: int, bodies: list[bytes]) -> list[tuple[str, int, float, float]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    rows = []
    with (
        Stack() as stack,
        httpx.Client(proxy=f"http://bench:x@127.0.0.1:{stack.ports['http-proxy']}", trust_env=False, timeout=10) as c,
    ):
        total = 0
        for name, reqs in (
            ("GET 1 KiB text/plain of random bytes", [("GET", f"/rand/{i}", None) for i in range(n)]),
            ("GET 1 KiB text (Python source)", [("GET", f"/text/{i}", None) for i in range(n)]),
            (f"LLM session: {len(bodies)} turns, POST /v1/messages", [("POST", "/v1/messages", b) for b in bodies]),
        ):
            before = data_bytes(stack.db_path)
            sent = sum(len(b or b"") for _m, _p, b in reqs)
            for method, path, body in reqs:
                c.request(
                    method,
                    f"http://127.0.0.1:{port}{path}",
                    content=body,
                    headers={"Content-Type": "application/json"} if body else {},
                ).raise_for_status()
            total += len(reqs)
            wait_for(
                lambda want=total: stack.get("/api/transactions", params={"limit": 1}).json()["total"] >= want,
                60,
                message="all stored",
            )
            grown = data_bytes(stack.db_path) - before
            rows.append((name, len(reqs), grown / len(reqs), sent / len(reqs)))
        # The same session as a real agent's traffic to api.anthropic.com is stored: claimed by the
        # anthropic dissector (here an endpoint rule names the local origin), so the conversation
        # tracker keeps its rows (llm_requests, the assembled conversation) beside the transactions.
        # Another container: its bodies are no deltas against the session above.
        r = stack.request(
            "POST",
            "/api/endpoint-rules",
            json={"host_pattern": f"127.0.0.1:{port}", "path_pattern": "/v1/messages", "decoder_name": "anthropic"},
        )
        r.raise_for_status()
        before = data_bytes(stack.db_path)
        with httpx.Client(
            proxy=f"http://bench-llm:x@127.0.0.1:{stack.ports['http-proxy']}", trust_env=False, timeout=10
        ) as llm:
            for body in bodies:
                llm.post(
                    f"http://127.0.0.1:{port}/v1/messages", content=body, headers={"Content-Type": "application/json"}
                ).raise_for_status()
        total += len(bodies)

        def assembled(want: int = total) -> bool:
            status = stack.get("/api/maintenance/status").json().get("conversations") or {}
            convs = stack.get("/api/conversations", params={"container": "bench-llm"}).json()
            return (
                stack.get("/api/transactions", params={"limit": 1}).json()["total"] >= want
                and status.get("backlog") == 0
                and any(c.get("turn_count") == len(bodies) for c in convs.get("items", []))
            )

        wait_for(assembled, 60, message="the session stored and assembled")
        grown = data_bytes(stack.db_path) - before
        sent = sum(map(len, bodies))
        name = f"LLM session: {len(bodies)} turns, POST /v1/messages, claimed by the anthropic dissector"
        rows.append((name, len(bodies), grown / len(bodies), sent / len(bodies)))
    server.shutdown()
    return rows


def compression(bodies: list[bytes]) -> list[tuple[str, int, float]]:
    raw = sum(map(len, bodies))
    out = [("as they are", raw, 0.0)]
    for level in (1, 3, 9, 19):
        c = zstandard.ZstdCompressor(level=level)
        t0 = time.perf_counter()
        size = sum(len(c.compress(b)) for b in bodies)
        out.append((f"zstd level {level}, each body alone", size, (time.perf_counter() - t0) / len(bodies) * 1e6))
    # A dictionary trained on the container's first bodies, used for the rest (all counted; the
    # dictionary too).
    k = max(4, len(bodies) // 4)
    try:
        d = zstandard.train_dictionary(64 * 1024, bodies[:k])
        c = zstandard.ZstdCompressor(level=3, dict_data=d)
        t0 = time.perf_counter()
        size = (
            sum(len(zstandard.ZstdCompressor(level=3).compress(b)) for b in bodies[:k])
            + sum(len(c.compress(b)) for b in bodies[k:])
            + len(d.as_bytes())
        )
        out.append(
            (
                f"zstd level 3, dictionary trained on the first {k} bodies",
                size,
                (time.perf_counter() - t0) / len(bodies) * 1e6,
            )
        )
    except zstandard.ZstdError as exc:
        out.append((f"trained dictionary: {exc}", raw, 0.0))
    # Each body against the previous one (a delta: reading one needs the chain back to a full body).
    t0 = time.perf_counter()
    size = len(zstandard.ZstdCompressor(level=3).compress(bodies[0]))
    for prev, b in zip(bodies, bodies[1:]):
        d = zstandard.ZstdCompressionDict(prev, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        size += len(zstandard.ZstdCompressor(level=3, dict_data=d).compress(b))
    out.append(("zstd level 3 against the previous body (delta)", size, (time.perf_counter() - t0) / len(bodies) * 1e6))
    return out


def _record(container: str, body: bytes, ts: float) -> dict[str, Any]:
    from greyproxy import bodies as B

    rec: dict[str, Any] = {
        "timestamp": ts,
        "container_name": container,
        "destination_host": "api.anthropic.com",
        "destination_port": 443,
        "method": "POST",
        "url": "https://api.anthropic.com/v1/messages?beta=true",
        "request_headers": {},
        "request_body_size": len(body),
        "request_content_type": "application/json",
        "status_code": 200,
        "response_headers": {},
        "response_body": None,
        "response_body_size": 0,
        "duration_ms": 1.0,
        "result": "allowed",
    }
    B.to_record(rec, "request", B.pack(body, "application/json"))
    return rec


def stored_deltas(stream: list[tuple[str, bytes]], chain: int, candidates: int) -> tuple[int, float, float, float, int]:
    """(request body bytes stored, mean µs to read one cold, worst µs, recorder µs per body, deltas)
    for `stream` [(container, body)] recorded one record per batch by the real recorder."""
    import tempfile

    import orjson

    from greyproxy import bodies as B
    from greyproxy.store import open_database
    from services.recorder import transactions as T
    from services.recorder.apply import apply_records

    T.DELTAS = B.DeltaEncoder(chain=chain, candidates=candidates)
    with tempfile.TemporaryDirectory() as d:
        db = open_database(Path(d) / "d.db")
        conn = db.connection()
        cpu = 0.0
        for i, (container, body) in enumerate(stream):
            rec = orjson.loads(orjson.dumps(_record(container, body, 1000.0 + i)))
            t0 = time.process_time()
            apply_records(conn, [(f"r{i}", "transaction", rec)])
            cpu += time.process_time() - t0
        size = conn.execute("SELECT SUM(length(request_body)) FROM http_transactions").fetchone()[0]
        n_delta = conn.execute("SELECT COUNT(*) FROM http_transactions WHERE request_body_codec = 2").fetchone()[0]
        times = []
        for (tid,) in conn.execute("SELECT id FROM http_transactions ORDER BY id").fetchall():
            best = float("inf")
            for _ in range(3):
                t0 = time.process_time()
                data = B.Reader(conn.execute).content(tid, "request")
                best = min(best, time.process_time() - t0)
            assert data == stream[tid - 1][1], tid
            times.append(best * 1e6)
        db.close()
    return size, sum(times) / len(times), max(times), cpu / len(stream) * 1e6, n_delta


def interleaved(turns: int) -> list[tuple[str, int, bytes]]:
    """One stream (container "claude", POST /v1/messages): a main conversation of `turns` turns,
    a subagent's (another system prompt) from turn 5 for 15 turns, a one-off utility call (a short
    system prompt, a title request) every 4th turn: [(conversation, body)]."""
    main = session_bodies(turns)
    sub = [b.replace(b"You are Claude Code", b"You are a subagent of Claude Code") for b in session_bodies(15)]
    sub = [b.replace(CORPUS[900][:200].encode(), CORPUS[1000][:200].encode()) for b in sub]
    out: list[tuple[str, int, bytes]] = []
    for t in range(turns):
        out.append(("main", t, main[t]))
        if 5 <= t < 20:
            out.append(("sub", t, sub[t - 5]))
        if t % 4 == 3:
            title = json.dumps(
                {
                    "model": "claude-haiku",
                    "system": "Write a title",
                    "messages": [{"role": "user", "content": CORPUS[t][:300]}],
                }
            ).encode()
            out.append((f"util{t}", t, title))
    return out


def offline_deltas(bodies: list[bytes], turns: int) -> None:
    from greyproxy import bodies as B

    raw = sum(map(len, bodies))
    print("\nWhat the recorder stores (the session's request bodies, a chain of at most N frames):\n")
    print(
        "| N | bytes stored | ratio | recorder µs per body | read µs per body, mean | worst |\n|---|---|---|---|---|---|"
    )
    for chain in (1, 4, 8, 16, 32, 64):
        size, mean, worst, rec_us, _n = stored_deltas([("claude", b) for b in bodies], chain, 4)
        label = "1 (no deltas)" if chain == 1 else str(chain)
        print(f"| {label} | {size:,} | {raw / size:.1f}× | {rec_us:,.0f} | {mean:,.0f} | {worst:,.0f} |")
    mixed = interleaved(turns)
    raw = sum(len(b) for _c, _t, b in mixed)
    print(
        f"\nOne stream interleaving a main conversation, a subagent and utility calls ({len(mixed)} bodies, {raw:,} bytes; N = {B.DELTA_CHAIN}):\n"
    )
    print("| base chosen among | bytes stored | ratio | deltas |\n|---|---|---|---|")
    for label, stream, cands in (
        ("the previous body of the stream", [("claude", b) for _c, _t, b in mixed], 1),
        (
            "the stream's last 4 bodies, longest common prefix (what is built)",
            [("claude", b) for _c, _t, b in mixed],
            4,
        ),
        ("the previous body of the same conversation (keyed by it)", [(c, b) for c, _t, b in mixed], 1),
    ):
        size, _mean, _worst, _rec, n = stored_deltas(stream, B.DELTA_CHAIN, cands)
        print(f"| {label} | {size:,} | {raw / size:.1f}× | {n} of {len(stream)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="GETs of each kind")
    ap.add_argument("--turns", type=int, default=40, help="turns of the LLM session")
    ap.add_argument("--offline", action="store_true", help="only the offline tables (no stack)")
    args = ap.parse_args()
    import greyproxy

    print(f"tree: {Path(greyproxy.__file__).resolve().parent.parent}")
    bodies = session_bodies(args.turns)
    if args.offline:
        offline_deltas(bodies, args.turns)
        return
    print("\n| load | requests | bytes stored per request | body bytes sent per request |\n|---|---|---|---|")
    for name, n, per, sent in through_stack(args.n, bodies):
        print(f"| {name} | {n} | {per:,.0f} | {sent:,.0f} |")
    raw = sum(map(len, bodies))
    print(f"\nLLM session request bodies: {len(bodies)}, {raw:,} bytes in all (last {len(bodies[-1]):,})\n")
    print("| stored as | bytes | ratio | µs per body |\n|---|---|---|---|")
    for name, size, us in compression(bodies):
        print(f"| {name} | {size:,} | {raw / size:.1f}× | {us:,.0f} |")
    try:
        from greyproxy.bodies import DeltaEncoder  # noqa: F401 - only in trees that store deltas
    except ImportError:
        return
    offline_deltas(bodies, args.turns)


if __name__ == "__main__":
    main()
