"""Maintenance process: runs jobs in a worker thread, reports progress, prunes periodically."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from bus import topics
from bus.pubsub import Subscriber
from bus.reqrep import ControlServer, RemoteError
from greyproxy.llm import ASSEMBLER_VERSION
from greyproxy.config import Config
from greyproxy.runtime import ServiceRuntime, run_async_service
from greyproxy.store import open_database
from greyproxy.timeutil import rfc3339

from . import assembler  # noqa: F401 - registers the rebuild-conversations job
from . import redact  # noqa: F401 - registers the redact-headers job
from .jobs import CAP_HIGH_WATER, DROPPED, JOBS, JobState, WalCheckpointer, over_cap

log = logging.getLogger("greyproxy.maintenance")

PRUNE_EVERY = 3600.0
CAP_CHECK_EVERY = 0.5  # the size cap's check: a few PRAGMAs and a stat (~0.1 ms)
CAP_IDLE_BACKOFF = 30.0  # after a run that found nothing it may drop

SESSION_SWEEP_EVERY = 10.0  # SPEC §12.2: expired credential sessions deleted, session.expired published


async def sweep_sessions(rt: ServiceRuntime, executor: ThreadPoolExecutor) -> None:
    from greyproxy.store import sessions

    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(SESSION_SWEEP_EVERY)
        try:
            gone = await loop.run_in_executor(executor, sessions.remove_expired, time.time())
        except Exception:
            log.exception("expired session sweep failed")
            continue
        for sid in gone:
            rt.publisher.publish(topics.SESSION_EXPIRED, sid)
        if gone:
            log.info("expired credential sessions removed: %s", ", ".join(gone))


def dropped_any(st: JobState) -> bool:
    """Whether the size-cap run `st` dropped anything. Not "the data shrank": under heavy traffic
    the recorder refills what a run frees while it runs, and a pause then lets the file outgrow the
    cap many times over. A run that dropped every row it may (`exhausted`: what is left is in tables
    the cap does not drop) counts as none: run again at once, it would drop the newest rows on arrival."""
    result = st.extra.get("result") or {}
    return not result.get("exhausted") and any(result.get(what) for what in DROPPED)


class JobRunner:
    def __init__(self, rt: ServiceRuntime, db, executor: ThreadPoolExecutor) -> None:
        self.rt = rt
        self.db = db
        self.executor = executor
        self.states: dict[str, JobState] = {name: JobState() for name in JOBS}
        self.loop = asyncio.get_running_loop()

    def status(self) -> dict[str, Any]:
        out = {}
        for name, st in self.states.items():
            d = asdict(st)
            d.pop("extra")
            d["started_at"] = rfc3339(st.started_at)
            d["finished_at"] = rfc3339(st.finished_at)
            out[name] = d
        return {"jobs": out}

    def _progress(self, name: str, st: JobState, done: bool) -> None:
        data = {"job": name, "processed": st.processed, "total": st.total, "done": done}
        if st.error:
            data["error"] = st.error
        self.rt.publisher.publish(topics.MAINTENANCE_PROGRESS, data)

    def start(self, name: str, opts: dict[str, Any]) -> dict[str, Any]:
        if name not in JOBS:
            raise RemoteError(f"unknown job: {name}", 400)
        st = self.states.setdefault(name, JobState())
        if st.running:
            raise RemoteError(f"job {name} is already running", 409)
        st.running, st.processed, st.total, st.extra = True, 0, 0, {}
        st.started_at, st.finished_at, st.error = time.time(), None, None
        self.loop.run_in_executor(self.executor, self._run, name, st, opts)
        return {"status": "started", "job": name}

    def _run(self, name: str, st: JobState, opts: dict[str, Any]) -> None:
        conn = self.db.connection()
        last = 0.0
        try:
            job = JOBS[name](conn, opts)
            while True:
                try:
                    processed, total = next(job)
                except StopIteration as end:  # a job may return what it did (size-cap: what it dropped)
                    st.extra["result"] = end.value
                    break
                st.processed, st.total = processed, total
                now = time.monotonic()
                if now - last > 0.2:  # progress events at most 5/s
                    last = now
                    self.loop.call_soon_threadsafe(self._progress, name, st, False)
        except Exception as exc:
            log.exception("job %s failed", name)
            st.error = f"{type(exc).__name__}: {exc}"
        finally:
            st.running = False
            st.finished_at = time.time()
            self.loop.call_soon_threadsafe(self._progress, name, st, True)


class ConversationLoop:
    """The incremental assembler (SPEC §13.1): a pass after each `transactions.stored` (debounced
    500 ms), a look at MAX(id) every 5 s to heal a missed event, nothing while tracking is off.
    Passes run in the worker pool under the assembler's lock, which the rebuild job holds too."""

    DEBOUNCE = 0.5
    CHECK_EVERY = 5.0

    def __init__(self, rt: ServiceRuntime, db, executor: ThreadPoolExecutor, runner: JobRunner) -> None:
        self.rt, self.db, self.executor, self.runner = rt, db, executor, runner
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.passes = 0
        rt.add_stats(lambda: {"assembler_passes": self.passes})

    def _publish(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        for topic, data in events:
            self.rt.publisher.publish(topic, data)

    def _pass(self) -> bool:
        """One pass if tracking is on, work is waiting and no rebuild holds the lock."""
        conn = self.db.connection()
        if not assembler.enabled(conn):
            return False
        top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM http_transactions").fetchone()[0]
        dirty = conn.execute("SELECT 1 FROM llm_dirty LIMIT 1").fetchone()
        if top <= assembler.meta_get(conn, "conversations_cursor") and not dirty:
            return False
        if not assembler.LOCK.acquire(blocking=False):
            return True  # a rebuild runs: try again later
        try:
            events: list[tuple[str, dict[str, Any]]] = []
            assembler.run_pass(conn, lambda t, d: events.append((t, d)))
            self.passes += 1
        finally:
            assembler.LOCK.release()
        if events:
            self.loop.call_soon_threadsafe(self._publish, events)
        return False

    def _needs_rebuild(self) -> str | None:
        """Why the conversations must be rebuilt at start, if they must."""
        conn = self.db.connection()
        if not assembler.enabled(conn):
            return None
        if assembler.meta_get(conn, "assembler_version") < ASSEMBLER_VERSION:
            return "assembler version changed"
        if assembler.meta_get(conn, assembler.REBUILD_UNFINISHED):
            return "the last rebuild did not finish (its process stopped)"
        return None

    async def _listen(self) -> None:
        sub = Subscriber(self.rt.cfg.bus["sub"], [topics.TRANSACTIONS_STORED, topics.SETTINGS_CHANGED])
        try:
            while True:
                await sub.recv()
                self.wake.set()
        finally:
            sub.close()

    async def serve(self) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            why = await self.loop.run_in_executor(self.executor, self._needs_rebuild)
            if why:
                log.info("%s: rebuilding conversations", why)
                try:
                    self.runner.start("rebuild-conversations", {})
                except RemoteError:
                    pass
            while True:
                try:
                    await asyncio.wait_for(self.wake.wait(), self.CHECK_EVERY)
                    await asyncio.sleep(self.DEBOUNCE)
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()
                try:
                    again = await self.loop.run_in_executor(self.executor, self._pass)
                except Exception:
                    log.exception("conversation pass failed")  # retried at the next check
                    again = False
                if again:
                    self.wake.set()
                    await asyncio.sleep(self.DEBOUNCE)
        finally:
            listener.cancel()


async def main(rt: ServiceRuntime) -> None:
    cfg = rt.cfg
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maintenance")
    loop = asyncio.get_running_loop()
    db = await loop.run_in_executor(
        executor, open_database, cfg.db_path, True, cfg.section("database")["walAutocheckpoint"]
    )
    runner = JobRunner(rt, db, executor)

    def cap_opts() -> dict[str, Any]:
        return {"max_database_mib": cfg.section("retention").get("maxDatabaseMiB", 4096)}

    def prune_opts() -> dict[str, Any]:
        return {
            "retention_days": cfg.section("retention")["days"],
            "pending_ttl_days": cfg.section("proxy")["pendingTtlDays"],
        }

    async def start(args: dict[str, Any]) -> dict[str, Any]:
        name = str(args.get("job", ""))
        opts = dict(args.get("options") or {})
        if name == "prune":
            opts = prune_opts() | opts
        if name == "size-cap":
            opts = cap_opts() | opts
        if name == "rebuild-conversations" and not await loop.run_in_executor(
            executor, lambda: assembler.enabled(db.connection())
        ):
            raise RemoteError("conversation tracking is disabled", 409)
        return runner.start(name, opts)

    conversations = ConversationLoop(rt, db, executor, runner)

    control = ControlServer(
        cfg.bus["maintenanceControl"],
        {
            "job.start": start,
            "job.status": lambda args: runner.status(),
            "stats": lambda args: rt.stats(),
        },
    )
    rt.add_stats(lambda: {"jobs_running": [n for n, s in runner.states.items() if s.running]})

    async def periodic() -> None:
        await asyncio.sleep(10)
        while True:
            if not runner.states["prune"].running:
                runner.start("prune", prune_opts())
            await asyncio.sleep(PRUNE_EVERY)

    def check(mib: float) -> bool:
        return over_cap(db.connection(), mib)

    async def size_cap() -> None:
        """retention.maxDatabaseMiB (SPEC §15): the size-cap job starts when the database holds more
        than CAP_HIGH_WATER of it; checked again at once after each run (still over: run again)."""
        while True:
            while runner.states["size-cap"].running:
                await asyncio.sleep(0.1)
            opts = cap_opts()
            try:
                over = await loop.run_in_executor(executor, check, opts["max_database_mib"])
            except Exception:
                log.exception("size check failed")
                over = False
            if over:
                log.info(
                    "database over %d %% of retention.maxDatabaseMiB (%s MiB): dropping the oldest data",
                    round(CAP_HIGH_WATER * 100),
                    opts["max_database_mib"],
                )
                with contextlib.suppress(RemoteError):  # started through the API meanwhile
                    runner.start("size-cap", opts)
                while runner.states["size-cap"].running:
                    await asyncio.sleep(0.1)
                if dropped_any(runner.states["size-cap"]):
                    continue  # check again at once
                await asyncio.sleep(CAP_IDLE_BACKOFF)  # nothing (else) it may drop: not every 0.5 s
            await asyncio.sleep(CAP_CHECK_EVERY)

    async def checkpoints() -> None:
        """database.checkpointInterval: the -wal is checkpointed here rather than in the recorder's
        COMMITs (jobs.WalCheckpointer), on a thread of its own so that no job holds it up."""
        interval = float(cfg.section("database")["checkpointInterval"])
        if interval <= 0:
            return  # the writers' automatic checkpoint (database.walAutocheckpoint) does it alone
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maintenance-wal")
        wal = await loop.run_in_executor(thread, lambda: WalCheckpointer(db.connection()))
        rt.add_stats(lambda: {"checkpoints": wal.stats()})
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(thread, wal.run)
            except Exception:
                log.exception("checkpoint failed")  # the recorder's own checkpoint bounds the -wal meanwhile

    log.info("maintenance up: control %s", cfg.bus["maintenanceControl"])
    try:
        await asyncio.gather(
            control.serve(),
            periodic(),
            conversations.serve(),
            sweep_sessions(rt, executor),
            size_cap(),
            checkpoints(),
        )
    finally:
        control.close()


def run(cfg: Config) -> None:
    run_async_service("maintenance", cfg, main)
