#!/usr/bin/env python3
"""What a proxied keep-alive request costs to record (issue 18 item 1), in-process, per function.

The request of `bench/cpu_split.py` (wrk's GET through the forward proxy, nginx's 1 KiB
`application/octet-stream` answer, so no body is stored): the proxy side builds its records
(`Recorder.txn` + `Txn.finish` + the log record, `JournalWriter.append`-encoded), the recorder
side decodes the journal batches as `JournalConsumer` does, applies them (`apply_records`, into a
fresh database file) and publishes the batch's events with nobody subscribed (`publish_events`).

    .venv/bin/python bench/record_cost.py [--requests N] [--batch R] [--runs K] [--checkpointer S]
    .venv/bin/python bench/record_cost.py --stack [--requests N]

`--stack`: the same requests' records (built beforehand) pushed through the journal into a
running stack's recorder with the proxy's JournalWriter, as bench/run.py's "journal → SQLite" row
does with log records only: records/s (first send → last ack) and the recorder's CPU per request.

`--checkpointer S`: another process checkpoints the database's -wal every S seconds as maintenance
does (services/maintenance/jobs.py, WalCheckpointer; a tree without it: nothing), so that the
recorder's COMMITs checkpoint only past `wal_autocheckpoint` pages, as in the stack.

Run it in another tree to compare (cd there; PYTHONPATH=.): it adapts to the record API it finds.
Figures: CPU time (`time.process_time`) per request, the minimum over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path.cwd()))

import greyproxy  # noqa: E402
from bus import journal as jmod  # noqa: E402
from bus import records  # noqa: E402
from bus.journal import JournalWriter  # noqa: E402
from greyproxy.store import open_database  # noqa: E402
from services.proxy import http1  # noqa: E402
from services.proxy.pipeline import Recorder  # noqa: E402
from services.recorder import apply as apply_mod  # noqa: E402
from services.recorder import service  # noqa: E402
from services.recorder import transactions  # noqa: E402,F401 - registers the transaction kind

REQUEST = b"GET http://127.0.0.1:8080/1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 10:47:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Sat, 05 Dec 2026 10:40:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6932b6c0-400"\r\nAccept-Ranges: bytes\r\n\r\n'
)
BODY = bytes(1024)


class Verdict:  # what Gate.record reads of a verdict
    allowed = True
    rule_id = 7
    resolved_hostname = None
    elapsed_ms = 0.0123
    reason = "rule"


class Publisher:  # nobody subscribed: every event is skipped (the usual case)
    skipped = 0

    def wanted(self, topic: str) -> bool:
        return False

    def skip(self, n: int = 1) -> None:
        self.skipped += n

    def publish(self, topic: str, data: Any, check: bool = True) -> None:  # pragma: no cover
        raise AssertionError("nobody subscribed")


def proxy_side(writer: JournalWriter, recorder: Recorder, n: int, parse: bool = False, unique: bool = False) -> None:
    """n requests: the gate's log record and the exchange's transaction, as the proxy builds them.
    `parse`: each request's response head is parsed too (the record reads its fields from the head:
    how much of that work the parse does and how much the record varies between trees).
    `unique`: each request has its own URL and its answer its own X-Request-Id (as real traffic varies
    them: no two transactions' URL and response headers alike; the recorder binds a value shared by
    all rows of a statement once, apply.Shape)."""
    req_head, _ = http1.parse_request_head(REQUEST)
    resp_head, _ = http1.parse_response_head(RESPONSE)
    v = Verdict()
    combined = hasattr(recorder, "request")  # the one-record-per-request API, if this tree has it
    log_values = getattr(records, "log_values", None)  # the log record as an array (shape 2), if this tree has it
    for i in range(n):
        if unique:
            req_head, _ = http1.parse_request_head(REQUEST.replace(b"/1k ", b"/1k?r=%d " % i))
            resp_head, _ = http1.parse_response_head(
                RESPONSE.replace(b"\r\n\r\n", b"\r\nX-Request-Id: %08x\r\n\r\n" % i)
            )
        elif parse:
            resp_head, _ = http1.parse_response_head(RESPONSE)
        if combined:
            t = recorder.request("c1", "127.0.0.1", 8080, "HTTP", v, req_head, "http://127.0.0.1:8080")
        elif log_values is not None:
            writer.append(
                records.LOG,
                log_values(
                    "c1",
                    "127.0.0.1",
                    8080,
                    "HTTP",
                    records.ALLOWED,
                    v.resolved_hostname,
                    v.rule_id,
                    "* → 127.0.0.1:*",
                    v.elapsed_ms,
                    v.reason,
                    None,
                    "",
                ),
            )
            t = recorder.txn("c1", "http://127.0.0.1:8080", "127.0.0.1", 8080, req_head, v.rule_id)
        else:
            writer.append(
                records.LOG,
                records.log_record(
                    "c1",
                    "127.0.0.1",
                    8080,
                    "HTTP",
                    records.ALLOWED,
                    resolved_hostname=v.resolved_hostname,
                    rule_id=v.rule_id,
                    rule_summary="* → 127.0.0.1:*",
                    response_time_ms=v.elapsed_ms,
                    reason=v.reason,
                    mitm_skip_reason=None,
                    container_id="",
                ),
            )
            t = recorder.txn("c1", "http://127.0.0.1:8080", "127.0.0.1", 8080, req_head, v.rule_id)
        t.resp_sink(resp_head)(BODY)
        t.finish(resp_head)


def batches(encoded: list[bytes], per_batch: int, writer: str = "bench") -> list[bytes]:
    """The writer's records as its batches (`writer`: its name, for a tree whose batches carry it)."""
    batch_body = getattr(jmod, "batch_body", None)
    if batch_body is not None:
        return [
            batch_body(i // per_batch + 1, writer, encoded[i : i + per_batch])
            for i in range(0, len(encoded), per_batch)
        ]
    head, tail = jmod._BATCH_HEAD, jmod._BATCH_TAIL
    return [
        b"".join((head % (i + 1), b",".join(encoded[i : i + per_batch]), tail))
        for i in range(0, len(encoded), per_batch)
    ]


def decode(body: bytes) -> list[Any]:
    """The consumer's decode of one batch (its own function when the tree has one)."""
    fn = getattr(jmod, "decode_batch", None)
    if fn is not None:
        return fn(body)[1]
    b = jmod.orjson.loads(body)
    return [(str(r[0]), str(r[1]), r[2]) for r in b["r"]]


def checkpointer(path: str, every: float, stop: Any, ready: Any) -> None:
    """Maintenance's checkpoints of the -wal (a process of its own, as in the stack)."""
    from services.maintenance.jobs import WalCheckpointer

    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    wal = WalCheckpointer(conn)
    ready.set()
    while not stop.wait(every):
        wal.run()
    conn.close()


def start_checkpointer(path: Path, every: float) -> Any:
    """The checkpointer process and its stop event, or None (off, or a tree without WalCheckpointer)."""
    import importlib.util
    import multiprocessing

    if every <= 0 or importlib.util.find_spec("services.maintenance.jobs") is None:
        return None
    from services.maintenance import jobs

    if not hasattr(jobs, "WalCheckpointer"):
        return None
    ctx = multiprocessing.get_context("spawn")  # fork would leave the parent copy-on-write faults to pay
    stop, ready = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=checkpointer, args=(str(path), every, stop, ready), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError("the checkpointer process did not start")
    return proc, stop


def stack_drain(n: int) -> int:
    """Push n requests' records through a real stack's journal; print records/s and recorder CPU."""
    import zmq.asyncio

    sys.path.insert(0, str(Path.cwd() / "bench"))
    from harness import greybench
    from harness.procs import cpu_seconds, stop_all
    from harness.proxies import GreyProxy

    root = Path(tempfile.mkdtemp(prefix="gp-recdrain-"))
    grey = GreyProxy(root)
    try:
        grey.start()
        endpoint = greybench.journal_endpoint(grey.stack)
        pid = grey.service_pid("recorder")
        assert pid, "no recorder pid"
        mpid = grey.service_pid("maintenance")  # its checkpoints of the -wal and the assembler's passes

        async def push() -> tuple[float, int, float, float]:
            ctx = zmq.asyncio.Context()
            writer = JournalWriter(endpoint, outbox_limit=10**7, outbox_bytes=10**11, ctx=ctx)
            proxy_side(writer, Recorder(writer), n)  # serialised into the outbox; nothing sent yet
            records = len(writer._queue)
            task = asyncio.create_task(writer.run())
            c0, m0, t0 = cpu_seconds(pid), cpu_seconds(mpid), time.perf_counter()
            ok = await writer.flush(300)
            t1, c1 = time.perf_counter(), cpu_seconds(pid)
            await asyncio.sleep(1.5)  # the assembler's debounced pass over what was just stored
            m1 = cpu_seconds(mpid)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            ctx.destroy(linger=0)
            assert ok and writer.dropped == 0, writer.stats()
            return t1 - t0, records, 1e6 * (c1 - c0) / n, 1e6 * (m1 - m0) / n

        secs, records, cpu_us, maint_us = asyncio.run(push())
        con = sqlite3.connect(f"file:{grey.stack.db_path}?mode=ro", uri=True, timeout=10)
        stored = con.execute("SELECT (SELECT COUNT(*) FROM logs), (SELECT COUNT(*) FROM http_transactions)").fetchone()
        con.close()
        print(
            f"stack: {n} requests = {records} records through the journal in {secs:.2f} s: {records / secs:,.0f} records/s"
            f" ({n / secs:,.0f} requests/s); recorder CPU {cpu_us:.1f} µs/request, maintenance {maint_us:.1f} µs/request;"
            f" stored logs/transactions {stored}"
        )
        assert stored[0] >= n and stored[1] >= n, stored
    finally:
        grey.stop()
        stop_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", action="store_true", help="through a running stack's journal (see above)")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=18, help="requests per journal batch (18: ~6 000 req/s, 3 ms)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the recorder side once")
    ap.add_argument("--parse", action="store_true", help="parse each response head in the proxy side's loop too")
    ap.add_argument(
        "--checkpointer", type=float, default=0, metavar="S", help="checkpoint the -wal every S s from another process"
    )
    args = ap.parse_args()
    print(f"tree: {Path(greyproxy.__file__).resolve().parent.parent}")
    n = args.requests
    if args.stack:
        return stack_drain(n)
    best: dict[str, float] = {}
    rec_per_req = 0.0
    for run in range(args.runs):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        writer = JournalWriter("ipc:///nonexistent", outbox_limit=10**9, outbox_bytes=10**12)
        recorder = Recorder(writer)
        gc.collect()
        t0 = time.process_time()
        proxy_side(writer, recorder, n, args.parse)
        t_proxy = time.process_time() - t0
        encoded = list(writer._queue)
        rec_per_req = len(encoded) / n
        per_batch = max(1, int(round(args.batch * rec_per_req)))
        bodies = batches(encoded, per_batch)
        root = Path(tempfile.mkdtemp(prefix="gp-reccost-"))
        try:
            db = open_database(root / "greyproxy.db")
            conn = db.connection()
            ckpt = start_checkpointer(root / "greyproxy.db", args.checkpointer)
            pub = Publisher()
            gc.collect()
            t_dec = t_apply = t_pub = 0.0
            prof = None
            if args.profile and run == 0:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            for body in bodies:
                a = time.process_time()
                recs = decode(body)
                b = time.process_time()
                events = apply_mod.apply_records(conn, recs, lazy=True)
                c = time.process_time()
                service.publish_events(pub, events)
                d = time.process_time()
                t_dec += b - a
                t_apply += c - b
                t_pub += d - c
            if prof is not None:
                import pstats

                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            stored = conn.execute(
                "SELECT (SELECT COUNT(*) FROM logs), (SELECT COUNT(*) FROM http_transactions)"
            ).fetchone()
            assert stored == (n, n), stored
            if ckpt is not None:
                ckpt[1].set()
                ckpt[0].join(10)
            db.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
            loop.close()
        for k, v in (("proxy", t_proxy), ("decode", t_dec), ("apply", t_apply), ("publish", t_pub)):
            best[k] = min(best.get(k, 1e9), v)
        print(
            f"run {run}: proxy {1e6 * t_proxy / n:.1f}  decode {1e6 * t_dec / n:.1f}  apply {1e6 * t_apply / n:.1f}"
            f"  publish {1e6 * t_pub / n:.1f} µs/request"
        )
    rec = best["decode"] + best["apply"] + best["publish"]
    print(
        f"min: proxy {1e6 * best['proxy'] / n:.2f} µs/request; recorder decode {1e6 * best['decode'] / n:.2f} + apply"
        f" {1e6 * best['apply'] / n:.2f} + publish {1e6 * best['publish'] / n:.2f} = {1e6 * rec / n:.2f} µs/request"
        f" ({rec_per_req:g} journal records per request, {args.batch} requests per batch, {n} requests)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
