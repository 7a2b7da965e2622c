"""Soak of bounded storage (issue 18, SPEC §15 `retention.maxDatabaseMiB`).

The whole stack (`greyproxy serve`, tests/harness's Stack: free ports, a temp data dir) with a
small `retention.maxDatabaseMiB`, and proxied traffic for `--duration` seconds: wrk through the HTTP
proxy (container `soak`) to an nginx origin on 127.0.0.1, cycling over text answers (2–8 KiB of
Python source), `text/plain` answers of random bytes (1–6 KiB: stored as binary) and LLM-shaped
`POST /v1/messages` with a growing conversation (JSON, 1–20 KiB request bodies). Every `--interval`
seconds it samples the database file and its -wal (the largest size seen, polled twice a second),
the rows stored, the newest transaction through the API and the requests served. At the end a
sample of the newest transactions is read back through the API and compared byte for byte with what
the origin sent (answers) and what the client sent (LLM request bodies).

    .venv/bin/python bench/soak.py [--duration 600] [--cap-mib 64] [--interval 15] [--rate 500]
                                   [--json FILE] [--results-md bench/results.md]

Exit status 0 when: the database (+ -wal) stayed under the cap in every sample after the first
cap run, rows kept arriving in every interval (the newest id grew), the cap acted (its event and
its log line), and every sampled body read back identical. Needs nginx and wrk (bench/setup.sh system).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from harness.loads import _LUA_DONE, run_wrk  # noqa: E402
from harness.origin import nginx_binary  # noqa: E402
from harness.procs import Managed, free_port, stop_all, wait_port  # noqa: E402
from harness.proxies import _test_harness  # noqa: E402

MIB = 1 << 20
HOST = "127.0.0.1"
CONTAINER = "soak"
N_TEXT, N_RAND, N_LLM = 48, 48, 16
LLM_ANSWER = (
    '{"id":"msg_soak","type":"message","role":"assistant","model":"claude-soak",'
    '"content":[{"type":"text","text":"Done: the file is updated."}],"stop_reason":"end_turn",'
    '"usage":{"input_tokens":1200,"output_tokens":9}}'
)
CAP_LOG = "retention.maxDatabaseMiB"  # in maintenance's log line when the cap acts


# ----------------------------------------------------------------------------- origin and load


def make_content(www: Path, seed: int = 18) -> dict[str, bytes]:
    """The origin's files and the LLM request bodies: {path or 'llm:k': bytes}."""
    rnd = random.Random(seed)
    src = b"".join(p.read_bytes() for p in sorted((Path(os.__file__).parent / "asyncio").glob("*.py")))
    out: dict[str, bytes] = {}
    (www / "t").mkdir(parents=True, exist_ok=True)
    (www / "r").mkdir(parents=True, exist_ok=True)
    for i in range(N_TEXT):
        size = rnd.randint(2048, 8192)
        start = rnd.randint(0, len(src) - size)
        out[f"/t/{i}.txt"] = src[start : start + size]
    for i in range(N_RAND):
        out[f"/r/{i}.txt"] = rnd.randbytes(rnd.randint(1024, 6144))
    for path, body in out.items():
        (www / path.lstrip("/")).write_bytes(body)
    system = src[:3000].decode("utf-8", "replace")
    history: list[dict[str, Any]] = []
    for k in range(N_LLM):
        history.append({"role": "user", "content": f"Step {k}: change line {rnd.randint(1, 400)} of soak.py"})
        body = {
            "model": "claude-soak",
            "max_tokens": 1024,
            "system": system,
            "messages": list(history),
        }
        out[f"llm:{k}"] = orjson.dumps(body)
        history.append({"role": "assistant", "content": "Done: the file is updated."})
    return out


class Origin:
    """nginx on 127.0.0.1: the files as text/plain, POST /v1/messages answered with LLM_ANSWER."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, 0, None

    def start(self) -> Origin:
        binary = nginx_binary()
        if not binary:
            raise RuntimeError("nginx not installed (bench/setup.sh system)")
        t = self.root / "tmp"
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (t / d).mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = (
            f"{user}worker_processes 1;\ndaemon off;\nmaster_process on;\npid {self.root}/nginx.pid;\n"
            f"error_log {self.root}/error.log warn;\nevents {{ worker_connections 4096; }}\n"
            "http {\n  access_log off;\n  types { }\n  default_type text/plain;\n"
            "  keepalive_timeout 300s;\n  keepalive_requests 10000000;\n  client_max_body_size 4m;\n"
            f"  client_body_temp_path {t}/client_body;\n  proxy_temp_path {t}/proxy;\n"
            f"  fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n"
            f"  server {{\n    listen {HOST}:{self.port} backlog=4096;\n    root {self.root / 'www'};\n"
            "    location / { }\n"
            f"    location = /v1/messages {{ default_type application/json; return 200 '{LLM_ANSWER}'; }}\n"
            "  }\n}\n"
        )
        (self.root / "nginx.conf").write_text(conf)
        self.proc = Managed(
            "nginx",
            [binary, "-p", str(self.root), "-c", str(self.root / "nginx.conf"), "-e", str(self.root / "error.log")],
            self.root / "nginx.out",
        ).start()
        if not wait_port(HOST, self.port, 10, self.proc):
            raise RuntimeError(f"nginx did not start: {self.proc.tail()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def lua_script(origin_port: int, content: dict[str, bytes], conns: int, rate: float) -> str:
    """wrk: a request cycle of text, random-bytes and LLM requests; `delay` paces it to `rate` req/s."""
    auth = "Basic " + base64.b64encode(f"{CONTAINER}:x".encode()).decode()
    base = f"http://{HOST}:{origin_port}"
    gets = [p for p in content if p.startswith("/")]
    random.Random(1).shuffle(gets)
    llm = [k for k in content if k.startswith("llm:")]
    lines = [
        f'local host = "{HOST}:{origin_port}"',
        f'local auth = "{auth}"',
        "local reqs = {}",
        "init = function(args)",
        '  local h = {["Host"] = host, ["Proxy-Authorization"] = auth}',
        '  local j = {["Host"] = host, ["Proxy-Authorization"] = auth, ["Content-Type"] = "application/json"}',
    ]
    li = 0
    for i, path in enumerate(gets):
        lines.append(f'  reqs[#reqs + 1] = wrk.format("GET", "{base}{path}", h)')
        if i % 6 == 5:  # one LLM call per six answers
            k = llm[li % len(llm)].split(":")[1]
            body = content[f"llm:{k}"].decode()
            assert "]==]" not in body
            lines.append(f'  reqs[#reqs + 1] = wrk.format("POST", "{base}/v1/messages?turn={k}", j, [==[{body}]==])')
            li += 1
    lines += ["end", "local i = 0", "request = function()", "  i = i + 1", "  return reqs[(i % #reqs) + 1]", "end"]
    if rate > 0:
        lines.append(f"delay = function() return {max(1, round(conns * 1000 / rate))} end")
    return "\n".join(lines) + "\n" + _LUA_DONE


# ----------------------------------------------------------------------------- observation


class FileWatch:
    """Polls the database file and its -wal ten times a second; keeps the largest sum since `take()`."""

    def __init__(self, db: Path) -> None:
        self.db, self.stop, self.max, self.max_split = db, threading.Event(), 0, (0, 0)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sizes(self) -> tuple[int, int]:
        def size(p: Path) -> int:
            with contextlib.suppress(OSError):
                return p.stat().st_size
            return 0

        return size(self.db), size(self.db.with_name(self.db.name + "-wal"))

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self._see()

    def _see(self) -> None:
        db, wal = self.sizes()
        if db + wal > self.max:
            self.max, self.max_split = db + wal, (db, wal)

    def take(self) -> int:
        """The largest db + -wal since the last call (`max_split`: its db and -wal)."""
        self._see()
        m, self.max = self.max, 0
        return m


class CapEvents:
    """`maintenance.progress` events of the size-cap job, from the API's /ws."""

    def __init__(self, api: str) -> None:
        self.url = api.replace("http://", "ws://", 1) + "/ws"
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from websockets.sync.client import connect

        try:
            with connect(self.url, open_timeout=5, ping_interval=None) as ws:
                while not self.stop.is_set():
                    try:
                        msg = orjson.loads(ws.recv(timeout=0.5))
                    except TimeoutError:
                        continue
                    if msg.get("type") == "maintenance.progress" and msg.get("data", {}).get("job") == "size-cap":
                        self.events.append(msg["data"])
        except Exception as exc:  # noqa: BLE001 - reported
            self.error = f"{type(exc).__name__}: {exc}"

    def runs_done(self) -> int:
        return sum(1 for e in self.events if e.get("done"))


def db_rows(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        n, lo, hi, bodies = conn.execute(
            "SELECT COUNT(*), MIN(id), MAX(id), SUM(response_body IS NOT NULL OR request_body IS NOT NULL)"
            " FROM http_transactions"
        ).fetchone()
        page, count, free = (
            conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count", "freelist_count")
        )
        logs, log_lo, log_hi = conn.execute("SELECT COUNT(*), MIN(timestamp), MAX(timestamp) FROM logs").fetchone()
        tx_hi = conn.execute("SELECT MAX(timestamp) FROM http_transactions").fetchone()[0]
        tables = conn.execute(
            "SELECT COALESCE(m.tbl_name, d.name), SUM(d.pgsize) FROM dbstat d LEFT JOIN sqlite_schema m"
            " ON m.name = d.name GROUP BY 1 ORDER BY 2 DESC LIMIT 5"
        ).fetchall()
        return {
            "tables": {name: size for name, size in tables},
            "rows": n,
            "oldest_id": lo,
            "newest_id": hi,
            "with_bodies": bodies or 0,
            "logs": logs,
            "oldest_log_ts": log_lo or 0,
            "newest_log_ts": log_hi or 0,
            "newest_tx_ts": tx_hi or 0,
            "wall": time.time(),
            "data_bytes": (count - free) * page,
        }
    finally:
        conn.close()


def cap_log_lines(data_dir: Path) -> list[str]:
    out = []
    for p in sorted((data_dir / "logs").glob("maintenance*.log*")):
        with contextlib.suppress(OSError):
            out += [line for line in p.read_text(errors="replace").splitlines() if CAP_LOG in line]
    return out


def newest_via_api(client: httpx.Client, api: str) -> dict[str, Any]:
    r = client.get(f"{api}/api/transactions", params={"limit": 1})
    r.raise_for_status()
    items = r.json().get("items") or []
    if not items:
        return {}
    it = items[0]
    return {"id": it.get("id"), "timestamp": it.get("timestamp")}


def verify_bodies(client: httpx.Client, api: str, content: dict[str, bytes], n: int) -> dict[str, Any]:
    """The newest n transactions of the container read back through the API, compared with what was sent."""

    def as_bytes(value: Any, encoding: str | None) -> bytes | None:
        if value is None:
            return None
        return base64.b64decode(value) if encoding == "base64" else str(value).encode("utf-8")

    r = client.get(f"{api}/api/transactions", params={"container": CONTAINER, "limit": n})
    r.raise_for_status()
    out: dict[str, Any] = {"checked": 0, "identical": 0, "dropped": 0, "mismatches": [], "kinds": {}}
    for it in r.json().get("items") or []:
        d = client.get(f"{api}/api/transactions/{it['id']}").json()
        path = "/" + d["url"].split("/", 3)[3]  # http://127.0.0.1:PORT/t/3.txt -> /t/3.txt
        if path.startswith("/v1/messages"):
            k = path.rsplit("=", 1)[1]
            pairs = [("request", content[f"llm:{k}"]), ("response", LLM_ANSWER.encode())]
            kind = "llm"
        else:
            pairs = [("response", content[path])]
            kind = "random bytes" if path.startswith("/r/") else "text"
        for side, sent in pairs:
            got = as_bytes(d.get(f"{side}_body"), d.get(f"{side}_body_encoding"))
            out["checked"] += 1
            out["kinds"][kind] = out["kinds"].get(kind, 0) + 1
            if got is None:
                out["dropped"] += 1
            elif got == sent:
                out["identical"] += 1
            else:
                out["mismatches"].append(
                    {"id": it["id"], "path": path, "side": side, "sent": len(sent), "got": len(got)}
                )
    return out


def merge_verify(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"checked": 0, "identical": 0, "dropped": 0, "mismatches": [], "kinds": {}}
    for p in parts:
        for k in ("checked", "identical", "dropped"):
            out[k] += p[k]
        out["mismatches"] += p["mismatches"]
        for kind, n in p["kinds"].items():
            out["kinds"][kind] = out["kinds"].get(kind, 0) + n
    return out


# ----------------------------------------------------------------------------- the soak


def soak(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="gp-soak-"))
    content = make_content(root / "origin" / "www")
    origin = Origin(root / "origin").start()
    stack = _test_harness().Stack(
        {
            "retention": {"maxDatabaseMiB": args.cap_mib},
            "proxy": {"maxConnectionsPerClient": 1000, "maxConnections": 2000, "idleTimeout": 600},
        }
    )
    client = httpx.Client(timeout=10, trust_env=False)
    res: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "cap_mib": args.cap_mib,
        "interval_s": args.interval,
        "rate": args.rate,
        "conns": args.conns,
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "samples": [],
    }
    try:
        stack.start(timeout=40)
        events = CapEvents(stack.api)
        events.thread.start()
        watch = FileWatch(stack.db_path)
        watch.thread.start()
        lua = lua_script(origin.port, content, args.conns, args.rate)
        port = stack.ports["http-proxy"]
        t0 = time.monotonic()
        res["first_log_ts"] = time.time()  # every log the traffic makes is younger than this
        served = 0
        while (elapsed := time.monotonic() - t0) < args.duration - 0.5:
            w = run_wrk(port, lua, args.conns, min(args.interval, args.duration - elapsed), root, timeout_s=10)
            if "error" in w:
                raise RuntimeError(f"wrk: {w['error']}")
            served += w["requests"]
            rows = db_rows(stack.db_path)
            db, wal = watch.sizes()
            sample = {
                "t": round(time.monotonic() - t0),
                "requests": w["requests"],
                "errors": w["errors"],
                "rps": w["rps"],
                "served": served,
                **rows,
                "db_bytes": db,
                "wal_bytes": wal,
                "max_file_bytes": watch.take(),
                "max_file_split": watch.max_split,
                "data_wal_bytes": rows["data_bytes"] + wal,
                "cap_runs": events.runs_done(),
                "cap_log_lines": len(cap_log_lines(stack.data_dir)),
                "newest_api": newest_via_api(client, stack.api),
                # the newest few read back now: over the soak they span every phase of the cap's runs
                "verify": verify_bodies(client, stack.api, content, args.verify_each),
            }
            res["samples"].append(sample)
            print(
                f"[soak {sample['t']:4d}s] {w['rps']:6.0f} req/s  served {served:8d}  rows {rows['rows']:7d} "
                f"(ids {rows['oldest_id']}–{rows['newest_id']}, bodies {rows['with_bodies']})  db "
                f"{db / MIB:5.1f} MiB + wal {wal / MIB:4.1f}  max {sample['max_file_bytes'] / MIB:5.1f} MiB  "
                f"cap runs {sample['cap_runs']}, log lines {sample['cap_log_lines']}",
                flush=True,
            )
        time.sleep(2)  # the last records committed
        final = verify_bodies(client, stack.api, content, args.verify)
        res["verify"] = merge_verify([*(x["verify"] for x in res["samples"]), final])
        res["verify_final"] = final
        res["cap_log"] = cap_log_lines(stack.data_dir)[-3:]
        res["cap_events"] = {"runs": events.runs_done(), "events": len(events.events), "ws_error": events.error}
        watch.stop.set()
        events.stop.set()
    finally:
        client.close()
        with contextlib.suppress(Exception):
            stack.cleanup()
        origin.stop()
        stop_all()
        shutil.rmtree(stack.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    res["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["checks"] = judge(res)
    return res


def judge(res: dict[str, Any]) -> dict[str, Any]:
    cap = res["cap_mib"] * MIB
    s = res["samples"]
    first_cap = next((i for i, x in enumerate(s) if x["cap_runs"] or x["cap_log_lines"]), None)
    after = s[first_cap + 1 :] if first_cap is not None else []
    newest = [x["newest_id"] or 0 for x in s]
    v = res.get("verify") or {}
    return {
        "cap_acted": first_cap is not None and (res["cap_events"]["runs"] > 0) and bool(res.get("cap_log")),
        "under_cap_after_first_run": bool(after) and all(x["max_file_bytes"] <= cap for x in after),
        "max_file_mib_after_first_run": max((x["max_file_bytes"] for x in after), default=0) / MIB,
        "max_file_mib": max((x["max_file_bytes"] for x in s), default=0) / MIB,
        "max_data_wal_mib_after_first_run": max((x.get("data_wal_bytes", 0) for x in after), default=0) / MIB,
        "recorded_every_interval": len(s) > 1 and all(b > a for a, b in zip(newest, newest[1:])),
        "api_newest_grows": len(s) > 1
        and all((b["newest_api"].get("id") or 0) > (a["newest_api"].get("id") or 0) for a, b in zip(s, s[1:])),
        # every body present reads back as sent; a body the cap dropped reads null (counted apart)
        "bodies_identical": bool(v.get("identical"))
        and not v["mismatches"]
        and v["identical"] + v["dropped"] == v["checked"],
    }


def markdown(res: dict[str, Any], command: str) -> str:
    c, v = res["checks"], res["verify"]
    lines = [
        "<!-- soak:begin -->",
        "## Soak: the database stays under `retention.maxDatabaseMiB` (issue 18 item 4)",
        "",
        f"`{command}` on {res['started_at']}: the whole stack with `retention.maxDatabaseMiB: {res['cap_mib']}`, "
        f"{res['duration_s']:.0f} s of wrk ({res['conns']} connections, paced to {res['rate']:.0f} req/s) through "
        f"the HTTP proxy to nginx: text answers of 2–8 KiB, `text/plain` answers of 1–6 KiB of random bytes "
        f"(stored as binary), and one LLM-shaped `POST /v1/messages` (a growing conversation, 1–20 KiB JSON) per "
        f"six answers. Load average {res['loadavg_before']} before, {res['loadavg_after']} after (2 cores shared "
        "with other work). Sizes in MiB; *max* is the largest database + -wal seen (polled every 0.1 s) in the "
        "interval; *data* the pages in use (what the cap counts, with the -wal); *ids* are the oldest and newest "
        "transaction kept; *newest (API)* is `GET /api/transactions?limit=1`.",
        "",
        "| t (s) | req/s | served | transactions | ids | with bodies | logs | data | db | -wal | max db + -wal |"
        " cap runs | newest (API) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in res["samples"]:
        lines.append(
            f"| {x['t']} | {x['rps']:,.0f} | {x['served']:,} | {x['rows']:,} | {x['oldest_id']}–{x['newest_id']} | "
            f"{x['with_bodies']:,} | {x['logs']:,} | {x['data_bytes'] / MIB:.1f} | {x['db_bytes'] / MIB:.1f} | "
            f"{x['wal_bytes'] / MIB:.1f} | "
            f"{x['max_file_bytes'] / MIB:.1f} | {x['cap_runs']} | {x['newest_api'].get('id')} "
            f"{(x['newest_api'].get('timestamp') or '')[11:19]} |"
        )
    yes = {True: "yes", False: "**no**"}
    lines += [
        "",
        f"- Under the cap ({res['cap_mib']} MiB) in every interval after the first cap run: "
        f"{yes[c['under_cap_after_first_run']]}: database + -wal up to {c['max_file_mib_after_first_run']:.1f} MiB "
        f"(polled), pages in use + -wal up to {c.get('max_data_wal_mib_after_first_run', 0):.1f} MiB (at the "
        "samples; the cap's own measure).",
        f"- Traffic still recorded: the newest id grew in every interval: {yes[c['recorded_every_interval']]}; "
        f"through the API: {yes[c['api_newest_grows']]}.",
        f"- The cap acted: {res['cap_events']['runs']} size-cap runs (`maintenance.progress` events with "
        f"`done`), log line: `{(res['cap_log'] or ['none'])[-1].split(' WARNING ', 1)[-1][:200]}`.",
        "- Largest tables and indexes at the end (MiB): "
        + ", ".join(f"{k} {v / MIB:.1f}" for k, v in res["samples"][-1]["tables"].items())
        + ".",
        f"- Read back through the API (the newest transactions after every interval and at the end: {v['checked']} "
        f"bodies, {v['kinds']}): {v['identical']} identical to what was sent, {v['dropped']} already dropped by "
        f"the cap (null), {len(v['mismatches'])} different.",
        "<!-- soak:end -->",
    ]
    return "\n".join(lines) + "\n"


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- soak:begin -->", "<!-- soak:end -->"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--cap-mib", type=int, default=64, help="retention.maxDatabaseMiB (default 64)")
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between samples (default 15)")
    ap.add_argument("--rate", type=float, default=500.0, help="offered req/s, 0 = as fast as it goes (default 500)")
    ap.add_argument("--conns", type=int, default=10, help="wrk connections (default 10)")
    ap.add_argument("--verify", type=int, default=60, help="newest transactions read back at the end (default 60)")
    ap.add_argument("--verify-each", type=int, default=8, help="... and after every interval (default 8)")
    ap.add_argument("--json", help="write the samples and checks to this file")
    ap.add_argument("--results-md", help="write the table into this file's <!-- soak:begin/end --> block")
    args = ap.parse_args(argv)
    if not shutil.which("wrk") or not nginx_binary():
        print("soak: needs wrk and nginx (bench/setup.sh system)", file=sys.stderr)
        return 2
    res = soak(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    command = (
        f".venv/bin/python bench/soak.py --duration {args.duration:g} --cap-mib {args.cap_mib} "
        f"--interval {args.interval:g} --rate {args.rate:g} --conns {args.conns}"
    )
    if args.results_md:
        write_block(Path(args.results_md), markdown(res, command))
    print(
        json.dumps(
            {"checks": res["checks"], "verify": {k: v for k, v in res["verify"].items() if k != "mismatches"}}, indent=1
        )
    )
    return 0 if all(v for k, v in res["checks"].items() if not k.startswith("max_")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
