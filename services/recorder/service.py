"""Recorder process: consumes the journal, writes batches, publishes events after commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from typing import Any

from bus import topics
from bus.journal import JournalConsumer, Record
from bus.pubsub import Publisher
from bus.reqrep import ControlServer, RemoteError
from greyproxy.config import Config
from greyproxy.metrics import BATCH_BUCKETS, Histogram
from greyproxy.runtime import ServiceRuntime, run_async_service, tune_gc
from greyproxy.store import open_database

from . import transactions  # noqa: F401 - registers the `transaction` record kind
from services.proxy.store_view import OPS as VIEW_OPS
from services.proxy.store_view import LocalView

from .apply import Deferred, Rows, apply_records

log = logging.getLogger("greyproxy.recorder")

# A batch's records (lists of scalars, up to 20 coalesced batches of 500: ~50 000 young container
# objects while it is applied) form no reference cycles. With the default threshold (700) the
# collector walked every batch's objects several times over: ~8 % of the recorder's instructions
# per request (bench/results.md, s9-r). Now once per largest batch at most.
GC_THRESHOLD = (50_000, 10, 10)
STOP_QUIET = 0.5  # seconds of a quiet journal after a stop before the recorder ends (last_records)
STOP_MOST = 3.0  # seconds at most it waits so (supervisord.conf gives each program 5)


def publish_events(publisher: Publisher, events: list[tuple[str, Any]]) -> None:
    """Publish a committed batch's events, building a Deferred payload only if its topic is wanted.

    Asked here, after the commit and on the publisher's thread, not before applying: a
    subscription that arrives while a batch is written still gets that batch's events. Usually
    nobody subscribes to log.new/transaction.new (the /ws bridge does only while a client is
    connected): their payloads are then never built.
    """
    wanted: dict[str, bool] = {}  # once per topic per batch
    last_id = 0
    for topic, data in events:
        kind = type(data)
        if topic == topics.TRANSACTION_NEW:
            if kind is Rows:
                last_id = max(last_id, data.ids[-1])
            elif kind is Deferred:
                last_id = max(last_id, int(data.row.get("id") or 0))
        want = wanted.get(topic)
        if want is None:
            want = wanted[topic] = publisher.wanted(topic)
        if kind is Rows:  # one event per row
            if want:
                for payload in data.build():
                    publisher.publish(topic, payload, check=False)
            else:
                publisher.skip(len(data))
            continue
        if not want:
            publisher.skip()
            continue
        if kind is Deferred:
            data = data.build()
        publisher.publish(topic, data, check=False)
    if last_id:
        # Internal: wakes the conversation assembler (SPEC §13.1) once per committed batch.
        if publisher.wanted(topics.TRANSACTIONS_STORED):
            publisher.publish(topics.TRANSACTIONS_STORED, {"last_id": last_id}, check=False)
        else:
            publisher.skip()


async def main(rt: ServiceRuntime) -> None:
    cfg = rt.cfg
    # One writer thread: SQLite has one writer anyway, and it keeps the event loop free.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder-db")
    loop = asyncio.get_running_loop()
    # Its COMMITs checkpoint the -wal only past database.walAutocheckpoint pages: maintenance does it
    # every database.checkpointInterval (services/maintenance/jobs.py, WalCheckpointer).
    db = await loop.run_in_executor(
        writer, open_database, cfg.db_path, True, cfg.section("database")["walAutocheckpoint"]
    )

    batch_seconds = Histogram(BATCH_BUCKETS)  # GET /metrics: greyproxy_recorder_batch_seconds

    def apply(records: list[Record]) -> list[tuple[str, Any]]:
        t0 = time.perf_counter()
        try:
            return apply_records(db.connection(), records, lazy=True)
        finally:
            batch_seconds.observe(time.perf_counter() - t0)

    def after_commit(events: list[tuple[str, Any]]) -> None:
        publish_events(rt.publisher, events)

    consumer = JournalConsumer(cfg.bus["journal"], apply, writer, after_commit)
    rt.add_stats(
        lambda: {
            "records": consumer.records,
            "batches": consumer.applied_batches,
            "events_skipped": rt.publisher.skipped,
            "metrics": {"batch_seconds": batch_seconds.snapshot()},
        }
    )
    # A proxy on another host (proxy.rulesFrom: recorder) reads the rules and settings through these.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder-view")
    view = LocalView()

    def view_op(method: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
        async def answer(args: dict[str, Any]) -> Any:
            if method == "dns_names":  # since when (epoch seconds); optionally of these addresses only
                since, ips = args.get("since"), args.get("ips")
                if isinstance(since, bool) or not isinstance(since, (int, float)):
                    raise RemoteError("since must be a number (epoch seconds)", 400)
                if ips is not None and not (
                    isinstance(ips, list) and len(ips) <= 10_000 and all(isinstance(i, str) for i in ips)
                ):
                    raise RemoteError("ips must be a list of addresses", 400)
                return await loop.run_in_executor(reader, view.dns_names, float(since), ips)
            if method == "pending_state":  # keys: [[container, host, port], ...]
                keys = args.get("keys")
                if (
                    not isinstance(keys, list)
                    or not 0 < len(keys) <= 10_000
                    or not all(
                        isinstance(k, list)
                        and len(k) == 3
                        and isinstance(k[0], str)
                        and isinstance(k[1], str)
                        and type(k[2]) is int
                        for k in keys
                    )
                ):
                    raise RemoteError("keys must be a list of [container, host, port]", 400)
                return list(await loop.run_in_executor(reader, view.pending_state, [tuple(k) for k in keys]))
            return await loop.run_in_executor(reader, getattr(view, method))

        return answer

    control = ControlServer(
        cfg.bus["recorderControl"], {"stats": lambda args: rt.stats(), **{op: view_op(m) for op, m in VIEW_OPS.items()}}
    )
    log.info("recorder up: journal %s, db %s", cfg.bus["journal"], cfg.db_path)
    tune_gc(GC_THRESHOLD)
    try:
        await asyncio.gather(consumer.serve(), control.serve())
    finally:
        try:
            await last_records(consumer)
        finally:
            consumer.close()
            control.close()


async def last_records(consumer: JournalConsumer, quiet: float = STOP_QUIET, most: float = STOP_MOST) -> None:
    """A stop reaches every process of the stack at once (supervisord.conf): the proxies close their
    connections and send their last records as they stop. Take them until the journal has been
    quiet for `quiet` seconds (at most `most`). Before, the recorder was gone first, and the records
    of exchanges completed during a proxy's stop were lost (~40 per stop under load)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(consumer.serve())
    try:
        start = since = loop.time()
        seen = consumer.records
        while loop.time() - start < most:
            await asyncio.sleep(0.05)
            if consumer.records != seen:
                seen, since = consumer.records, loop.time()
            elif loop.time() - since >= quiet:
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(cfg: Config) -> None:
    run_async_service("recorder", cfg, main)
