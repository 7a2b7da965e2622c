""" "The proxy" as the API sees it: every proxy process (workers, proxies on other hosts) at once.

A control call goes to each known proxy in parallel and the answers are merged: counts are
summed (`stats`' active_connections and waiting, `holds.block`'s blocked), lists concatenated
(`waiters`), and a status every proxy holds alike (silent mode, a reload's result) taken from the
first answer. The proxies known are the local workers the configuration names (proxy.workers)
plus any proxy whose heartbeat announces its control endpoint (a proxy on another host), kept
while its heartbeats keep coming.

It has ControlClient's `call` and `service`, so the API's callers (util.soft_call among them) use
it unchanged. A call fails with ServiceUnavailable only when no proxy answers; a RemoteError
from any proxy (a bad argument: every proxy would say the same) is raised as it is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from bus import curve, topics
from bus.reqrep import ControlClient, RemoteError, ServiceUnavailable

log = logging.getLogger("greyproxy.api")

# stats keys that are per-process counts: summed over the proxies.
SUMMED = ("active_connections", "clients", "tunnels", "waiting", "decisions")
PROBE_EVERY = 3.0  # seconds between pings of a proxy that heartbeats but did not answer
SILENT_END_AFTER = 0.05  # seconds after a silent mode's end that its allowall.changed is published


def _sum_counts(results: list[Any], key: str) -> int:
    return sum(int(r.get(key) or 0) for r in results if isinstance(r, dict) and isinstance(r.get(key), (int, float)))


def merge(op: str, results: list[Any]) -> Any:
    """One answer from every proxy's answer to `op` (in the proxies' order)."""
    first = results[0]
    if op == "stats":
        out = dict(first) if isinstance(first, dict) else {}
        for key in SUMMED:
            if any(isinstance(r, dict) and key in r for r in results):
                out[key] = _sum_counts(results, key)
        out["proxies"] = len(results)
        return out
    if op == "waiters":
        return {"waiters": [w for r in results if isinstance(r, dict) for w in r.get("waiters") or []]}
    if op == "holds.block":
        return {"blocked": _sum_counts(results, "blocked")}
    if op == "cert.reload":
        messages = [r.get("message") for r in results if isinstance(r, dict)]
        return {"message": "reloaded" if "reloaded" in messages else (messages[0] if messages else "unchanged")}
    if op in ("rules.reload", "credentials.reload"):
        return {
            **(first if isinstance(first, dict) else {}),
            "reloaded": any(isinstance(r, dict) and r.get("reloaded") for r in results),
        }
    return first


_UNKNOWN = object()  # ProxyGroup.call: the silent mode before is not known


class ProxyGroup:
    def __init__(
        self,
        endpoints: list[str],
        timeout: float,
        retries: int,
        stale_after: Callable[[], float],
        service: str = "proxy",
    ) -> None:
        self.service = service
        self.timeout = timeout
        self.retries = retries
        self.stale_after = stale_after
        self._configured = list(endpoints)
        self._clients: dict[str, ControlClient] = {}
        self._announced: dict[str, tuple[str, float]] = {}  # endpoint -> (proxy name, last heartbeat)
        self._keys: dict[str, str] = {}  # tcp:// endpoint -> its CURVE public key, as announced
        # Silent mode lives in each proxy's memory: what was last set through us, with its end,
        # is given again to a proxy that (re)starts, so it does not differ from the others.
        self._silent: tuple[str, float | None] | None = None
        self._silent_known = False  # set or cleared through us, or learnt from the proxies (_adopt_silent)
        # allowall.changed is ours to publish (set, cleared, and its end by the clock): the proxies
        # each hold the mode, and one of them down at that moment would leave it unsaid.
        self.publish: Callable[[str, Any], None] | None = None
        self._silent_end: asyncio.TimerHandle | None = None
        self._adopting = False
        self._started: dict[str, float] = {}  # proxy name -> started_at of its process
        self._tasks: set[asyncio.Task] = set()
        # Endpoints whose last call found no answer, since when: a proxy on another host whose
        # heartbeats arrive but whose control endpoint does not answer us (its host never allowed
        # our key, say) is alive but out of our hands: /api/health shows it "unreachable".
        self._unanswered: dict[str, float] = {}
        self._probed: dict[str, float] = {}  # endpoint -> when it was last pinged for that

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def note_heartbeat(self, name: str, data: dict[str, Any]) -> None:
        """A heartbeat from a proxy that announces its control endpoint: call it from now on."""
        endpoint = data.get("control")
        if data.get("role") == "proxy" and isinstance(endpoint, str) and endpoint.startswith(("ipc://", "tcp://")):
            new = endpoint not in self._announced and endpoint not in self._configured
            if new:
                log.info("proxy %s announced its control endpoint %s", name, endpoint)
            self._announced[endpoint] = (name, time.time())
            started = data.get("started_at")
            if isinstance(started, (int, float)):
                previous = self._started.get(name)
                self._started[name] = float(started)
                if previous != started and self._silent is not None:  # a new process: give it silent mode
                    self._spawn(self._resync_silent(name, endpoint))
            if not self._silent_known and not self._adopting:
                self._adopting = True
                self._spawn(self._adopt_silent())
            key = data.get("control_key")
            if isinstance(key, str) and self._keys.get(endpoint) != key:
                self._keys[endpoint] = key
                old = self._clients.pop(endpoint, None)  # a new key: a new socket
                if old is not None:
                    old.close()
            # Can we reach it? Asked when it appears (health says so at once), and again while
            # it heartbeats but does not answer us, every PROBE_EVERY seconds (it may have been
            # starting, or its host has allowed our key since).
            now = time.time()
            if (new or endpoint in self._unanswered) and now - self._probed.get(endpoint, 0.0) >= PROBE_EVERY:
                self._probed[endpoint] = now
                self._spawn(self._probe(endpoint))

    def forget(self, name: str) -> None:
        """A proxy on another host stopped cleanly: call it no more (a new heartbeat brings it back)."""
        for endpoint in [ep for ep, (n, _seen) in self._announced.items() if n == name]:
            del self._announced[endpoint]
            client = self._clients.pop(endpoint, None)
            if client is not None:
                client.close()
            self._unanswered.pop(endpoint, None)
            self._probed.pop(endpoint, None)
        self._started.pop(name, None)

    def unreachable(self, name: str) -> str | None:
        """The control endpoint of proxy `name` (one announced by its heartbeats) when its last
        call found no answer; else None."""
        for endpoint, (n, _seen) in self._announced.items():
            if n == name and endpoint in self._unanswered:
                return endpoint
        return None

    def _name_of(self, endpoint: str) -> str:
        announced = self._announced.get(endpoint)
        return announced[0] if announced else endpoint

    async def _probe(self, endpoint: str) -> None:
        try:
            await self._client(endpoint).call("ping", retries=1)
        except ServiceUnavailable:
            self._note_reach("ping", [], [endpoint])
            return
        except RemoteError:
            pass  # it answered (an error is an answer)
        self._note_reach("ping", [endpoint], [])

    def _note_reach(self, op: str, answered: list[str], unanswered: list[str]) -> None:
        now = time.time()
        for endpoint in unanswered:
            if endpoint not in self._unanswered:
                self._unanswered[endpoint] = now
                if endpoint.startswith("tcp://"):
                    self._spawn(self._explain(endpoint))
        for endpoint in answered:
            if self._unanswered.pop(endpoint, None) is not None:
                name = self._name_of(endpoint)
                log.info("proxy %s answers again at %s", name, endpoint)
                if self._silent_known and op not in ("allowall.set", "allowall.clear"):
                    self._spawn(self._resync_silent(name, endpoint))  # it may have missed a change

    async def _explain(self, endpoint: str) -> None:
        """Say once why a tcp:// control endpoint does not answer (bus/curve.py's diagnose)."""
        why = await asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                curve.diagnose, endpoint, self._keys.get(endpoint), 2.0, socket.gethostname(), zmq.DEALER
            ),
        )
        log.warning(
            "proxy %s does not answer at %s: %s",
            self._name_of(endpoint),
            endpoint,
            why or "its CURVE handshake succeeds: the process is busy or stuck",
        )

    def endpoints(self) -> list[str]:
        now = time.time()
        extra = [
            ep
            for ep, (_n, seen) in self._announced.items()
            if ep not in self._configured and now - seen <= self.stale_after()
        ]
        return self._configured + extra

    def _client(self, endpoint: str) -> ControlClient:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = ControlClient(
                endpoint, self.service, self.timeout, self.retries, server_key=self._keys.get(endpoint)
            )
        return client

    async def call(
        self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None, retries: int | None = None
    ) -> Any:
        endpoints = self.endpoints()
        answers = await asyncio.gather(
            *(self._client(ep).call(op, args, timeout=timeout, retries=retries) for ep in endpoints),
            return_exceptions=True,
        )
        results, answered, down = [], [], []
        for ep, answer in zip(endpoints, answers):
            if isinstance(answer, ServiceUnavailable):
                down.append(ep)
            elif not isinstance(answer, BaseException) or isinstance(answer, RemoteError):
                answered.append(ep)
        self._note_reach(op, answered, down)
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, ServiceUnavailable):
                raise answer  # a RemoteError: every proxy would say the same
            if not isinstance(answer, BaseException):
                results.append(answer)
        if not results:
            raise ServiceUnavailable(self.service, f"none of {len(endpoints)} proxies answered")
        if down:
            log.warning(
                "proxy %s: %d of %d proxies did not answer (%s)", op, len(down), len(endpoints), ", ".join(down)
            )
        # What silent mode was before this call, when we know it (set, cleared or learnt)
        before = self._silent if self._silent_known else _UNKNOWN
        if op == "allowall.set" and args:
            seconds = args.get("duration_seconds") or 0
            self._silent = (str(args.get("mode") or "allow"), time.time() + seconds if seconds else None)
            self._silent_known = True
        elif op == "allowall.clear":
            self._silent = None
            self._silent_known = True
        result = merge(op, results)
        if op in ("allowall.set", "allowall.clear"):
            self._announce_silent(result, changed=before != self._silent)
        return result

    def _announce_silent(self, status: Any, changed: bool = True) -> None:
        """allowall.changed for a mode set or cleared through us, only when that changed it
        (SPEC §4: "silent mode changed"; a DELETE when it is off, or the same mode again without
        an end, is no news); its end timed. A set with a duration always moves the end: news.
        Not known before (an API that started a moment ago, before `_adopt_silent`): announced."""
        if changed and self.publish is not None and isinstance(status, dict):
            self.publish(topics.ALLOWALL_CHANGED, status)
        self._time_silent_end()

    def _time_silent_end(self) -> None:
        """allowall.changed when the mode we know of runs out (the proxies end it at the same time,
        each by its own clock: this comes SILENT_END_AFTER later, once they have)."""
        if self._silent_end is not None:
            self._silent_end.cancel()
            self._silent_end = None
        if self._silent is None or self._silent[1] is None:
            return
        until = self._silent[1]
        self._silent_end = asyncio.get_running_loop().call_later(
            max(0.0, until - time.time()) + SILENT_END_AFTER, self._silent_ended, until
        )

    def _silent_ended(self, until: float) -> None:
        self._silent_end = None
        if self._silent is None or self._silent[1] != until:
            return  # changed since
        self._silent = None
        if self.publish is not None:
            self.publish(
                topics.ALLOWALL_CHANGED, {"active": False, "mode": None, "expires_at": None, "remaining_seconds": None}
            )

    async def _adopt_silent(self) -> None:
        """An API that starts knows nothing of the silent mode the proxies are in (set through the
        API before it restarted). Once the proxies' heartbeats are in, it asks each, takes the mode
        of the longest-running process of this host (a proxy that started since is in the
        configured mode, and must not be left so), and gives it to those that differ. Before, a worker restarted after
        the API was left in normal mode while the others stayed in silent mode, and
        GET /api/allowall answered with whichever it asked first."""
        try:
            await asyncio.sleep(self.stale_after())  # every proxy's heartbeat, and so its endpoint
            endpoints = self.endpoints()
            answers = await asyncio.gather(
                *(self._client(ep).call("allowall.get", {}) for ep in endpoints), return_exceptions=True
            )
            states = [
                (self._started.get(self._name_of(ep), float("inf")), ep, answer)
                for ep, answer in zip(endpoints, answers)
                if isinstance(answer, dict)
            ]
            if self._silent_known or not states:
                return  # set or cleared through us meanwhile; or nobody answered: the next heartbeat retries
            # This host's proxies (proxy.workers) first: when they all started with this API (the
            # stack restarted), the configured mode is what holds ("lost on restart", SPEC §4), also
            # for a proxy on another host that kept running; one on another host decides only when
            # none of ours answered.
            ours = [st for st in states if st[1] in self._configured]
            _started, _ep, oldest = min(ours or states, key=lambda st: st[0])
            if oldest.get("active"):
                left = oldest.get("remaining_seconds")
                self._silent = (str(oldest.get("mode")), time.time() + left if isinstance(left, (int, float)) else None)
            else:
                self._silent = None
            self._silent_known = True
            self._time_silent_end()  # (learnt, not changed: nothing to announce now)
            differ = [
                ep
                for _s, ep, answer in states
                if (answer.get("active"), answer.get("mode")) != (oldest.get("active"), oldest.get("mode"))
            ]
            if differ:
                log.warning(
                    "silent mode: proxies %s differ from the longest-running one (%s): given its mode",
                    ", ".join(self._name_of(ep) for ep in differ),
                    oldest.get("mode") if oldest.get("active") else "off",
                )
            for ep in differ:
                self._spawn(self._resync_silent(self._name_of(ep), ep))
        finally:
            self._adopting = False

    async def _resync_silent(self, name: str, endpoint: str) -> None:
        if self._silent is None:
            if self._silent_known:  # cleared while it could not hear us
                try:
                    await self._client(endpoint).call("allowall.clear", {})
                    log.info("silent mode cleared on proxy %s, which missed it", name)
                except (ServiceUnavailable, RemoteError) as exc:
                    log.warning("could not clear silent mode on proxy %s: %s", name, exc)
            return
        mode, until = self._silent
        seconds = 0 if until is None else math.ceil(until - time.time())
        if until is not None and seconds <= 0:
            return
        try:
            await self._client(endpoint).call(
                "allowall.set", {"mode": mode, "duration_seconds": seconds, "expires_at": until, "again": True}
            )
            log.info("silent mode %s given again to proxy %s", mode, name)
        except (ServiceUnavailable, RemoteError) as exc:
            log.warning("could not give silent mode to proxy %s: %s", name, exc)

    def close(self) -> None:
        if self._silent_end is not None:
            self._silent_end.cancel()
        for client in self._clients.values():
            client.close()
