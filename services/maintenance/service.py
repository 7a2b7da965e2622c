"""Maintenance process: runs jobs in a worker thread, reports progress, prunes periodically."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from bus import topics
from bus.reqrep import ControlServer, RemoteError
from greyproxy.config import Config
from greyproxy.runtime import ServiceRuntime, run_async_service
from greyproxy.store import open_database
from greyproxy.timeutil import rfc3339

from . import redact  # noqa: F401 - registers the redact-headers job
from .jobs import JOBS, JobState

log = logging.getLogger("greyproxy.maintenance")

PRUNE_EVERY = 3600.0


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
        st.running, st.processed, st.total = True, 0, 0
        st.started_at, st.finished_at, st.error = time.time(), None, None
        self.loop.run_in_executor(self.executor, self._run, name, st, opts)
        return {"status": "started", "job": name}

    def _run(self, name: str, st: JobState, opts: dict[str, Any]) -> None:
        conn = self.db.connection()
        last = 0.0
        try:
            for processed, total in JOBS[name](conn, opts):
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


async def main(rt: ServiceRuntime) -> None:
    cfg = rt.cfg
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maintenance")
    loop = asyncio.get_running_loop()
    db = await loop.run_in_executor(executor, open_database, cfg.db_path)
    runner = JobRunner(rt, db, executor)

    def prune_opts() -> dict[str, Any]:
        return {"retention_days": cfg.section("retention")["days"],
                "pending_ttl_days": cfg.section("proxy")["pendingTtlDays"]}

    async def start(args: dict[str, Any]) -> dict[str, Any]:
        name = str(args.get("job", ""))
        opts = dict(args.get("options") or {})
        if name == "prune":
            opts = prune_opts() | opts
        return runner.start(name, opts)

    control = ControlServer(cfg.bus["maintenanceControl"], {
        "job.start": start,
        "job.status": lambda args: runner.status(),
        "stats": lambda args: rt.stats(),
    })
    rt.add_stats(lambda: {"jobs_running": [n for n, s in runner.states.items() if s.running]})

    async def periodic() -> None:
        await asyncio.sleep(10)
        while True:
            if not runner.states["prune"].running:
                runner.start("prune", prune_opts())
            await asyncio.sleep(PRUNE_EVERY)

    log.info("maintenance up: control %s", cfg.bus["maintenanceControl"])
    try:
        await asyncio.gather(control.serve(), periodic())
    finally:
        control.close()


def run(cfg: Config) -> None:
    run_async_service("maintenance", cfg, main)
