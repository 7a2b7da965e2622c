"""Request hooks: the ordered chain every proxied HTTP request passes after it was read and its
destination decided, and before it goes upstream (SPEC §7, §12.5).

A hook is a named callable taking the `Flow` (the request as the hooks see it). It returns None to
let the request pass, possibly after changing the head sent upstream through the flow's methods,
or a `Refusal` (status, an `X-Greyproxy-Reason` token and a body) to answer the client instead; a
hook that must wait (a worker-thread lookup) may return an awaitable of either. The first refusal
ends the chain. The order is fixed by the service (`service.py`):

1. `RuleRecheck` — the rules, judged for the host actually contacted (on the forward proxy the
   gate has just decided it; inside a tunnel it is decided again per request);
2. `CredentialSubstitution` — placeholders in the upstream head swapped for their values, or the
   request refused (SPEC §12.5);
3. later middleware.

The client's request (`Flow.head`) is never changed: the upstream head is built from a copy,
taken when a hook first changes something (copy on write), so a request no hook touches costs
nothing extra, and nothing a hook adds (a secret) can reach the transaction record, the journal,
`/ws` or a log, which all see the client's request.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from greyproxy.credentials.substitute import IN_PATH, UNKNOWN, Plan, Scrubber, plan

from . import http1
from .httpio import phrase

if TYPE_CHECKING:
    from greyproxy.credentials.substitute import Live

    from .credentials import LiveCredentials
    from .gate import Gate, Verdict

__all__ = [
    "CredentialSubstitution",
    "Flow",
    "HookChain",
    "Refusal",
    "RequestHook",
    "RuleRecheck",
    "TEST_HOOKS_ENV",
    "hooks_from_env",
    "resolve",
]

log = logging.getLogger("greyproxy.proxy")

REASON_HEADER = "X-Greyproxy-Reason"
DENIED_BODY = "Request denied by proxy"  # SPEC §7: a per-request rule deny

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.1 field name
# Fields a hook may not set or drop: framing, the connection's own, and Host (the request goes to
# the host that was decided; a hook cannot send it elsewhere by renaming it).
_PROTECTED = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
    }
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A hook's answer instead of the upstream's: `status`, `reason` (a token sent as
    `X-Greyproxy-Reason`) and a one-line text body. The connection is closed after it."""

    status: int
    reason: str
    body: str

    def render(self) -> bytes:
        return http1.render_response(
            self.status,
            phrase(self.status),
            self.body.encode("utf-8"),
            close=True,
            headers=[("Content-Type", "text/plain; charset=utf-8"), (REASON_HEADER, self.reason)],
        )


class Flow:
    """One request as the hooks see it.

    `head` is the client's request (read only); `host`/`port` the destination actually contacted,
    `server_name` the name the upstream certificate is verified against (intercepted TLS, else the
    host); `verdict` the rules' answer once known. The upstream head starts as the client's
    end-to-end fields and target; `set_header`, `remove_header` and `set_target` change it (on a
    copy); `render` gives the bytes sent upstream."""

    __slots__ = (
        "claimed",
        "counted",
        "container",
        "scheme",
        "host",
        "port",
        "server_name",
        "head",
        "verdict",
        "substituted",
        "session_id",
        "scrubber",
        "refused_labels",
        "_headers",
        "_target",
    )

    def __init__(
        self,
        container: str,
        scheme: str,
        host: str,
        port: int,
        head: http1.RequestHead,
        verdict: Verdict | None = None,
        server_name: str | None = None,
        claimed: bool = False,
    ) -> None:
        self._setup(container, scheme, host, port, head, verdict, server_name, claimed)

    def _setup(
        self,
        container: str,
        scheme: str,
        host: str,
        port: int,
        head: http1.RequestHead,
        verdict: Verdict | None,
        server_name: str | None,
        claimed: bool,
    ) -> None:
        """`__init__`'s work (`new_flow` calls it on a Flow made without __init__)."""
        self.container, self.scheme, self.host, self.port = container, scheme, host, port
        # SPEC §16: `container` is a claimed identity whose secret this connection presented (a
        # session bound to a claimed identity substitutes only where this is True).
        self.claimed = claimed
        self.server_name = server_name or host
        self.head = head
        self.verdict = verdict
        # The rule whose hit the connection's admission counted (a tunnel's requests, judged again
        # by `RuleRecheck`: the same rule deciding again is no second hit).
        self.counted: int | None = None
        self.substituted: list[str] | tuple[str, ...] = ()  # credential labels used (stored in the record)
        self.session_id: str | None = None  # the session of the first session credential substituted
        self.scrubber: Scrubber | None = None  # what was substituted, to scrub from the recorded response
        self.refused_labels: tuple[str, ...] = ()  # credential labels a refusal involved
        self._headers: list[tuple[str, str]] | None = None  # the upstream fields once a hook changed them
        self._target: str | None = None

    # -- reading --
    @property
    def changed(self) -> bool:
        return self._headers is not None or self._target is not None

    @property
    def target(self) -> str:
        """The request target sent upstream (origin-form)."""
        return self._target if self._target is not None else self.head.path

    def upstream_headers(self) -> list[tuple[str, str]]:
        """The fields sent upstream (a fresh list when no hook changed any; do not mutate it)."""
        return self._headers if self._headers is not None else self.head.upstream_headers()

    # -- changing (copy on write) --
    def _own(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._headers = self.head.upstream_headers()  # a new list: the client's head is untouched
        return self._headers

    @staticmethod
    def _checked(name: str, value: str | None = None) -> str:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"not a field name: {name!r}")
        lname = name.lower()
        if lname in _PROTECTED or lname.startswith("proxy-"):
            raise ValueError(f"a request hook may not change the {name} field")
        http1.check_field(name, value or "")
        return lname

    def set_header(self, name: str, value: str) -> None:
        """Set `name` to one `value` upstream (replacing every field of that name, in place of the first)."""
        lname = self._checked(name, value)
        out: list[tuple[str, str]] = []
        placed = False
        for k, v in self._own():
            if k.lower() == lname:
                if not placed:
                    out.append((k, value))
                    placed = True
            else:
                out.append((k, v))
        if not placed:
            out.append((name, value))
        self._headers = out

    def replace_value(self, index: int, value: str) -> None:
        """Change the value of the `index`-th upstream field (as `upstream_headers()` lists them)."""
        headers = self._own()
        name = headers[index][0]
        self._checked(name, value)
        headers[index] = (name, value)

    def replace_values(self, headers: list[tuple[str, str]], current: list[tuple[str, str]] | None = None) -> None:
        """Take `headers` as the upstream fields: the names and order of `upstream_headers()`
        (`current`, when the caller has it), values changed where needed (each checked)."""
        if current is None:
            current = self.upstream_headers()
        if len(headers) != len(current):
            raise ValueError("replace_values changes values only")
        for (k, v), (k0, v0) in zip(headers, current):
            if k != k0:
                raise ValueError("replace_values changes values only")
            if v != v0:
                self._checked(k, v)
        self._headers = headers

    def remove_header(self, name: str) -> None:
        lname = self._checked(name)
        self._headers = [(k, v) for k, v in self._own() if k.lower() != lname]

    def set_target(self, target: str) -> None:
        if not target.startswith("/") and target != "*":
            raise ValueError("the upstream target must be origin-form")
        http1.check_field(target)
        if " " in target:
            raise ValueError("space in the request target")
        self._target = target

    def render(self, version: str) -> bytes:
        """The request head sent upstream."""
        head = self.head
        if self._headers is None and self._target is None:
            return head.render_upstream(version)  # the same bytes, fewer checks (http1.RequestHead.parsed)
        headers = self._headers if self._headers is not None else head.upstream_headers()
        return http1.render_request_head(
            head.method, self._target if self._target is not None else head.path, version, headers
        )


def new_flow(
    container: str,
    scheme: str,
    host: str,
    port: int,
    head: http1.RequestHead,
    verdict: Verdict | None,
    server_name: str | None,
    claimed: bool,
) -> Flow:
    """`Flow(...)` with every argument given (compiled: made and set up by C calls, without
    __init__'s Python arguments; the HTTP proxy makes one per request)."""
    flow = Flow.__new__(Flow)
    flow._setup(container, scheme, host, port, head, verdict, server_name, claimed)
    return flow


class RequestHook(Protocol):
    name: str

    def __call__(self, flow: Flow) -> Refusal | None | Awaitable[Refusal | None]: ...


class HookChain:
    """The hooks in their order; `run` gives the first refusal, or None (the request goes upstream)."""

    __slots__ = ("hooks", "refused")  # (hooks.pxd: an extension type when compiled)

    def __init__(self, hooks: Sequence[RequestHook] = ()) -> None:
        self.hooks = tuple(hooks)
        self.refused: dict[str, int] = {}  # per hook name (heartbeat stats)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hooks]

    def run(self, flow: Flow) -> Refusal | None | Awaitable[Refusal | None]:
        """The first refusal, or None; an awaitable of that when a hook has to wait. Synchronous
        hooks (the usual case) cost no coroutine: callers do `r = chain.run(flow)` and await `r`
        only when it is neither None nor a `Refusal` (`resolve` does that).

        The built-in hooks are not called where their first test lets the request pass (compiled,
        a call each through Python costs ~800 instructions): `RuleRecheck` with an allowing verdict
        given (the forward proxy's), `CredentialSubstitution` without credentials or with nothing
        to find (`_nothing_to_find`). Their own classes only, not subclasses."""
        i = 0
        for hook in self.hooks:
            kind = type(hook)
            if kind is RuleRecheck:
                v = flow.verdict
                if v is not None and v.allowed:
                    i += 1
                    continue
            elif kind is CredentialSubstitution:
                if hook.live is None or _nothing_to_find(flow):  # type: ignore[attr-defined]
                    i += 1
                    continue
            out = hook(flow)
            if out is None:
                i += 1
                continue
            if isinstance(out, Refusal):
                self.refused[hook.name] = self.refused.get(hook.name, 0) + 1
                return out
            return self._finish(flow, i, out)
        return None

    async def _finish(self, flow: Flow, i: int, pending: Awaitable[Refusal | None]) -> Refusal | None:
        """The rest of the chain once hook `i` returned an awaitable."""
        hooks = self.hooks
        while True:
            out = await pending
            if out is not None:
                self.refused[hooks[i].name] = self.refused.get(hooks[i].name, 0) + 1
                return out
            while True:
                i += 1
                if i == len(hooks):
                    return None
                got = hooks[i](flow)
                if got is None:
                    continue
                if isinstance(got, Refusal):
                    self.refused[hooks[i].name] = self.refused.get(hooks[i].name, 0) + 1
                    return got
                pending = got
                break


async def resolve(out: Refusal | None | Awaitable[Refusal | None]) -> Refusal | None:
    """`HookChain.run`'s answer, awaited if it has to be (for callers that do not mind a coroutine)."""
    if out is None or isinstance(out, Refusal):
        return out
    return await out


class RuleRecheck:
    """The rules for the host actually contacted. The forward proxy's gate decision comes in as
    `flow.verdict` (no second lookup); inside a tunnel each request is judged again, so a deny
    added while a connection is kept alive applies to its next request."""

    name = "rules"

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def __call__(self, flow: Flow) -> Refusal | None:
        v = flow.verdict
        if v is None:
            v = flow.verdict = self.gate.check_request(flow.container, flow.host, flow.port, flow.counted)
        if v.allowed:
            return None
        return Refusal(403, "rule", DENIED_BODY)


def _nothing_to_find(flow: Flow) -> bool:
    """No placeholder credential can be in the request (the common case): no `greyproxy` anywhere
    in the head as received (so in no value and not in the target), no hook changed its fields or
    target, and no Authorization field (Basic credentials). (A function: compiled, the flow and its
    head read as C structs.)"""
    head = flow.head
    return (
        head.placeholder_free
        and flow._headers is None
        and flow._target is None
        and head.names is not None
        and "authorization" not in head.names
    )


class CredentialSubstitution:
    """Placeholder credentials in header and query values swapped for their values (SPEC §12.5),
    or the request refused (fail loudly). Records on the flow: `substituted` (labels),
    `session_id`, `scrubber` (what to scrub from the recorded response), `refused_labels`.

    Without a live map (`live` None) it is a no-op. A request with no placeholder pays one
    substring search per header value and one over the target (`substitute.plan`)."""

    name = "credentials"

    def __init__(self, live: LiveCredentials | None = None, claimed: Callable[[str], bool] | None = None) -> None:
        self.live = live
        # SPEC §16: `claimed(name)` says whether a name is a claimed identity; a session whose
        # container_name is one substitutes only on connections that proved that identity.
        self.claimed = claimed

    def _lookup(self, flow: Flow) -> Callable[[str], Live | None]:
        live = self.live
        assert live is not None
        claimed = self.claimed
        if claimed is None:
            return live.lookup
        owners = live.owners

        def lookup(placeholder: str) -> Live | None:
            c = live.lookup(placeholder)
            if c is None or c.session_id is None:
                return c
            owner = owners.get(c.session_id)
            if owner is not None and claimed(owner) and not (flow.claimed and flow.container == owner):
                return None  # another connection's secret: as unknown here (refused, never substituted)
            return c

        return lookup

    def _plan(self, flow: Flow, headers: list[tuple[str, str]]) -> Plan:
        live = self.live
        assert live is not None
        tls = flow.scheme == "https"
        return plan(
            headers,
            flow.target,
            self._lookup(flow),
            destination=flow.server_name if tls else flow.host,
            authority=flow.head.host,
            plaintext=not tls,
            available=live.available,
        )

    def __call__(self, flow: Flow) -> Refusal | None | Awaitable[Refusal | None]:
        if self.live is None or _nothing_to_find(flow):
            return None
        headers = flow.upstream_headers()
        p = self._plan(flow, headers)
        if p.refused is not None and p.refused.reason == UNKNOWN:
            return self._again(flow)  # a session created a moment ago: look once more before refusing
        return self._apply(flow, p, headers)

    async def _again(self, flow: Flow) -> Refusal | None:
        assert self.live is not None
        await self.live.recheck()
        headers = flow.upstream_headers()
        return self._apply(flow, self._plan(flow, headers), headers)

    def _apply(self, flow: Flow, p: Plan, headers: list[tuple[str, str]]) -> Refusal | None:
        live = self.live
        assert live is not None
        if p.refused is not None:
            r = p.refused
            flow.refused_labels = r.labels
            flow.session_id = r.session_id
            live.refused[r.reason] += 1
            log.warning(
                "credential refused: %s → %s:%d: %s (labels %s, session %s)",
                flow.container,
                flow.host,
                flow.port,
                r.reason,
                ", ".join(r.labels) or "-",
                r.session_id or "-",
            )
            return Refusal(403, r.reason, r.body)
        if not p.used:
            return None
        try:
            if p.headers is not None:
                flow.replace_values(p.headers, headers)
            if p.target is not None:
                flow.set_target(p.target)
        except ValueError:  # a placeholder in a field a hook may not change (Host, framing)
            flow._headers, flow._target = None, None  # nothing substituted leaves
            live.refused[IN_PATH] += 1
            labels = tuple(p.labels)
            flow.refused_labels = labels
            return Refusal(
                403,
                IN_PATH,
                f"Greyproxy: credential {', '.join(labels)} appears in a header the "
                "proxy does not substitute (Host or message framing)",
            )
        flow.substituted = p.labels
        flow.session_id = p.session_id
        flow.scrubber = p.scrubber()
        live.used(p.used)
        return None


# Test-only: a module:function returning extra hooks, appended after the built-in ones. Read by
# the proxy service at start; not a config key, not documented for users (the stack tests use it).
TEST_HOOKS_ENV = "GREYPROXY_TEST_REQUEST_HOOKS"


def hooks_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[RequestHook]:
    spec = environ.get(TEST_HOOKS_ENV)
    if not spec:
        return []
    module, _, attr = spec.partition(":")
    factory: Callable[[], Sequence[RequestHook]] = getattr(importlib.import_module(module), attr or "hooks")
    hooks = list(factory())
    for h in hooks:
        if not callable(h) or not isinstance(getattr(h, "name", None), str):
            raise TypeError(f"{spec}: a request hook needs a name and must be callable")
    log.warning("test request hooks installed from %s: %s", TEST_HOOKS_ENV, [h.name for h in hooks])
    return hooks
