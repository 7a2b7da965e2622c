"""GET /api/logs at scale on its own (the same measure bench/run.py makes, without the loads):

    python bench/logs_bench.py [--rows 1000000] [--calls 50]

Starts the whole stack on free ports in a temp dir, fills the logs table to --rows synthetic rows
(50 containers agent0..agent49, sqlite3 executemany), then times GET /api/logs?limit=50 without
a filter and with ?container=agent7 (a substring matching one name) and ?container=agent1 (eleven
names). Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from harness import greybench  # noqa: E402
from harness.proxies import GreyProxy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gp-logs-bench"))
    grey = GreyProxy(root)
    grey.start()
    try:
        result = greybench.logs_api_latency(grey.stack.api, grey.stack.db_path, args.rows, args.calls)
    finally:
        grey.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
