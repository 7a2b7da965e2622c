"""API process: uvicorn serving the Falcon app inside our own uvloop, plus the heartbeat tracker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from bus.reqrep import ControlClient
from greyproxy import ports
from greyproxy.config import Config
from greyproxy.runtime import ServiceRuntime, run_async_service
from greyproxy.store import open_database

from .app import create_app
from .context import ApiContext
from .health import _book as health_book
from .health import track_heartbeats, watch_health
from .util import BodyEnd
from .proxies import ProxyGroup
from .notify import run_notifier
from .server import StrictHttpProtocol, WebSocketProtocol
from .settings import current_settings

log = logging.getLogger("greyproxy.api")

SHUTDOWN_TIMEOUT = 3  # seconds a stop waits for requests and /ws handlers in progress to end


class _Server(uvicorn.Server):
    # Our runtime owns the signals; uvicorn must not replace the handlers.
    def capture_signals(self):  # noqa: ANN201
        return contextlib.nullcontext()


def make_context(rt: ServiceRuntime) -> ApiContext:
    cfg = rt.cfg
    timeout, retries = float(cfg.bus["requestTimeout"]), int(cfg.bus["requestRetries"])
    stale = max(2.5, 3 * float(cfg.bus["heartbeatInterval"]))  # as ApiContext.stale_after
    # Every proxy process at once (proxy.workers, proxies on other hosts): see proxies.py.
    proxies = ProxyGroup(cfg.proxy_control_endpoints(), timeout, retries, lambda: stale)
    proxies.publish = rt.publisher.publish  # allowall.changed is the group's to announce
    return ApiContext(
        cfg=cfg,
        publisher=rt.publisher,
        db_executor=ThreadPoolExecutor(max_workers=4, thread_name_prefix="api-db"),
        proxy=proxies,  # type: ignore[arg-type]
        recorder=ControlClient(cfg.bus["recorderControl"], "recorder", timeout, retries),
        maintenance=ControlClient(cfg.bus["maintenanceControl"], "maintenance", timeout, retries),
    )


async def main(rt: ServiceRuntime) -> None:
    cfg = rt.cfg
    if cfg.api is None:
        log.info("API disabled (greyproxy.addr is empty); heartbeat only")
        await asyncio.Event().wait()
        return
    ctx = make_context(rt)
    await ctx.db(open_database, cfg.db_path, True, cfg.section("database")["walAutocheckpoint"])
    app = BodyEnd(create_app(ctx))  # (read_json tells a whole body from one the client left)
    if ctx.credentials_key is not None:  # session.key made now when absent (SPEC §12.4)
        await ctx.db(ctx.credentials_key.start)
    server = _Server(
        uvicorn.Config(
            app,
            host=cfg.api.host,
            port=cfg.api.port,
            loop="none",
            lifespan="off",
            http=StrictHttpProtocol,
            proxy_headers=False,  # X-Forwarded-For is anyone's to write: the peer address is the client
            log_level="warning",
            access_log=False,
            ws=WebSocketProtocol,  # uvicorn's websockets-sansio, closing a stuck client (server.py)
            ws_ping_interval=20,
            ws_ping_timeout=20,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,  # then what is left is cancelled
            server_header=False,
            date_header=False,
        )
    )
    api_host, api_port = cfg.api.host, cfg.api.port

    async def bind() -> socket.socket:
        return ports.listen_socket(api_host, api_port)

    # Closing connections (TIME_WAIT) on the port are waited for; a listening program is refused at once.
    sock = await ports.bind_retrying(bind, "API (greyproxy.addr)", api_host, api_port, logger=log)
    book = health_book(ctx)
    book.api_started(time.time())
    tracker = asyncio.create_task(track_heartbeats(ctx))
    notifier = asyncio.create_task(run_notifier(ctx, read_settings=current_settings))
    bridge = asyncio.create_task(ctx.ws_hub.run_bridge())
    health_watch = asyncio.create_task(watch_health(ctx))
    log.info("API on http://%s:%d%s", cfg.api.host, cfg.api.port, cfg.path_prefix)
    serve = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        # Shielded: a stop (SIGTERM) must reach uvicorn as its own graceful shutdown, which closes
        # each /ws client with 1012 (service restart) and lets its handler end. Cancelling the
        # server's task instead left the handlers to be cancelled with the loop: no close frame,
        # and a CancelledError traceback in api.log for every client connected.
        await asyncio.shield(serve)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(serve, SHUTDOWN_TIMEOUT + 1)
        raise
    finally:
        tracker.cancel()
        notifier.cancel()
        bridge.cancel()
        health_watch.cancel()
        book.api_stopping()  # a clean stop: the next API does not count it as a death


def run(cfg: Config) -> None:
    run_async_service("api", cfg, main)
