"""Container identity from the Docker / Podman Engine API (SPEC §14, config `greyproxy.docker`).

A connection without a proxy user name is named after the container whose network address it
comes from: `GET /containers/json` on the engine's Unix socket lists the running containers with
their networks' `IPAddress`; the answer is cached for `cacheTTL` seconds (and fetched again, at
most once a second, when an unknown address shows up: a container that just started). An
unreachable socket is logged once (until it works again) and the identity falls back to
`unknown-<ip>`. Podman's socket speaks the same API.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

import httptools
import orjson

log = logging.getLogger("greyproxy.proxy")

MAX_ANSWER = 16 * 1024 * 1024
REQUEST_TIMEOUT = 2.0
MISS_REFRESH = 1.0  # seconds between fetches caused by unknown addresses

Identity = tuple[str, str]  # (container name, container id)


class EngineError(Exception):
    """The engine could not be asked, or its answer makes no sense."""


def _norm_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr)


def containers_by_ip(containers: Any) -> dict[str, Identity]:
    """The Engine API's container list → {address: (name, id)} (names without the leading '/')."""
    if not isinstance(containers, list):
        raise EngineError("GET /containers/json did not answer a JSON array")
    out: dict[str, Identity] = {}
    for c in containers:
        if not isinstance(c, dict):
            continue
        cid = c["Id"] if isinstance(c.get("Id"), str) else ""
        raw_names = c.get("Names")
        names = [n for n in raw_names if isinstance(n, str) and n.strip("/")] if isinstance(raw_names, list) else []
        name = names[0].lstrip("/") if names else cid[:12]
        settings = c.get("NetworkSettings")
        networks = settings.get("Networks") if isinstance(settings, dict) else None
        if not name or not isinstance(networks, dict):
            continue
        for net in networks.values():
            if not isinstance(net, dict):
                continue
            for key in ("IPAddress", "GlobalIPv6Address"):
                ip = net.get(key)
                if isinstance(ip, str) and ip:
                    out[_norm_ip(ip)] = (name, cid)
    return out


class _Answer:
    """httptools callbacks: status and body of one response."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_ANSWER:
            raise EngineError("the engine's answer is too large")

    def on_message_complete(self) -> None:
        self.done = True


async def engine_get(socket_path: str, path: str, timeout: float = REQUEST_TIMEOUT) -> Any:
    """GET `path` from the Engine API on a Unix socket; the decoded JSON body."""

    async def exchange() -> Any:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: greyproxy\r\n"
                "Accept: application/json\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            answer = _Answer()
            parser = httptools.HttpResponseParser(answer)
            total = 0
            while not answer.done:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_ANSWER + 65536:
                    raise EngineError("the engine's answer is too large")
                parser.feed_data(chunk)
            if not answer.done:
                raise EngineError("the engine closed the connection mid-answer")
            status = parser.get_status_code()
            if status != 200:
                raise EngineError(f"{path} answered {status}")
            return orjson.loads(bytes(answer.body))
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise EngineError(f"no answer within {timeout:g} s") from None
    except (OSError, httptools.HttpParserError, orjson.JSONDecodeError) as exc:
        raise EngineError(str(exc) or exc.__class__.__name__) from None


class DockerIdentity:
    """Source address → (container name, id), through the engine socket, cached."""

    def __init__(self, socket_path: str, cache_ttl: float = 30.0) -> None:
        self.socket_path = socket_path
        self.cache_ttl = cache_ttl
        self.by_ip: dict[str, Identity] = {}
        self.fetched_at = -1e18  # monotonic time of the last successful fetch
        self.tried_at = -1e18
        self.failing = False
        self.lookups = 0
        self.fetches = 0
        self._inflight: asyncio.Future | None = None

    async def _refresh(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        self.tried_at = time.monotonic()
        try:
            self.fetches += 1
            self.by_ip = containers_by_ip(await engine_get(self.socket_path, "/containers/json"))
            self.fetched_at = time.monotonic()
            if self.failing:
                log.info("container engine at %s answers again", self.socket_path)
            self.failing = False
        except EngineError as exc:
            if not self.failing:
                log.warning(
                    "container identity: cannot ask the engine at %s (%s); connections without a "
                    "proxy user name are named unknown-<ip>",
                    self.socket_path,
                    exc,
                )
            self.failing = True
            self.by_ip = {}
        finally:
            fut, self._inflight = self._inflight, None
            fut.set_result(None)

    async def lookup(self, ip: str) -> Identity | None:
        self.lookups += 1
        ip = _norm_ip(ip)
        if self._inflight is not None:  # a fetch is under way: its answer is the freshest
            await asyncio.shield(self._inflight)
        now = time.monotonic()
        if now - self.fetched_at > self.cache_ttl and now - self.tried_at > MISS_REFRESH:
            await self._refresh()
        found = self.by_ip.get(ip)
        if found is None and not self.failing and time.monotonic() - self.tried_at > MISS_REFRESH:
            await self._refresh()  # a container started since the last fetch
            found = self.by_ip.get(ip)
        return found

    def stats(self) -> dict[str, Any]:
        return {
            "socket": self.socket_path,
            "containers": len(self.by_ip),
            "lookups": self.lookups,
            "fetches": self.fetches,
            "reachable": not self.failing,
        }
