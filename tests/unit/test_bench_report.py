"""bench/harness/report.py: the 4/8-core prediction and results.md's hand-written sections.

A full `bench/run.py` rewrites the top of bench/results.md; the sections other work appended after
it (`<!-- name:begin -->` blocks, `## ` headings run.py does not write) must survive every run.
"""

from __future__ import annotations

import importlib.util
import subprocess
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


def test_the_cpu_table_says_how_long_each_proxy_process_waited_for_a_cpu(report) -> None:
    def split(waits: dict[str, float], **us: float) -> dict:
        procs = {k: {"us": v, **({"waiting_pct": waits[k]} if k in waits else {})} for k, v in us.items()}
        return {"idle_pct": 20.0, "processes": procs}

    res = {
        "proxies": {
            "greyproxy": {
                "keepalive": {"rps": 1, "cpu": split({"proxy": 24.2, "recorder": 26.0}, proxy=78, recorder=15)}
            },
            "greyproxy-w2": {
                "keepalive": {
                    "rps": 1,
                    "cpu": split({"proxy-0": 9.6, "proxy-1": 12.4}, **{"proxy-0": 40, "proxy-1": 40}),
                }
            },
            "tinyproxy": {"keepalive": {"rps": 1, "cpu": split({}, proxy=100)}},  # a run from before the column
        }
    }
    lines = report.cpu_markdown(res)
    table = lines[: lines.index("### Prediction for 4 and 8 cores")]
    rows = {x.split(" | ")[1]: x for x in table if x.startswith("| keep-alive |")}
    assert rows["greyproxy"].endswith("| 20% | 24% |")  # the proxy's figure, not the recorder's
    assert rows["greyproxy-w2"].endswith("| 20% | 10% + 12% |")
    assert rows["tinyproxy"].endswith("| 20% | — |")


def test_waited_reads_the_run_queue_time_of_every_thread_of_a_process() -> None:
    """cpu_split.waited on a real process: more spinning threads than CPUs queue for one. In a child
    (bench/ on its path: its `harness` package is not this suite's)."""
    if not list(Path("/proc/self/task").glob("*/schedstat")):
        pytest.skip("no /proc schedstat here")
    code = (
        "import os, threading\n"
        "from cpu_split import waited\n"
        "me = os.getpid()\n"
        "before = waited([me])\n"
        "stop = threading.Event()\n"
        "def spin():\n"
        "    while not stop.is_set():\n"
        "        sum(range(1000))\n"
        "ts = [threading.Thread(target=spin) for _ in range(2 * (os.cpu_count() or 1))]\n"
        "[t.start() for t in ts]\n"
        "stop.wait(0.3)\n"
        "during = waited([me])\n"
        "stop.set()\n"
        "[t.join() for t in ts]\n"
        "print(before, during, waited([2**31 - 1]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PATH.parent.parent, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    before, during, nothing = (float(x) for x in out)
    assert during > before >= 0  # the spinning threads (and the GIL's hand-offs) queued
    assert nothing == 0  # no such process: nothing, no error


# ----------------------------------------------------------------------------- the bare uvloop tunnel (the floor)


def _split(**us: float) -> dict:
    return {"idle_pct": 0.0, "processes": {k: {"us": v} for k, v in us.items()}}


def _res(connect: dict[str, float | None], direct: float | None = 2000.0) -> dict:
    """A run with only CONNECT download figures (the other rows n/a), as run.py leaves them."""
    proxies: dict = {}
    for who, mbps in connect.items():
        proxies[who] = {"status": "ok", "connect_download": {"mbps": mbps} if mbps is not None else {"na": "not run"}}
    return {"mode": "full", "proxies": proxies, "greyproxy_only": {}, "direct": {"mbps": direct}}


def _connect_target(report, res: dict) -> dict:
    rows = report.build_rows(res)
    return next(t for t in report.apply_targets(rows, res) if t["row"] == "connect_mbps")


def test_the_floor_is_a_column_beside_the_peers_but_never_the_best_peer(report) -> None:
    res = _res({"greyproxy": 1000.0, "bare-uvloop": 5000.0, "tinyproxy": 400.0, "mitmdump": 450.0})
    res["proxies"]["greyproxy-w2"] = {"status": "ok"}
    assert report.columns(res) == ("greyproxy", "greyproxy-w2", "bare-uvloop", "tinyproxy", "mitmdump", "proxy.py")
    row = next(r for r in report.build_rows(res) if r["key"] == "connect_mbps")
    assert row["values"]["bare-uvloop"] == 5000.0
    # the best *peer* is mitmdump (450), not the floor's 5 000
    assert row["best_peer"] == "mitmdump" and row["ratio_to_best_peer"] == pytest.approx(1000 / 450)
    text = report.text_table({**res, "rows": [row]})
    assert "bare-uvloop" in text.splitlines()[0] and "2.22× mitmdump" in text


@pytest.mark.parametrize(
    ("grey", "tiny", "bare", "met"),
    [
        (1000.0, 400.0, 1050.0, True),  # 2.5× tinyproxy, 95 % of the floor
        (1000.0, 400.0, 1111.2, False),  # 2.5× tinyproxy but 89.99 % of the floor
        (1000.0, 501.0, 1000.0, False),  # 100 % of the floor but 1.996× tinyproxy
        (1000.0, 400.0, None, None),  # no floor: cannot judge the second condition
        (1000.0, 600.0, None, False),  # ... unless the first already fails
        (1000.0, None, 1000.0, None),  # no tinyproxy
    ],
)
def test_connect_target_needs_2x_tinyproxy_and_90_percent_of_the_floor(report, grey, tiny, bare, met) -> None:
    t = _connect_target(report, _res({"greyproxy": grey, "tinyproxy": tiny, "bare-uvloop": bare}))
    assert t["target"] == "≥ 2× tinyproxy and ≥ 90% of a bare uvloop tunnel"
    assert t["met"] is met


def test_connect_target_keeps_the_share_of_direct_as_information(report) -> None:
    # 40 % of a direct download: once a failure of the old "≥ 50% of direct", now only told
    t = _connect_target(report, _res({"greyproxy": 1000.0, "tinyproxy": 400.0, "bare-uvloop": 1050.0}, 2500.0))
    assert t["met"] is True
    assert t["detail"] == (
        "1 000 MB/s = 2.50× tinyproxy (400 MB/s) and 95% of the bare uvloop tunnel (1 050 MB/s); "
        "40% of a direct download (2 500 MB/s)"
    )


def _tunnels(p: float, L: float, user: float | None = None, **more: float) -> dict:  # noqa: N803 - L as in the doc
    split = _split(proxy=p, origin=L / 2, client=L / 2, **more)
    if user is not None:
        split["processes"]["proxy"].update(user_us=user, system_us=p - user)
    return {"status": "ok", "tunnels": {"rps": 1000.0, "cpu": split}}


def test_floor_sits_beside_tinyproxy_in_the_cpu_tables_and_is_no_peer(report) -> None:
    res = {
        "proxies": {
            "greyproxy": _tunnels(120.0, 70.0, recorder=10.0, bus=1.0),
            "bare-uvloop": _tunnels(93.0, 70.0, user=30.0),
            "tinyproxy": _tunnels(83.0, 70.0),
        }
    }
    pred = report.predictions(res)["tunnels"]
    # W = C for the floor (once per core): min(4e6/93, 4e6/163) = the cores
    assert pred["columns"]["bare-uvloop"]["rate"][4] == pytest.approx(4e6 / 163)
    # the target compares greyproxy with tinyproxy, never with the floor
    assert pred["targets"][4]["want"] == pytest.approx(4e6 / 153)
    lines = report.cpu_markdown(res)
    rows = [x for x in lines if x.startswith("| new tunnels |")]
    assert [x.split(" | ")[1] for x in rows[:3]] == ["greyproxy", "bare-uvloop", "tinyproxy"]
    assert any(x.startswith("| new tunnels | bare-uvloop | 93.0 | — | — | 70.0 | 24 540 |") for x in lines), lines


def test_floor_line_says_what_the_floor_means_for_new_tunnels(report) -> None:
    res = {
        "proxies": {
            "greyproxy": _tunnels(134.9, 70.0, recorder=10.0),
            "bare-uvloop": _tunnels(92.6, 70.0, user=29.4),
            "tinyproxy": _tunnels(83.0, 70.0),
        }
    }
    f = report.floor(res)
    assert (
        f["floor_us"] == pytest.approx(92.6) and f["tinyproxy_us"] == 83.0 and f["grey_us"] == pytest.approx(144.9)
    )  # with the recorder's 10
    assert f["floor_over_tinyproxy"] == pytest.approx(92.6 / 83.0)
    line = report.floor_line(f)
    assert "spent 92.6 µs of CPU per new tunnel (user 29.4, system 63.2), tinyproxy 83.0: 1.12×" in line
    # predicted on 4 cores: 4e6/162.6 = 24 600 vs 4e6/153 = 26 144, 94 %
    assert "predicted on 4 cores 24 600 vs 26 144" in line
    assert "The floor alone costs more than tinyproxy" in line and "94% of tinyproxy's predicted rate" in line
    assert "greyproxy's processes (proxy, recorder and the rest) spent 145 µs, 52.3 above the floor." in line
    assert line in report.cpu_markdown(res)

    # a floor below tinyproxy leaves room: how much, and whether greyproxy is within it
    res["proxies"]["bare-uvloop"] = _tunnels(60.0, 70.0, user=20.0)
    line = report.floor_line(report.floor(res))
    assert "The floor leaves 23.0 µs per tunnel for what a proxy adds to it" in line
    assert "spent 145 µs, 84.9 above the floor, 61.9 µs more than the target allows." in line
    res["proxies"]["greyproxy"] = _tunnels(80.0, 70.0)
    assert report.floor_line(report.floor(res)).endswith("spent 80.0 µs, 20.0 above the floor: within it.")
    res["proxies"]["greyproxy"] = _tunnels(58.9, 70.0)
    assert "spent 58.9 µs, 1.10 below (a noisy run" in report.floor_line(report.floor(res))

    # without tinyproxy (or without the floor) there is no line
    del res["proxies"]["tinyproxy"]
    assert report.floor(res) is None and report.floor_line(None) == ""


@pytest.mark.parametrize(
    ("grey", "tiny", "met"), [(12000.0, 11765.0, True), (7673.0, 11765.0, False), (7673.0, None, None)]
)
def test_new_tunnels_are_judged_on_the_measured_rate_against_tinyproxy(report, grey, tiny, met) -> None:
    """Issue 18 lists "new tunnels/s ≥ tinyproxy" among the targets: the measured row is judged (not only
    the predicted rates), and its text gives the bare uvloop tunnel's rate of the same run."""
    res = _res({})
    for who, rps in (("greyproxy", grey), ("tinyproxy", tiny), ("bare-uvloop", 9342.0)):
        res["proxies"][who] = {"status": "ok", "tunnels": {"rps": rps} if rps is not None else {"na": "not run"}}
    rows = report.build_rows(res)
    t = next(t for t in report.apply_targets(rows, res) if t["row"] == "tunnels_rps")
    assert t["target"] == "≥ tinyproxy" and t["met"] is met
    assert t["detail"].endswith("(the bare uvloop tunnel: 9 342)"), t["detail"]


@pytest.mark.parametrize(("affinity", "judged"), [(2, True), (1, False), (4, False)])
def test_the_rate_targets_are_judged_again_at_the_default_workers_when_measured(report, affinity, judged) -> None:
    """`proxy.workers: auto` is a worker per CPU: on a 2-CPU machine a `--workers 1,2` run measured it
    (greyproxy-w2), and the rate targets are judged on that column too, as entries of their own; the
    rows keep the workers-1 marks. Without the default's column (1 CPU: it is workers 1; 4 CPUs: no
    greyproxy-w4 here) there are no such entries."""
    res = _res({})
    res["machine"] = {"cores": affinity, "affinity": affinity}
    for who, rps in (("greyproxy", 7000.0), ("greyproxy-w2", 9000.0), ("tinyproxy", 4000.0), ("proxy.py", 5000.0)):
        res["proxies"][who] = {"status": "ok", "keepalive": {"rps": rps}, "tunnels": {"rps": rps}}
    rows = report.build_rows(res)
    targets = report.apply_targets(rows, res)
    again = [t for t in targets if t.get("who") == "greyproxy-w2"]
    first = next(t for t in targets if t["row"] == "keepalive_rps" and "who" not in t)
    assert first["met"] is False and first["detail"].startswith("7 000 vs 1.5 × 5 000")
    row = next(r for r in rows if r["key"] == "keepalive_rps")
    assert row["target_met"] is False  # the row's mark: workers 1
    if not judged:
        assert again == []
        return
    ka = next(t for t in again if t["row"] == "keepalive_rps")
    assert ka["met"] is True and ka["detail"].startswith("9 000 vs 1.5 × 5 000")
    assert ka["target"] == "≥ 1.5× best peer, at the default workers (auto = 2 here)"
    tun = next(t for t in again if t["row"] == "tunnels_rps")
    assert tun["met"] is True and tun["detail"].startswith("9 000 vs 4 000")
