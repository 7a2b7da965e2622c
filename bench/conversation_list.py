"""What GET /api/conversations costs per page (SPEC §13.6, issue 18 item 4): the API's own
listing function on a database of N Claude Code sessions of T turns each, assembled by the real
assembler; best of 10 pages of 50. Then the same with `conversations.item` cleared, as for rows
written before migration 13 (the listing then decompresses and parses each item's whole detail).

    .venv/bin/python bench/conversation_list.py [--n 50] [--turns 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit"), str(ROOT)]

import llm_db  # noqa: E402
import llm_fixtures as F  # noqa: E402
from test_llm_storage_bounded import _session  # noqa: E402

from greyproxy.store.db import open_database  # noqa: E402
from services.api import llm as api  # noqa: E402
from services.maintenance import assembler as AS  # noqa: E402


def _page_ms() -> float:
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        api.list_conversations({}, 50, 0)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="sessions")
    ap.add_argument("--turns", type=int, default=40, help="turns per session")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.db"
        conn = llm_db.new_store(path)
        for i in range(args.n):
            llm_db.insert(conn, _session(args.turns, sid=f"9d4a2584-4176-4653-be44-{i:012d}", t0=F.T0 + i))
        AS.run_pass(conn)
        db = open_database(path)
        try:
            listed = _page_ms()
            conn.execute("UPDATE conversations SET item = NULL")
            cut = _page_ms()
        finally:
            db.close()
            conn.close()
    print(
        f"{args.n} sessions of {args.turns} turns, a page of 50: list form {listed:.2f} ms; detail cut down {cut:.2f} ms"
    )


if __name__ == "__main__":
    main()
