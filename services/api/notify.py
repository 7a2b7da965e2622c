"""OS desktop notifications for the pending queue (SPEC §9).

Linux uses `notify-send`, macOS `terminal-notifier`; without one, notifications are simply
unavailable. Each notification runs as its own subprocess task, so the event loop never
waits on a desktop daemon. Suppressed while notificationsEnabled is off or while a /ws client
claims notifications (a companion app shows its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bus import topics
from bus.pubsub import Subscriber

log = logging.getLogger("greyproxy.api.notify")

TITLE = "Greyproxy"
COOLDOWN = 30.0  # seconds between two notifications for the same destination
PROCESS_TIMEOUT = 10.0  # a notifier that hangs this long is killed
MAX_IN_FLIGHT = 4  # a burst of new destinations must not fork a process per entry
SUBSCRIBED = ("pending_request.", topics.SETTINGS_CHANGED)

GroupKey = tuple[str, str, int]
ReadSettings = Callable[[Any], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Backend:
    name: str  # "notify-send" | "terminal-notifier" | "none"
    path: str | None = None

    @property
    def available(self) -> bool:
        return self.path is not None


NO_BACKEND = Backend("none")


def detect_backend() -> Backend:
    """The platform's notifier if it is on PATH (checked each time: it may be installed later)."""
    name = "terminal-notifier" if sys.platform == "darwin" else "notify-send"
    path = shutil.which(name)
    return Backend(name, path) if path else NO_BACKEND


def message_text(data: dict[str, Any]) -> str:
    host = data.get("resolved_hostname") or data.get("destination_host")
    return f"{data.get('container_name')} wants to connect to {host}:{data.get('destination_port')}"


@dataclass
class Shown:
    """What is needed to close a notification once its entry is decided."""

    key: GroupKey
    notification_id: int | None = None  # notify-send --print-id
    group: str | None = None  # terminal-notifier -group


class Notifier:
    def __init__(
        self,
        ctx: Any,
        backend: Backend,
        cooldown: float = COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
        read_settings: ReadSettings | None = None,
    ) -> None:
        self.ctx = ctx
        self.read_settings = read_settings
        self.backend = backend
        self.cooldown = cooldown
        self.clock = clock
        self.enabled = True
        self.sent = 0
        self._last: dict[GroupKey, float] = {}
        self._shown: dict[int, Shown] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._print_id = True  # old notify-send versions lack --print-id; learned on first failure

    async def load_settings(self) -> None:
        if self.read_settings is not None:
            self.enabled = bool((await self.read_settings(self.ctx))["notificationsEnabled"])

    def claimed(self) -> bool:
        return int(self.ctx.notification_claims) > 0

    def dashboard_url(self, pending_id: Any) -> str | None:
        try:
            return f"{self.ctx.cfg.api_base()}/?pending={pending_id}"
        except Exception:  # the API address may be unset in odd setups; the text alone still helps
            return None

    def handle(self, topic: str, data: Any) -> bool:
        """React to one bus event; True when a notification was started."""
        if not isinstance(data, dict):
            return False
        if topic == topics.SETTINGS_CHANGED:
            if isinstance(data.get("notificationsEnabled"), bool):
                self.enabled = data["notificationsEnabled"]
            return False
        if topic in (topics.PENDING_ALLOWED, topics.PENDING_DISMISSED):
            self._close(data.get("pending_id"))
            return False
        if topic == topics.PENDING_CREATED:
            return self._maybe_notify(data)
        if topic == topics.PENDING_UPDATED and int(data.get("waiting") or 0) > 0:
            return self._maybe_notify(data)
        return False

    def _maybe_notify(self, data: dict[str, Any]) -> bool:
        if not (self.backend.available and self.enabled) or self.claimed():
            return False
        try:
            key: GroupKey = (
                str(data["container_name"]),
                str(data.get("resolved_hostname") or data["destination_host"]),
                int(data["destination_port"]),
            )
        except (KeyError, TypeError, ValueError):
            return False
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.cooldown:
            return False
        if len(self._tasks) >= MAX_IN_FLIGHT:
            return False
        self._last[key] = now
        if len(self._last) > 10_000:  # forget keys whose cooldown is long over
            self._last = {k: t for k, t in self._last.items() if now - t < self.cooldown}
        self.sent += 1
        self._spawn(self._show(data.get("id"), key, message_text(data)))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        """Wait for the notification processes started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _show(self, pending_id: Any, key: GroupKey, text: str) -> None:
        shown = Shown(key)
        url = self.dashboard_url(pending_id)
        if self.backend.name == "terminal-notifier":
            shown.group = "greyproxy-" + hashlib.sha1(repr(key).encode()).hexdigest()[:16]
            args = ["-title", TITLE, "-message", text, "-group", shown.group]
            if url:
                args += ["-open", url]
            await self._run(args)
        else:
            base = ["--app-name", TITLE, "--expire-time", str(int(self.cooldown * 1000)), TITLE, text]
            if self._print_id:
                rc, out, err = await self._run(["--print-id", *base])
                if rc != 0 and b"print-id" in err:
                    self._print_id = False
                    await self._run(base)
                elif rc == 0 and out.strip().isdigit():
                    shown.notification_id = int(out.strip())
            else:
                await self._run(base)
        if isinstance(pending_id, int):
            self._shown[pending_id] = shown

    def _close(self, pending_id: Any) -> None:
        shown = self._shown.pop(pending_id, None) if isinstance(pending_id, int) else None
        if shown is None:
            return
        self._last.pop(shown.key, None)  # a new request after a decision deserves a fresh notification
        if shown.group:
            self._spawn(self._run(["-remove", shown.group]))
        elif shown.notification_id is not None:
            gdbus = shutil.which("gdbus")
            if gdbus:
                self._spawn(
                    self._exec(
                        [
                            gdbus,
                            "call",
                            "--session",
                            "--dest",
                            "org.freedesktop.Notifications",
                            "--object-path",
                            "/org/freedesktop/Notifications",
                            "--method",
                            "org.freedesktop.Notifications.CloseNotification",
                            str(shown.notification_id),
                        ]
                    )
                )

    async def _run(self, args: list[str]) -> tuple[int, bytes, bytes]:
        assert self.backend.path is not None
        return await self._exec([self.backend.path, *args])

    async def _exec(self, argv: list[str]) -> tuple[int, bytes, bytes]:
        """Run a helper without blocking the loop; a failure is logged, never raised."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            log.debug("notification helper %s failed to start: %s", argv[0], exc)
            return -1, b"", str(exc).encode()
        try:
            out, err = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            log.debug("notification helper %s timed out", argv[0])
            return -1, b"", b"timeout"
        if proc.returncode:
            log.debug("notification helper %s exited %s: %s", argv[0], proc.returncode, err[:200])
        return proc.returncode or 0, out, err


async def run_notifier(ctx: Any, backend: Backend | None = None, *, read_settings: ReadSettings | None = None) -> None:
    """Show OS notifications for pending events until cancelled; returns at once without a backend.

    read_settings gives the effective settings (services.api.settings.current_settings: passed in
    by the service, as settings itself reports this module's backend); without it, enabled."""
    backend = backend or detect_backend()
    if not backend.available:
        log.info("OS notifications unavailable (no notify-send / terminal-notifier on PATH)")
        return
    notifier = Notifier(ctx, backend, read_settings=read_settings)
    sub = Subscriber(ctx.cfg.bus["sub"], SUBSCRIBED)
    try:
        try:
            await notifier.load_settings()
        except Exception:  # the database may be busy at start; the default (enabled) stands
            log.warning("notifications: could not read settings; assuming enabled", exc_info=True)
        log.info("OS notifications via %s", backend.name)
        while True:
            msg = await sub.recv()
            try:
                notifier.handle(str(msg.get("type")), msg.get("data"))
            except Exception:  # one odd event must not end notifications
                log.exception("notification for %s failed", msg.get("type"))
    finally:
        sub.close()
