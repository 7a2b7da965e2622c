"""HTTP/1.x I/O over a `Stream` (a `Conn` or a `TlsStream`): reading a head under the header
deadline, relaying one message body, and the proxy's own short answers.

The parsing itself is sans-I/O (`http1.py`); these are the few awaits around it, shared by the
HTTP forward proxy (`http_proxy.py`), interception (`mitm.py`) and the exchange (`exchange.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

from . import http1
from .conn import ConnClosed

if TYPE_CHECKING:
    from .pipeline import Stream

__all__ = ["body_error", "cancel", "error_response", "parse_head", "phrase", "read_head", "relay_body", "start_body"]

T = TypeVar("T")

# Parsed CONNECT heads by their exact bytes. A client opens its tunnels to a destination with the
# same head every time (curl, Node, Python clients: request line, Host, User-Agent,
# Proxy-Connection), and parsing it costs more than the rest of the tunnel's admission. The parse is
# a pure function of the bytes and the limits, so a hit gives the same head, the same answers and
# the same records. Kept only for a CONNECT head that is the whole buffer (nothing pipelined after
# it) and carries no Proxy-Authorization (its password is not kept past its connection). The heads
# are shared: nothing changes a CONNECT head once parsed. Bounded: heads of up to CONNECT_HEAD_BYTES
# (a client's are ~100-300 bytes), and past CONNECT_HEADS of them it starts over (at most 2 MiB).
CONNECT_HEADS = 1024
CONNECT_HEAD_BYTES = 2048
_connect_heads: dict[bytes, tuple[http1.RequestHead, int, int, int]] = {}


def parse_head(buf: bytes, limits: Any) -> tuple[http1.RequestHead, int] | None:
    """`http1.parse_request_head` under the connection limits (`context.Limits`); CONNECT heads
    through `_connect_heads`. The HTTP listener's parse of a request head, in its handler and its
    request cycle alike (keepalive.py)."""
    if not buf.startswith(b"CONNECT "):
        return http1.parse_request_head(buf, limits.max_header_bytes, limits.max_headers)
    heads = _connect_heads  # (compiled: a dict's get, a C call; httpio.pxd)
    hit = heads.get(buf)
    if hit is not None and hit[2] == limits.max_header_bytes and hit[3] == limits.max_headers:
        return hit[0], hit[1]
    got = http1.parse_request_head(buf, limits.max_header_bytes, limits.max_headers)
    if (
        got is not None and got[1] == len(buf) <= CONNECT_HEAD_BYTES and "proxy-authorization" not in got[0].names  # type: ignore[operator]
    ):
        if len(_connect_heads) >= CONNECT_HEADS:
            _connect_heads.clear()
        _connect_heads[buf] = (got[0], got[1], limits.max_header_bytes, limits.max_headers)
    return got


async def read_head(
    conn: Stream,
    limits: Any,
    parse: Callable[[bytes], T | None],
    first_timeout: float | None,
    deadline: float | None = None,
) -> T | None:
    """Read until a full head parses (`parse(buf)` → value or None while incomplete). None when the
    peer closed cleanly before sending anything; HttpError(400) when it closed mid-head.

    Without `first_timeout` (a client's first request) the whole head must arrive within
    `limits.header_timeout`, counted from now. With it (the next request on a kept-alive
    connection, or a response), the first byte may take up to `first_timeout`, and the header
    deadline runs from that byte. TimeoutError past either. `deadline` (time.monotonic): the header
    deadline when it started before this read (a connection's first head, from accept).
    """
    # Deadlines on the monotonic clock (a vDSO call; asyncio.get_running_loop() would cost a
    # getpid() system call per head): read_more takes what remains of them.
    now = monotonic()
    if deadline is None and (first_timeout is None or conn.buf):
        deadline = now + limits.header_timeout
    idle_deadline = now + first_timeout if first_timeout is not None else None
    while True:
        if conn.buf:
            if deadline is None:
                deadline = monotonic() + limits.header_timeout
            parsed = parse(bytes(conn.buf))
            if parsed is not None:
                return parsed
        remaining = (deadline if deadline is not None else idle_deadline) - monotonic()  # type: ignore[operator]
        if remaining <= 0:
            raise asyncio.TimeoutError()
        if not await conn.read_more(remaining):
            if conn.buf:
                raise http1.HttpError(400, "incomplete request")
            return None


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(
    status: int, reason: str, text: str, close: bool = True, headers: list[tuple[str, str]] | None = None
) -> bytes:
    """A short text/plain answer of the proxy's own (403, 502, 504, ...)."""
    return http1.render_response(status, reason, (text.rstrip("\n") + "\n").encode(), headers=headers, close=close)


async def relay_body(
    src: Stream, dst: Stream, reader: http1.BodyReader, timeout: float, wrote: Callable[[], None] | None = None
) -> None:
    """Copy one message body from src to dst as-is; leftover bytes stay in src.buf.

    ConnClosed when src ends before the body does (or dst is gone), TimeoutError when src is
    silent for `timeout`, WriteStalled when dst takes nothing for as long, and the reader's framing
    errors (HttpError / UpstreamError). `wrote`:
    called after each write to dst (before its drain), while dst is open."""
    while True:
        if src.buf:
            if wrote is not None and dst.closed:  # (a response body: nothing counted past a client that left)
                raise ConnClosed()
            data, rest, done = reader.feed(src.take())
            if rest:
                src.buf[:0] = rest
            if data:
                unused = len(src.buf)  # (bytes the reader cannot use yet: a chunk's size line cut short)
                dst.write(data)
                if wrote is not None:
                    wrote()
                await dst.drain(timeout)  # (WriteStalled: dst took nothing for as long)
                if not done and len(src.buf) > unused:
                    # Bytes came in while dst drained (the body's last ones, maybe: then none would
                    # follow, and `read_more`, which waits for bytes beyond these, would wait until
                    # the timeout; an outside run saw 1 in ~100 uploads of a few MB stall so).
                    continue
            if done:
                return
        if not await src.read_more(timeout):
            if reader.until_close:
                return
            raise ConnClosed()


def start_body(src: Stream, dst: Stream, reader: http1.BodyReader, timeout: float) -> asyncio.Task:
    """Relay a request body in the background while the answer is awaited (the head is already sent:
    with `Expect: 100-continue` the client sends the body only once the upstream's 100 is relayed).
    A broken body (bad chunk framing, client gone or stalled) aborts `dst`, so the exchange ends at once."""
    task = asyncio.ensure_future(relay_body(src, dst, reader, timeout))
    task.add_done_callback(lambda t: dst.abort() if not t.cancelled() and t.exception() is not None else None)
    return task


def body_error(task: asyncio.Task | None) -> BaseException | None:
    """Why a body relay task failed, if it did (None while it runs, or when it succeeded)."""
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel and wait: the task's cleanup (a read resets its waiter) must not run after a new read."""
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
