"""Compile the proxy's hot pure-Python modules with Cython, in place, in a copy of the tree.

An experiment's tool (issue 18 item 1, bench/results.md "s6-e"): the same .py files are compiled
(Cython's pure-Python mode) to extension modules next to them, so `bench/proxy_path.py --root DIR`
and `bench/conn_path.py --root DIR` measure compiled against pure code. Never run it on a working
tree you edit: Python prefers the .so to the .py beside it, so an edit would not be seen.

    .venv/bin/python bench/cython_tree.py --root /tmp/comp [--jobs 2] [--annotation-typing] [MODULE.py ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HOT = [
    "services/proxy/http1.py",
    "services/proxy/keepalive.py",
    "services/proxy/exchange.py",
    "services/proxy/gate.py",
    "services/proxy/pipeline.py",
    "services/proxy/conn.py",
    "services/proxy/hooks.py",
    "services/proxy/http_proxy.py",
    "services/proxy/pool.py",
    "services/proxy/context.py",
    "services/proxy/upstream.py",
    "services/proxy/tunnel.py",
    "services/proxy/httpio.py",
    "services/proxy/mitm.py",
    "greyproxy/redaction.py",
    "greyproxy/capture.py",
    "greyproxy/metrics.py",
    "bus/records.py",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="tree to compile in (a copy, never your working tree)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--annotation-typing",
        action="store_true",
        help="let Cython type variables from annotations (int/float become C types: changes semantics)",
    )
    ap.add_argument("modules", nargs="*", default=HOT)
    args = ap.parse_args(argv)
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    root = Path(args.root).resolve()
    os.chdir(root)
    exts = [Extension(m[:-3].replace("/", "."), [m]) for m in args.modules]
    directives = {"language_level": 3, "binding": True, "annotation_typing": args.annotation_typing}
    t0 = time.monotonic()
    modules = cythonize(exts, compiler_directives=directives, nthreads=args.jobs, quiet=True)
    t1 = time.monotonic()
    dist = Distribution({"name": "greyproxy-compiled", "ext_modules": modules})  # not the tree's pyproject.toml
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace, cmd.parallel, cmd.build_temp = True, args.jobs, str(root / "build" / "tmp")
    dist.run_command("build_ext")
    t2 = time.monotonic()
    print(f"cython {t1 - t0:.1f} s, C compile {t2 - t1:.1f} s, {len(exts)} modules, {args.jobs} jobs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
