"""The API's memory and CPU while it streams `GET /api/transactions/export.har` (SPEC §14).

Starts the whole stack (tests/harness's Stack: free ports, a temp data dir), writes rows straight
into its database, and exports them with httpx while sampling the API process's RSS
(/proc/PID/status) every 20 ms:

- `big`: 200 transactions with a ~2 MiB highly compressible JSON response body each (stored zstd,
  ~300 bytes a row: what an outside tester used), one export (~420 MB of HAR);
- `rows`: 100 000 ordinary transactions (a 400-character JSON body each way), one export, then
  three at once;
- `cancel`: the `rows` export read for 30 KB and dropped, three times: the API's CPU seconds in
  the 3 s after each drop (an export that keeps going burns ~1 s a second); then the `big` one
  dropped likewise three times, and the API's RSS after.

    .venv/bin/python bench/har_export_rss.py [--scenario big,rows,cancel] [--json FILE]

Nothing to install: Python only (~1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from harness.proxies import _test_harness  # noqa: E402

from greyproxy.bodies import pack  # noqa: E402
from greyproxy.capture import TRANSACTION_COLUMNS  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


class Sampler:
    """The peak RSS of `pid` while it runs (a thread sampling every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_mib(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_mib(self.pid))


def insert(db: Path, container: str, n: int, body: bytes, t0: float) -> None:
    cols = [c for c in TRANSACTION_COLUMNS if c not in ("id", "request_body_base", "response_body_base")]
    headers = json.dumps({"Content-Type": ["application/json"], "Authorization": ["[REDACTED]"]})
    packed = pack(body, "application/json")

    def row(i: int) -> list:
        values = {
            "timestamp": t0 + i * 0.01,
            "container_name": container,
            "destination_host": "api.test",
            "destination_port": 443,
            "method": "POST",
            "url": f"https://api.test/v1/chat?i={i}",
            "request_headers": headers,
            "request_body_size": 0,
            "status_code": 200,
            "response_headers": headers,
            "response_body": packed.blob,
            "response_body_codec": packed.codec,
            "response_body_charset": packed.charset,
            "response_body_size": len(body),
            "response_content_type": "application/json",
            "duration_ms": 12.5,
            "result": "allowed",
            "substituted_credentials": "[]",
            "refused_credentials": "[]",
            "host_mismatch": 0,
        }
        return [values.get(c) for c in cols]

    con = sqlite3.connect(db, timeout=30)
    with con:
        con.executemany(
            f"INSERT INTO http_transactions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            (row(i) for i in range(n)),
        )
    con.close()


def export(url: str, container: str, stop_after: int | None = None) -> int:
    """Bytes read of the export (all of it, or about `stop_after` and then the connection dropped)."""
    got = 0
    with httpx.stream(
        "GET", url, params={"container": container}, timeout=httpx.Timeout(30, read=300), trust_env=False
    ) as r:
        assert r.status_code == 200, r.status_code
        for chunk in r.iter_raw(16384):
            got += len(chunk)
            if stop_after is not None and got >= stop_after:
                break
    return got


def settle(pid: int, seconds: float = 1.0) -> float:
    time.sleep(seconds)
    return rss_mib(pid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scenario", default="big,rows,cancel")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    scenarios = args.scenario.split(",")
    h = _test_harness()
    out: dict[str, Any] = {}
    t0 = time.time() - 3 * 3600  # recent: retention keeps them
    big = json.dumps({"choices": [{"message": {"content": "x" * (2 * 1024 * 1024 - 64)}}]}).encode()
    small = json.dumps({"choices": [{"message": {"content": "x" * 400}}]}).encode()
    with h.Stack({"proxy": {"holdTimeout": 2}}) as stack:
        pid = stack.pid("api")
        assert pid
        url = stack.url("/api/transactions/export.har")
        insert(stack.db_path, "big", 200, big, t0)
        insert(stack.db_path, "rows", 100_000, small, t0 + 10)
        base = settle(pid)
        print(f"API RSS at rest: {base:.0f} MiB")
        if "big" in scenarios:
            with Sampler(pid) as s:
                started = time.monotonic()
                size = export(url, "big")
                took = time.monotonic() - started
            after = settle(pid)
            out["big"] = {"bytes": size, "seconds": took, "before": base, "peak": s.peak, "after": after}
            print(
                f"big: {size / 1e6:.0f} MB in {took:.1f} s; RSS {base:.0f} → peak {s.peak:.0f} MiB"
                f" (+{s.peak - base:.0f}), {after:.0f} MiB after"
            )
        if "rows" in scenarios:
            before = rss_mib(pid)
            with Sampler(pid) as s:
                started = time.monotonic()
                size = export(url, "rows")
                took = time.monotonic() - started
            after = settle(pid)
            out["rows"] = {"bytes": size, "seconds": took, "before": before, "peak": s.peak, "after": after}
            print(
                f"rows: {size / 1e6:.0f} MB in {took:.1f} s; RSS {before:.0f} → peak {s.peak:.0f} MiB"
                f" (+{s.peak - before:.0f}), {after:.0f} MiB after"
            )
            before = rss_mib(pid)
            with Sampler(pid) as s:
                started = time.monotonic()
                threads = [threading.Thread(target=export, args=(url, "rows")) for _ in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                took = time.monotonic() - started
            after = settle(pid)
            out["rows_x3"] = {"seconds": took, "before": before, "peak": s.peak, "after": after}
            print(
                f"rows, three at once: {took:.1f} s; RSS {before:.0f} → peak {s.peak:.0f} MiB"
                f" (+{s.peak - before:.0f}), {after:.0f} MiB after"
            )
        if "cancel" in scenarios:
            before = rss_mib(pid)
            burnt = []
            with Sampler(pid) as s:
                for container in ("rows", "rows", "rows", "big", "big", "big"):
                    export(url, container, stop_after=30_000)
                    c0 = cpu_seconds(pid)
                    time.sleep(3)
                    burnt.append(cpu_seconds(pid) - c0)
            after = settle(pid)
            out["cancel"] = {"cpu_after_drop": burnt, "before": before, "peak": s.peak, "after": after}
            print(
                f"cancel (rows ×3, big ×3): API CPU in the 3 s after each drop"
                f" {', '.join(f'{b:.2f}' for b in burnt)} s;"
                f" RSS {before:.0f} → peak {s.peak:.0f} MiB, {after:.0f} MiB after"
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
