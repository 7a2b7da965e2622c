"""GET /api/health: each service's state from its heartbeats, the database, 503 naming what is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import falcon
import orjson
import falcon.asgi

from bus import topics
from bus.pubsub import Subscriber
from greyproxy import __version__
from greyproxy.metrics import counters_of, sum_stats
from greyproxy.timeutil import rfc3339

from .context import ApiContext, ServiceSeen
from .util import json_response

log = logging.getLogger("greyproxy.api")

WATCHED = ("bus", "proxy", "recorder", "maintenance")


HOSTNAME = socket.gethostname()
# Service -> pid, for services whose last heartbeat came from this host: their process can be
# checked directly, so one killed -9 shows as down at once rather than after the heartbeat
# timeout (by which time supervisord may have restarted it and the outage would never show).
_local_pids: dict[str, int] = {}


_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _kill_pending(pid: int) -> bool:
    """Whether SIGKILL is pending for `pid` (Linux /proc status): sent but not yet acted on, as when
    the process is in an uninterruptible wait (a disk write). It is as good as gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_BIT:
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        # a zombie has exited (its parent has not reaped it yet); a killed one may not have yet
        return state not in (b"Z", b"X") and not _kill_pending(pid)
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RESTARTS_FILE = "restarts.json"  # in the run dir: the restarts counted since `greyproxy serve` started
API_ALIVE_FILE = "api.alive"  # in the run dir while an API runs; left behind by one that died


class RestartBook:
    """The restarts counted since the stack started (`greyproxy serve` clears the file), kept in the
    run dir so that an API started again after a death goes on from them instead of from zero, and
    counts its own death: its marker file is still there when it starts."""

    def __init__(self, run_dir: Any) -> None:
        self.path = run_dir / RESTARTS_FILE if run_dir is not None else None
        self.alive = run_dir / API_ALIVE_FILE if run_dir is not None else None
        self.counts: dict[str, tuple[int, float]] = {}
        if self.path is not None:
            try:
                raw = orjson.loads(self.path.read_bytes())
                self.counts = {
                    str(k): (int(v[0]), float(v[1]))
                    for k, v in raw.items()
                    if isinstance(v, list) and len(v) == 2 and not isinstance(v[0], bool)
                }
            except (OSError, ValueError, TypeError):
                self.counts = {}

    def api_started(self, now: float) -> None:
        """At the API's start: its own marker left behind means the last API died."""
        if self.alive is None:
            return
        if self.alive.exists():
            n, _at = self.counts.get("api", (0, 0.0))
            self.counts["api"] = (n + 1, now)
            log.warning(
                "the API started again without a clean stop of the last one: %d time(s); api.log says why", n + 1
            )
            self.save()
        with contextlib.suppress(OSError):
            self.alive.write_text(str(os.getpid()))

    def api_stopping(self) -> None:
        if self.alive is not None:
            with contextlib.suppress(OSError):
                self.alive.unlink()

    def count(self, name: str, restarts: int, at: float) -> None:
        """A restart counted (on the API's loop, from a heartbeat): kept, its file written in a thread."""
        self.counts[name] = (restarts, at)
        try:
            asyncio.get_running_loop().run_in_executor(None, self.save)
        except RuntimeError:  # (no loop: tests that call take_heartbeat directly)
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        data = orjson.dumps({k: [n, at] for k, (n, at) in dict(self.counts).items()})
        tmp = self.path.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not keep the restart counts in %s: %s", self.path, exc)


def _book(ctx: ApiContext) -> RestartBook:
    book = getattr(ctx, "restart_book", None)
    if book is None:
        book = RestartBook(getattr(ctx.cfg, "run_dir", None))
        ctx.restart_book = book
    return book


async def track_heartbeats(ctx: ApiContext) -> None:
    sub = Subscriber(ctx.cfg.bus["sub"], [topics.SERVICE_HEARTBEAT])
    try:
        while True:
            msg = await sub.recv()
            take_heartbeat(ctx, msg.get("data") or {})
    finally:
        sub.close()


def take_heartbeat(ctx: ApiContext, data: dict[str, Any]) -> None:
    """One service.heartbeat (docs/events.md) into ctx.seen, and the proxy fan-out's endpoints."""
    name = data.get("service")
    if not isinstance(name, str):
        return
    if data.get("host") == HOSTNAME and isinstance(data.get("pid"), int):
        _local_pids[name] = data["pid"]
    else:
        _local_pids.pop(name, None)
    stopping = data.get("stopping") is True
    if stopping and data.get("role") == "proxy" and name not in configured_proxies(ctx):
        # A proxy on another host that stopped cleanly has left: no longer listed, no longer
        # called. One that dies without a word stays listed, down.
        if (gone := ctx.seen.pop(name, None)) is not None:
            log.info("proxy %s (host %s) stopped: no longer listed", name, data.get("host"))
            ctx.departed_counters = sum_stats(
                [counters_of(data.get("stats")) or counters_of(gone.stats), gone.carried, ctx.departed_counters]
            )
        forget = getattr(ctx.proxy, "forget", None)
        if forget is not None:
            forget(name)
        return
    before = ctx.seen.get(name)
    started_at = float(data.get("started_at") or 0)
    twice = _same_name_twice(ctx, name, data, started_at)
    if twice == "drop":
        return  # a second process under a name: not a restart each beat; said in the log
    restarts, restarted_at = (
        (before.restarts, before.restarted_at) if before is not None else _book(ctx).counts.get(name, (0, 0.0))
    )
    carried = before.carried if before is not None else {}
    if twice == "keep":
        pass  # the first process of a clashing name, back after the other's beat: no restart, no counters carried
    elif before is not None and started_at != before.started_at:  # a new process: the last one's counters go on
        carried = sum_stats([counters_of(before.stats), carried])
        hub = getattr(ctx, "ws_hub", None)
        if hub is not None:
            hub.forget_source(name)  # the connections the last one held went with it
    if before is not None and started_at != before.started_at and not before.stopping and twice is None:
        # A new process under this name, and the last one never said it was stopping: it died.
        restarts, restarted_at = restarts + 1, started_at
        _book(ctx).count(name, restarts, restarted_at)
        log.warning(
            "%s started again (pid %s, was %s) without a clean stop of the last one: %d time(s) since the API"
            " started; its log says why",
            name,
            data.get("pid"),
            before.pid,
            restarts,
        )
    ctx.seen[name] = ServiceSeen(
        pid=int(data.get("pid") or 0),
        last_seen=time.time(),
        started_at=started_at,
        uptime=float(data.get("uptime") or 0),
        stats=data.get("stats") or {},
        ready=data.get("ready") is not False,
        role=str(data.get("role") or ""),
        stopping=stopping,
        restarts=restarts,
        restarted_at=restarted_at,
        carried=carried,
    )
    note = getattr(ctx.proxy, "note_heartbeat", None)
    if note is not None and not stopping:
        note(name, data)


_DUPLICATE_WINDOW = 10.0  # seconds: a process of a name that beats again after another took the name
_DUPLICATE_LOG_EVERY = 60.0
_procs_by_name: dict[str, dict[tuple[Any, Any, float], float]] = {}  # name -> {(host, pid, started_at): last beat}
_duplicate_said: dict[str, float] = {}
_last_proc: dict[str, tuple[Any, Any, float]] = {}


def _same_name_twice(ctx: ApiContext, name: str, data: dict[str, Any], started_at: float) -> str | None:
    """Whether this heartbeat comes from one of two live processes under `name` (two proxies on
    other hosts left with the same proxy.name, or one named like this stack's workers together).
    A restart shows a new process and never the old one again; two processes interleave: a
    process beats again after another one beat under its name. The one that started first keeps
    the name ("keep": its heartbeat taken, not as a restart), the other's heartbeats are dropped
    ("drop"); the clash is logged once a minute. None: the usual heartbeat."""
    now = time.time()
    proc = (data.get("host"), data.get("pid"), started_at)
    procs = _procs_by_name.setdefault(name, {})
    for p, seen in list(procs.items()):
        if now - seen > _DUPLICATE_WINDOW:
            del procs[p]
    last = _last_proc.get(name)
    clash = proc in procs and last is not None and last != proc and last in procs and data.get("stopping") is not True
    procs[proc] = now
    _last_proc[name] = proc
    aggregate = data.get("role") == "proxy" and getattr(ctx.cfg, "workers", 1) > 1 and name == _proxy_base(ctx)
    if not clash and not aggregate:
        return None
    if now - _duplicate_said.get(name, 0.0) > _DUPLICATE_LOG_EVERY:
        _duplicate_said[name] = now
        if aggregate:
            log.warning(
                "a proxy on host %s (pid %s) sends heartbeats as %r, the name of this stack's workers together:"
                " give it its own proxy.name",
                data.get("host"),
                data.get("pid"),
                name,
            )
        else:
            assert last is not None
            log.warning(
                "two processes send heartbeats as %r: pid %s on host %s and pid %s on host %s; each proxy"
                " needs its own proxy.name (until then /api/health shows the one that started first)",
                name,
                last[1],
                last[0],
                proc[1],
                proc[0],
            )
    if aggregate:
        return "drop"
    keeper = min(procs, key=lambda p: p[2])
    return "keep" if proc == keeper else "drop"


def _proxy_base(ctx: ApiContext) -> str:
    raw = getattr(ctx.cfg, "raw", None) or {}
    return str(raw.get("proxy", {}).get("name", "proxy"))


def configured_proxies(ctx: ApiContext) -> list[str]:
    """The proxy processes this stack's configuration runs: "proxy", or proxy-0 ... proxy-N-1."""
    base = _proxy_base(ctx)
    workers = getattr(ctx.cfg, "workers", 1)
    return [base] if workers == 1 else [f"{base}-{i}" for i in range(workers)]


def proxy_names(ctx: ApiContext) -> list[str]:
    """Every proxy process /api/health lists: the configured workers, then any other proxy heard
    from (a proxy on another host) that has not said it stopped."""
    names = configured_proxies(ctx)
    return names + sorted(n for n, s in ctx.seen.items() if s.role == "proxy" and n not in names)


def _db_ok() -> bool:
    from greyproxy.store import database

    database.execute_sql("SELECT 1").fetchone()
    return True


async def _first_heartbeats(ctx: ApiContext) -> None:
    """Right after the API (re)starts it has heard no heartbeat yet: wait for them, briefly, rather
    than report every service down."""
    grace_end = ctx.started_at + ctx.stale_after()

    def all_seen() -> bool:
        return all(n in ctx.seen for n in (*(w for w in WATCHED if w != "proxy"), *proxy_names(ctx)))

    if time.time() >= grace_end or all_seen():
        return
    deadline = min(grace_end, time.time() + 1.5 * float(ctx.cfg.bus["heartbeatInterval"]) + 0.2)
    while time.time() < deadline and not all_seen():
        await asyncio.sleep(0.05)


class HealthResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        await _first_heartbeats(self.ctx)
        body = await health_body(self.ctx)
        json_response(resp, body, 503 if body.get("down") else 200)


HEALTH_LOOK = 1.0  # seconds between the watcher's looks at the processes' states (while /ws has clients)


def health_state(body: dict[str, Any]) -> tuple[Any, ...]:
    """What a `health.changed` is sent for: the overall status and each process's state and pid
    (a restart between two looks changes the pid), the database's."""
    services = body.get("services") or {}
    return (
        body.get("status"),
        tuple(sorted((n, s.get("state"), s.get("pid")) for n, s in services.items() if n != "api")),
        (body.get("database") or {}).get("up"),
    )


async def watch_health(ctx: ApiContext) -> None:
    """Send `health.changed` (the body of GET /api/health) to the /ws clients whenever a process
    goes up, down, starting or unreachable, restarts, or the database stops answering: looked at
    every HEALTH_LOOK seconds while any client is connected (heartbeats, a `SELECT 1`; nothing while
    none is). Also at the first look after a client connected: a change between its own read of
    GET /api/health and that look would otherwise never reach it. Straight to the connections, not
    over the bus (the bus may be what went down)."""
    hub = ctx.ws_hub
    last: tuple[Any, ...] | None = None
    known: set[int] = set()  # the connections seen at the last look
    while True:
        await asyncio.sleep(HEALTH_LOOK)
        now = {id(c) for c in hub.connections}
        if not now:
            last, known = None, set()
            continue
        joined = bool(now - known)
        known = now
        try:
            body = await health_body(ctx)
        except Exception:  # one failed look must not end the watch
            log.exception("health watch: a look failed")
            continue
        state = health_state(body)
        if joined or state != last:
            hub.dispatch(topics.HEALTH_CHANGED, body)
        last = state


async def health_body(ctx: ApiContext) -> dict[str, Any]:
    """The body of GET /api/health (SPEC §5); `down` lists what is not up."""
    now = time.time()
    services: dict[str, dict] = {}
    down: list[str] = []
    bus_seen = ctx.seen.get("bus")
    bus_silent = bus_seen is None or now - bus_seen.last_seen > ctx.stale_after()
    proxies = proxy_names(ctx)
    watched = [n for n in WATCHED if n != "proxy"]
    watched[1:1] = proxies  # bus, the proxies, recorder, maintenance
    for name in watched:
        seen = ctx.seen.get(name)
        fresh = ready = local = False
        if seen is not None:
            fresh = now - seen.last_seen <= ctx.stale_after() and not seen.stopping
            ready = seen.ready and not seen.stopping
            local = _local_pids.get(name) == seen.pid
        up = fresh and ready
        if up and local and not _pid_alive(seen.pid):  # type: ignore[union-attr]
            up = False  # killed: no need to wait for its heartbeats to go stale
        elif not up and name != "bus" and bus_silent and local and ready and _pid_alive(seen.pid):  # type: ignore[union-attr]
            up = True  # with the broker down no heartbeat can arrive; the process itself is alive
        state = "up" if up else ("starting" if fresh and not ready else "down")  # (not starting for ever)
        unreachable = getattr(ctx.proxy, "unreachable", None)
        if up and seen is not None and seen.role == "proxy" and unreachable is not None and unreachable(name):
            up, state = False, "unreachable"  # alive (its heartbeats come) but it does not answer the API
        services[name] = {
            "up": up,
            "state": state,
            "pid": seen.pid if seen else None,
            "last_seen": rfc3339(seen.last_seen) if seen else None,
            "uptime": round(seen.uptime, 1) if seen else None,
            "restarts": seen.restarts if seen else 0,
            "last_restart": rfc3339(seen.restarted_at) if seen and seen.restarts else None,
        }
        if not up:
            down.append(name)
    if "proxy" not in proxies:
        # "proxy" stands for them all: up when every one is (each is listed under its own name too).
        states = [services[n] for n in proxies]
        all_up = all(st["up"] for st in states)
        services["proxy"] = {
            "up": all_up,
            "state": "up" if all_up else ("starting" if any(st["state"] == "starting" for st in states) else "down"),
            "pid": states[0]["pid"] if states else None,
            "last_seen": states[0]["last_seen"] if states else None,
            "uptime": states[0]["uptime"] if states else None,
            "restarts": sum(st["restarts"] for st in states),
            "last_restart": max((st["last_restart"] for st in states if st["last_restart"]), default=None),
            "workers": proxies,
        }
    api_restarts, api_restarted = _book(ctx).counts.get("api", (0, 0.0))
    services["api"] = {
        "up": True,
        "state": "up",
        "pid": os.getpid(),
        "last_seen": rfc3339(now),
        "uptime": round(now - ctx.started_at, 1),
        "restarts": api_restarts,
        "last_restart": rfc3339(api_restarted) if api_restarts else None,
    }
    try:
        db_up = await asyncio.wait_for(ctx.db(_db_ok), 2.0)
    except Exception as exc:  # any failure here means the database is not usable
        log.warning("health: database check failed: %s", exc)
        db_up = False
    if not db_up:
        down.append("database")
    body: dict[str, Any] = {
        "service": "greyproxy",
        "version": __version__,
        "status": "ok" if not down else "degraded",
        "ports": ctx.cfg.ports(),
        "services": services,
        "database": {"up": db_up, "path": str(ctx.cfg.db_path)},
    }
    if down:
        body["down"] = down
        body["error"] = f"down: {', '.join(down)}"
    return body


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/health"), HealthResource(ctx))
