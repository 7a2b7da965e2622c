"""bench/harness/report.py: the 4/8-core prediction and results.md's hand-written sections.

A full `bench/run.py` rewrites the top of bench/results.md; the sections other work appended after
it (`<!-- name:begin -->` blocks, `## ` headings run.py does not write) must survive every run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent.parent / "bench" / "harness" / "report.py"


@pytest.fixture(scope="module")
def report():  # bench/harness is not importable as `harness` here (tests/harness is)
    spec = importlib.util.spec_from_file_location("bench_report_under_test", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GENERATED = "# Benchmark results\n\nProduced by run {n}.\n\n## Machine\n\n- 2 cores\n\n## Notes\n\n- noisy\n"
HAND = "<!-- soak:begin -->\n## Soak\n\ntable\n<!-- soak:end -->\n\n## Proxy workers\n\nprose\n"


def test_first_run_over_an_unmarked_file_keeps_the_hand_written_sections(report) -> None:
    old = GENERATED.format(n=0) + "\n## Details\n\n- old details\n\n" + HAND
    new = report.merge_markdown(old, GENERATED.format(n=1))
    assert new.startswith("# Benchmark results\n" + report.RUN_BEGIN)
    assert "Produced by run 1." in new and "run 0" not in new and "old details" not in new
    assert new.endswith(HAND)


def test_later_runs_replace_only_their_part(report) -> None:
    first = report.merge_markdown(GENERATED.format(n=0) + "\n" + HAND, GENERATED.format(n=1))
    second = report.merge_markdown(first, GENERATED.format(n=2))
    assert "Produced by run 2." in second and "run 1" not in second
    assert second.count(report.RUN_BEGIN) == 1 and second.count("## Machine") == 1
    assert second.endswith(HAND)
    assert report.merge_markdown("", GENERATED.format(n=3)).count("## Machine") == 1


def test_prediction_is_the_smallest_bound(report) -> None:
    parts = {"P": 100.0, "R": 50.0, "O": 10.0, "L": 40.0}
    # 4 cores: proxy 4e6/100 = 40 000, recorder 1e6/50 = 20 000, cores 4e6/200 = 20 000 → 20 000
    rate, bound = report.predict(parts, 4)
    assert rate == pytest.approx(20_000)
    rate8, bound8 = report.predict(parts, 8)
    assert rate8 == pytest.approx(20_000) and bound8 == "the recorder (one process)"
    # one worker (mitmdump): the proxy process bounds it
    assert report.predict({"P": 1000.0, "R": None, "O": 0.0, "L": 50.0}, 8, 1) == (1000.0, "the proxy processes")


def test_predictions_judge_the_targets_on_predicted_rates(report) -> None:
    def split(**us: float) -> dict:
        return {"idle_pct": 0.0, "processes": {k: {"us": v} for k, v in us.items()}}

    res = {
        "proxies": {
            "greyproxy": {"keepalive": {"rps": 1, "cpu": split(proxy=60, recorder=20, bus=1, api=1, origin=20)}},
            "greyproxy-w2": {"keepalive": {"rps": 1, "cpu": split(**{"proxy-0": 40, "proxy-1": 40, "recorder": 30})}},
            "tinyproxy": {"keepalive": {"rps": 1, "cpu": split(proxy=100, origin=20)}},
            "proxy.py": {"keepalive": {"rps": 1, "cpu": split(proxy=200, origin=20)}},
        }
    }
    pred = report.predictions(res)["keepalive"]
    assert pred["columns"]["greyproxy-w2"]["parts"]["P"] == 80
    t4 = pred["targets"][4]
    # greyproxy: min(4e6/60, 1e6/20, 4e6/102) = 39 216; tinyproxy: 4e6/120 = 33 333; 1.5× = 50 000
    assert t4["got"] == pytest.approx(4e6 / 102) and t4["want"] == pytest.approx(1.5 * 4e6 / 120)
    assert t4["met"] is False
    lines = "\n".join(report.cpu_markdown(res))
    assert "rate ≈ min( W·10⁶/P" in lines and "| 80 (40 + 40) |" in lines
