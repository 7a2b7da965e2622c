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
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from bus.reqrep import ControlClient, RemoteError, ServiceUnavailable

log = logging.getLogger("greyproxy.api")

# stats keys that are per-process counts: summed over the proxies.
SUMMED = ("active_connections", "clients", "tunnels", "waiting", "decisions")


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
        self._started: dict[str, float] = {}  # proxy name -> started_at of its process
        self._tasks: set[asyncio.Task] = set()

    def note_heartbeat(self, name: str, data: dict[str, Any]) -> None:
        """A heartbeat from a proxy that announces its control endpoint: call it from now on."""
        endpoint = data.get("control")
        if data.get("role") == "proxy" and isinstance(endpoint, str) and endpoint.startswith(("ipc://", "tcp://")):
            if endpoint not in self._announced and endpoint not in self._configured:
                log.info("proxy %s announced its control endpoint %s", name, endpoint)
            self._announced[endpoint] = (name, time.time())
            started = data.get("started_at")
            if isinstance(started, (int, float)):
                previous = self._started.get(name)
                self._started[name] = float(started)
                if previous != started and self._silent is not None:  # a new process: give it silent mode
                    task = asyncio.get_running_loop().create_task(self._resync_silent(name, endpoint))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            key = data.get("control_key")
            if isinstance(key, str) and self._keys.get(endpoint) != key:
                self._keys[endpoint] = key
                old = self._clients.pop(endpoint, None)  # a new key: a new socket
                if old is not None:
                    old.close()

    def forget(self, name: str) -> None:
        """A proxy on another host stopped cleanly: call it no more (a new heartbeat brings it back)."""
        for endpoint in [ep for ep, (n, _seen) in self._announced.items() if n == name]:
            del self._announced[endpoint]
            client = self._clients.pop(endpoint, None)
            if client is not None:
                client.close()
        self._started.pop(name, None)

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
        results, down = [], []
        for ep, answer in zip(endpoints, answers):
            if isinstance(answer, RemoteError):
                raise answer
            if isinstance(answer, ServiceUnavailable):
                down.append(ep)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results.append(answer)
        if not results:
            raise ServiceUnavailable(self.service, f"none of {len(endpoints)} proxies answered")
        if down:
            log.warning(
                "proxy %s: %d of %d proxies did not answer (%s)", op, len(down), len(endpoints), ", ".join(down)
            )
        if op == "allowall.set" and args:
            seconds = args.get("duration_seconds") or 0
            self._silent = (str(args.get("mode") or "allow"), time.time() + seconds if seconds else None)
        elif op == "allowall.clear":
            self._silent = None
        return merge(op, results)

    async def _resync_silent(self, name: str, endpoint: str) -> None:
        if self._silent is None:
            return
        mode, until = self._silent
        seconds = 0 if until is None else math.ceil(until - time.time())
        if until is not None and seconds <= 0:
            return
        try:
            await self._client(endpoint).call("allowall.set", {"mode": mode, "duration_seconds": seconds})
            log.info("silent mode %s given again to the restarted proxy %s", mode, name)
        except (ServiceUnavailable, RemoteError) as exc:
            log.warning("could not give silent mode to the restarted proxy %s: %s", name, exc)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
