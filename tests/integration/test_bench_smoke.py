"""The benchmark harness runs end to end in its CI-sized mode and produces sane results.

`bench/run.py --quick --smoke` measures greyproxy only, against a Python origin with Python
load loops: no nginx, wrk, curl, peers, network or apt needed. It must finish well under a
minute and write results.json with every row the full run has (values > 0 where measured).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.stack

# Rows that smoke mode measures for greyproxy: each must be a positive number.
MEASURED = (
    "keepalive_rps",
    "keepalive_p50_ms",
    "keepalive_p99_ms",
    "newconn_rps",
    "newconn_p50_ms",
    "newconn_p99_ms",
    "connect_mbps",
    "http_mbps",
    "tunnels_rps",
    "tunnels_p99_ms",
    "approval_p99_ms",
    "approval_call_p99_ms",
    "rules_100_median_us",
    "rules_100_p99_us",
    "rules_10000_median_us",
    "rules_10000_p99_us",
    "recorder_rps",
    "recorder_journal_rps",
    "logs_api_p50_ms",
    "logs_api_p99_ms",
    "logs_api_container_p50_ms",
    "logs_api_container_p99_ms",
    "idle_rss_mb",
)
# Rows present but not measured in smoke mode (n/a with a reason).
NOT_MEASURED = ("https_rps", "rules_100000_median_us")
# The bare uvloop tunnel (the floor, its own process) runs in smoke mode too: the CONNECT rows only.
FLOOR_MEASURED = ("connect_mbps", "tunnels_rps", "idle_rss_mb")
FLOOR_NA = ("keepalive_rps", "newconn_rps", "http_mbps", "https_rps")


@pytest.mark.timeout(90)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    results_md = REPO / "bench" / "results.md"
    md_before = results_md.stat().st_mtime if results_md.exists() else None
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--smoke", "--no-install", "--out", str(out)],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=85,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert elapsed < 60, f"smoke bench took {elapsed:.0f}s"

    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "smoke"
    for key in ("machine", "versions", "proxies", "greyproxy_only", "rows", "targets", "duration_s"):
        assert key in res, key
    assert res["machine"]["cores"] >= 1 and res["versions"]["python"]
    assert res["proxies"]["greyproxy"]["status"] == "ok"
    for peer in ("tinyproxy", "mitmdump", "proxy.py"):
        assert res["proxies"][peer]["status"].startswith("n/a"), peer

    rows = {r["key"]: r for r in res["rows"]}
    for key in MEASURED:
        assert key in rows, key
        value = rows[key]["values"].get("greyproxy")
        assert isinstance(value, (int, float)) and value > 0, (key, value, rows[key]["na"])
    for key in NOT_MEASURED:
        assert rows[key]["values"].get("greyproxy") is None and rows[key]["na"].get("greyproxy"), key
    assert res["proxies"]["bare-uvloop"]["status"] == "ok", res["proxies"]["bare-uvloop"]
    for key in FLOOR_MEASURED:
        value = rows[key]["values"].get("bare-uvloop")
        assert isinstance(value, (int, float)) and value > 0, (key, value, rows[key]["na"])
    for key in FLOOR_NA:
        assert "CONNECT-only" in rows[key]["na"]["bare-uvloop"], key
    # The floor is no peer: with the peers skipped there is no best peer, whatever it measured.
    assert rows["connect_mbps"]["best_peer"] is None
    connect = next(t for t in res["targets"] if t["row"] == "connect_mbps")
    assert "of the bare uvloop tunnel (" in connect["detail"], connect
    assert "bare uvloop tunnel (n/a" not in connect["detail"], connect
    # The recorder stored every record exactly once.
    rec = res["greyproxy_only"]["recorder"]
    assert rec["loss"] == 0 and rec["duplicates"] == 0 and rec["stored"] == rec["completed"] > 0, rec
    assert rows["recorder_loss"]["values"]["greyproxy"] == 0
    # ... and so did the records pushed straight through the journal.
    rj = res["greyproxy_only"]["recorder_journal"]
    assert rj["loss"] == 0 and rj["duplicates"] == 0 and rj["stored"] == rj["records"] > 0, rj
    # Every approval hold was released.
    appr = res["greyproxy_only"]["approval"]
    assert appr["measured"] == appr["holds"] > 0, appr
    # The logs table really held the rows the API call was timed against.
    assert res["greyproxy_only"]["logs_api"]["rows"] >= 5000
    for name, figures in res["greyproxy_only"]["logs_api"]["container"].items():
        assert figures["errors"] == 0 and figures["calls"] > 0, (name, figures)
    # Every target is listed, judged where it can be.
    assert len(res["targets"]) == 10  # with new tunnels/s (measured) and GET /api/logs, without and with ?container=
    assert {t["row"] for t in res["targets"]} <= set(rows)

    assert (out / "results-smoke.md").read_text().startswith("# Benchmark results")
    # Smoke mode never overwrites the committed full-run report.
    assert (results_md.stat().st_mtime if results_md.exists() else None) == md_before
    assert "greyproxy" in proc.stdout and "targets:" in proc.stdout
