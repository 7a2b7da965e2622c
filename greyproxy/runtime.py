"""What every service process shares: logging, uvloop, the heartbeat, the stall watchdog and clean
shutdown."""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from collections.abc import Awaitable, Callable
from typing import Any

from bus import topics

from .config import ENV_SUPERVISOR_PID, Config, ensure_dirs

log = logging.getLogger("greyproxy")

# "1" makes a lone `greyproxy run` exit with its parent too (supervisord's children always do).
ENV_EXIT_WITH_PARENT = "GREYPROXY_EXIT_WITH_PARENT"
PARENT_CHECK_EVERY = 1.0  # seconds between getppid() checks (the fallback to PDEATHSIG)
PARENT_GONE_GRACE = 8.0  # seconds for a clean stop after the parent died, then _exit
_PR_SET_PDEATHSIG = 1
_watching_parent = False
# In heartbeats: lets /api/health check a local service's pid (the bus may span machines).
HOSTNAME = socket.gethostname()


def _set_pdeathsig(sig: int) -> bool:
    """Ask the Linux kernel to send us `sig` when our parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_parent(env: Mapping[str, str] | None = None) -> bool:
    """Make this process stop when the process that started it dies, even by SIGKILL.

    Applies under supervisord (or when GREYPROXY_EXIT_WITH_PARENT=1): a supervisord killed with
    -9 cannot stop its programs, and orphans would keep the ports and the database busy. Linux
    gets PR_SET_PDEATHSIG (SIGTERM, the clean stop); everywhere a daemon thread also polls
    getppid() and sends the SIGTERM itself, then hard-exits if the clean stop hangs. Returns
    whether the watch was set up.
    """
    global _watching_parent
    if _watching_parent:
        return True
    env = os.environ if env is None else env
    supervisor_pid = env.get(ENV_SUPERVISOR_PID, "")
    if not (env.get("SUPERVISOR_ENABLED") or supervisor_pid or env.get(ENV_EXIT_WITH_PARENT) == "1"):
        return False
    _set_pdeathsig(signal.SIGTERM)
    parent = os.getppid()
    # The parent may have died before the prctl above: then we were already re-parented.
    if supervisor_pid.isdigit() and env.get("SUPERVISOR_ENABLED") and parent != int(supervisor_pid):
        log.error("parent supervisord (pid %s) is gone; exiting", supervisor_pid)
        os._exit(1)
    if parent == 1 and not env.get(ENV_EXIT_WITH_PARENT):
        return False  # started by init itself (a container entry point): nothing to outlive

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_EVERY)
        log.warning("parent process %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GONE_GRACE)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    _watching_parent = True
    return True


# A service whose event loop stops running (bus.stallTimeout): its exit status, so that its
# supervisor (supervisord; systemd's Restart=on-failure) restarts it. EX_SOFTWARE, from sysexits.h.
EXIT_STALLED = 70
STALL_TICK = 1.0  # seconds between the loop's ticks (at most; a quarter of a short timeout)
STALL_FALLBACK = 10.0  # the SIGVTALRM fallback: this much more CPU time than the thread's deadline
STALL_FROZEN = 5.0  # the watchdog thread itself woke this late (at least): the whole process was stopped


class StallWatchdog:
    """Ends this process when its event loop has not run for `timeout` seconds, with every thread's
    stack in its log (stderr), so that its supervisor starts a fresh one.

    A stalled loop serves nobody: a proxy worker's listener keeps taking its share of new
    connections (SO_REUSEPORT), which then wait forever. The loop ticks (`call_later`) every
    `STALL_TICK` s; a daemon thread checks the last tick and, past `timeout`, logs why, dumps the
    stacks (faulthandler) and `_exit`s with `EXIT_STALLED`.

    That thread needs the GIL, which a stall inside C code may never give back (a catastrophic
    regex, a loop in a compiled module): such a stall burns CPU. For that case each tick also
    pushes back a SIGVTALRM (`setitimer(ITIMER_VIRTUAL)`, one system call), due once the process
    has used `timeout + fallback` seconds of CPU without a tick; faulthandler's C handler, which
    needs no GIL, writes every thread's stack, then the signal's default action ends the process
    (supervisord: "terminated by SIGVTALRM"). (faulthandler's own `dump_traceback_later` is not
    used: re-arming it joins a thread while holding the GIL, which took up to 0.15 s of the loop
    on a busy machine.)

    A process that was stopped as a whole (Ctrl-Z, SIGSTOP, a debugger that stops every thread, a
    machine asleep) is not a stalled one: its watchdog thread, which wakes every `tick_every`
    seconds, then wakes `frozen` seconds or more late, and gives the loop a fresh `timeout`; a
    stopped process uses no CPU, so the fallback does not count that time either. A debugger
    that stops only the loop's thread (pdb) is a stall: `bus.stallTimeout: 0` turns the watchdog
    off."""

    def __init__(self, service: str, timeout: float, fallback: float = STALL_FALLBACK) -> None:
        self.service = service
        self.timeout = timeout
        self.fallback = fallback
        self.tick_every = min(STALL_TICK, timeout / 4)
        self.frozen = min(STALL_FROZEN, timeout / 2)  # a wake this late: the process was stopped
        self.last = time.monotonic()
        self._alarm = False
        self._loop: Any = None
        self._timer: Any = None
        self._stopped = threading.Event()

    def start(self, loop: Any) -> None:
        """Begin watching `loop` (the running loop of this thread)."""
        self._loop = loop
        try:
            faulthandler.register(signal.SIGVTALRM, file=sys.stderr, all_threads=True, chain=True)
            self._alarm = True
        except (AttributeError, RuntimeError, ValueError, OSError) as exc:  # no SIGVTALRM, no usable stderr
            log.warning("stall watchdog: no SIGVTALRM fallback (%s); a stall that holds the GIL is not ended", exc)
        self._tick()
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def _tick(self) -> None:
        self.last = time.monotonic()
        if self._alarm:
            signal.setitimer(signal.ITIMER_VIRTUAL, self.timeout + self.fallback)
        self._timer = self._loop.call_later(self.tick_every, self._tick)

    def _watch(self) -> None:
        woke = time.monotonic()
        while not self._stopped.wait(self.tick_every):
            now = time.monotonic()
            stalled, woke = self.stalled(now, woke), now
            if stalled >= self.timeout and not self._stopped.is_set():
                self._exit(stalled)

    def stalled(self, now: float, woke: float) -> float:
        """How long the loop has not ticked as of `now`, for the watchdog thread that last woke at
        `woke`. If that thread wakes `frozen` late it did not run either: the whole process was
        stopped (or a stall that held the GIL ended by itself), and the loop gets a fresh start."""
        if now - woke >= self.frozen:
            self.last = max(self.last, now)
        return now - self.last

    def _exit(self, stalled: float) -> None:
        log.critical(
            "%s: the event loop has not run for %.1f s (bus.stallTimeout: %g): exiting with status %d so that"
            " it is started again; where each thread was follows",
            self.service,
            stalled,
            self.timeout,
            EXIT_STALLED,
        )
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: S110 - exiting anyway
                pass
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (RuntimeError, ValueError, OSError):
            pass
        os._exit(EXIT_STALLED)

    def stop(self) -> None:
        """The loop is ending on purpose (a clean stop): no more watching."""
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._alarm:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            faulthandler.unregister(signal.SIGVTALRM)
            self._alarm = False


def tune_gc(threshold: tuple[int, int, int]) -> None:
    """Once a service has started: what startup built moves out of the cyclic collector's way
    (gc.freeze: rules, certificates, modules are never walked again), and the first generation is
    collected after `threshold[0]` net new objects instead of 700 (a service whose per-request
    objects form no reference cycles: they are freed by their reference counts anyway)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*threshold)


def setup_logging(service: str) -> None:
    level = os.environ.get("GREYPROXY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


BUS_RETRY_MIN, BUS_RETRY_MAX = 2.0, 60.0  # seconds between tries of a tcp:// bus that refused our key


class ServiceRuntime:
    """Heartbeat publisher plus a registry of figures each service reports in it."""

    def __init__(self, name: str, cfg: Config, announce: dict[str, Any] | None = None) -> None:
        self.name = name
        self.announce = dict(announce or {})  # extra heartbeat fields (a proxy: role, control endpoint, worker)
        self.cfg = cfg
        self.started_at = time.time()
        from bus.pubsub import Publisher  # here: the bus process (no event loop) never loads asyncio

        self.publisher = Publisher(cfg.bus["pub"], name)
        self._stats: list[Callable[[], dict[str, Any]]] = []
        # Sent in every heartbeat; /api/health counts a service up only once it is ready. A
        # service whose start takes a while (the proxy: rules, listeners, DNS) clears it first thing
        # in main() and sets it when it serves.
        self.ready = True

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

    def mark_ready(self) -> None:
        """Ready now: say so at once rather than at the next heartbeat."""
        self.ready = True
        self.publisher.publish(topics.SERVICE_HEARTBEAT, self.heartbeat_payload())

    def heartbeat_payload(self) -> dict[str, Any]:
        now = time.time()
        return {
            "service": self.name,
            "pid": os.getpid(),
            "host": HOSTNAME,
            "started_at": self.started_at,
            "uptime": round(now - self.started_at, 3),
            "ready": self.ready,
            "stats": self.stats(),
            **self.announce,
        }

    async def heartbeat_loop(self) -> None:
        import asyncio

        interval = float(self.cfg.bus["heartbeatInterval"])
        refused_since: float | None = None
        retry_at, backoff = 0.0, BUS_RETRY_MIN
        from bus import curve

        loop = asyncio.get_running_loop()
        while True:
            self.publisher.publish(topics.SERVICE_HEARTBEAT, self.heartbeat_payload())
            await asyncio.sleep(interval)
            # `greyproxy keys revoke` takes effect on connections already open too (bus/curve.py)
            if curve.configured() and await loop.run_in_executor(None, curve.revoked):
                await curve.rebind_all()
            # A tcp:// bus that refused this host's key is never asked again by libzmq: ask again
            # here, backing off (each try is a line in that bus's log), until it is allowed there.
            refused, now = self.publisher.refused(), time.monotonic()
            if refused and refused_since is None:
                refused_since, retry_at = now, now + backoff
                from bus import curve

                key = curve.public_key() or ""
                log.warning(
                    "the bus at %s refused this host's CURVE key %s: heartbeats and events stay off it until"
                    " it is allowed there (greyproxy keys allow %s %s); trying again",
                    self.cfg.bus["pub"],
                    key,
                    self.name,
                    shlex.quote(key),
                )
            elif refused is False and refused_since is not None:
                log.info("the bus at %s accepts this host's key again", self.cfg.bus["pub"])
                refused_since, backoff = None, BUS_RETRY_MIN
            if refused_since is not None and now >= retry_at:
                self.publisher.reconnect()
                backoff = min(backoff * 2, BUS_RETRY_MAX)
                retry_at = now + backoff


def run_async_service(
    name: str, cfg: Config, main: Callable[[ServiceRuntime], Awaitable[None]], announce: dict[str, Any] | None = None
) -> None:
    """Run main(runtime) on uvloop until it returns or SIGTERM/SIGINT arrives (its loop keeping its
    transports in a `TransportTable`: greyproxy/transport_table.py)."""
    import asyncio

    from .transport_table import import_uvloop

    uvloop = import_uvloop()

    exit_with_parent()  # cmd_run did it already; here for callers that come straight in
    ensure_dirs(cfg)
    from bus import curve

    if not curve.configured():  # as cmd_run: tcp:// bus sockets are CURVE
        curve.configure(cfg.keys_dir, cfg.bus["serverKey"])

    async def runner() -> None:
        rt = ServiceRuntime(name, cfg, announce)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        hb = asyncio.create_task(rt.heartbeat_loop())
        stall = float(cfg.bus["stallTimeout"])
        watchdog = StallWatchdog(name, stall) if stall > 0 else None
        if watchdog is not None:
            watchdog.start(loop)
        try:
            await main(rt)
        except asyncio.CancelledError:
            log.info("%s stopping", name)
        finally:
            if watchdog is not None:
                watchdog.stop()
            hb.cancel()
            # A last heartbeat: /api/health shows this process down at once, not after the
            # heartbeats go stale, and forgets a proxy on another host that left (docs/events.md).
            rt.publisher.publish(topics.SERVICE_HEARTBEAT, {**rt.heartbeat_payload(), "ready": False, "stopping": True})
            rt.publisher.close()

    uvloop.run(runner())
