"""Instructions per request of the in-process request path (bench/proxy_path.py), under callgrind.

Instruction counts do not depend on how busy the machine is. The same program runs twice under
`valgrind --tool=callgrind` with N1 and N2 keep-alive requests through `http_proxy.handle_http`
(in-memory transports, as bench/proxy_path.py); (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of one
request without the start-up (imports, setup).

    .venv/bin/python bench/callgrind_path.py [--root DIR] [--n1 500] [--n2 2500] [--branch-sim]

`--branch-sim` also counts mispredicted branches (conditional + indirect, callgrind's simulated
predictor): an interpreter's cost that instruction counts do not show.

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


def counts(root: str, n: int, branch_sim: bool) -> list[int]:
    """callgrind's totals: [Ir] or, with branch_sim, [Ir, Bc, Bcm, Bi, Bim]."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--branch-sim={'yes' if branch_sim else 'no'}",
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
        m = re.search(r"Collected : ([\d ]+)", run.stderr)
        if run.returncode != 0 or not m:
            raise SystemExit(f"valgrind failed ({run.returncode}):\n{run.stderr[-2000:]}")
        return [int(x) for x in m.group(1).split()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(BENCH.parent), help="checkout to import the proxy from")
    ap.add_argument("--n1", type=int, default=500)
    ap.add_argument("--n2", type=int, default=2500)
    ap.add_argument("--branch-sim", action="store_true", help="also count mispredicted branches")
    ap.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        inner(args.root, args.inner)
        return 0
    c1, c2 = counts(args.root, args.n1, args.branch_sim), counts(args.root, args.n2, args.branch_sim)
    per = [(b - a) / (args.n2 - args.n1) for a, b in zip(c1, c2)]
    pure = " (GREYPROXY_PURE=1)" if os.environ.get("GREYPROXY_PURE", "") not in ("", "0") else ""
    line = f"{args.root}{pure}: {per[0]:,.0f} instructions/request"
    if args.branch_sim:
        line += f", {per[1] + per[3]:,.0f} branches, {per[2] + per[4]:,.0f} mispredicted ({per[4]:,.0f} indirect)"
    print(f"{line} (callgrind, {args.n1} vs {args.n2} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
