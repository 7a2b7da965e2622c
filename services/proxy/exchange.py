"""One HTTP/1.x request/response exchange between a client and an upstream connection: the one
state machine used by the HTTP forward proxy (`http_proxy.py`) and by interception (`mitm.py`).

The request head has been read, decided and passed the request hooks; `Exchange.run` sends the
upstream head, relays the request body in the background, reads the answer (interim 1xx
relayed on the way), streams the final response back as it arrives, and ends in one of the
final states below. Its state is explicit (`Exchange.state`, after h11's `_state.py`), and each
step may only move along `TRANSITIONS`:

    SEND_REQUEST ─▶ AWAIT_RESPONSE ─┬─(1xx)──▶ AWAIT_RESPONSE
                                    ├─(101)──▶ SWITCHED ─▶ DONE      bytes both ways until either ends
                                    ├────────▶ SEND_RESPONSE ─┬─▶ DONE
                                    │                         └─▶ FAILED  502 if none of it was sent, else cut off
                                    ├────────▶ FAILED   502 / 504 / 400 answered, or the client left
                                    └────────▶ STALE    a reused upstream closed unanswered: send again

Whose fault: an origin that answers badly (a head that does not parse or is too long, framing
that does not add up, a chunk size like `ZZZ`, a 101 nobody asked for) is the origin's: the client
gets `502` with the reason while nothing of the response has been sent (body bytes that arrived
with the head are checked before the head goes out), and its connection stays open when its own
request was read in full. Once the response head has gone out, a broken body can only cut the
client off. A malformed request body is the client's: `400`. Every ending is in the transaction
record, with `error` saying what went wrong.

Not here: reading the request head, the decision, the hooks (callers); connections (callers own
them, except that an upstream this exchange cannot leave reusable is closed by it).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from . import http1
from .conn import Conn, ConnClosed, WriteStalled
from .http1 import parse_response_head, render_response_head
from .httpio import body_error, cancel, error_response, phrase, read_head, relay_body, start_body
from .pipeline import Stream, Txn, relay
from .tls import TlsStream

__all__ = [
    "AWAIT_RESPONSE",
    "DONE",
    "Exchange",
    "FAILED",
    "RETRYABLE",
    "SEND_REQUEST",
    "SEND_RESPONSE",
    "STALE",
    "STATES",
    "SWITCHED",
    "State",
    "TRANSITIONS",
    "upstream_version",
]


class State:
    """One state of an exchange (a sentinel compared by identity, as h11's; cheap to hash)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<State {self.value}>"


SEND_REQUEST = State("send_request")  # the upstream head goes out, the request body starts
AWAIT_RESPONSE = State("await_response")  # reading the origin's answer (1xx relayed on the way)
SEND_RESPONSE = State("send_response")  # the final head and its body go to the client
SWITCHED = State("switched")  # 101: bytes both ways until either side ends
DONE = State("done")  # ended; see client_keep / upstream_reusable
FAILED = State("failed")  # answered with an error of ours, or cut off
STALE = State("stale")  # a reused upstream closed unanswered: send it again
STATES = (SEND_REQUEST, AWAIT_RESPONSE, SEND_RESPONSE, SWITCHED, DONE, FAILED, STALE)

TRANSITIONS: dict[State, frozenset[State]] = {
    SEND_REQUEST: frozenset({AWAIT_RESPONSE}),
    AWAIT_RESPONSE: frozenset({AWAIT_RESPONSE, SEND_RESPONSE, SWITCHED, FAILED, STALE}),
    SEND_RESPONSE: frozenset({DONE, FAILED}),
    SWITCHED: frozenset({DONE}),
    DONE: frozenset(),
    FAILED: frozenset(),
    STALE: frozenset(),
}

# Requests that may be sent again on a new connection when a kept one turns out closed (RFC 9110
# §9.2.2: idempotent), and only without a body (its bytes are gone once relayed).
RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def upstream_version(head: http1.RequestHead) -> str:
    """An HTTP/1.0 client's request goes upstream as HTTP/1.0, so its answer is never chunked."""
    return "1.0" if head.version == "1.0" else "1.1"


def new_exchange(
    client: Stream, upstream: Stream, head: http1.RequestHead, limits: Any, txn: Txn | None, reused: bool
) -> Exchange:
    """`Exchange(client, upstream, head, limits, txn, reused)` (compiled: made and set up by C calls,
    without __init__'s Python arguments; the kept-alive cycle makes one per request)."""
    ex = Exchange.__new__(Exchange)
    ex._setup(client, upstream, head, limits, txn, reused)
    return ex


def _counted(ex: Exchange, sink: Callable[[bytes | memoryview], None] | None, data: bytes | memoryview) -> None:
    """The request body's sink (`Exchange.send`): its progress counted, then the record's sink."""
    ex._body_bytes += len(data)
    if sink is not None:
        sink(data)


def _write(stream: Stream, data: bytes) -> None:
    """`stream.write(data)` (compiled: a connection's write is a C call, exchange.pxd)."""
    if isinstance(stream, Conn):
        conn: Conn = stream
        conn.write(data)
        return
    stream.write(data)


def _buffer(stream: Stream) -> bytearray:
    """`stream.buf` (compiled: a connection's read as a C struct field, exchange.pxd)."""
    if isinstance(stream, Conn):
        conn: Conn = stream
        return conn.buf
    return stream.buf


def _socket_of(stream: Any) -> Any:
    """The connection whose socket carries `stream`: the raw one under TLS."""
    return stream.raw if type(stream) is TlsStream else stream


class Exchange:
    """One request/response. After `run`: `state` (DONE, FAILED or STALE), `client_keep` (the client
    connection may carry another request), `upstream_reusable` (the upstream connection ended the
    exchange cleanly and may serve another; when False this exchange has closed it), `error`."""

    __slots__ = (
        "client",
        "upstream",
        "head",
        "limits",
        "txn",
        "reused",
        "state",
        "client_keep",
        "upstream_reusable",
        "error",
        "final",
        "status",
        "_body",
        "_continued",
        "_interim_seen",
        "_owed",
        "_reader",
        "_body_sent",
        "_body_bytes",
        "_left",
        "_passed",
    )

    def __init__(
        self,
        client: Stream,
        upstream: Stream,
        head: http1.RequestHead,
        limits: Any,
        txn: Txn | None = None,
        reused: bool = False,
    ) -> None:
        self._setup(client, upstream, head, limits, txn, reused)

    def _setup(
        self, client: Stream, upstream: Stream, head: http1.RequestHead, limits: Any, txn: Txn | None, reused: bool
    ) -> None:
        """`__init__`'s work (`new_exchange` calls it on an Exchange made without __init__)."""
        self.client = client
        self.upstream = upstream
        self.head = head
        self.limits = limits
        self.txn = txn
        self.reused = reused  # the upstream served a request before (it may have gone stale since)
        self.state = SEND_REQUEST
        self.client_keep = False
        self.upstream_reusable = False
        self.error: str | None = None
        self.final: http1.ResponseHead | None = None  # the response relayed to the client
        self.status: int | None = None  # what the client was answered when it was not `final`
        self._body: asyncio.Task | None = None  # the request body relay
        self._continued = False  # a 100 Continue came
        self._interim_seen = False  # any 1xx came
        self._owed = False  # the request body is still owed when the answer is complete
        self._reader: http1.BodyReader | None = None  # the response body's rest, when `step` sent the head
        self._body_sent = False  # the request body went out with the head (`send`)
        self._left = False  # the client left while the answer was awaited or relayed (`client_left`)
        self._body_bytes = 0  # request body bytes the background relay has passed on (its progress)
        # The response body's bytes the client was handed as of the last write of it: what the record
        # counted then, less what the client's transport still held (`_mark`, `_undelivered`).
        self._passed = 0

    def _to(self, state: State) -> None:
        transitions = TRANSITIONS  # (typed, compiled: the look-ups in C)
        allowed = transitions[self.state]
        if state not in allowed:
            raise RuntimeError(f"exchange: {self.state.value} → {state.value} is not a transition")
        self.state = state

    async def run(self, request: bytes) -> State:
        """Send `request` (the upstream head) and see the exchange through; the final state.

        The usual exchange (an answer whose body came with its head) awaits nothing but the
        response head: the steps are plain methods, and only the longer paths are coroutines."""
        self.send(request)
        return await self.proceed()

    def send(self, request: bytes, body: bytes | None = None) -> None:
        """SEND_REQUEST → AWAIT_RESPONSE: the upstream head goes out, a request body starts relaying.
        `body`: the whole (Content-Length) request body, already read: it goes out with the head."""
        head, t = self.head, self.txn
        if body is not None:
            if t is not None:
                t.req_sink()(body)
            self._body_sent = True
            _write(self.upstream, request + body)
            self._to(AWAIT_RESPONSE)
            return
        _write(self.upstream, request)
        if self.state is SEND_REQUEST:  # (`_to`'s check for this one transition, inline)
            self.state = AWAIT_RESPONSE
        else:
            self._to(AWAIT_RESPONSE)
        if head.chunked or (head.content_length or 0) > 0:
            sink = t.req_sink() if t is not None else None
            reader = http1.BodyReader(head.content_length, head.chunked, sink=functools.partial(_counted, self, sink))
            self._body = start_body(self.client, self.upstream, reader, self.limits.idle_timeout)

    def step(self) -> bool:
        """Without waiting (the kept-alive cycle in `keepalive.py`, a request without a body): when
        upstream.buf holds the final answer's head, send it on with the body bytes that came with it.
        True when that ended the exchange (`_end` done); False when `proceed` must go on: nothing
        consumed (no complete head yet, a 1xx or 101, a head that does not parse: `proceed` meets the
        same), or the head went out and the rest of the body is to be relayed."""
        buf = _buffer(self.upstream)
        if self.state is not AWAIT_RESPONSE or self._body is not None or not buf:
            return False
        try:
            # (the name imported: compiled, a C call, exchange.pxd; not the module's attribute through Python)
            got = parse_response_head(bytes(buf), self.limits.max_header_bytes, self.head.method)
        except http1.UpstreamError:
            return False
        if got is None or got[0].status < 200:
            return False
        resp, n = got
        del buf[:n]
        more = self._send_head(resp)
        if more is not None:
            self._reader = more
            return False
        if self.state is SEND_RESPONSE:
            self._done(resp)
        self._end()
        return True

    def pump(self) -> bool:
        """SEND_RESPONSE without waiting (after `step` sent the head): the body bytes in upstream.buf
        go on to the client, and the upstream's end ends a body read until close. True when the
        exchange ended (`_end` done), as `relay_body` would end it; False: more body is to come."""
        reader, upstream, client = self._reader, self.upstream, self.client
        assert reader is not None and self.state is SEND_RESPONSE
        if upstream.buf:
            try:
                data, rest, done = reader.feed(upstream.take())
            except http1.UpstreamError as exc:
                self._cut_off(f"bad response from upstream: {exc}")
                self._end()
                return True
            if rest:
                upstream.buf[:0] = rest
            if data:
                client.write(data)
                if client.closed:  # what relay_body's drain says
                    self._cut_off(self._client_gone("during the response"))
                    self._end()
                    return True
                self._mark()
            if done:
                self._done(self.final)  # type: ignore[arg-type]
                self._end()
                return True
        if upstream.eof:
            if reader.until_close and not self._left:
                self._done(self.final)  # type: ignore[arg-type]
            else:
                self._cut_off(
                    self._client_gone("during the response")
                    if client.closed or self._left
                    else "the upstream closed before the response body ended"
                )
            self._end()
            return True
        return False

    def stalled(self) -> bool:
        """The upstream said nothing for `idle_timeout` in the middle of the body (`pump`'s deadline)."""
        self._cut_off("the upstream stalled in the middle of the response body")
        self._end()
        return True

    async def proceed(self) -> State:
        """The rest of the exchange after `send` (or after a `step` that left the body to relay)."""
        head, limits, upstream = self.head, self.limits, self.upstream
        max_bytes, method = limits.max_header_bytes, head.method

        # (A partial, not an inner function: compiled, a coroutine's locals live in a scope its inner
        # functions refer back to, a cycle that kept each exchange, its record and its 2 MiB body copy
        # until the collector ran: hundreds of MB under large intercepted responses.)
        parse = functools.partial(http1.parse_response_head, max_header_bytes=max_bytes, request_method=method)

        # The client's connection (the socket under TLS) tells this exchange of its end while the
        # answer is awaited or relayed (unless someone else watches it: the kept-alive cycle does
        # that itself).
        raw: Any = _socket_of(self.client)  # a Conn (or a test's stream)
        watch = None
        if (
            not limits.half_closed_clients and getattr(raw, "watcher", False) is None
        ):  # (a stream without one: not watched)
            watch = raw.watcher = self._client_event
            if raw.eof:  # it left already (while the upstream was connected, say)
                self.client_left()
        try:
            if self.state is SEND_RESPONSE and self._reader is not None:
                await self._relay_response_body(self._reader, drain=True)
                if self.state is SEND_RESPONSE:
                    self._done(self.final)  # type: ignore[arg-type]
            progress = 0  # the request body's bytes relayed when the upstream's deadline last came
            while self.state is AWAIT_RESPONSE:
                try:
                    got = await read_head(upstream, limits, parse, limits.idle_timeout)
                except asyncio.TimeoutError:
                    body = self._body
                    if body is not None and self._body_taken() != progress:
                        # The request body is still on its way (an upload longer than idle_timeout,
                        # or an origin that reads it slowly: relayed, or still in this side's
                        # buffers; the relay has its own deadlines): an origin answers once it has
                        # it, so its deadline runs again from here.
                        progress = self._body_taken()
                        continue
                    self._fail(504, "the upstream did not answer in time")
                    break
                except http1.UpstreamError as exc:
                    self._fail(502, f"bad response from upstream: {exc}")
                    break
                except http1.HttpError:  # read_head's "closed mid-head"
                    if self._left:
                        self._unanswered()
                        break
                    self._fail(
                        502, "bad response from upstream: the connection closed in the middle of the response head"
                    )
                    break
                if got is None:
                    self._unanswered()
                    break
                resp, n = got
                if resp.status >= 200:
                    del upstream.buf[:n]
                    more = self._send_head(resp)
                    if more is not None:
                        await self._relay_response_body(more)
                    if self.state is SEND_RESPONSE:
                        if self._body is not None:
                            await self._request_body_end()
                        self._done(resp)
                elif resp.status == 101:
                    await self._switch(resp, n)
                else:
                    self._interim(resp, n)
        finally:
            if watch is not None and raw.watcher is watch:
                raw.watcher = None
            if self._body is not None and not self._body.done():
                await cancel(self._body)
            self._end()
        return self.state

    def _body_taken(self) -> int:
        """Request body bytes the upstream has taken: relayed, less what its transport and kernel
        still hold (an origin reading slowly moves this while the relay waits on its drain)."""
        unsent = getattr(_socket_of(self.upstream), "unsent", None)
        return self._body_bytes - (unsent() if unsent is not None else 0)

    def _client_event(self) -> None:
        """The client connection's watcher while `proceed` waits: bytes (a pipelined request: they
        wait in its buffer) or its end."""
        if _socket_of(self.client).eof:
            self.client_left()

    def client_left(self) -> bool:
        """The client's connection ended (its EOF or close) while the answer was awaited or relayed,
        the request all sent: nobody will read the answer, so the upstream is aborted now (an LLM
        stops generating a completion nobody reads) rather than at the next write that fails, and
        the record says the client went away. A client that only half-closed is treated the same
        (as squid's and nginx's defaults do; `proxy.halfClosedClients: true` keeps answering it).
        False, nothing done: not in those states, a request body still on its way (its relay ends
        the exchange), or the upstream already closing (Greyproxy closes both when a rule that
        allowed them is revoked: the record says that, not that the client left)."""
        state = self.state
        if self._left or (state is not AWAIT_RESPONSE and state is not SEND_RESPONSE):
            return False
        body = self._body
        if body is not None and not body.done():
            return False
        up = self.upstream
        conn = _socket_of(up)
        transport = getattr(conn, "transport", None)
        if conn.closed or (transport is not None and transport.is_closing()):
            return False  # already ending: Greyproxy closing both (a rule revoked), or the origin's close
        self._left = True
        up.abort()
        return True

    def _end(self) -> None:
        """The exchange is over (or abandoned): an upstream it cannot leave reusable is closed, and
        the record sent (unless it is to be sent again: STALE)."""
        t = self.txn
        if not self.upstream_reusable:
            if self.state is DONE and self.error is None:
                self.upstream.close()  # e.g. `Connection: close` from the origin: its last bytes go first
            else:
                self.upstream.abort()
        if t is not None and self.state is not STALE:
            t.finish(self.final, self.status, "allowed", self.error)  # (positional: a C call, exchange.pxd)

    # -- AWAIT_RESPONSE --
    def _interim(self, resp: http1.ResponseHead, n: int) -> None:
        """A 1xx (not 101): relayed, and the answer is still to come."""
        raw = self.upstream.take(n).lstrip(b"\r\n")  # blank lines the parser tolerated before it
        if self.head.version != "1.0":  # RFC 9110 §15.2: never a 1xx to an HTTP/1.0 client
            self.client.write(raw)
        self._continued = self._continued or resp.status == 100
        self._interim_seen = True
        self._to(AWAIT_RESPONSE)

    def _unanswered(self) -> None:
        """The upstream closed without a byte of answer."""
        head = self.head
        # Nobody is left to answer when the client connection closed: the client left, or the proxy
        # closed both connections (a rule that allowed them revoked, an identity rotated). Then the
        # request is never sent again: after a revocation it must not leave a second time.
        gone = self.client.closed or self._left
        if (
            not gone
            and self.reused
            and self._body is None
            and not self._body_sent
            and not self._interim_seen
            and head.method in RETRYABLE
        ):
            self._to(STALE)  # the origin closed the kept connection as the request went out
            return None
        exc = body_error(self._body)
        if isinstance(exc, http1.HttpError):  # the client's body was malformed (it aborted the upstream)
            return self._fail(exc.status, str(exc), reason=exc.reason, client_fault=True)
        if isinstance(exc, WriteStalled):  # the origin stopped reading the body (its relay aborted it)
            return self._fail(
                504,
                "the upstream did not answer in time: it took no byte of the request body for "
                f"{self.limits.idle_timeout:g} s",
            )
        if exc is not None and (gone or self.client.eof or isinstance(exc, TimeoutError)):
            # The client went away (or stalled) in the middle of its body: nobody left to answer.
            self.error = self._body_failure(exc)
            self._to(FAILED)
            return None
        if gone:  # not the origin's fault
            self.error = self._client_gone("before the answer came")
            self._to(FAILED)
            return None
        # (A body relay that failed because the upstream closed under it is the origin's doing too.)
        return self._fail(502, "upstream closed the connection without answering")

    def _client_gone(self, when: str) -> str:
        """Why the client's connection is closed. With the upstream closed too, Greyproxy may have
        closed both (a rule that allowed them revoked, an identity rotated: gate.close_revoked,
        close_identities abort both at once), which the connections alone cannot tell from a client
        that reset its connection: the record says both."""
        if self.upstream.closed and not self._left:
            return f"the client connection closed {when} (the client left, or Greyproxy closed both: a rule or identity revoked)"
        return f"the client went away {when}"

    def _body_failure(self, exc: BaseException) -> str:
        """Why the request body did not all reach the upstream, saying whose doing it was."""
        if isinstance(exc, TimeoutError):
            why = "the client stalled in the middle of it"
        elif isinstance(exc, WriteStalled):
            why = f"the upstream took no byte of it for {self.limits.idle_timeout:g} s"
        elif self.client.eof or self.client.closed:
            why = "the client closed its connection in the middle of it"
        elif self.upstream.closed:
            why = "the upstream closed its connection in the middle of it"
        else:
            why = str(exc) or type(exc).__name__
        return f"the request body did not arrive: {why}"

    def _fail(self, status: int, text: str, reason: str | None = None, client_fault: bool = False) -> None:
        """Answer the client with an error of ours; its connection stays open when its request was
        read in full (and it wants that), the upstream one is dropped."""
        body = self._body
        request_read = body is None or (body.done() and not body.cancelled() and body.exception() is None)
        # (An HTTP/1.0 client would need `Connection: keep-alive` on our answer: it is simply closed.)
        keep = self.head.keep_alive and self.head.version != "1.0" and request_read and not client_fault
        self.client.write(error_response(status, reason or phrase(status), f"Greyproxy: {text}", close=not keep))
        self.client_keep = keep
        self.upstream_reusable = False
        self.final, self.status, self.error = None, status, text
        if self.txn is not None:
            self.txn.resp = None  # nothing of the origin's body reached the client
        self._to(FAILED)
        return None

    # -- SWITCHED --
    async def _switch(self, resp: http1.ResponseHead, n: int) -> None:
        """101: relay both ways until either side ends (only for a request that asked to upgrade)."""
        if self.head.upgrade is None:
            self._fail(
                502, "bad response from upstream: 101 Switching Protocols to a request that asked for no upgrade"
            )
            return
        self._to(SWITCHED)
        self.client.write(self.upstream.take(n))
        await cancel(self._body)  # its read ends before the relay's starts
        self.final = resp
        observers: tuple[Any, Any] = (None, None)
        t = self.txn
        if t is not None:
            t.finish(resp)
            observers = t.websocket_observers(resp)
        await relay(self.client, self.upstream, self.limits.idle_timeout, *observers)
        self._to(DONE)

    # -- SEND_RESPONSE --
    def _send_head(self, resp: http1.ResponseHead) -> http1.BodyReader | None:
        """The final head goes to the client, with the body bytes already here (checked first: a bad
        start is still a clean 502). The reader when more body is to come, else None."""
        if self.state is AWAIT_RESPONSE:  # (`_to`'s check for this one transition, inline)
            self.state = SEND_RESPONSE
        else:
            self._to(SEND_RESPONSE)
        head, upstream, t, body = self.head, self.upstream, self.txn, self._body
        # Answered without a 100 while the body is still owed: the client may never send it
        # (RFC 9110 §10.1.1), and bytes it sends next could be either the body or a new request.
        # So this exchange ends both connections instead of waiting for (or guessing at) them.
        self._owed = head.expect_continue and not self._continued and body is not None and not body.done()
        self.client_keep = keep = head.keep_alive and not resp.until_close and not self._owed
        # (positional: C calls, exchange.pxd)
        if not resp.has_body:
            _write(self.client, render_response_head(resp, keep, b""))
            self.final = resp
            return None
        size, buf = resp.content_length, _buffer(upstream)
        if size is not None and not resp.chunked and len(buf) >= size:
            # The whole (Content-Length) body came with the head, as a small answer does: it leaves
            # with the head in one send (joined with it once), with no reader (what one would pass on
            # and capture).
            whole = buf[:size]  # (a copy: the record's capture and the head's join take any bytes-like)
            out = render_response_head(resp, keep, whole)
            del buf[:size]
            if t is not None:
                t.resp_sink(resp)(whole)
            _write(self.client, out)
            self.final = resp
            return None
        out = render_response_head(resp, keep, b"")
        reader = http1.BodyReader(
            resp.content_length,
            resp.chunked,
            until_close=resp.until_close,
            sink=t.resp_sink(resp) if t is not None else None,
            response=True,
        )
        done = False
        if upstream.buf:
            # The body bytes already here leave with the head in one send (one wakeup of the client).
            try:
                data, rest, done = reader.feed(upstream.take())
            except http1.UpstreamError as exc:
                self._fail(502, f"bad response from upstream: {exc}")
                return None
            if rest:
                upstream.buf[:0] = rest
            out += data
        _write(self.client, out)
        self.final = resp
        if done:
            return None
        self._mark()
        return reader

    async def _relay_response_body(self, reader: http1.BodyReader, drain: bool = False) -> None:
        """The rest of the response body (`drain`: a write of `pump` may still be waiting to go out)."""
        client = self.client
        try:
            if drain:
                await client.drain(self.limits.idle_timeout)
            await relay_body(self.upstream, client, reader, self.limits.idle_timeout, self._mark)
            if self._left:  # (a body read until close ends at the abort: not the whole body)
                self._cut_off(self._client_gone("during the response"))
        except WriteStalled:
            # The client stopped reading: nothing passes either way, so proxy.idleTimeout ends it
            # as it ends an idle tunnel (before, it held both connections until the client left).
            self._cut_off(f"the client took no byte of the response for {self.limits.idle_timeout:g} s")
        except http1.UpstreamError as exc:
            self._cut_off(f"bad response from upstream: {exc}")
        except asyncio.TimeoutError:
            self._cut_off("the upstream stalled in the middle of the response body")
        except ConnClosed:
            self._cut_off(
                self._client_gone("during the response")
                if client.closed or self._left
                else "the upstream closed before the response body ended"
            )

    async def _request_body_end(self) -> None:
        """The response is out; the request body must have ended too for both connections to go on."""
        if self._owed:
            return
        body = self._body
        assert body is not None
        try:
            # Not wait_for: from Python 3.12 on it needs a current task, and an intercepted tunnel's
            # request past its first wait runs from the connection's callbacks (keepalive.py).
            if not body.done():
                await asyncio.wait((body,), timeout=self.limits.idle_timeout)
                if not body.done():
                    body.cancel()  # (as wait_for's timeout; `proceed` waits for its end)
                    raise asyncio.TimeoutError
            body.result()
        except (asyncio.TimeoutError, ConnClosed, WriteStalled, http1.HttpError) as exc:
            self.error = self._body_failure(exc)
            self._owed = True

    def _done(self, resp: http1.ResponseHead) -> None:
        if self._owed:
            self.client_keep = False
            self.upstream.abort()  # it may still wait for the body nobody will send
        else:
            self.upstream_reusable = resp.keep_alive and not resp.until_close
        if self.state is SEND_RESPONSE:  # (`_to`'s check for this one transition, inline)
            self.state = DONE
        else:
            self._to(DONE)

    def _cut_off(self, text: str) -> None:
        """The response broke after its head went out: the client can only be cut off."""
        self.error = text
        self.client_keep = False
        self.upstream_reusable = False
        self._undelivered()  # (before the abort drops what the client's transport still holds)
        self.client.abort()
        self._to(FAILED)

    def _mark(self) -> None:
        """After a write of the response body to the client (while it is connected): the bytes of it
        handed over so far, for the record of a cut (`_undelivered`)."""
        t = self.txn
        cap = t.resp if t is not None else None
        if cap is None:
            return
        transport = getattr(_socket_of(self.client), "transport", None)
        pending = transport.get_write_buffer_size() if transport is not None else 0
        passed = cap.size - pending
        self._passed = passed if passed > 0 else 0

    def _undelivered(self) -> None:
        """A cut response's record counts the body bytes the client was handed, not those read from
        the origin: less what its transport still holds (dropped by the abort), and less what came
        after the client went away (written nowhere). A client gone already: as of the last write
        (`_mark`; its transport's buffer is emptied by then). The stored copy is cut to the same."""
        t = self.txn
        cap = t.resp if t is not None else None
        if cap is None:
            return
        raw = _socket_of(self.client)
        transport = getattr(raw, "transport", None)
        if not raw.closed and transport is not None and not transport.is_closing():
            passed = cap.size - transport.get_write_buffer_size()
            if passed < 0:
                passed = 0
        else:
            passed = self._passed
        if passed < cap.size:
            cap.size = passed
            if len(cap.data) > passed:
                del cap.data[passed:]
