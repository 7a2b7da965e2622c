"""The assembler's cost per stored plain (non-LLM) transaction (issue 18: maintenance CPU under
plain-HTTP load). Stores N plain GET rows (1 KiB bodies, a handful of hosts) in a real SQLite file
with the services' pragmas, as the recorder would between two passes (`--per-pass` rows, about
500 ms of keep-alive traffic), runs `run_pass` after each group and prints the process CPU per row
the passes took (min over --repeat runs).

    .venv/bin/python bench/assembler_skip.py [--n 30000] [--per-pass 3000] [--assembler FILE]

--assembler loads another version of services/maintenance/assembler.py (e.g. `git show
97767c1:services/maintenance/assembler.py > /tmp/old.py`) in its place, for before/after runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import llm_db  # noqa: E402
import llm_fixtures as F  # noqa: E402


def load(path: str | None):
    if path is None:
        from services.maintenance import assembler

        return assembler
    spec = importlib.util.spec_from_file_location("services.maintenance._assembler_alt", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def plain_rows(n: int) -> list[dict]:
    body = os.urandom(512).hex()
    rows = []
    for i in range(n):
        host = f"origin{i % 5}.test"
        r = F.row(f"http://{host}:8080/x/{i}", None, body, ts=time.time(), method="GET", resp_ct="text/plain")
        rows.append(r)
    return rows


def run(AS, n: int, per_pass: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        conn = llm_db.new_store(Path(d) / "a.db")
        rows = plain_rows(n)
        cpu = 0.0
        for k in range(0, n, per_pass):
            llm_db.insert(conn, rows[k : k + per_pass])
            t = time.process_time()
            AS.run_pass(conn)
            cpu += time.process_time() - t
        conn.close()
        return cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30000)
    ap.add_argument("--per-pass", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--assembler", default=None)
    a = ap.parse_args()
    AS = load(a.assembler)
    best = min(run(AS, a.n, a.per_pass) for _ in range(a.repeat))
    print(f"{a.assembler or 'this tree'}: {best:.2f} µs of CPU per stored plain transaction (min of {a.repeat})")


if __name__ == "__main__":
    main()
