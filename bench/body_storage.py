"""Bytes stored per request (SPEC §15, issue 18 item 4): through the whole stack, and how well an
LLM session's bodies compress.

1. Through the proxy (tests/conftest.py's Stack, plain-HTTP origin on loopback, httpx keep-alive):
   N GETs of 1 KiB `text/plain` random bytes, N GETs of 1 KiB English-like text (Python source
   and docstrings), and an LLM session: a Claude-Code-shaped `POST /v1/messages` whose body
   repeats the whole conversation each turn (a ~14 KiB system prompt, ~8 KiB of tool schemas, every
   earlier turn; the turns' text is taken from the standard library's source so it does not repeat
   itself). Bytes stored per request = growth of the database's pages in use (page_count −
   freelist_count, after a TRUNCATE checkpoint) / requests: the row, its log entry, the indexes.
2. Offline, the same session's request bodies: per-row zstd at levels 1/3/9/19 (what is stored:
   level 3), a zstd dictionary trained on the container's earlier bodies, and each body
   compressed against the previous one (raw-content dictionary, a delta).

    .venv/bin/python bench/body_storage.py [--n 300] [--turns 40]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="GETs of each kind")
    ap.add_argument("--turns", type=int, default=40, help="turns of the LLM session")
    args = ap.parse_args()
    import greyproxy

    print(f"tree: {Path(greyproxy.__file__).resolve().parent.parent}")
    bodies = session_bodies(args.turns)
    print("\n| load | requests | bytes stored per request | body bytes sent per request |\n|---|---|---|---|")
    for name, n, per, sent in through_stack(args.n, bodies):
        print(f"| {name} | {n} | {per:,.0f} | {sent:,.0f} |")
    raw = sum(map(len, bodies))
    print(f"\nLLM session request bodies: {len(bodies)}, {raw:,} bytes in all (last {len(bodies[-1]):,})\n")
    print("| stored as | bytes | ratio | µs per body |\n|---|---|---|---|")
    for name, size, us in compression(bodies):
        print(f"| {name} | {size:,} | {raw / size:.1f}× | {us:,.0f} |")


if __name__ == "__main__":
    main()
