"""Rows, ratios to the best peer, targets; the stdout table, results.md and results.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROXIES = ("greyproxy", "tinyproxy", "mitmdump", "proxy.py")
PEERS = PROXIES[1:]
GREY = "greyproxy"
# A bare CONNECT tunnel on uvloop (harness/bare_tunnel.py, its own process): not a peer but the floor
# a Python proxy on uvloop stands on. It never counts as the best peer (the ratio column compares
# greyproxy with proxies that do a proxy's work); the CONNECT download target is judged against it.
FLOOR = "bare-uvloop"
CONNECT_VS_TINYPROXY = 2.0  # CONNECT download ≥ 2× tinyproxy ...
CONNECT_VS_FLOOR = 0.9  # ... and ≥ 90 % of the bare uvloop tunnel, in the same run (issue 18)


def columns(res: dict[str, Any]) -> tuple[str, ...]:
    """greyproxy, its other worker counts (greyproxy-w2 ...: `run.py --workers 1,2`), the bare uvloop
    tunnel (the floor, beside tinyproxy), then the peers."""
    more = sorted(
        (k for k in res.get("proxies", {}) if k.startswith(GREY + "-w")), key=lambda k: int(k[len(GREY) + 2 :])
    )
    return (GREY, *more, FLOOR, *PEERS)


def is_grey(who: str) -> bool:
    """A greyproxy column (any worker count): the only ones with a recorder and other processes."""
    return who == GREY or who.startswith(GREY + "-w")


def all_of(conds: list[bool | None]) -> bool | None:
    """Conditions that must all hold: False when one is known to fail, None when one cannot be judged."""
    if any(c is False for c in conds):
        return False
    return None if any(c is None for c in conds) else True


Getter = Callable[[dict[str, Any]], Any]


def _get(path: str) -> Getter:
    """'keepalive.rps' → lambda over one proxy's result dict; a dict with 'na' or 'error' → reason."""

    def getter(d: dict[str, Any]) -> Any:
        cur: Any = d
        for part in path.split("."):
            if not isinstance(cur, dict):
                return None
            if "na" in cur:
                return ("na", cur["na"])
            nxt = cur.get(part)
            if nxt is None and cur.get("error"):
                return ("na", cur["error"])
            cur = nxt
        if isinstance(cur, dict) and ("na" in cur or "error" in cur):
            return ("na", cur.get("na") or cur.get("error"))
        return cur

    return getter


# (key, label, unit, higher_is_better, per-proxy path or None, greyproxy-only path or None)
ROW_SPECS: list[tuple[str, str, str, bool, str | None, str | None]] = [
    ("keepalive_rps", "HTTP keep-alive, 20 conns, 1 KiB: req/s", "req/s", True, "keepalive.rps", None),
    ("keepalive_p50_ms", "  keep-alive latency p50", "ms", False, "keepalive.p50_ms", None),
    ("keepalive_p99_ms", "  keep-alive latency p99", "ms", False, "keepalive.p99_ms", None),
    ("newconn_rps", "HTTP new connection per request: req/s", "req/s", True, "newconn.rps", None),
    ("newconn_p50_ms", "  new-connection latency p50", "ms", False, "newconn.p50_ms", None),
    ("newconn_p99_ms", "  new-connection latency p99", "ms", False, "newconn.p99_ms", None),
    ("connect_mbps", "CONNECT tunnel download: MB/s", "MB/s", True, "connect_download.mbps", None),
    ("http_mbps", "plain HTTP download (same file): MB/s", "MB/s", True, "http_download.mbps", None),
    ("https_rps", "HTTPS intercepted, capture on: req/s", "req/s", True, "https_intercept.rps", None),
    ("tunnels_rps", "new CONNECT tunnels/s (CONNECT+GET+close)", "tun/s", True, "tunnels.rps", None),
    ("tunnels_p99_ms", "  new-tunnel latency p99", "ms", False, "tunnels.p99_ms", None),
    ("approval_p50_ms", "approval: allow answer → first byte p50", "ms", False, None, "approval.p50_ms"),
    ("approval_p99_ms", "approval: allow answer → first byte p99", "ms", False, None, "approval.p99_ms"),
    (
        "approval_call_p99_ms",
        "  approval: allow call sent → first byte p99",
        "ms",
        False,
        None,
        "approval.call_to_byte_p99_ms",
    ),
    ("rules_100_median_us", "rule decision @100 rules: median", "µs", False, None, "rules.sizes.100.median_us"),
    ("rules_100_p99_us", "rule decision @100 rules: p99", "µs", False, None, "rules.sizes.100.p99_us"),
    ("rules_10000_median_us", "rule decision @10 000 rules: median", "µs", False, None, "rules.sizes.10000.median_us"),
    ("rules_10000_p99_us", "rule decision @10 000 rules: p99", "µs", False, None, "rules.sizes.10000.p99_us"),
    (
        "rules_100000_median_us",
        "rule decision @100 000 rules: median",
        "µs",
        False,
        None,
        "rules.sizes.100000.median_us",
    ),
    ("rules_100000_p99_us", "rule decision @100 000 rules: p99", "µs", False, None, "rules.sizes.100000.p99_us"),
    (
        "recorder_journal_rps",
        "recorder: records/s, journal → SQLite",
        "rec/s",
        True,
        None,
        "recorder_journal.records_per_s",
    ),
    ("recorder_journal_loss", "  recorder (journal): records lost", "records", False, None, "recorder_journal.loss"),
    ("recorder_rps", "recorder: records/s end to end through the proxy", "rec/s", True, None, "recorder.records_per_s"),
    ("recorder_loss", "  recorder (through the proxy): records lost", "records", False, None, "recorder.loss"),
    ("logs_api_p50_ms", "GET /api/logs?limit=50 p50", "ms", False, None, "logs_api.p50_ms"),
    ("logs_api_p99_ms", "GET /api/logs?limit=50 p99", "ms", False, None, "logs_api.p99_ms"),
    (
        "logs_api_container_p50_ms",
        "GET /api/logs?container=… p50 (substring; worst of agent7, agent1)",
        "ms",
        False,
        None,
        "logs_api.container_p50_ms",
    ),
    ("logs_api_container_p99_ms", "GET /api/logs?container=… p99", "ms", False, None, "logs_api.container_p99_ms"),
    ("idle_rss_mb", "RSS with idle tunnels open", "MB", False, "idle_tunnels.rss_mb", None),
]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v


def build_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, label, unit, higher, path, grey_path in ROW_SPECS:
        values: dict[str, float | None] = {}
        na: dict[str, str] = {}
        if path is not None:
            for name in columns(res):
                pres = res["proxies"].get(name)
                if pres is None:
                    na[name] = "not run"
                    values[name] = None
                    continue
                if str(pres.get("status", "ok")).startswith("n/a"):
                    na[name] = pres["status"][4:].strip() or "n/a"
                    values[name] = None
                    continue
                v = _get(path)(pres)
                if isinstance(v, tuple):
                    na[name] = str(v[1])
                    values[name] = None
                else:
                    values[name] = _num(v)
                    if values[name] is None:
                        na[name] = "not measured"
        else:
            v = _get(grey_path)(res.get("greyproxy_only", {}))  # type: ignore[arg-type]
            if isinstance(v, tuple):
                na[GREY] = str(v[1])
                values[GREY] = None
            else:
                values[GREY] = _num(v)
                if values[GREY] is None:
                    na[GREY] = "not measured"
        peer_vals = {p: values.get(p) for p in PEERS if values.get(p) is not None}
        best_peer = best_val = ratio = None
        if peer_vals:
            best_peer = (max if higher else min)(peer_vals, key=lambda p: peer_vals[p])
            best_val = peer_vals[best_peer]
            g = values.get(GREY)
            if g is not None and best_val:
                ratio = g / best_val
        rows.append(
            {
                "key": key,
                "label": label,
                "unit": unit,
                "higher_is_better": higher,
                "values": values,
                "na": na,
                "best_peer": best_peer,
                "best_peer_value": best_val,
                "ratio_to_best_peer": ratio,
                "target": None,
                "target_met": None,
            }
        )
    return rows


def apply_targets(rows: list[dict[str, Any]], res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on this run's figures. met: True/False/None (cannot judge)."""
    by = {r["key"]: r for r in rows}

    def val(key: str, who: str = GREY) -> float | None:
        r = by.get(key)
        return None if r is None else r["values"].get(who)

    direct = _num((res.get("direct") or {}).get("mbps"))
    mode = res.get("mode")
    out: list[dict[str, Any]] = []

    def target(key: str, text: str, met: bool | None, detail: str) -> None:
        by[key]["target"] = text
        by[key]["target_met"] = met
        out.append({"row": key, "target": text, "met": met, "detail": detail})

    def rates(who: str) -> list[tuple[str, str, bool | None, str]]:
        """The request and tunnel rate targets for one greyproxy column: (row, target, met, detail)."""
        out_: list[tuple[str, str, bool | None, str]] = []
        g, best = val("keepalive_rps", who), by["keepalive_rps"]["best_peer_value"]
        out_.append(
            (
                "keepalive_rps",
                "≥ 1.5× best peer",
                None if g is None or best is None else g >= 1.5 * best,
                f"{_fmt(g)} vs 1.5 × {_fmt(best)} ({by['keepalive_rps']['best_peer']})",
            )
        )
        g, t = val("newconn_rps", who), val("newconn_rps", "tinyproxy")
        out_.append(
            ("newconn_rps", "≥ tinyproxy", None if g is None or t is None else g >= t, f"{_fmt(g)} vs {_fmt(t)}")
        )
        # The measured rate; the floor's (a bare uvloop tunnel, same run) says how much of the gap any
        # proxy on uvloop has to carry.
        g, t, b = val("tunnels_rps", who), val("tunnels_rps", "tinyproxy"), val("tunnels_rps", FLOOR)
        out_.append(
            (
                "tunnels_rps",
                "≥ tinyproxy",
                None if g is None or t is None else g >= t,
                f"{_fmt(g)} vs {_fmt(t)} (the bare uvloop tunnel: {_fmt(b)})",
            )
        )
        g, m = val("https_rps", who), val("https_rps", "mitmdump")
        out_.append(
            (
                "https_rps",
                "≥ 5× mitmdump",
                None if g is None or m is None else g >= 5 * m,
                f"{_fmt(g)} vs 5 × {_fmt(m)}",
            )
        )
        return out_

    grey_rates = {row: (text, met, detail) for row, text, met, detail in rates(GREY)}
    target("keepalive_rps", *grey_rates["keepalive_rps"])
    target("newconn_rps", *grey_rates["newconn_rps"])
    # Both conditions in the same run; the share of a direct download (no proxy) is information only.
    g, t, b = val("connect_mbps"), val("connect_mbps", "tinyproxy"), val("connect_mbps", FLOOR)
    met = all_of(
        [
            None if g is None or t is None else g >= CONNECT_VS_TINYPROXY * t,
            None if g is None or b is None else g >= CONNECT_VS_FLOOR * b,
        ]
    )
    target(
        "connect_mbps",
        f"≥ {CONNECT_VS_TINYPROXY:g}× tinyproxy and ≥ {CONNECT_VS_FLOOR:.0%} of a bare uvloop tunnel",
        met,
        f"{_fmt(g)} MB/s = {_share(g, t, 'x')} tinyproxy ({_fmt(t)} MB/s) and {_share(g, b)} of the bare "
        f"uvloop tunnel ({_fmt(b)} MB/s); {_share(g, direct)} of a direct download ({_fmt(direct)} MB/s)",
    )
    target("tunnels_rps", *grey_rates["tunnels_rps"])
    target("https_rps", *grey_rates["https_rps"])
    g = val("approval_p99_ms")
    target("approval_p99_ms", "≤ 100 ms", None if g is None else g <= 100, f"{_fmt(g)} ms")
    g = val("rules_10000_median_us")
    target("rules_10000_median_us", "≤ 20 µs", None if g is None else g <= 20, f"{_fmt(g)} µs (worse of hit/miss)")
    # Judged on the recorder's own rate (journal in, rows committed); the proxy-driven figure is
    # bounded by the proxy's request rate and only has to lose nothing.
    g, loss, e2e_loss = val("recorder_journal_rps"), val("recorder_journal_loss"), val("recorder_loss")
    losses = [x for x in (loss, e2e_loss) if x is not None]
    target(
        "recorder_journal_rps",
        "≥ 20 000 rec/s, zero loss",
        None if g is None or loss is None else (g >= 20000 and not any(losses)),
        f"{_fmt(g)} rec/s journal → SQLite, loss {_fmt(loss)}; through the proxy "
        f"{_fmt(val('recorder_rps'))} rec/s (bounded by the proxy's req/s), loss {_fmt(e2e_loss)}",
    )
    g = val("logs_api_p50_ms")
    rows_n = ((res.get("greyproxy_only") or {}).get("logs_api") or {}).get("rows")
    scale = "" if mode == "full" else f" (measured at {rows_n} rows, not 1 000 000)"
    target(
        "logs_api_p50_ms",
        "≤ 20 ms at 1 000 000 rows",
        None if g is None else g <= 20,
        f"{_fmt(g)} ms at {rows_n} rows{scale}",
    )
    g = val("logs_api_container_p50_ms")
    target(
        "logs_api_container_p50_ms",
        "?container= (substring) ≤ 20 ms at 1 000 000 rows",
        None if g is None else g <= 20,
        f"{_fmt(g)} ms at {rows_n} rows{scale}",
    )
    # The same rate targets for greyproxy at its default `proxy.workers: auto` (a worker per CPU it may
    # use, at most 8), when this run measured that count as a column of its own (`--workers 1,N`):
    # what a user of this machine gets without setting anything. The rows keep the workers-1 marks.
    auto = default_workers(res)
    who = f"{GREY}-w{auto}"
    if auto > 1 and any(r["values"].get(who) is not None for r in rows):
        for row, text, met, detail in rates(who):
            out.append(
                {
                    "row": row,
                    "who": who,
                    "target": f"{text}, at the default workers (auto = {auto} here)",
                    "met": met,
                    "detail": detail,
                }
            )
    return out


def default_workers(res: dict[str, Any]) -> int:
    """`proxy.workers: auto` on the measured machine: the CPUs the process may use, at most 8."""
    m = res.get("machine") or {}
    n = m.get("affinity") or m.get("cores") or 1
    return max(1, min(8, int(n)))


# ----------------------------------------------------------------------------- formatting


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if not isinstance(v, (int, float)):
        return str(v)
    a = abs(v)
    if isinstance(v, int) or unit == "records" or (a >= 100 and float(v).is_integer()):
        return f"{int(round(v)):,}".replace(",", " ")
    if a >= 1000:
        return f"{v:,.0f}".replace(",", " ")
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _share(a: float | None, b: float | None, how: str = "%") -> str:
    """a as a share of b: "81%" or "3.01×"; "n/a" when either is missing."""
    if a is None or not b:
        return "n/a"
    return f"{a / b:.2f}×" if how == "x" else f"{a / b:.0%}"


def _cell(row: dict[str, Any], who: str, short: bool = True) -> str:
    v = row["values"].get(who)
    if v is not None:
        return _fmt(v, row["unit"])
    if who in row["na"]:
        reason = row["na"][who]
        if short:
            return "n/a"
        return f"n/a: {reason}"
    return "—"


def _ratio(row: dict[str, Any]) -> str:
    r = row["ratio_to_best_peer"]
    if r is None:
        return "—"
    return f"{r:.2f}× {row['best_peer']}"


def _met(row: dict[str, Any]) -> str:
    if row["target"] is None:
        return ""
    m = row["target_met"]
    return f"{row['target']}: " + ("met" if m else "MISSED" if m is False else "n/a")


def text_table(res: dict[str, Any]) -> str:
    rows = res["rows"]
    cols = columns(res)
    head = ["figure", "unit", *cols, "grey / best peer", "target"]
    body = [[r["label"], r["unit"], *[_cell(r, p) for p in cols], _ratio(r), _met(r)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    left = (0, 1, len(cols) + 2, len(cols) + 3)

    def line(cells: list) -> str:
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    notes = []
    for r in rows:
        for who, why in r["na"].items():
            if r["values"].get(who) is None:
                notes.append(f"  {r['key']} / {who}: n/a: {why}")
    seen = set()
    uniq = [n for n in notes if not (n.split(": n/a: ")[1] in seen or seen.add(n.split(": n/a: ")[1]))]
    if uniq:
        out.append("")
        out.append("n/a reasons (first occurrence of each):")
        out += uniq[:20]
    return "\n".join(out)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    v = res["versions"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `bench/run.py{' --quick' if res['mode'] == 'quick' else ''}` (mode **{res['mode']}**) on "
        f"{res['started_at']}, in {res['duration_s']:.0f} s. Raw figures: `bench/out/results.json`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu')} — {m.get('cores')} cores online (affinity {m.get('affinity')})",
        f"- Memory: {m.get('mem_total_mb')} MB; kernel {m.get('kernel')}; {m.get('os')}",
        f"- Load average before / after: {m.get('loadavg_before')} / {m.get('loadavg_after')}; "
        f"machine busy during the run: {m.get('busy_pct')}% of all CPU time "
        f"(this harness's own load included)",
        "",
        "## Versions",
        "",
        *[f"- {k}: {val if val else 'not installed'}" for k, val in v.items()],
        "",
        "## Results",
        "",
        "Every figure from this one run. *grey / best peer* is this project's figure divided by the best peer's "
        "(highest for rates, lowest for latencies and memory: for those a ratio below 1× is better than the best "
        f"peer). *{FLOOR}* is a bare CONNECT tunnel on uvloop (`bench/harness/bare_tunnel.py`, its own process, "
        "CONNECT rows only): the floor a Python proxy on uvloop stands on, not a peer, so never the best peer. "
        "Targets are judged on this run's figures: on greyproxy with one proxy worker (the marks in the "
        "table), and the rate targets again, in the Targets list, on the column of the default "
        "`proxy.workers: auto` (a worker per CPU) when the run measured it.",
        "",
        "| figure | unit | " + " | ".join(columns(res)) + " | grey / best peer | target |",
        "|---|---|" + "---:|" * len(columns(res)) + "---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            "| "
            + " | ".join(
                _md_escape(x)
                for x in [r["label"].strip(), r["unit"], *[_cell(r, p) for p in columns(res)], _ratio(r), _met(r)]
            )
            + " |"
        )
    lines += ["", "### Targets", "", "| target | figure | met |", "|---|---|---|"]
    for t in res["targets"]:
        row = next(r for r in res["rows"] if r["key"] == t["row"])
        met = "met" if t["met"] else "**missed**" if t["met"] is False else "n/a"
        lines.append(
            f"| {_md_escape(row['label'].strip())}: {_md_escape(t['target'])} | {_md_escape(t['detail'])} | {met} |"
        )
    lines += ["", *cpu_markdown(res)] if cpu_markdown(res) else []
    na_lines = []
    for r in res["rows"]:
        for who, why in r["na"].items():
            if r["values"].get(who) is None:
                na_lines.append(f"- {r['label'].strip()} / {who}: n/a: {why}")
    if na_lines:
        lines += ["", "### Not measured", "", *na_lines]
    a = res.get("analysis_md")
    if a:
        lines += [
            "",
            "## Analysis",
            "",
            "*Hand-written in `bench/analysis.md` (included by every full run); "
            "the figures it quotes are from the run it names.*",
            "",
            *a,
        ]
    d = res.get("details_md")
    if d:
        lines += ["", "## Details", "", *d]
    lines += ["", "## How each figure is measured", "", *res.get("method_md", [])]
    lines += ["", "## Configuration of each proxy", ""]
    for name, s in res.get("settings", {}).items():
        lines.append(f"- **{name}**: {s}")
    if res.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in res["notes"]]]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict[str, Any], out_dir: Path, md_path: Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in res.items() if k not in ("details_md", "method_md", "analysis_md")}
    (out_dir / "results.json").write_text(json.dumps(clean, indent=2, default=str) + "\n")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(merge_markdown(md_path.read_text() if md_path.exists() else "", markdown(res)))


RUN_BEGIN, RUN_END = "<!-- bench-run:begin -->", "<!-- bench-run:end -->"
RUN_HEADINGS = ("Machine", "Versions", "Results", "Analysis", "Details", "How each figure is measured")
RUN_HEADINGS += ("Configuration of each proxy", "Notes")  # what markdown() writes


def merge_markdown(old: str, generated: str) -> str:
    """The report with this run's part (the title, then RUN_BEGIN ... RUN_END) replaced and every
    hand-written section after it kept: what follows RUN_END, or (a file from before the markers)
    everything from the first `<!-- name:begin -->` line or `## ` heading this writer does not produce."""
    title, _, body = generated.partition("\n")
    part = f"{title}\n{RUN_BEGIN}\n{body.strip()}\n{RUN_END}\n"
    if RUN_END in old:
        tail = old.partition(RUN_END)[2]
        return part + ("\n" + tail.lstrip("\n") if tail.strip() else "")
    ours = {line for line in generated.splitlines() if line.startswith("## ")} | {f"## {h}" for h in RUN_HEADINGS}
    kept: list[str] = []
    for i, line in enumerate(old.splitlines()):
        if (line.startswith("<!-- ") and line.endswith(":begin -->")) or (line.startswith("## ") and line not in ours):
            kept = old.splitlines()[i:]
            break
    return part + ("\n" + "\n".join(kept) + "\n" if kept else "")


# ----------------------------------------------------------------------------- CPU per request, cores

CPU_LOADS = (
    ("keepalive", "keep-alive"),
    ("newconn", "new connection"),
    ("tunnels", "new tunnels"),
    ("https_intercept", "intercepted HTTPS"),
)
OTHERS = ("maintenance", "bus", "api")  # O in the prediction
LOADGEN = ("origin", "client")  # L: nginx and the load generator, which share the machine
CORES = (4, 8)
# Processes a peer runs its requests on when it has C cores: tinyproxy a thread per connection,
# proxy.py one worker per core (its default); mitmdump one asyncio process.
# The bare uvloop tunnel as if run once per core (as greyproxy's `proxy.workers: auto`): the floor.
PEER_WORKERS = {"tinyproxy": None, "proxy.py": None, "mitmdump": 1, FLOOR: None}  # None: one per core
# What each target compares on the predicted rates (as in apply_targets).
PREDICTED_TARGETS = {
    "keepalive": ("≥ 1.5× best peer", lambda peers: 1.5 * max(peers.values())),
    "newconn": ("≥ tinyproxy", lambda peers: peers.get("tinyproxy")),
    "tunnels": ("≥ tinyproxy", lambda peers: peers.get("tinyproxy")),
    "https_intercept": ("≥ 5× mitmdump", lambda peers: 5 * peers["mitmdump"] if "mitmdump" in peers else None),
}


def _split(res: dict[str, Any], who: str, load: str) -> dict[str, Any] | None:
    x = (res.get("proxies", {}).get(who) or {}).get(load)
    return x.get("cpu") if isinstance(x, dict) else None


def cpu_parts(split: dict[str, Any]) -> dict[str, Any]:
    """P (every proxy process), each worker, R, O, L (µs per request) from a Meter result."""
    procs = split["processes"]
    workers = {k: v["us"] for k, v in procs.items() if k == "proxy" or k.startswith("proxy-")}
    return {
        "P": sum(workers.values()),
        "workers": workers,
        "R": procs.get("recorder", {}).get("us"),
        "O": sum(procs[k]["us"] for k in OTHERS if k in procs),
        "L": sum(procs[k]["us"] for k in LOADGEN if k in procs),
        "each": {k: v["us"] for k, v in procs.items()},
    }


def predict(parts: dict[str, Any], cores: int, workers: int | None = None) -> tuple[float, str]:
    """rate ≈ min(W·10⁶/P, 10⁶/R, C·10⁶/(P+R+O+L)) and what bounds it. W = C unless given."""
    w = cores if workers is None else workers
    p, r, o, load = parts["P"], parts.get("R") or 0.0, parts.get("O") or 0.0, parts["L"]
    bounds = {"the proxy processes": w * 1e6 / p if p else float("inf")}
    if r:
        bounds["the recorder (one process)"] = 1e6 / r
    bounds["the cores (all processes)"] = cores * 1e6 / (p + r + o + load)
    name = min(bounds, key=lambda k: bounds[k])
    return bounds[name], name


def predictions(res: dict[str, Any]) -> dict[str, Any]:
    """Per load: each column's parts and predicted rate on 4 and 8 cores; targets judged on the
    greyproxy (workers 1) prediction against the peers' predictions."""
    out: dict[str, Any] = {}
    for load, _label in CPU_LOADS:
        per: dict[str, Any] = {}
        for who in columns(res):
            split = _split(res, who, load)
            if not split:
                continue
            parts = cpu_parts(split)
            w = None if is_grey(who) else PEER_WORKERS.get(who)
            per[who] = {
                "parts": parts,
                "rate": {c: predict(parts, c, w)[0] for c in CORES},
                "bound": {c: predict(parts, c, w)[1] for c in CORES},
            }
        targets = {}
        if GREY in per and load in PREDICTED_TARGETS:
            text, want_fn = PREDICTED_TARGETS[load]
            for c in CORES:
                peers = {k: v["rate"][c] for k, v in per.items() if k in PEERS}
                want = want_fn(peers) if peers else None
                got = per[GREY]["rate"][c]
                targets[c] = {"target": text, "want": want, "got": got, "met": None if want is None else got >= want}
        out[load] = {"columns": per, "targets": targets}
    return out


def cpu_markdown(res: dict[str, Any]) -> list[str]:
    """The CPU-per-request table and the 4/8-core prediction (empty when nothing was metered)."""
    pred = res.get("predictions") or predictions(res)
    if not any(v["columns"] for v in pred.values()):
        return []
    lines = [
        "### CPU per request per process",
        "",
        "µs of CPU (user + system, from /proc) each process spent over the load, divided by the requests "
        "served (`bench/cpu_split.py`'s `Meter`); *origin* is nginx, *client* the load generator (wrk, "
        "tunnelbench, curl). A peer's *proxy* is its whole process tree. *proxy waited*: the share of the "
        "load's wall time the proxy's threads spent ready to run but waiting for a CPU (/proc schedstat; "
        "summed over a peer's processes, one figure per greyproxy worker): time lost to the other processes "
        "on this machine's cores, not to the proxy's own work.",
        "",
        "| load | column | req/s | proxy | recorder | maintenance | bus | api | origin | client | machine idle "
        "| proxy waited |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for load, label in CPU_LOADS:
        for who, c in pred[load]["columns"].items():
            parts, each = c["parts"], c["parts"]["each"]
            ws = parts["workers"]
            proxy = _fmt(parts["P"]) + (f" ({' + '.join(_fmt(v) for v in ws.values())})" if len(ws) > 1 else "")
            rps = ((res["proxies"].get(who) or {}).get(load) or {}).get("rps")
            split = _split(res, who, load) or {}
            cells = [_fmt(each[k]) if k in each else "—" for k in ("recorder", *OTHERS, *LOADGEN)]
            waits = [
                v["waiting_pct"]
                for k, v in (split.get("processes") or {}).items()
                if (k == "proxy" or k.startswith("proxy-")) and "waiting_pct" in v
            ]
            waited = " + ".join(f"{w:.0f}%" for w in waits) if waits else "—"
            lines.append(
                f"| {label} | {who} | {_fmt(rps)} | {proxy} | "
                + " | ".join(cells)
                + f" | {split.get('idle_pct', 0):.0f}% | {waited} |"
            )
    lines += [
        "",
        "### Prediction for 4 and 8 cores",
        "",
        "From this run's CPU per request above, with W proxy workers on C cores (`proxy.workers: auto` = C):",
        "",
        "    rate ≈ min( W·10⁶/P ,  10⁶/R ,  C·10⁶/(P + R + O + L) )",
        "",
        "P = µs per request of all proxy processes together, R = the recorder (one process), O = maintenance + "
        "bus + api, L = the origin and the load generator, which need the same cores (measured here, not "
        "assumed). For a peer: R = O = 0 and W = C (tinyproxy: a thread per connection; proxy.py: a worker "
        f"per core), W = 1 for mitmdump (one process); for {FLOOR} R = O = 0 and W = C (as if run once per "
        "core, as greyproxy's workers are). This assumes the per-request CPU stays what it is "
        "here and that nothing else is shared. It predicts what the proxies could serve, not what this "
        "harness could drive: the origin (nginx, one worker) and the load generators (wrk -t1, tunnelbench, "
        "curl: one process each) are single processes, counted here as if spread over every core, so a "
        "predicted rate may be above what they alone could produce. On this 2-core machine every process "
        "competes for the cores with the others, which inflates every column's figures, the peers' too: "
        "the comparison, not the absolute rate, is what the prediction is for.",
        "",
        "| load | column | P | R | O | L | 4 cores | 8 cores | bound on 8 cores by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for load, label in CPU_LOADS:
        for who, c in pred[load]["columns"].items():
            p = c["parts"]
            lines.append(
                f"| {label} | {who} | {_fmt(p['P'])} | {_fmt(p['R']) if is_grey(who) else '—'} | "
                f"{_fmt(p['O']) if is_grey(who) else '—'} | {_fmt(p['L'])} | {_fmt(c['rate'][4])} | "
                f"{_fmt(c['rate'][8])} | {c['bound'][8]} |"
            )
    lines += [
        "",
        "Targets on the predicted rates (greyproxy from its workers-1 figures, against the peers' predictions):",
        "",
        "| load | target | 4 cores | 8 cores |",
        "|---|---|---|---|",
    ]
    for load, label in CPU_LOADS:
        t = pred[load]["targets"]
        if not t:
            continue
        cells = []
        for c in CORES:
            x = t[c]
            verdict = "n/a" if x["met"] is None else "met" if x["met"] else "**missed**"
            cells.append(f"{_fmt(x['got'])} vs {_fmt(x['want'])}: {verdict}")
        lines.append(f"| {label} | {t[CORES[0]]['target']} | " + " | ".join(cells) + " |")
    line = floor_line(floor(res, pred))
    if line:
        lines += ["", line]
    return lines


def floor(res: dict[str, Any], pred: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The new-tunnel figures of the bare uvloop tunnel beside tinyproxy's and greyproxy's (workers 1):
    CPU µs per tunnel (the floor's user/system split), the measured rates and the predicted ones.
    None unless both the floor and tinyproxy were metered on the new-tunnels load."""
    pred = pred or res.get("predictions") or predictions(res)
    cols = pred["tunnels"]["columns"]
    if FLOOR not in cols or "tinyproxy" not in cols:
        return None
    own = (_split(res, FLOOR, "tunnels") or {}).get("processes", {}).get("proxy", {})

    def rps(who: str) -> Any:
        return ((res["proxies"].get(who) or {}).get("tunnels") or {}).get("rps")

    out: dict[str, Any] = {
        "floor_us": cols[FLOOR]["parts"]["P"],
        "floor_user_us": own.get("user_us"),
        "floor_system_us": own.get("system_us"),
        "tinyproxy_us": cols["tinyproxy"]["parts"]["P"],
        # every greyproxy process (proxy, recorder, the rest), as the prediction and the target count them
        "grey_us": sum(cols[GREY]["parts"].get(k) or 0 for k in ("P", "R", "O")) if GREY in cols else None,
        "floor_rps": rps(FLOOR),
        "tinyproxy_rps": rps("tinyproxy"),
        "floor_rate": cols[FLOOR]["rate"],
        "tinyproxy_rate": cols["tinyproxy"]["rate"],
    }
    out["floor_over_tinyproxy"] = out["floor_us"] / out["tinyproxy_us"] if out["tinyproxy_us"] else None
    return out


def floor_line(f: dict[str, Any] | None) -> str:
    """What the floor means for "new tunnels/s ≥ tinyproxy", in this run's own figures ('' without them)."""
    if not f or f.get("floor_over_tinyproxy") is None:
        return ""
    b, t, g = f["floor_us"], f["tinyproxy_us"], f["grey_us"]
    c = CORES[0]
    split = (
        f" (user {_fmt(f['floor_user_us'])}, system {_fmt(f['floor_system_us'])})"
        if f.get("floor_user_us") is not None and f.get("floor_system_us") is not None
        else ""
    )
    text = (
        f"**Floor for new tunnels/s ≥ tinyproxy**: the bare uvloop tunnel ({FLOOR}: no rules, no log, no records) "
        f"spent {_fmt(b)} µs of CPU per new tunnel{split}, tinyproxy {_fmt(t)}: {f['floor_over_tinyproxy']:.2f}× "
        f"({_fmt(f['floor_rps'])} vs {_fmt(f['tinyproxy_rps'])} tunnels/s here; predicted on {c} cores "
        f"{_fmt(f['floor_rate'][c])} vs {_fmt(f['tinyproxy_rate'][c])}). "
    )
    if b >= t:
        text += (
            "The floor alone costs more than tinyproxy, so no proxy on uvloop meets this target on CPU per tunnel: "
            f"it can reach {_share(f['floor_rate'][c], f['tinyproxy_rate'][c])} of tinyproxy's predicted rate at best"
        )
    else:
        text += f"The floor leaves {_fmt(t - b)} µs per tunnel for what a proxy adds to it"
    if g is not None:
        where = "above" if g >= b else "below (a noisy run: nothing a proxy does is free)"
        text += f"; greyproxy's processes (proxy, recorder and the rest) spent {_fmt(g)} µs, {_fmt(abs(g - b))} {where} the floor"
        if b < t:
            text += ": within it" if g <= t else f", {_fmt(g - t)} µs more than the target allows"
    return text + "."
