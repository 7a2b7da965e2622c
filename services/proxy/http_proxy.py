"""The HTTP forward proxy listener: CONNECT (a tunnel, `tunnel.py`) and absolute-URI `http://`
requests, each one through the request path

    read head (httpio) → decide (gate.admit) → record snapshot (pipeline.Txn) → request hooks
    (hooks.py) → exchange (exchange.py) on a kept or pooled upstream connection → record sent

on a kept-alive client connection. A connection begins in its callbacks (`begin_http`,
keepalive.py): requests that need no waiting are served there, and `handle_http`'s task starts
only when one does (or never).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from . import http1
from .conn import Conn, PipeConn
from .context import CAP_OVERALL, CAP_PER_CLIENT, ClientConn, Limits, default_identity, unnamed_identity
from .exchange import STALE, Exchange, upstream_version
from .gate import Admission, Verdict
from .hooks import DENIED_BODY, REASON_HEADER, Flow, HookChain, Refusal, new_flow
from .identities import IdentityGuard
from .httpio import CONNECT_HEAD_BYTES, CONNECT_HEADS, _connect_heads, error_response, parse_head, read_head  # noqa: F401
from .pipeline import Recorder
from .keepalive import END, EXCHANGE, HEAD, PREPARE, RAISE, TUNNEL, Handover, KeptAlive, Prepared, close_both, resume
from .pool import usable
from .tunnel import run_tunnel
from .upstream import UpstreamFailure, connect

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from .pipeline import Txn

T = TypeVar("T")

log = logging.getLogger("greyproxy.proxy")

FORBIDDEN_BODY = "Blocked by Greyproxy: this destination is not allowed"
# The guard's refusal says why: a shell set up by `greyproxy env` sends curl's API calls here, since
# curl reads no port in NO_PROXY (README, "Put an agent behind Greyproxy").
GUARD_BODY = (
    "Blocked by Greyproxy: this is one of Greyproxy's own listeners (the API, the proxy, DNS),"
    " which it never proxies to; connect to it directly (curl: --noproxy HOST)"
)


def forbidden(verdict: Verdict, request: bool) -> bytes:
    """The 403 for a refused verdict (SPEC §3.1: `403 Forbidden`, then close), its reason token in
    `X-Greyproxy-Reason` as every refusal of the proxy's has it: the guard's own text, else for a
    plain-HTTP request SPEC §7's `Request denied by proxy` (the same answer as a per-request deny
    inside an intercepted tunnel), for a CONNECT the usual one."""
    reason = verdict.reason
    text = GUARD_BODY if reason == "guard" else DENIED_BODY if request else FORBIDDEN_BODY
    return error_response(403, "Forbidden", text, headers=[(REASON_HEADER, str(reason))])


def _cap_text(name: str, share: int, configured: int, workers: int) -> str:
    """A cap as its refusal names it: the configured value, and this worker's share of it."""
    if workers <= 1:
        return f"proxy.{name} = {configured or share}"
    return f"proxy.{name} = {configured or share}, split over {workers} proxy workers: {share} on this one"


def cap_response(cap: str, identity: str, limits: Limits) -> bytes:
    """The refusal of a connection past a connection cap: 503 (overall) or 429 (this client)."""
    if cap == CAP_OVERALL:
        status, reason = 503, "Service Unavailable"
        what = _cap_text(CAP_OVERALL, limits.max_connections, limits.configured_max_connections, limits.workers)
        text = f"Greyproxy: too many open connections ({what}); try again later\n"
    else:
        status, reason = 429, "Too Many Requests"
        what = _cap_text(CAP_PER_CLIENT, limits.max_per_client, limits.configured_max_per_client, limits.workers)
        text = f"Greyproxy: too many open connections for client {identity!r} ({what}); close some and try again\n"
    return http1.render_response(status, reason, text.encode("utf-8"), headers=[("Retry-After", "1")], close=True)


IDENTITY_REFUSED = http1.render_response(
    407,
    "Proxy Authentication Required",
    b"Greyproxy: this client name is claimed; give its secret as the proxy password\n",
    headers=[("Proxy-Authenticate", 'Basic realm="greyproxy"')],
    close=True,
)


def identity_known(client: ClientConn, ids: IdentityGuard, name: str, head: http1.RequestHead) -> bool:
    """`check_identity` need not look: this connection passed it for what `head` presents (the same
    name and secret, or no credentials after a proved claim) and the claims loaded are the same."""
    if head.proxy_user:
        return ids.token(name, head.proxy_password) == client.identity_token
    return client.identity_token is not None and client.identity_token[0] == ids.generation


def identity_passed(client: ClientConn, ids: IdentityGuard, name: str, head: http1.RequestHead) -> bool:
    """`check_identity` without waiting: True when it passed (before, or now: an unclaimed name, a
    secret verified before in this process; remembered as `check_identity` remembers it); False when
    it must look further (scrypt, or a refusal to record)."""
    if identity_known(client, ids, name, head):
        return True
    secret = head.proxy_password if head.proxy_user else None
    if not ids.quick(name, secret):
        return False
    client.identity_token = ids.token(name, secret)
    client.claimed = ids.claims.claimed(name)
    return True


async def check_identity(client: ClientConn, ids: IdentityGuard, name: str, head: http1.RequestHead) -> bool:
    """SPEC §16, once per connection: again only when the name or secret presented, or the claims
    loaded, change. A request without credentials on a connection that proved a claim keeps it
    until the claims change (then it must present the secret again)."""
    if identity_passed(client, ids, name, head):
        return True
    secret = head.proxy_password if head.proxy_user else None
    token = ids.token(name, secret)
    ok = await ids.check(
        name,
        secret,
        src_ip=client.src_ip,
        protocol="HTTP",
        host=head.host,
        port=head.port,
        method="CONNECT" if head.method == "CONNECT" else "HTTP",
    )
    client.identity_token = token if ok else None
    client.claimed = ok and ids.claims.claimed(name)
    return ok


def prepare(
    client: ClientConn, head: http1.RequestHead, container: str
) -> Prepared | None | Coroutine[Any, Any, Prepared | None]:
    """A request's steps before the exchange: decision, record snapshot, hooks, the upstream head.
    None when it was answered here (the connection then ends). Usually nothing in them waits: their
    result, with no coroutine made (the request cycle, keepalive.py, serves it in its callbacks);
    else the coroutine of the steps from the one that waits on (`later`), which gives it."""
    if head.scheme != "http":
        client.write(
            error_response(400, "Bad Request", "Greyproxy: only http:// URLs can be forwarded; use CONNECT for https")
        )
        return None
    # decide
    gate = client.ctx.gate
    # (the bound method as Python makes it: see `admit_connect`)
    verdict = gate.admit_now(container, head.host, head.port, "HTTP", getattr(client, "gone"))  # noqa: B009
    if type(verdict) is not Verdict:
        return _prepare_later(client, head, container, verdict)  # type: ignore[arg-type]
    return _admitted(client, head, container, verdict)


_mismatches = [float("-inf"), 0]  # (when a host mismatch was last logged, how many so far)


def _host_field(t: Txn, head: http1.RequestHead, field: str, container: str) -> None:
    """SPEC §7 on the forward proxy: `request_host` is the request's own `Host` field and
    `host_mismatch` is true (and logged) when it names another host than the absolute URI's, which
    is the host contacted and judged (and the `Host` sent upstream). A field that does not parse is
    kept as sent and flagged too."""
    try:
        name, _port = http1._split_authority(field, False, head.port)
    except http1.HttpError:
        name = field
    if name == head.host:
        return
    t.request_host, t.host_mismatch = name, True
    now = time.monotonic()
    _mismatches[1] += 1
    if now - _mismatches[0] >= 1.0:  # at most one line a second
        _mismatches[0] = now
        log.warning(
            "host mismatch: %s sent Host %r for %s (contacted and recorded as %s, host_mismatch; %d so far)",
            container,
            field,
            head.authority,
            head.host,
            _mismatches[1],
        )


def later(got: T | Coroutine[Any, Any, T]) -> TypeIs[Coroutine[Any, Any, T]]:
    """Whether a `prepare` or `admit_connect` result is the coroutine of steps that wait (else
    it is the result: a Prepared tuple, a Verdict or None)."""
    return got is not None and type(got) is not tuple and type(got) is not Verdict


async def _prepare_later(
    client: ClientConn, head: http1.RequestHead, container: str, deciding: Coroutine[Any, Any, Verdict]
) -> Prepared | None:
    """`prepare` from a decision that waits."""
    got = _admitted(client, head, container, await deciding)
    if later(got):
        return await got
    return got


def _admitted(
    client: ClientConn, head: http1.RequestHead, container: str, verdict: Verdict
) -> Prepared | None | Coroutine[Any, Any, Prepared | None]:
    """`prepare` once decided: the record's snapshot, a 403 or the hooks."""
    if client.closed:
        return None
    ctx = client.ctx
    # The record's snapshot of what the client sent (the absolute URI names the host contacted).
    rec = ctx.recorder
    if type(rec) is Recorder:  # (the service's: compiled, a C call)
        recorder: Recorder = rec
        t = recorder.txn(container, "http://" + head.authority, head.host, head.port, head, verdict.rule_id)
    elif rec is not None:
        t = rec.txn(container, "http://" + head.authority, head.host, head.port, head, verdict.rule_id)
    else:
        t = None
    if t is not None:
        field = head.header("host")
        if field is not None and field != head.authority:  # (the usual request: its Host is the URI's)
            _host_field(t, head, field, container)
    if not verdict.allowed:
        client.write(forbidden(verdict, True))
        if t is not None:
            t.finish(None, 403, "blocked", None, verdict.reason)  # (positional: a C call, http_proxy.pxd)
        return None
    # request hooks (the rule re-check takes the gate's verdict just given); positional: a keyword costs more
    flow = new_flow(container, "http", head.host, head.port, head, verdict, None, client.claimed)
    hooks = ctx.hooks
    if type(hooks) is HookChain:  # (the service's: compiled, a C call)
        chain: HookChain = hooks
        refusal = chain.run(flow)
    else:
        refusal = hooks.run(flow)
    if refusal is not None and not isinstance(refusal, Refusal):
        return _hooks_later(client, head, verdict, t, flow, refusal)  # a hook that has to wait
    return _hooked(client, head, verdict, t, flow, refusal)


async def _hooks_later(
    client: ClientConn,
    head: http1.RequestHead,
    verdict: Verdict,
    t: Txn | None,
    flow: Flow,
    refusal: Awaitable[Refusal | None],
) -> Prepared | None:
    """`prepare` from a hook that waits."""
    return _hooked(client, head, verdict, t, flow, await refusal)


def _hooked(
    client: ClientConn, head: http1.RequestHead, verdict: Verdict, t: Txn | None, flow: Flow, refusal: Refusal | None
) -> Prepared | None:
    """`prepare` once the hooks answered: the refusal written, or the request prepared."""
    if t is not None:
        t.credentials_from(flow)
    if refusal is not None:
        client.write(refusal.render())
        if t is not None:
            t.finish(None, refusal.status, "blocked", None, refusal.reason)  # (positional: see `_admitted`)
        return None
    return verdict, t, flow.render(upstream_version(head))


def admit_connect(
    client: ClientConn, head: http1.RequestHead, container: str
) -> Verdict | None | Coroutine[Any, Any, Verdict | None]:
    """A CONNECT's decision: its verdict when allowed (its log entry still to write: `run_tunnel` or
    the connect failure writes it), None when answered here (403) or the client left meanwhile.
    Usually it does not wait: the request cycle (keepalive.py) then runs it in its callbacks; else
    the coroutine of the decision's rest (`later`), which gives it."""
    gate = client.ctx.gate
    # (the bound method through the type, as Python makes it: compiled, `client.gone` would wrap the C
    # method in a new function object first, ~400 instructions on every new tunnel)
    gone = getattr(client, "gone")  # noqa: B009
    verdict = gate.admit_now(container, head.host, head.port, "CONNECT", gone)
    if type(verdict) is not Verdict:
        return _admit_connect_later(client, verdict)  # type: ignore[arg-type]
    return _connect_admitted(client, verdict)


async def _admit_connect_later(client: ClientConn, deciding: Coroutine[Any, Any, Verdict]) -> Verdict | None:
    return _connect_admitted(client, await deciding)


def _connect_admitted(client: ClientConn, verdict: Verdict) -> Verdict | None:
    if client.closed:
        gate = client.ctx.gate
        gate.finish_log(verdict)
        return None
    if not verdict.allowed:
        client.write(forbidden(verdict, False))
        return None
    return verdict


async def open_tunnel(
    client: ClientConn, head: http1.RequestHead, container: str, verdict: Verdict, release: Callable[[], None]
) -> None:
    """An admitted CONNECT's upstream connect (502/504/403 when it fails), its 200 and its tunnel;
    `release`: the handler's, for an upstream kept from earlier requests."""
    ctx = client.ctx
    admission = Admission(ctx.gate, container, head.host, head.port, "CONNECT", verdict)
    try:
        up = await connect(head.host, head.port, ctx.limits.connect_timeout, admission, protocol=PipeConn)
    except UpstreamFailure as exc:
        ctx.gate.finish_log(verdict)
        client.write(error_response(*exc.http_answer()))
        return
    release()
    client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await run_tunnel(ctx, client, up, container, head.host, head.port, verdict, "CONNECT")


def begin_http(client: ClientConn) -> None:
    """The HTTP listener's start of a connection (`ClientConn.begin`): its requests, and a CONNECT's
    admission, upstream connect and tunnel, are served in its callbacks while nothing needs waiting
    (keepalive.py); `handle_http` takes over where that stops."""
    cycle = KeptAlive(client, prepare, identity_passed, admit_connect)
    cycle.begin(default_identity(client))  # (C calls, compiled)


async def handle_http(client: ClientConn) -> None:
    ctx = client.ctx
    gate, limits = ctx.gate, ctx.limits
    identity = default_identity(client)
    ids = ctx.identities
    pool = ctx.pool
    upstream: Conn | None = None
    upstream_key: tuple[str, str, int] | None = None  # (identity, host, port)
    clean = False  # the upstream's last exchange ended cleanly: it may serve another request
    cid: int | None = None
    first = True  # no request head read yet
    header_deadline: float | None = None  # the first head's, when the connection began before this task
    # A connection `begin_http` began: the cycle hands over what it reached (as `serve` does).
    fast: KeptAlive | None = client.cycle
    handed: Handover | None = None
    if fast is not None:
        client.cycle = None  # (no reference cycle left behind)
        handed, fast.handed = fast.handed, None
        identity, upstream, upstream_key, cid, clean = fast.identity, fast.upstream, fast.key, fast.cid, fast.clean
        first = fast.first
        header_deadline = fast.header_deadline

    def release() -> None:
        """Done with the current upstream: parked for a later request when clean, else closed."""
        nonlocal upstream, cid
        if cid is not None:
            gate.untrack(cid)
            cid = None
        if upstream is not None:
            if clean and upstream_key is not None:
                pool.put(upstream_key, upstream)
            else:
                upstream.close()
            upstream = None

    async def attach(key: tuple[str, str, int], verdict: Verdict, fresh: bool) -> tuple[Conn, bool]:
        """An upstream for `key`: a parked one unless `fresh`, else a new connection (UpstreamFailure),
        either judged for this request's admission (`verdict`). (connection, whether it served a
        request before)."""
        nonlocal upstream, upstream_key, cid, clean
        release()
        admission = Admission(gate, key[0], key[1], key[2], "HTTP", verdict)
        parked = None if fresh else pool.get(key, admission)
        reused = parked is not None
        up = parked if parked is not None else await connect(key[1], key[2], limits.connect_timeout, admission)
        upstream, upstream_key, clean = up, key, False
        cid = gate.track(key[0], key[1], key[2], verdict, close_both(client, up))
        return up, reused

    def parse_req(buf: bytes):  # noqa: ANN202
        return parse_head(buf, limits)

    async def exchange(head: http1.RequestHead, prepared: Prepared, ex: Exchange | None = None) -> bool:
        """The exchange of a prepared request on a kept or pooled upstream connection (`ex`: one the
        kept-alive cycle started); whether the client connection goes on."""
        nonlocal upstream, clean
        verdict, t, request = prepared
        key = (identity, head.host, head.port)
        try:
            if ex is not None:
                clean = False
                state = await ex.proceed()
            else:
                reused = True  # the connection served a request before (it may have gone stale since)
                if upstream is None or upstream_key != key or not clean or not usable(upstream):
                    upstream, reused = await attach(key, verdict, fresh=False)
                elif not gate.keeps(key[0], key[2], upstream):
                    # An address rule added since it connected denies where it goes: closed, not
                    # parked (`attach` releases it), and a fresh connect is judged (and logged).
                    clean = False
                    upstream, reused = await attach(key, verdict, fresh=False)
                elif cid is not None:
                    lc = gate.live.get(cid)
                    if lc is not None:
                        lc.rule_id = verdict.rule_id
                clean = False
                ex = Exchange(client, upstream, head, limits, t, reused)
                state = await ex.run(request)
            if state is STALE:
                # The origin had closed the kept connection as the request went out (nothing
                # was answered, nothing was consumed): once more on a new connection.
                upstream, _ = await attach(key, verdict, fresh=True)
                ex = Exchange(client, upstream, head, limits, t)
                await ex.run(request)
        except UpstreamFailure as exc:
            upstream = None
            status, reason, text = exc.http_answer()
            client.write(error_response(status, reason, text))
            if t is not None:
                t.finish(status=status, result="blocked" if exc.kind == "guard" else "allowed", error=str(exc))
            return False
        clean = ex.upstream_reusable
        return ex.client_keep

    async def resumed(h: Handover) -> bool:
        """A request the kept-alive cycle began and handed over; whether the client connection goes on."""
        assert h.head is not None
        if h.head.method == "CONNECT":  # (PREPARE: its decision waits)
            verdict = await resume(h.coro, h.waiting)  # type: ignore[arg-type]
            if verdict is not None:
                await open_tunnel(client, h.head, identity, verdict, release)
            return False
        if h.kind is PREPARE:
            prepared = await resume(h.coro, h.waiting)  # type: ignore[arg-type]
            return prepared is not None and await exchange(h.head, prepared)
        assert h.prepared is not None
        return await exchange(h.head, h.prepared, h.exchange)

    try:
        while True:
            if (
                handed is None
                and not first
                and clean
                and upstream is not None
                and upstream_key is not None
                and usable(upstream)
            ):
                # the request cycle, once a request left a clean upstream
                if fast is None:
                    fast = KeptAlive(client, prepare, identity_passed)
                try:
                    handed = await fast.serve(identity, upstream, upstream_key, cid)
                finally:
                    fast.stop()
                    clean = fast.clean
            if handed is not None:
                if handed.kind is END:
                    return
                if handed.kind is RAISE:
                    raise handed.exc  # type: ignore[misc]
                if handed.kind is TUNNEL:
                    if handed.coro is not None:  # the tunnel, past its first wait
                        await resume(handed.coro, handed.waiting)
                    else:  # admitted, its upstream to connect
                        assert handed.head is not None and handed.verdict is not None
                        await open_tunnel(client, handed.head, identity, handed.verdict, release)
                    return
                if handed.kind is PREPARE or handed.kind is EXCHANGE:
                    h, handed = handed, None
                    if not await resumed(h):
                        return
                    continue
            if handed is not None and handed.kind is HEAD:
                got = handed.got
            else:
                try:
                    got = await read_head(
                        client,
                        limits,
                        parse_req,
                        None if first else limits.idle_timeout,
                        header_deadline if first else None,
                    )
                except asyncio.TimeoutError:
                    if first or client.buf:
                        client.write(error_response(408, "Request Timeout", "Greyproxy: request headers took too long"))
                    return
                except http1.HttpError as exc:
                    client.write(error_response(exc.status, exc.reason, f"Greyproxy: {exc}"))
                    return
                if got is None:
                    return
            handed = None
            head, n = got  # type: ignore[misc]
            del client.buf[:n]
            first = False
            if head.proxy_user:
                identity = head.proxy_user
            elif ctx.docker is not None and client.identity is None:
                identity = await unnamed_identity(client)
            if (
                ids is not None
                and (head.proxy_user or client.claimed)
                and not await check_identity(client, ids, identity, head)
            ):
                client.write(IDENTITY_REFUSED)
                return
            container = identity
            cap = client.claim(identity)
            if cap is not None:
                client.write(cap_response(cap, identity, limits))
                return

            if head.method == "CONNECT":
                verdict = admit_connect(client, head, container)
                if later(verdict):
                    verdict = await verdict
                if verdict is not None:
                    await open_tunnel(client, head, container, verdict, release)
                return

            prepared = prepare(client, head, container)
            if later(prepared):
                prepared = await prepared
            if prepared is None or not await exchange(head, prepared):
                return
    finally:
        if fast is not None:
            fast.close()
            # Compiled (Cython), a coroutine's locals live in the scope its inner functions share,
            # which they refer back to: a cycle only the collector frees. Not with the cycle in it.
            fast = None
        release()
        # ...the inner functions too: dropped, they take the cycle with them (the connection, its
        # transport, its last Handover and tasks stayed until the collector ran).
        release = attach = parse_req = exchange = resumed = None  # type: ignore[assignment]  # (Cython: no `del` of these)
