"""The request cycle of the HTTP forward proxy, run in the connections' callbacks.

Most requests need no waiting at all: the head (and a Content-Length body, if any) is read in
full, the client's identity is known at once, the gate answers from its rules, the hooks answer at
once, the request goes out on a kept upstream connection, and the origin's answer arrives with
its body (or its body streams on from the upstream's callbacks while the client takes it).
`KeptAlive` serves those requests from the connections' protocol callbacks (`Conn.watcher`): no
task wakeup, future or coroutine frame per read. The request steps themselves are the handler's
own (`prepare`, which answers at once in that case and makes no coroutine, else gives the
coroutine of its steps from the one that waits, driven here by hand; the identity check's quick
answer) and the exchange is `exchange.Exchange` (`send`, `step`), so both ways give
the same answers and the same records.

It serves a connection from its start (`begin`, the HTTP listener's: a new connection's first
request, on an upstream parked in the pool for the same client and destination; or its CONNECT:
decision, upstream connect (`upstream.Connecting`), 200 and the tunnel's first look), and the handler's
task starts only when it hands the connection over; and it serves a handler's connection again
(`serve`) once a request left a clean upstream. A connection it served to its end (the client's
`Connection: close`, its close, its idle deadline) never had a task: the cycle releases the
upstream (parked when clean) and finishes the connection as the handler would.

Anything else is handed back to the handler's coroutine (`http_proxy.handle_http`) at the point
reached, with what was done so far (`Handover`):

    READ      the client's bytes are not a complete head, or it closed with bytes unread, or its
              first head did not come in time: read it as usual (under the first head's deadline)
    HEAD      a complete head this cycle does not serve (a new destination, a chunked body or one
              not all here, an upgrade, a CONNECT after other requests, a name to look up, a secret
              to verify or refuse, a connection cap, a bad scheme...): nothing of it consumed
    PREPARE   the request steps have to wait (a hold, a lookup, a hook): the suspended coroutine
              (a CONNECT's: its decision, `admit`; the handler then connects)
    TUNNEL    a CONNECT admitted: its upstream needs a name looked up (`connect` in the handler),
              or its tunnel (`run_tunnel`) waits a second time: the suspended coroutine
    EXCHANGE  the answer needs the handler (a 1xx, a head split over reads, the origin closing
              before the head, a client whose buffer is full in the middle of the body): the
              exchange in its state, continued by `Exchange.proceed`; or (no exchange) a first
              request prepared with no upstream parked for it: the handler connects
    END       the connection is done (no keep-alive, an answer that ends it, idle too long)
    RAISE     a step raised: re-raised by the handler

Deadlines are the usual ones: a new connection's first head must be in by `header_timeout` from
accept (else the handler answers 408, as its own read would), between requests the next one's
first byte may take `idle_timeout` (then the connection ends, as the coroutine's read would end
it), the origin's answer too (then 504, as `Exchange.proceed` answers), and each read of its body
(then it is cut off, as `relay_body` does). One timer per connection enforces them, re-armed only
when it fires before the current deadline (or a deadline moves earlier).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Generator
from time import monotonic
from typing import TYPE_CHECKING, Any

from . import http1
from .conn import Conn, FirstDeadlines
from .exchange import AWAIT_RESPONSE, SEND_RESPONSE, Exchange, new_exchange
from .gate import Verdict, new_admission
from .httpio import error_response, parse_head
from .mitm import Interceptor
from .pool import usable
from .tunnel import Tunnel, run_tunnel
from .upstream import Connecting, UpstreamFailure

if TYPE_CHECKING:
    from .context import ClientConn
    from .identities import IdentityGuard
    from .pipeline import Txn

log = logging.getLogger("greyproxy.proxy")

__all__ = [
    "END",
    "EXCHANGE",
    "HEAD",
    "PREPARE",
    "RAISE",
    "READ",
    "TUNNEL",
    "Handover",
    "KeptAlive",
    "Prepared",
    "Deadlines",
    "close_both",
    "resume",
]

# (verdict, transaction record, upstream request head) of a request that passed the gate and hooks
Prepared = tuple["Verdict", "Txn | None", bytes]
# The request steps (http_proxy.prepare): their result, or the coroutine of the steps that wait (`_drive`)
PrepareFn = Callable[["ClientConn", http1.RequestHead, str], "Prepared | None | Coroutine[Any, Any, Prepared | None]"]
# The identity check's answer without waiting (http_proxy.identity_passed): False when the handler must check
QuickFn = Callable[["ClientConn", "IdentityGuard", str, http1.RequestHead], bool]
# A CONNECT's decision (http_proxy.admit_connect): its verdict when allowed, None when answered; or
# the coroutine of the decision that waits
AdmitFn = Callable[["ClientConn", http1.RequestHead, str], "Verdict | None | Coroutine[Any, Any, Verdict | None]"]

READ, HEAD, PREPARE, EXCHANGE, TUNNEL, END, RAISE = "read", "head", "prepare", "exchange", "tunnel", "end", "raise"

# not serving; waiting for the next request; for the answer; for more of its body; for a new tunnel's
# first bytes (the tunnel hook's `first_look`)
_OFF, _IDLE, _AWAIT, _BODY, _LOOK = 0, 1, 2, 3, 4

# An exchange's steps the cycle runs (`KeptAlive._run`)
_STEP, _PUMP, _STALLED, _TIMED_OUT = 0, 1, 2, 3


class Handover:
    """Where the handler's coroutine takes over (see the module doc); the fields its `kind` uses."""

    __slots__ = ("kind", "got", "head", "coro", "waiting", "prepared", "exchange", "verdict", "exc")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.got: tuple[http1.RequestHead, int] | None = None  # HEAD: the parsed head, (head, length)
        self.head: http1.RequestHead | None = None  # PREPARE, EXCHANGE: the request's head
        self.coro: Coroutine[Any, Any, Any] | None = None  # PREPARE: the suspended steps (`prepare`, `admit_connect`)
        self.waiting: Any = None  # PREPARE: what they wait for (the future they yielded)
        self.prepared: Prepared | None = None  # EXCHANGE
        self.exchange: Exchange | None = None  # EXCHANGE (None: not sent, no upstream yet)
        self.verdict: Verdict | None = None  # TUNNEL: the CONNECT's (allowed) verdict
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


# The connection is done: one Handover for all (an END has no fields, nobody changes it).
_ENDED = Handover(END)


def resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> _Resume:
    """`await resume(coro, waiting)`: the result of a coroutine that `coro.send(None)` left waiting."""
    return _Resume(coro, waiting)


class KeptAlive:
    """One client connection's request cycle. `begin` (from accept) or `serve` (from the handler) runs
    it until a `Handover`."""

    __slots__ = (
        "client",
        "limits",
        "prepare",
        "quick",
        "admit",
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
        "verdict",
        "tunnel",
        "look",
        "looked",
        "first",
        "header_deadline",
        "handed",
        "_fut",
        "deadlines",
        "_deadline",
        "_queue",
        "_timeout",
    )

    def __init__(self, client: ClientConn, prepare: PrepareFn, quick: QuickFn, admit: AdmitFn | None = None) -> None:
        self.client = client
        ctx = self.client.ctx  # (through the typed attribute: C struct reads, compiled)
        self.limits, self.gate = ctx.limits, ctx.gate
        self.prepare = prepare  # the request steps (http_proxy.prepare)
        self.quick = quick  # the identity check without waiting (http_proxy.identity_passed)
        self.admit = admit  # a CONNECT's decision (http_proxy.admit_connect); None: CONNECT goes to the handler
        self.loop = self.client._loop or asyncio.get_running_loop()
        self.state = _OFF
        self.identity = ""
        self.upstream: Conn | None = None
        self.key: tuple[str, str, int] | None = None
        self.cid: int | None = None
        self.clean = False  # the upstream ended its last exchange cleanly (as the handler's `clean`)
        self.exchange: Exchange | None = None
        self.head: http1.RequestHead | None = None
        self.prepared: Prepared | None = None
        self.verdict: Verdict | None = None  # a CONNECT's while its upstream connects
        self.tunnel: Coroutine[Any, Any, None] | None = None  # `run_tunnel` while it waits for the first bytes
        # while it looks: the tunnel hook's `first_look`, or the hook itself when it is an Interceptor
        # (compiled: its `first_look` then a C call, keepalive.pxd)
        self.look: Any = None  # (a `first_look`, Callable[..., bool | None], or an Interceptor)
        self.looked: Tunnel | None = None  # the tunnel it looks at (tracked, not joined yet)
        self.first = True  # no request head taken from this connection yet
        self.header_deadline = 0.0  # the first head's deadline (time.monotonic), from `begin`
        self.handed: Handover | None = None  # where the handler's task starts (a connection `begin` took)
        self._fut: asyncio.Future | None = None
        self.deadlines: Deadlines = ctx.deadlines
        self._deadline = 0.0  # the current wait's (time.monotonic: `Deadlines`)
        self._queue: dict[KeptAlive, None] | None = None  # where `deadlines` keeps this cycle while it waits
        self._timeout = 0.0  # the timeout of that queue

    # -- from accept --
    def begin(self, identity: str) -> None:
        """A new connection (no handler task): its requests are served here until one needs the
        handler, which then starts where this left off (`handed`); `identity`: the default one."""
        client = self.client
        client.cycle = self
        self.identity = identity
        timeout = self.limits.header_timeout
        self.header_deadline = deadline = monotonic() + timeout
        client.watcher = self._on_client
        self.state = _IDLE
        self.deadlines.arm(self, timeout, deadline)  # (`_arm`'s, for a cycle in no queue yet)
        if client.buf or client.eof:
            self._next()

    # -- the handler's side --
    def serve(
        self, identity: str, upstream: Conn, key: tuple[str, str, int], cid: int | None
    ) -> asyncio.Future[Handover]:
        """Serve requests on the kept clean `upstream` (for `key`) from the callbacks; the future's
        result says where the handler goes on (done at once when the first request is not for here)."""
        self.identity, self.upstream, self.key, self.cid, self.clean = identity, upstream, key, cid, True
        self.first = False
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
        """The connection is over: no deadline left behind."""
        q = self._queue
        if q is not None:
            self._queue = None
            del q[self]

    def _unwatch(self) -> None:
        self.state = _OFF
        self.client.watcher = None
        if self.upstream is not None:
            self.upstream.watcher = None

    def _hand(self, h: Handover) -> None:
        self._unwatch()
        self.exchange = self.head = self.prepared = None
        fut, self._fut = self._fut, None
        if fut is not None:
            if not fut.done():
                fut.set_result(h)
            return
        client = self.client
        if client.task is not None:
            return  # the handler stopped the cycle (`stop`)
        # Begun from accept, no handler yet: the connection ends here, or the handler starts.
        if h.kind is END:
            self._finish()
        else:
            self.handed = h
            client.start()

    def _finish(self) -> None:
        """The end of a connection no handler took: what the handler's end does (its upstream
        released: parked when clean, else closed; the connection no longer counted, and closed)."""
        self.close()
        client = self.client
        client.cycle = None  # (no reference cycle left: both are freed by their counts)
        cid, self.cid = self.cid, None
        if cid is not None:
            self.gate.untrack(cid)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self.clean and self.key is not None:
                client.ctx.pool.put(self.key, upstream)
            else:
                upstream.close()
        if not client.detached:  # (a spliced tunnel's client is finished by the tunnel)
            client.finish()

    # -- deadlines --
    def _arm(self, timeout: float) -> None:
        """The current wait's deadline: `timeout` from now (`_on_timer` then)."""
        q = self._queue
        if q is not None and self._timeout == timeout:  # the usual case, inline: to the end of its queue
            self._deadline = monotonic() + timeout
            del q[self]
            q[self] = None
            return
        self.deadlines.arm(self, timeout)

    def _on_timer(self) -> None:
        """The current wait's deadline has come (`Deadlines`)."""
        if self.state is _OFF:
            return
        if self.state is _LOOK:
            self._look(True)  # nobody spoke for idleTimeout
            return
        if self.state is _IDLE:
            # as the handler's read of a next request that never came; a first one: its 408
            self._hand(Handover(READ if self.first else END))
            return
        ex = self.exchange
        assert ex is not None
        self._run(ex, _TIMED_OUT if self.state is _AWAIT else _STALLED)

    @staticmethod
    def _timed_out(ex: Exchange) -> bool:
        ex._fail(504, "the upstream did not answer in time")
        ex._end()
        return True

    # -- callbacks --
    def _on_client(self) -> None:
        state = self.state
        if state is _IDLE:
            self._next()
        elif (state is _AWAIT or state is _BODY) and self.client.eof and not self.limits.half_closed_clients:
            # The client left while its answer was awaited or relayed: the upstream is aborted at
            # once (`Exchange.client_left`); its close then ends the exchange in `_on_upstream`.
            self.exchange.client_left()  # type: ignore[union-attr]
        elif state is _LOOK:  # a new tunnel's look (the upstream's watcher too, meanwhile: `_connected`)
            self._look(False)
        # Otherwise the client's bytes wait in its buffer while an answer is awaited (a pipelined
        # request is read once the answer is out).

    def _on_upstream(self) -> None:
        state = self.state
        if state is _BODY:
            self._run(self.exchange, _PUMP)  # type: ignore[arg-type]
            return
        if state is not _AWAIT:
            return  # an idle kept connection that speaks or closes is not usable for the next request
        ex = self.exchange
        assert ex is not None
        if self.upstream.eof:  # type: ignore[union-attr]
            self._hand_exchange(ex)  # `proceed` reads what is there and sees the close
            return
        self._run(ex, _STEP)

    def _run(self, ex: Exchange, step: int) -> None:
        """An exchange's next step without waiting (`_STEP`: `Exchange.step`, `_PUMP`: `pump`,
        `_STALLED`: `stalled`, `_TIMED_OUT`: `_timed_out`; told by a number: compiled, each a C call,
        where a method passed as an object would be made and called through Python each time), then
        where the cycle goes on."""
        try:
            if step == _STEP:
                ended = ex.step()
            elif step == _PUMP:
                ended = ex.pump()
            elif step == _STALLED:
                ended = ex.stalled()
            else:
                ended = self._timed_out(ex)
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
                self._arm(self.limits.idle_timeout)
                self.upstream.resume_reading()  # type: ignore[union-attr]
                return
            self._hand_exchange(ex)
            return
        self.clean = ex.upstream_reusable
        self.exchange = self.head = self.prepared = None
        if not ex.client_keep:
            self._hand(_ENDED)
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
        buf = client.buf
        if not buf:
            if client.eof:
                self._hand(_ENDED)  # closed between requests: as the handler's read, no answer
                return
            self.state = _IDLE
            if not self.first:  # (a first head's deadline runs from `begin`)
                self._arm(self.limits.idle_timeout)
            client.resume_reading()
            return
        if client.eof:  # bytes before a close: the handler's read takes them
            self._hand(Handover(READ))
            return
        limits = self.limits
        try:
            data = bytes(buf)
            if data.startswith(b"CONNECT "):
                got = parse_head(data, limits)  # (a CONNECT head seen before: not parsed again)
            else:  # (what parse_head does for the others, one call less on every new connection)
                got = http1.parse_request_head(data, limits.max_header_bytes, limits.max_headers)
        except http1.HttpError:
            got = None  # the handler's read answers it
        if got is None:
            self._hand(Handover(READ))
            return
        head, n = got
        try:
            if head.method == "CONNECT":
                servable = self.admit is not None and self.upstream is None and self._admissible(head)
            else:
                servable = self._servable(head, len(buf) - n)
        except BaseException as exc:  # what the handler's identity steps would have raised
            h = Handover(RAISE)
            h.exc = exc
            self._hand(h)
            return
        if not servable:
            h = Handover(HEAD)
            h.got = got
            self._hand(h)
            return
        del buf[:n]
        self.first = False
        if head.method == "CONNECT":
            self._connect(head)
        else:
            self._request(head)

    def _servable(self, head: http1.RequestHead, buffered: int) -> bool:
        """This cycle serves `head`, `buffered` bytes after it already here (else the handler does,
        from the head on). True after the handler's identity steps, which then answered at once: the
        name (no container lookup), the identity check (`quick`), the connection caps (counted)."""
        if not (
            head.method != "CONNECT"
            and head.scheme == "http"
            and not head.chunked
            and (not head.content_length or head.content_length <= buffered)  # no body, or all of it here
            and head.upgrade is None
        ):
            return False
        upstream = self.upstream
        if upstream is not None:
            name = head.proxy_user or self.identity
            # the kept upstream serves it: the same client and destination, clean, its address not
            # denied by an address rule added since it connected (else the handler's exchange closes
            # it and connects afresh, judged)
            if not (
                self.clean
                and self.key == (name, head.host, head.port)
                and usable(upstream)
                and self.gate.keeps(name, head.port, upstream)
            ):
                return False
        return self._admissible(head)

    def _admissible(self, head: http1.RequestHead) -> bool:
        """The handler's identity steps for `head` answered at once (see `_servable`)."""
        client = self.client
        name = head.proxy_user or self.identity
        ctx = client.ctx
        if not head.proxy_user and ctx.docker is not None and client.identity is None:
            return False  # the container's name is looked up first
        ids = ctx.identities
        if ids is not None and (head.proxy_user or client.claimed) and not self.quick(client, ids, name, head):
            return False  # a secret to verify (scrypt) or to refuse (407): the handler's check
        if client.over_cap:
            return False  # refused (503) by the handler's count
        if name != client.identity:
            if ctx.per_client.get(name, 0) >= self.limits.max_per_client:
                return False  # refused (429) by the handler's count
            client.claim(name)  # counted for it
            self.identity = name
        return True

    def _drive(self, coro: Coroutine[Any, Any, Any], head: http1.RequestHead) -> tuple[bool, Any]:
        """The coroutine of request steps that wait (what `prepare` or `admit` returned: the steps
        from the one that waits on) run by hand up to its first wait: (True, its result) when it
        had none; else (False, None), handed over: PREPARE (the handler waits for what it yielded,
        then goes on with it) or RAISE (what it raised)."""
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            return True, stop.value
        except BaseException as exc:
            h = Handover(RAISE)
            h.exc = exc
        else:
            h = Handover(PREPARE)
            h.head, h.coro, h.waiting = head, coro, waiting
        self._hand(h)
        return False, None

    def _request(self, head: http1.RequestHead) -> None:
        """The request steps, then the request sent upstream (or a handover)."""
        try:
            prepared = self.prepare(self.client, head, self.identity)
        except BaseException as exc:  # (raised by a step: the handler re-raises it, as in `_drive`)
            h = Handover(RAISE)
            h.exc = exc
            self._hand(h)
            return
        if prepared is not None and type(prepared) is not tuple:  # steps that wait (see `_drive`)
            done, prepared = self._drive(prepared, head)  # type: ignore[arg-type]
            if not done:
                return
        if prepared is None:
            self._hand(_ENDED)  # answered (403, a refusal, ...): the connection ends
            return
        verdict, t, request = prepared
        upstream = self.upstream
        if upstream is None:
            # The connection's first request: an upstream parked for this client and destination (as
            # the handler's `attach`), else the handler connects one.
            key = (self.identity, head.host, head.port)
            upstream = self.client.ctx.pool.take(key, self.gate)  # (judged as its admission would: Gate.keeps)
            if upstream is None:
                h = Handover(EXCHANGE)
                h.head, h.prepared = head, prepared
                self._hand(h)
                return
            self.upstream, self.key = upstream, key
            self.cid = self.gate.track(key[0], key[1], key[2], verdict, close_both(self.client, upstream))
            upstream.watcher = self._on_upstream
        elif self.cid is not None:
            lc = self.gate.live.get(self.cid)
            if lc is not None:
                lc.rule_id = verdict.rule_id
        self.clean = False
        ex = new_exchange(self.client, upstream, head, self.limits, t, True)
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
        self._arm(self.limits.idle_timeout)
        upstream.resume_reading()

    # -- a CONNECT (a new tunnel) --
    def _connect(self, head: http1.RequestHead) -> None:
        """A CONNECT the handler's identity steps passed at once: its decision (`admit`, run as
        `prepare` is), then the upstream connect (`Connecting`), the 200 and the tunnel, as
        the handler's CONNECT steps do; handed over where one of them has to wait."""
        self.close()  # the first head's deadline is met
        # The client's bytes wait in its buffer for the tunnel (as in the handler): not served while
        # _OFF (its watcher, `_on_client`, stays: the look's, once connected).
        self.state = _OFF
        # (a hold hands over: the handler waits for the decision, then connects)
        try:
            verdict = self.admit(self.client, head, self.identity)  # type: ignore[misc]
        except BaseException as exc:  # (as in `_request`)
            h = Handover(RAISE)
            h.exc = exc
            self._hand(h)
            return
        if verdict is not None and type(verdict) is not Verdict:  # a decision that waits (see `_drive`)
            done, verdict = self._drive(verdict, head)  # type: ignore[arg-type]
            if not done:
                return
        if verdict is None:
            self._hand(_ENDED)  # answered (403) or the client left
            return
        self.head, self.verdict = head, verdict
        admission = new_admission(self.gate, self.identity, head.host, head.port, "CONNECT", verdict)
        c = Connecting(head.host, head.port, self.limits.connect_timeout, admission, self._connected, self.loop)
        try:
            started = c.start()
        except BaseException as exc:
            h = Handover(RAISE)
            h.exc = exc
            self._hand(h)
            return
        if not started:
            self._hand_tunnel(head, verdict)  # a name to look up: the handler's `connect`

    def _hand_tunnel(self, head: http1.RequestHead, verdict: Verdict) -> None:
        h = Handover(TUNNEL)
        h.head, h.verdict = head, verdict
        self._hand(h)

    def _connected(self, up: Conn | None, failure: UpstreamFailure | None) -> None:
        """The tunnel's upstream connect is over (`Connecting`)."""
        head, verdict = self.head, self.verdict
        self.head = self.verdict = None
        assert head is not None and verdict is not None
        client = self.client
        if up is None:
            if failure is None:  # every cached address failed: the handler looks the name up again
                self._hand_tunnel(head, verdict)
                return
            self.gate.finish_log(verdict)
            client.write(error_response(*failure.http_answer()))
            self._hand(_ENDED)
            return
        client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        ctx = client.ctx
        hook = ctx.tunnel_hook
        # (an Interceptor, the service's hook: itself, its `first_look` called in `_look`)
        look: Any = hook if type(hook) is Interceptor else None if hook is None else getattr(hook, "first_look", None)
        if hook is not None and look is None:  # a hook that can only be awaited
            self.tunnel = run_tunnel(ctx, client, up, self.identity, head.host, head.port, verdict, "CONNECT")
            self._run_tunnel(None)
            return
        # `run_tunnel`'s steps without its coroutine: tracked, looked at by the hook from the
        # connections' callbacks while nobody has spoken, then spliced (or run_tunnel's to go on)
        tunnel = Tunnel(ctx, client, up)
        tunnel.track(self.identity, head.host, head.port, verdict)
        if look is None:
            self.gate.finish_log(verdict)
            self._join(tunnel)
            return
        self.head, self.verdict, self.look, self.looked = head, verdict, look, tunnel
        self.state = _LOOK
        watcher = client.watcher  # `_on_client` (its look for both ends: no second bound method made)
        if watcher is None:
            watcher = client.watcher = self._on_client
        up.watcher = watcher
        self._look(False)

    def _look(self, quiet_over: bool) -> None:
        """The tunnel hook's look at a new tunnel's first bytes (`first_look`, asked once either end
        has spoken, reached EOF or closed): waits (from the connections' callbacks, under
        idleTimeout) while nobody has; then the tunnel is spliced, or `run_tunnel` goes on with it
        (the hook's `__call__`, to intercept it)."""
        tunnel, head, verdict = self.looked, self.head, self.verdict
        assert tunnel is not None and head is not None and verdict is not None and self.look is not None
        client, upstream = tunnel.client, tunnel.upstream
        if not (quiet_over or client.buf or client.eof or upstream.buf or upstream.eof):
            self._arm_look()  # nobody has spoken yet: idleTimeout from now at most
            return
        try:
            look = self.look
            if type(look) is Interceptor:
                interceptor = look
                got = interceptor.first_look(client, upstream, head.host, verdict, quiet_over)
            else:
                got = look(client, upstream, head.host, verdict, quiet_over)
        except BaseException as exc:  # (what `run_tunnel` does when its hook raises)
            self._end_look()
            self.gate.finish_log(verdict)
            self.gate.untrack(tunnel.cid)
            tunnel.client.close()
            tunnel.upstream.close()
            h = Handover(RAISE)
            h.exc = exc
            self._hand(h)
            return
        if got is None:  # (asked again at the next bytes, EOF or close)
            self._arm_look()
            return
        self._end_look()
        if got:
            self.tunnel = run_tunnel(
                tunnel.ctx,
                tunnel.client,
                tunnel.upstream,
                self.identity,
                head.host,
                head.port,
                verdict,
                "CONNECT",
                tunnel,
            )
            self._run_tunnel(None)
            return
        self.gate.finish_log(verdict)  # (written by the look with its skip reason: as `run_tunnel`)
        self._join(tunnel)

    def _arm_look(self) -> None:
        """The look's deadline, unless armed already: idleTimeout from now, in `_LOOKS` (else, out of
        its order, as any other wait's)."""
        looks = _LOOKS  # (compiled: its arm a C call, keepalive.pxd)
        if self._queue is None and self not in looks.waiting:
            timeout = self.limits.idle_timeout
            if not looks.arm(self, timeout):
                self._arm(timeout)

    def _end_look(self) -> None:
        tunnel = self.looked
        assert tunnel is not None
        looks = _LOOKS
        looks.waiting.pop(self, None)
        self.close()  # no deadline left
        self.state = _OFF
        tunnel.client.watcher = tunnel.upstream.watcher = None
        self.head = self.verdict = self.look = self.looked = None

    def _join(self, tunnel: Tunnel) -> None:
        """A plain tunnel: spliced, it lives on in its connections' callbacks; this cycle is done."""
        tunnel.join()
        self._hand(_ENDED)

    def _run_tunnel(self, fut: Any) -> None:
        """`run_tunnel` driven by hand: its first wait (the look at the client's first bytes) goes on
        from that future's callback; a second one goes to the handler's task, which goes on with it."""
        coro = self.tunnel
        assert coro is not None
        self.tunnel = None
        try:
            waiting = coro.send(None)
        except StopIteration:
            self._hand(_ENDED)  # spliced (the tunnel lives on in its callbacks) or closed
            return
        except BaseException as exc:
            h = Handover(RAISE)
            h.exc = exc
            self._hand(h)
            return
        if fut is None and isinstance(waiting, asyncio.Future):
            waiting._asyncio_future_blocking = False
            self.tunnel = coro
            waiting.add_done_callback(self._run_tunnel)
            return
        h = Handover(TUNNEL)
        h.coro, h.waiting = coro, waiting
        self._hand(h)


class Deadlines:
    """The request cycles' deadlines: one timer per timeout, not one per connection.

    The cycles waiting with the same timeout are kept in the order they were armed (arming again
    moves one to the end), which is the order of their deadlines: one timer, at the first one's
    deadline, serves them all, and arming, moving or dropping a deadline is a dict operation. (A
    new connection's own timer, made at accept and cancelled at its end, cost more than serving
    its request's steps in the callbacks saved.) A cycle is called (`_on_timer`) once its deadline
    has come, at most a millisecond early. The deadlines are in `time.monotonic()`'s clock (a C call:
    the loop's `time()`, a method called by name, cost several times more, twice per request), the
    timer in the loop's, which runs behind it by at most a few ms (its ms steps, read once an
    iteration): a timer that comes early is armed again for the rest.
    """

    __slots__ = ("queues", "t1", "e1", "t2", "e2")

    def __init__(self) -> None:
        # by timeout: [the cycles waiting (in order), the timer at the first one's deadline or None]
        # (one look-up gives both; an entry, once made, stays)
        self.queues: dict[float, list[Any]] = {}
        # The two timeouts armed last and their entries (a new connection's first head's, then its
        # requests' idle one): found without hashing a float (-1: none yet).
        self.t1 = self.t2 = -1.0
        self.e1: list[Any] | None = None
        self.e2: list[Any] | None = None

    @property
    def timers(self) -> dict[float, asyncio.TimerHandle]:
        """The timers armed, by timeout."""
        return {t: e[1] for t, e in self.queues.items() if e[1] is not None}

    def __len__(self) -> int:
        return sum(len(e[0]) for e in self.queues.values())

    def arm(self, cycle: KeptAlive, timeout: float, deadline: float = 0.0) -> None:
        """`cycle` waits `timeout` from now: its deadline (`deadline` when given: time.monotonic)."""
        loop = cycle.loop
        cycle._deadline = deadline if deadline else monotonic() + timeout
        t = float(timeout)  # (compiled: a C double, compared as such)
        entry: list[Any] | None = self.e1 if t == self.t1 else self.e2 if t == self.t2 else None
        if entry is None:
            entry = self.queues.get(timeout)
            if entry is None:
                entry = self.queues[timeout] = [{}, None]
            self.t2, self.e2 = self.t1, self.e1
            self.t1, self.e1 = t, entry
        q = entry[0]
        old = cycle._queue
        if old is not None:
            del old[cycle]
        # (a queue with cycles in it has its timer: `_fire` arms it again for the ones it leaves)
        timed = bool(q) or entry[1] is not None
        q[cycle] = None
        cycle._queue, cycle._timeout = q, timeout
        if not timed:
            entry[1] = loop.call_later(timeout, self._fire, entry, loop)

    def _fire(self, entry: list[Any], loop: asyncio.AbstractEventLoop) -> None:
        entry[1] = None
        q = entry[0]
        now = monotonic() + 0.001  # (a deadline a millisecond away has come)
        while q:
            cycle = next(iter(q))
            if cycle._deadline > now:
                if entry[1] is None:  # (else a cycle that waited again armed it: `arm`)
                    entry[1] = loop.call_later(cycle._deadline - now + 0.001, self._fire, entry, loop)
                return
            del q[cycle]
            cycle._queue = None
            try:
                cycle._on_timer()  # (it may wait again: at the end of a queue, with a later deadline)
            except Exception:  # one connection's failure leaves the others' deadlines standing
                log.exception("request cycle deadline failed")


class _Looks(FirstDeadlines):
    """The deadlines of new tunnels' looks at their first bytes while nobody has spoken
    (`KeptAlive._look`): one timer for them all (`FirstDeadlines`; a cycle's arm in `Deadlines`
    costs ~400 instructions more, its float timeout hashed twice). They wait with the same timeout
    (`idleTimeout`), so the order they start in is their deadlines' order. One event loop's at a time:
    a look on another loop while this one's wait (threads), or one out of order (a shorter timeout
    than those waiting), is armed in `Deadlines` instead; the looks of a loop that closed (nothing
    will end them) are dropped when the next loop's first one comes (`FirstDeadlines.queue`)."""

    __slots__ = ()

    def arm(self, cycle: KeptAlive, timeout: float) -> bool:
        """Queue `cycle`'s look for `timeout` from now (`cycle._on_timer` then); False: not queued."""
        return self.queue(cycle, cycle.loop, monotonic() + timeout)

    def expire(self, cycle: KeptAlive) -> None:
        cycle._on_timer()  # (its state: _LOOK, the look ends as `non_tls`, or over already)


_LOOKS = _Looks()


class BothEnds:
    """What a rule change calls to end a tracked request's connections (`Gate.track`): both aborted.
    (An object, not a closure: compiled, one small extension type, cheaper to make per connection.)"""

    __slots__ = ("client", "upstream")

    client: Conn
    upstream: Conn

    def __call__(self) -> None:
        self.client.abort()
        self.upstream.abort()


def close_both(client: ClientConn, upstream: Conn) -> Callable[[], None]:
    """What a rule change calls to end a tracked request's connections (`Gate.track`)."""
    both = BothEnds.__new__(BothEnds)
    both.client, both.upstream = client, upstream
    return both
