"""Idle memory and imported modules of each of the stack's processes.

Starts the whole stack (`greyproxy serve`, tests/harness's Stack: free ports, a temp data dir),
waits until /api/health is 200 and the processes have settled, then reads each service process's
RSS and PSS (/proc/PID/smaps_rollup) and the names in its sys.modules (written by
tests/harness/moddump/sitecustomize.py on request), and prints a table per process plus the
heaviest top-level packages each one imported.

    .venv/bin/python bench/idle_rss.py [--settle S] [--json FILE] [--modules] [--src TREE]

--src measures another checkout (e.g. `git archive main | tar -x -C /tmp/gp-main`): its code and its
tests/harness, with this tree's module dumper.

Nothing to install: Python only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from harness.proxies import _test_harness  # noqa: E402

MODDUMP = REPO / "tests" / "harness" / "moddump"
SERVICES = ("bus", "proxy", "api", "recorder", "maintenance")


def mem_kb(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon ... in kB from /proc/PID/smaps_rollup (VmRSS from status as a fallback)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    if "Rss" not in out:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["Rss"] = int(line.split()[1])
        except OSError:
            pass
    return out


def top_packages(modules: list[str]) -> Counter[str]:
    return Counter(m.split(".", 1)[0] for m in modules)


def service_pids(health: dict[str, Any]) -> dict[str, int]:
    """service name -> pid from /api/health (proxy workers listed as proxy-0, proxy-1 ...)."""
    pids: dict[str, int] = {}
    for name, s in (health.get("services") or {}).items():
        if s.get("workers"):
            continue  # "proxy" stands for its workers, each listed under its own name
        if s.get("pid"):
            pids[name] = int(s["pid"])
    return pids


def _stack_class(src: Path | None) -> Any:
    if src is None:
        return _test_harness().Stack  # the suite's own helper
    name = "idle_rss_src_harness"
    pkg = src / "tests" / "harness"
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    assert spec is not None and spec.loader is not None, f"no tests/harness in {src}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.Stack


def measure(settle: float = 3.0, overrides: dict[str, Any] | None = None, src: Path | None = None) -> dict[str, Any]:
    """Start the stack with the module dumper, let it idle `settle` s, measure; stop it.

    Returns {"processes": {name: {"pid", "rss_kb", "pss_kb", "modules": [...]}}, "total_rss_kb", ...}.
    """
    Stack = _stack_class(src)  # noqa: N806
    dump_dir = Path(tempfile.mkdtemp(prefix="gp-mods-"))
    trigger = dump_dir / "now"
    stack = Stack(overrides or {})
    stack.env["PYTHONPATH"] = os.pathsep.join([str(MODDUMP), stack.env.get("PYTHONPATH", "")])
    stack.env["GREYPROXY_MODDUMP_TRIGGER"] = str(trigger)
    try:
        stack.start(timeout=40)
        time.sleep(settle)
        _, health = stack.health()
        pids = service_pids(health)
        procs: dict[str, dict[str, Any]] = {}
        for name, pid in pids.items():
            m = mem_kb(pid)
            procs[name] = {"pid": pid, "rss_kb": m.get("Rss"), "pss_kb": m.get("Pss"), "anon_kb": m.get("Pss_Anon")}
        trigger.write_text("")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all((dump_dir / f"{p['pid']}.json").exists() for p in procs.values()):
            time.sleep(0.2)
        for p in procs.values():
            f = dump_dir / f"{p['pid']}.json"
            p["modules"] = json.loads(f.read_text())["modules"] if f.exists() else None
    finally:
        stack.cleanup()
        shutil.rmtree(stack.root, ignore_errors=True)
        shutil.rmtree(dump_dir, ignore_errors=True)
    return {
        "processes": procs,
        "total_rss_kb": sum(p["rss_kb"] or 0 for p in procs.values()),
        "total_pss_kb": sum(p["pss_kb"] or 0 for p in procs.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle after /api/health is 200 (default 3)")
    ap.add_argument("--json", help="also write the figures (and module lists) to this file")
    ap.add_argument("--modules", action="store_true", help="print every process's module list")
    ap.add_argument("--workers", type=int, default=1, help="proxy.workers (default 1)")
    ap.add_argument("--src", type=Path, help="measure this checkout instead of the one holding this script")
    args = ap.parse_args(argv)
    res = measure(args.settle, {"proxy": {"workers": args.workers}}, args.src.resolve() if args.src else None)
    print(f"{'process':12s} {'RSS MB':>7s} {'PSS MB':>7s} {'modules':>8s}  heaviest top-level packages (modules)")
    for name, p in res["processes"].items():
        mods = p.get("modules") or []
        heavy = ", ".join(f"{k} {v}" for k, v in top_packages(mods).most_common(10))
        print(f"{name:12s} {(p['rss_kb'] or 0) / 1024:7.1f} {(p['pss_kb'] or 0) / 1024:7.1f} {len(mods):8d}  {heavy}")
    print(f"{'total':12s} {res['total_rss_kb'] / 1024:7.1f} {res['total_pss_kb'] / 1024:7.1f}")
    if args.modules:
        for name, p in res["processes"].items():
            print(f"\n## {name}\n" + " ".join(p.get("modules") or []))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
