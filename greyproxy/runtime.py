"""What every service process shares: logging, uvloop, the heartbeat and clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bus import topics
from bus.pubsub import Publisher

from .config import Config, ensure_dirs

log = logging.getLogger("greyproxy")


def setup_logging(service: str) -> None:
    level = os.environ.get("GREYPROXY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class ServiceRuntime:
    """Heartbeat publisher plus a registry of figures each service reports in it."""

    def __init__(self, name: str, cfg: Config) -> None:
        self.name = name
        self.cfg = cfg
        self.started_at = time.time()
        self.publisher = Publisher(cfg.bus["pub"], name)
        self._stats: list[Callable[[], dict[str, Any]]] = []

    def add_stats(self, fn: Callable[[], dict[str, Any]]) -> None:
        self._stats.append(fn)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fn in self._stats:
            try:
                out.update(fn())
            except Exception:  # a broken figure must not stop the heartbeat
                log.exception("stats provider failed")
        return out

    def heartbeat_payload(self) -> dict[str, Any]:
        now = time.time()
        return {"service": self.name, "pid": os.getpid(), "started_at": self.started_at,
                "uptime": round(now - self.started_at, 3), "stats": self.stats()}

    async def heartbeat_loop(self) -> None:
        interval = float(self.cfg.bus["heartbeatInterval"])
        while True:
            self.publisher.publish(topics.SERVICE_HEARTBEAT, self.heartbeat_payload())
            await asyncio.sleep(interval)


def run_async_service(name: str, cfg: Config, main: Callable[[ServiceRuntime], Awaitable[None]]) -> None:
    """Run main(runtime) on uvloop until it returns or SIGTERM/SIGINT arrives."""
    import uvloop

    ensure_dirs(cfg)

    async def runner() -> None:
        rt = ServiceRuntime(name, cfg)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        hb = asyncio.create_task(rt.heartbeat_loop())
        try:
            await main(rt)
        except asyncio.CancelledError:
            log.info("%s stopping", name)
        finally:
            hb.cancel()
            rt.publisher.close()

    uvloop.run(runner())
