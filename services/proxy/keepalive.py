"""The kept-alive request cycle of the HTTP forward proxy, run in the connections' callbacks.

Once a client connection's request has ended with its upstream connection kept clean, the next
requests for the same destination usually need no waiting at all: the head (and a Content-Length
body, if any) is read in full, the gate answers from its rules, the hooks answer at once, the request goes out on the kept upstream
connection, and the origin's answer arrives with its body (or its body streams on from the
upstream's callbacks while the client takes it). `KeptAlive` serves those requests from
the connections' protocol callbacks (`Conn.watcher`): no task wakeup, future or coroutine frame
per read. The request steps themselves are the handler's own (`prepare`, a coroutine that does
not suspend in that case, driven here by hand) and the exchange is `exchange.Exchange`
(`send`, `step`), so both ways give the same answers and the same records.

Anything else is handed back to the handler's coroutine (`http_proxy.handle_http`) at the point
reached, with what was done so far (`Handover`):

    READ      the client's bytes are not a complete head, or it closed: read it as usual
    HEAD      a complete head this cycle does not serve (a new destination, a chunked body or one
              not all here, an upgrade, CONNECT, a name or secret to check again, a bad
              scheme...): nothing of it consumed
    PREPARE   the request steps have to wait (a hold, a lookup, a hook): the suspended coroutine
    EXCHANGE  the answer needs the handler (a 1xx, a head split over reads, the origin closing
              before the head, a client whose buffer is full in the middle of the body): the
              exchange in its state, continued by `Exchange.proceed`
    END       the connection is done (no keep-alive, an answer that ends it, idle too long)
    RAISE     a step raised: re-raised by the handler

Deadlines are the usual ones: between requests the next one's first byte may take `idle_timeout`
(then the connection ends, as the coroutine's read would end it), the origin's answer too (then
504, as `Exchange.proceed` answers), and each read of its body (then it is cut off, as
`relay_body` does). One timer per connection enforces them, re-armed only
when it fires before the current deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from . import http1
from .conn import Conn
from .exchange import AWAIT_RESPONSE, SEND_RESPONSE, Exchange
from .pool import usable

if TYPE_CHECKING:
    from .context import ClientConn
    from .gate import Verdict
    from .identities import IdentityGuard
    from .pipeline import Txn

__all__ = ["END", "EXCHANGE", "HEAD", "PREPARE", "RAISE", "READ", "Handover", "KeptAlive", "Prepared", "resume"]

# (verdict, transaction record, upstream request head) of a request that passed the gate and hooks
Prepared = tuple["Verdict", "Txn | None", bytes]
PrepareFn = Callable[[http1.RequestHead, str], Coroutine[Any, Any, "Prepared | None"]]

READ, HEAD, PREPARE, EXCHANGE, END, RAISE = "read", "head", "prepare", "exchange", "end", "raise"

# not serving; waiting for the next request; for the answer; for more of its body
_OFF, _IDLE, _AWAIT, _BODY = 0, 1, 2, 3


class Handover:
    """Where the handler's coroutine takes over (see the module doc); the fields its `kind` uses."""

    __slots__ = ("kind", "got", "head", "coro", "waiting", "prepared", "exchange", "exc")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.got: tuple[http1.RequestHead, int] | None = None  # HEAD: the parsed head, (head, length)
        self.head: http1.RequestHead | None = None  # PREPARE, EXCHANGE: the request's head
        self.coro: Coroutine[Any, Any, Prepared | None] | None = None  # PREPARE: the suspended steps
        self.waiting: Any = None  # PREPARE: what they wait for (the future they yielded)
        self.prepared: Prepared | None = None  # EXCHANGE
        self.exchange: Exchange | None = None  # EXCHANGE
        self.exc: BaseException | None = None  # RAISE


class _Resume:
    """Awaitable going on with a coroutine that was started by hand and suspended on `waiting`."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, out = self.coro, self.waiting
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation (or anything thrown in) goes to the coroutine
                try:
                    out = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    out = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> _Resume:
    """`await resume(coro, waiting)`: the result of a coroutine that `coro.send(None)` left waiting."""
    return _Resume(coro, waiting)


class KeptAlive:
    """One client connection's kept-alive cycle. `serve` runs it until a `Handover`."""

    __slots__ = (
        "client",
        "limits",
        "parse",
        "prepare",
        "known",
        "gate",
        "loop",
        "state",
        "identity",
        "upstream",
        "key",
        "cid",
        "clean",
        "exchange",
        "head",
        "prepared",
        "_fut",
        "_deadline",
        "_timer",
    )

    def __init__(
        self,
        client: ClientConn,
        parse: Callable[[bytes], tuple[http1.RequestHead, int] | None],
        prepare: PrepareFn,
        known: Callable[[ClientConn, IdentityGuard, str, http1.RequestHead], bool],
    ) -> None:
        ctx = client.ctx
        self.client, self.limits, self.gate = client, ctx.limits, ctx.gate
        self.parse, self.prepare = parse, prepare
        self.known = known  # the identity check passed before for what a head presents (http_proxy.identity_known)
        self.loop = client._loop or asyncio.get_running_loop()
        self.state = _OFF
        self.identity = ""
        self.upstream: Conn | None = None
        self.key: tuple[str, str, int] | None = None
        self.cid: int | None = None
        self.clean = False  # the upstream ended its last exchange cleanly (as the handler's `clean`)
        self.exchange: Exchange | None = None
        self.head: http1.RequestHead | None = None
        self.prepared: Prepared | None = None
        self._fut: asyncio.Future | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- the handler's side --
    def serve(
        self, identity: str, upstream: Conn, key: tuple[str, str, int], cid: int | None
    ) -> asyncio.Future[Handover]:
        """Serve requests on the kept clean `upstream` (for `key`) from the callbacks; the future's
        result says where the handler goes on (done at once when the first request is not for here)."""
        self.identity, self.upstream, self.key, self.cid, self.clean = identity, upstream, key, cid, True
        self._fut = fut = self.loop.create_future()
        self.client.watcher = self._on_client
        upstream.watcher = self._on_upstream
        self._next()
        return fut

    def stop(self) -> None:
        """The handler is gone (cancelled) while this was serving: what an abandoned exchange does."""
        if (self.state is _AWAIT or self.state is _BODY) and self.exchange is not None:
            self.clean = False
            self.exchange._end()
        self._unwatch()
        self._fut = None

    def close(self) -> None:
        """The connection is over: no timer left behind."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _unwatch(self) -> None:
        self.state = _OFF
        self.client.watcher = None
        if self.upstream is not None:
            self.upstream.watcher = None

    def _hand(self, h: Handover) -> None:
        self._unwatch()
        self.exchange = self.head = self.prepared = None
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(h)

    # -- deadlines --
    def _arm(self) -> None:
        """The current wait's deadline. Deadlines only move later (the same timeout from a later now),
        so an armed timer is never late: when it fires early it waits on (`_on_timer`)."""
        loop = self.loop
        self._deadline = deadline = loop.time() + self.limits.idle_timeout
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.state is _OFF:
            return
        loop = self.loop
        if loop.time() + 0.001 < self._deadline:  # the clock has ms steps
            self._timer = loop.call_at(self._deadline, self._on_timer)
            return
        if self.state is _IDLE:
            self._hand(Handover(END))  # as the handler's read of a next request that never came
            return
        ex = self.exchange
        assert ex is not None
        self._run(ex, self._timed_out if self.state is _AWAIT else Exchange.stalled)

    @staticmethod
    def _timed_out(ex: Exchange) -> bool:
        ex._fail(504, "the upstream did not answer in time")
        ex._end()
        return True

    # -- callbacks --
    def _on_client(self) -> None:
        if self.state is _IDLE:
            self._next()
        # While an answer is awaited the client's bytes wait in its buffer (a pipelined request is
        # read once the answer is out) and its close is seen then, as in the handler.

    def _on_upstream(self) -> None:
        state = self.state
        if state is _BODY:
            self._run(self.exchange, Exchange.pump)  # type: ignore[arg-type]
            return
        if state is not _AWAIT:
            return  # an idle kept connection that speaks or closes is not usable for the next request
        ex = self.exchange
        assert ex is not None
        if self.upstream.eof:  # type: ignore[union-attr]
            self._hand_exchange(ex)  # `proceed` reads what is there and sees the close
            return
        self._run(ex, Exchange.step)

    def _run(self, ex: Exchange, step: Callable[[Exchange], bool]) -> None:
        try:
            ended = step(ex)
        except BaseException as exc:  # what the handler would have propagated, after the exchange's end
            self.clean = False
            try:
                ex._end()
            finally:
                h = Handover(RAISE)
                h.exc = exc
                self._hand(h)
            return
        if not ended:
            if ex.state is SEND_RESPONSE and not self.client.write_paused:
                # The head went out, more body is to come: it streams from the upstream's callback
                # while the client takes it (else `proceed` waits for the client, then relays).
                self.state = _BODY
                self._arm()
                self.upstream.resume_reading()  # type: ignore[union-attr]
                return
            self._hand_exchange(ex)
            return
        self.clean = ex.upstream_reusable
        self.exchange = self.head = self.prepared = None
        if not ex.client_keep:
            self._hand(Handover(END))
            return
        self._next()

    def _hand_exchange(self, ex: Exchange) -> None:
        h = Handover(EXCHANGE)
        h.exchange, h.head, h.prepared = ex, self.head, self.prepared
        self._hand(h)

    # -- the next request --
    def _next(self) -> None:
        """Serve the client's buffered requests; wait for the next one (or hand over)."""
        client = self.client
        while True:
            if client.eof:
                self._hand(Handover(READ))
                return
            if not client.buf:
                self.state = _IDLE
                self._arm()
                client.resume_reading()
                return
            try:
                got = self.parse(bytes(client.buf))
            except http1.HttpError:
                got = None  # the handler's read answers it
            if got is None:
                self._hand(Handover(READ))
                return
            head, n = got
            if not self._servable(head, len(client.buf) - n):
                h = Handover(HEAD)
                h.got = got
                self._hand(h)
                return
            del client.buf[:n]
            self._request(head)
            return

    def _servable(self, head: http1.RequestHead, buffered: int) -> bool:
        """This cycle serves `head`, `buffered` bytes after it already here (else the handler does,
        from the head on)."""
        client, upstream = self.client, self.upstream
        name = head.proxy_user or self.identity
        ids = client.ctx.identities
        return (
            head.method != "CONNECT"
            and head.scheme == "http"
            and not head.chunked
            and (not head.content_length or head.content_length <= buffered)  # no body, or all of it here
            and head.upgrade is None
            # the handler's identity steps would do nothing: no lookup, the check passed before, no cap
            and name == client.identity
            and not client.over_cap
            and (ids is None or not (head.proxy_user or client.claimed) or self.known(client, ids, name, head))
            # the kept upstream serves it
            and self.clean
            and self.key == (name, head.host, head.port)
            and upstream is not None
            and usable(upstream)
        )

    def _request(self, head: http1.RequestHead) -> None:
        """The request steps, then the request sent upstream (or a handover)."""
        coro = self.prepare(head, self.identity)
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            prepared = stop.value
        except BaseException as exc:
            h = Handover(RAISE)
            h.exc = exc
            self._hand(h)
            return
        else:
            h = Handover(PREPARE)
            h.head, h.coro, h.waiting = head, coro, waiting
            self._hand(h)
            return
        if prepared is None:
            self._hand(Handover(END))  # answered (403, a refusal, ...): the connection ends
            return
        verdict, t, request = prepared
        upstream = self.upstream
        assert upstream is not None
        if self.cid is not None:
            lc = self.gate.live.get(self.cid)
            if lc is not None:
                lc.rule_id = verdict.rule_id
        self.clean = False
        ex = Exchange(self.client, upstream, head, self.limits, t, True)
        self.exchange, self.head, self.prepared = ex, head, prepared
        body = None
        size = head.content_length
        if size:  # all here (`_servable`); taken only now: a handler that takes over relays it itself
            buf = self.client.buf
            body = bytes(buf[:size])
            del buf[:size]
        ex.send(request, body)
        assert ex.state is AWAIT_RESPONSE
        self.state = _AWAIT  # the answer comes in the upstream's callback (its buffer was empty)
        self._arm()
        upstream.resume_reading()
