"""Proxy process: listeners, the in-memory rule set, holds, and the journal to the recorder."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bus.journal import JournalWriter
from bus.reqrep import ControlServer
from greyproxy.config import Config
from greyproxy.runtime import ServiceRuntime, run_async_service

log = logging.getLogger("greyproxy.proxy")


async def main(rt: ServiceRuntime) -> None:
    cfg = rt.cfg
    journal = JournalWriter(cfg.bus["journal"], outbox_limit=int(cfg.section("proxy")["journalOutbox"]))
    rt.add_stats(lambda: {"journal": journal.stats()})

    def stats(args: dict[str, Any]) -> dict[str, Any]:
        return rt.stats()

    control = ControlServer(cfg.bus["proxyControl"], {"stats": stats})
    log.info("proxy up")
    try:
        await asyncio.gather(journal.run(), control.serve())
    finally:
        control.close()


def run(cfg: Config) -> None:
    run_async_service("proxy", cfg, main)
