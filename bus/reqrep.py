"""Request/reply control channel: a ROUTER server and a Lazy Pirate client.

The client retries a bounded number of times and reopens its socket after each
timeout, so a dead peer yields ServiceUnavailable quickly instead of a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import zmq
import zmq.asyncio

from . import curve

log = logging.getLogger("greyproxy.bus")

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


class ServiceUnavailable(Exception):
    """The peer did not answer in time (it is down, or too busy)."""

    def __init__(self, service: str, detail: str = "") -> None:
        super().__init__(f"{service} is not answering{': ' + detail if detail else ''}")
        self.service = service
        self.detail = detail


class RemoteError(Exception):
    """The peer answered with an error (our request was bad, or it failed)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ControlServer:
    """Answers {"id","op","args"} requests with {"id","ok","result"|"error","status"}."""

    def __init__(self, endpoint: str, handlers: dict[str, Handler], ctx: zmq.asyncio.Context | None = None) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        curve.secure(self._sock, endpoint, server=True)
        self._sock.bind(endpoint)
        if endpoint.startswith("ipc://"):
            try:
                os.chmod(endpoint[len("ipc://") :], 0o600)
            except OSError:
                pass
        self.handlers = dict(handlers)
        self.handlers.setdefault("ping", lambda args: {"pong": True, "pid": os.getpid()})

    async def serve(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            asyncio.create_task(self._answer(frames))

    async def _answer(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            return
        ident, body = frames[0], frames[-1]
        reply: dict[str, Any]
        try:
            req = orjson.loads(body)
            rid, op, args = req.get("id"), req.get("op"), req.get("args") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return
        handler = self.handlers.get(op)
        if handler is None:
            reply = {"id": rid, "ok": False, "error": f"unknown op: {op}", "status": 400}
        else:
            try:
                result = handler(args)
                if asyncio.iscoroutine(result):
                    result = await result
                reply = {"id": rid, "ok": True, "result": result}
            except RemoteError as exc:
                reply = {"id": rid, "ok": False, "error": str(exc), "status": exc.status}
            except ServiceUnavailable as exc:  # a process this one asks did not answer: said, no traceback
                log.warning("control op %s: %s", op, exc)
                reply = {"id": rid, "ok": False, "error": str(exc), "status": 503}
            except Exception as exc:  # a handler bug must not kill the control loop
                log.exception("control op %s failed", op)
                reply = {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}", "status": 500}
        try:
            await self._sock.send_multipart([ident, b"", orjson.dumps(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self._sock.close()


class ControlClient:
    """Async Lazy Pirate client: timeout per try, bounded tries, a fresh socket after each timeout."""

    _ids = itertools.count(1)

    def __init__(
        self,
        endpoint: str,
        service: str,
        timeout: float = 0.8,
        retries: int = 3,
        ctx: zmq.asyncio.Context | None = None,
        server_key: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.server_key = server_key  # tcp:// only: the peer's CURVE public key (default bus.serverKey)
        self.service = service
        self.timeout = timeout
        self.retries = max(1, retries)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()

    def _open(self) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue only to a connected peer, so a dead peer does not accumulate requests.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        curve.secure(sock, self.endpoint, server=False, server_key=self.server_key)
        sock.connect(self.endpoint)
        return sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = None

    async def call(
        self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None, retries: int | None = None
    ) -> Any:
        timeout = self.timeout if timeout is None else timeout
        tries = self.retries if retries is None else max(1, retries)
        async with self._lock:
            for _attempt in range(tries):
                if self._sock is None:
                    self._sock = self._open()
                rid = next(self._ids)
                body = orjson.dumps({"id": rid, "op": op, "args": args or {}})
                deadline = asyncio.get_running_loop().time() + timeout
                try:
                    await self._sock.send_multipart([b"", body], zmq.NOBLOCK)
                except zmq.Again:
                    # No connected peer yet (a fresh socket connects asynchronously): wait up to
                    # this try's timeout for the connection, then send; reopen if it never comes.
                    sent = False
                    if await self._sock.poll(timeout * 1000, zmq.POLLOUT):  # type: ignore[call-arg]  # pyzmq types poll() without flags
                        try:
                            await self._sock.send_multipart([b"", body], zmq.NOBLOCK)
                            sent = True
                        except zmq.Again:
                            pass
                    if not sent:
                        self._reset()
                        continue
                while True:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    if not await self._sock.poll(remaining * 1000, zmq.POLLIN):  # type: ignore[call-arg]  # as above
                        break
                    try:
                        # (the poll said a message is there: take it without waiting, as a recv
                        # that waits has no deadline; a readiness that was not one polls again)
                        frames = await self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    try:
                        reply = orjson.loads(frames[-1])
                    except orjson.JSONDecodeError:
                        continue
                    if reply.get("id") != rid:
                        continue  # a late answer to an earlier, abandoned try
                    if reply.get("ok"):
                        return reply.get("result")
                    raise RemoteError(reply.get("error", "error"), int(reply.get("status", 400)))
                self._reset()
            raise ServiceUnavailable(self.service, f"no answer after {tries} tries of {timeout:.1f}s")

    def close(self) -> None:
        self._reset()


def call_sync(
    endpoint: str, service: str, op: str, args: dict[str, Any] | None = None, timeout: float = 0.8, retries: int = 3
) -> Any:
    """Blocking form for CLI commands and worker threads (runs its own short event loop)."""

    async def go() -> Any:
        ctx = zmq.asyncio.Context()
        client = ControlClient(endpoint, service, timeout, retries, ctx=ctx)
        try:
            return await client.call(op, args)
        finally:
            client.close()
            ctx.term()

    return asyncio.run(go())
