"""The storage soak (bench/soak.py) in short: the whole stack with a 16 MiB `retention.maxDatabaseMiB`,
~36 s of paced wrk traffic (text, random bytes, LLM-shaped POSTs) through the proxy to nginx.

What it holds to: the cap acts (its `maintenance.progress` event and its log line), transactions keep
being recorded in every interval (the newest id grows, in the database and through the API), the
database file + its -wal stay under the cap at every moment the soak's file watcher sampled (without
the cap they would pass 40 MiB here), the newest transactions and logs are present while the oldest
are gone, and the newest bodies read back through the API are byte-identical to what the origin and
the client sent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
CAP = 16

pytestmark = pytest.mark.stack


@pytest.mark.skipif(
    not shutil.which("wrk") or not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists(),
    reason="needs wrk and nginx (bench/setup.sh system)",
)
def test_short_soak_keeps_the_database_bounded_and_recording(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(REPO / "bench" / "soak.py"), "--duration", "36", "--interval", "9"]
    argv += ["--cap-mib", str(CAP), "--rate", "300", "--verify", "40", "--json", str(out)]
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert p.returncode in (0, 1) and out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    checks, samples, verify = res["checks"], res["samples"], res["verify"]
    assert len(samples) >= 4 and all(s["errors"] == 0 for s in samples), samples
    assert checks["cap_acted"], (res["cap_events"], res["cap_log"])
    assert any("dropped the oldest" in line for line in res["cap_log"]), res["cap_log"]
    assert checks["recorded_every_interval"] and checks["api_newest_grows"], samples
    # the file watcher samples db + -wal sizes many times a second over the whole run
    over = [(x["t"], x["max_file_bytes"] / (1 << 20)) for x in samples if x["max_file_bytes"] > CAP * (1 << 20)]
    assert not over, f"database + -wal over the {CAP} MiB cap: {over}"
    assert checks["max_file_mib"] <= CAP, checks
    assert all(x["data_wal_bytes"] <= CAP * (1 << 20) for x in samples), samples
    last = samples[-1]
    assert last["oldest_id"] > 1, "no transaction was dropped"
    assert last["oldest_log_ts"] > res["first_log_ts"] + 5, "the oldest logs were not dropped"
    # the newest of both survive: logs and transactions of the last interval are there
    assert last["newest_log_ts"] >= last["wall"] - 9 and last["newest_tx_ts"] >= last["wall"] - 9, last
    # read back after every interval and at the end; a body the cap has just dropped reads null
    assert verify["checked"] >= 60 and set(verify["kinds"]) == {"text", "random bytes", "llm"}, verify
    assert checks["bodies_identical"] and not verify["mismatches"] and verify["identical"] >= 30, verify
