"""What every API resource shares: config, the database thread pool, bus clients, live state (the /ws hub)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from bus.pubsub import Publisher
from bus.reqrep import ControlClient
from greyproxy.config import Config

from .ws.hub import Hub

T = TypeVar("T")


@dataclass
class ServiceSeen:
    pid: int
    last_seen: float
    started_at: float
    uptime: float
    stats: dict[str, Any]
    ready: bool = True
    role: str = ""  # "proxy" for every proxy process (workers, other hosts)
    stopping: bool = False  # its last heartbeat: it stopped cleanly
    # Times a new process took this name after the last one ended without a clean stop (killed,
    # crashed, or ended by bus.stallTimeout's watchdog), since the stack started (health.RestartBook).
    restarts: int = 0
    restarted_at: float = 0.0  # when the last of those started
    # The counters (greyproxy.metrics.counters_of) the earlier processes of this name had reached
    # when a new one took it: /metrics adds them, so that they never go down.
    carried: dict[str, Any] = field(default_factory=dict)


@dataclass
class ApiContext:
    cfg: Config
    publisher: Publisher
    db_executor: ThreadPoolExecutor
    proxy: ControlClient  # a services.api.proxies.ProxyGroup: every proxy process at once
    recorder: ControlClient
    maintenance: ControlClient
    started_at: float = field(default_factory=time.time)
    seen: dict[str, ServiceSeen] = field(default_factory=dict)
    departed_counters: dict[str, Any] = field(default_factory=dict)  # of proxies on other hosts that left
    restart_book: Any = None  # services.api.health.RestartBook, made at first use
    # /ws clients currently claiming OS notifications (kept by the hub; read by notify and settings).
    notification_claims: int = 0
    # The /ws connections and their bus bridge: one per process, made with the context.
    ws_hub: Hub = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ws_hub = Hub(self)

    # session.key (services/api/credentials.Keyring), made by the credentials area.
    credentials_key: Any = None

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a peewee call in the pool: peewee is synchronous and must not block the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.db_executor, fn, *args)

    def publish(self, topic: str, data: Any) -> None:
        self.publisher.publish(topic, data)

    def stale_after(self) -> float:
        return max(2.5, 3 * float(self.cfg.bus["heartbeatInterval"]))
