"""Instructions per request of the in-process request path (bench/proxy_path.py), under callgrind.

Instruction counts do not depend on how busy the machine is. The same program runs twice under
`valgrind --tool=callgrind` with N1 and N2 keep-alive requests through `http_proxy.handle_http`
(in-memory transports, as bench/proxy_path.py); (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of one
request without the start-up (imports, setup).

    .venv/bin/python bench/callgrind_path.py [--root DIR] [--n1 500] [--n2 2500]

Environment passes through: GREYPROXY_PURE=1 measures the pure-Python modules of a tree that has
compiled ones (greyproxy/compiled.py).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def inner(root: str, n: int) -> None:
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, root)
    import logging

    import uvloop

    import proxy_path

    logging.disable(logging.WARNING)
    uvloop.run(proxy_path.proxied(n, False))


def instructions(root: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--inner",
                str(n),
                "--root",
                root,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        m = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or not m:
            raise SystemExit(f"valgrind failed ({run.returncode}):\n{run.stderr[-2000:]}")
        return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(BENCH.parent), help="checkout to import the proxy from")
    ap.add_argument("--n1", type=int, default=500)
    ap.add_argument("--n2", type=int, default=2500)
    ap.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        inner(args.root, args.inner)
        return 0
    i1, i2 = instructions(args.root, args.n1), instructions(args.root, args.n2)
    pure = " (GREYPROXY_PURE=1)" if os.environ.get("GREYPROXY_PURE") else ""
    print(
        f"{args.root}{pure}: {(i2 - i1) / (args.n2 - args.n1):,.0f} instructions/request (callgrind Ir, {args.n1} vs {args.n2} requests)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
