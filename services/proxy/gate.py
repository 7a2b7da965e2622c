"""The gate: every connection (and every plain-HTTP request) asks it for a verdict.

It holds the in-memory rule snapshot, silent mode, the hard guard against the stack's own
ports, and the pending holds; it sends log entries, pending sightings and rule hits through
the journal. It never touches SQLite on the event loop: snapshots are built in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any

from bus import records, topics
from bus.records import log_values
from bus.journal import JournalWriter
from bus.pubsub import Publisher
from greyproxy.policy import Decision, RuleSet, rule_summary
from greyproxy.localaddr import is_local_address, local_addresses
from greyproxy.policy.judge import Guard, Judgement, judge
from greyproxy.policy.patterns import analyse_host, normalise_host
from greyproxy.timeutil import rfc3339
from greyproxy.compiled import slotted
from greyproxy.metrics import DECISION_BUCKETS, Histogram

from .upstream import UpstreamFailure, resolve
from .waits import KeyedWaits

# normalise_host's answers: a pure function of a value that repeats (the hosts asked for).
_hosts: dict[str, str] = {}
HOST_CACHE = 4096  # hosts whose normal form is kept


def _normalise_host(host: str) -> str:
    """`normalise_host`, cached (bounded: hosts come from clients; a full cache starts over)."""
    hosts = _hosts
    normal = hosts.get(host)
    if normal is None:
        normal = normalise_host(host)
        if len(hosts) >= HOST_CACHE:
            hosts.clear()
        hosts[host] = normal
    return normal


def _is_ip(host: str) -> bool:
    return analyse_host(host)[1] != 0


log = logging.getLogger("greyproxy.proxy")

PENDING_IN_FLIGHT = 2.0  # seconds a new pending key held here may not be in the database yet (`_pending_room`)

Key = tuple[str, str, int]  # (container, host, port)
ClientGone = asyncio.Future | Callable[[], asyncio.Future] | None  # see Gate.admit

ALLOWED = records.ALLOWED
BLOCKED = records.BLOCKED
# Looked up once (compiled, a module attribute costs a lookup on every use; these run per connection).
_LOG = records.LOG
_perf_counter = time.perf_counter
_time = time.time
_INF = math.inf
DECISION_CACHE = 10_000  # cached rule decisions (see Gate._decisions)
NAME_TTL = 3600.0  # seconds an ip -> name mapping from the DNS cache stays valid (SPEC §6: memory, 1 h)
RESOLVE_TIMEOUT = 5.0  # seconds the gate waits for a name's addresses when an address rule could deny it
ADDRESS_TTL = 30.0  # seconds a name's addresses are reused for the admission check (the guard re-judges each connect)
ADDRESS_CACHE = 10_000  # names whose addresses are kept for that check
# Proxy workers (`name_grace`): how long a connection to a raw IP that no name is known for, about to
# be held, waits for one to come from another worker's DNS proxy (its client asked that worker for
# the name; the answer reaches this worker over the bus) before it is queued for a person.
NAME_GRACE = 0.25
# Seconds a raw IP's sighting, made with no name known for it, stays named later by `learn` after its
# last held connection went (client gone, hold timeout): a name that comes late (the bus lost it, the
# database look finds it) still names or withdraws the entry (`_withdraw_sighting`). At most
# UNNAMED_KEYS such addresses (a client connecting to many addresses nobody names: the oldest go).
UNNAMED_KEEP = 300.0
UNNAMED_KEYS = 10_000


# Verdict, Admission and LiveConn are dataclasses given __slots__ at the end of this module (as
# Python, greyproxy.compiled.slotted); compiled, they, SilentMode and Gate are extension types
# (gate.pxd): their fields C struct fields, the decision's steps called through a C vtable.
@dataclass
class Verdict:
    allowed: bool
    reason: str
    rule_id: int | None = None
    resolved_hostname: str | None = None
    elapsed_ms: float = 0.0
    # (container, host, port, method) of a tunnel's log entry still to write (see Gate.finish_log).
    log_pending: tuple[str, str, int, str] | None = None


def _new_verdict(allowed: bool, reason: str, rule_id: int | None, resolved: str | None) -> Verdict:
    """`Verdict(allowed, reason, rule_id, resolved)`; compiled, without the call of its __init__
    (a decision makes one per request)."""
    v = Verdict.__new__(Verdict)
    v.allowed = allowed
    v.reason = reason
    v.rule_id = rule_id
    v.resolved_hostname = resolved
    v.elapsed_ms = 0.0
    v.log_pending = None
    return v


@dataclass
class Admission:
    """One admitted connection's right to connect upstream: the client, the destination and the
    verdict `Gate.admit` gave it. Passed explicitly to whatever connects for that connection
    (`upstream.connect` / `upstream.Connecting` take it as their guard: calling it judges one
    address, `Gate.guard`); never kept in shared state (contextvars: uvloop runs all connections of
    one listener in one context), so a connect is judged for the connection it serves."""

    gate: Gate
    container: str
    host: str
    port: int
    method: str
    verdict: Verdict

    def __call__(self, ip: str, port: int) -> str | None:
        """The guard of a connect for this admission: why `ip` is refused, or None."""
        gate = self.gate
        if port not in gate.own_ports and gate._rules.address is None:
            return None  # the usual case: not a listener's port, no address deny rule (`Gate.guard`)
        return gate.guard(ip, port, self)

    def keeps(self, conn: Any) -> bool:
        """Whether `conn`, an idle upstream connected for an earlier admission of the same client
        and destination (the pool's), may serve this one (`Gate.keeps`)."""
        return self.gate.keeps(self.container, self.port, conn)


def new_admission(gate: Gate, container: str, host: str, port: int, method: str, verdict: Verdict) -> Admission:
    """`Admission(gate, container, host, port, method, verdict)`; compiled, without the call of its
    __init__ (a new tunnel's connect makes one)."""
    a = Admission.__new__(Admission)
    a.gate = gate
    a.container = container
    a.host = host
    a.port = port
    a.method = method
    a.verdict = verdict
    return a


@dataclass
class Hold:
    """One held connection waiting for a person's decision."""

    key: Key
    resolved: str | None
    future: asyncio.Future = field(repr=False)


@dataclass
class LiveConn:
    """A connection the gate let through; closed if the rule that allowed it goes away."""

    container: str
    host: str
    port: int
    resolved: str | None
    rule_id: int | None
    close: Callable[[], None]


def _held_name(waiters: list[Hold]) -> str | None:
    """The name the connections held for one key were judged under (`learn` names them all at once)."""
    for hold in waiters:
        if hold.resolved is not None:
            return hold.resolved
    return None


class SilentMode:
    """Allow-all / deny-all, in memory only (lost on restart by design)."""

    __slots__ = ("mode", "expires_at", "_timer")

    def __init__(self) -> None:
        self.mode: str | None = None
        self.expires_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def active_mode(self, now: float | None = None) -> str | None:
        if self.mode is None:
            return None
        if self.expires_at is not None and (now or time.time()) >= self.expires_at:
            return None
        return self.mode

    def status(self) -> dict[str, Any]:
        now = time.time()
        mode = self.active_mode(now)
        remaining = None
        if mode and self.expires_at is not None:
            remaining = max(0, int(round(self.expires_at - now)))
        return {
            "active": mode is not None,
            "mode": mode,
            "expires_at": rfc3339(self.expires_at) if mode else None,
            "remaining_seconds": remaining,
        }


class Gate:
    __slots__ = (
        "journal",
        "publisher",
        "_rules",
        "_decisions",
        "_verdicts",
        "rules_version",
        "guard_ports",
        "own_ports",
        "local_hosts",
        "hold_timeout",
        "max_pending",
        "pending_count",
        "pending_admitted",
        "pending_lookup",
        "_pending_lock",
        "_pending_recent",
        "silent",
        "announce_silent",
        "holds",
        "live",
        "_live_ids",
        "_hits",
        "_summaries",
        "names",
        "_addresses",
        "container_ids",
        "decisions",
        "allowed_count",
        "blocked_count",
        "decision_seconds",
        "hold_seconds",
        "defer_tunnel_logs",
        "name_hook",
        "name_grace",
        "_name_waits",
        "_unnamed_gone",
    )

    def __init__(
        self,
        journal: JournalWriter,
        publisher: Publisher,
        own_ports: set[int],
        local_hosts: set[str],
        hold_timeout: float,
        max_pending: int,
    ) -> None:
        self.journal = journal
        self.publisher = publisher
        self.rules = RuleSet([])  # also starts the decision cache (see the setter)
        self.rules_version = -1
        self.guard_ports = Guard(own_ports, local_hosts)  # the hard guard (policy/judge.py)
        self.own_ports = self.guard_ports.own_ports
        self.local_hosts = self.guard_ports.local_hosts
        self.hold_timeout = hold_timeout
        self.max_pending = max_pending
        # proxy.maxPending (`_pending_room`): the queue's size at the last look at the database, the
        # look itself (async [key, ...] -> (size, whether each key is queued); the service's), and
        # the new keys held here lately, with when. Without the look (tests): the size the service
        # last gave and the new keys held since.
        self.pending_count = 0
        self.pending_admitted = 0
        self.pending_lookup: Callable[[list[Key]], Awaitable[tuple[int, list[bool]]]] | None = None
        self._pending_lock = asyncio.Lock()
        self._pending_recent: dict[Key, float] = {}
        self.silent = SilentMode()
        self.announce_silent = True  # publish allowall.changed (proxy workers: the first one only)
        self.holds: dict[Key, list[Hold]] = {}
        self.live: dict[int, LiveConn] = {}
        self._live_ids = 0
        self._hits: dict[int, list[float]] = {}
        self._summaries: dict[int, str] = {}  # rule id -> rule_summary() for log records, per rule set
        self.names: dict[str, tuple[str, float]] = {}  # ip -> (hostname, seen): DNS cache (§6)
        self._addresses: dict[str, tuple[list[str], float]] = {}  # name -> (its addresses, looked up at)
        self.container_ids: dict[str, str] = {}  # container name -> id, from the engine (greyproxy.docker)
        self.decisions = 0
        # For GET /metrics (sent in the heartbeat): decisions by result (`results`), and how long they took.
        self.allowed_count = 0
        self.blocked_count = 0
        self.decision_seconds = Histogram(DECISION_BUCKETS)
        self.hold_seconds = Histogram(DECISION_BUCKETS)
        # Set when HTTPS interception is installed: an allowed tunnel's log entry waits for its
        # mitm_skip_reason, which is known only once the client's first bytes are seen.
        self.defer_tunnel_logs = False
        # Called before a decision to give an unnamed raw IP a chance at a name (the DNS proxy's
        # PTR fallback sets it): what to await first, or None (the usual case: nothing to wait for).
        self.name_hook: Callable[[str, str, int], Awaitable[Any] | None] | None = None
        # Proxy workers: NAME_GRACE (0: one process, whose own DNS proxy names an IP before its client
        # gets the answer), and the connections waiting through it, by IP (`learn` wakes them).
        self.name_grace = 0.0
        self._name_waits = KeyedWaits()
        # Keys of raw-IP sightings made unnamed whose held connections all went undecided, by IP:
        # {ip: {key: when (monotonic)}}, for `learn` to name or withdraw their entry (UNNAMED_KEEP).
        self._unnamed_gone: dict[str, dict[Key, float]] = {}

    @property
    def results(self) -> dict[str, int]:
        """Decisions given, by result (GET /metrics)."""
        return {"allowed": self.allowed_count, "blocked": self.blocked_count}

    # -- facts about a destination --
    def resolved_name(self, host: str) -> str | None:
        entry = self.names.get(host)
        if entry is None or time.time() - entry[1] > NAME_TTL:
            return None  # older than an hour: the address may belong to someone else by now
        return entry[0]

    def learn(self, ip: str, name: str, seen: float) -> None:
        """An ip -> name from a DNS answer (ours, another worker's over the bus, a PTR lookup): kept,
        and the connections to that IP waiting unnamed are judged again with it: those waiting
        through `name_grace`, and the held ones (a name rule may now decide them, SPEC §6)."""
        self.names[ip] = (name, seen)
        self._name_waits.wake(ip, name)
        if self.holds:
            for key, waiters in list(self.holds.items()):
                if key[1] != ip:
                    continue
                named = False
                decided: Verdict | None = None
                for hold in list(waiters):
                    if hold.resolved is None and not hold.future.done():
                        hold.resolved = name
                        named = True
                        v = self._decide_now(key[0], ip, key[2], name)
                        if v is not None:
                            hold.future.set_result(v)
                            decided = v
                if named:
                    self._withdraw_sighting(key, name, decided.rule_id if decided is not None else None)
        gone = self._unnamed_gone.pop(ip, None) if self._unnamed_gone else None
        if gone:
            old = time.monotonic() - UNNAMED_KEEP
            for key, when in gone.items():
                if when >= old:
                    j = self.judge(key[0], ip, key[2], name)
                    self._withdraw_sighting(key, name, j.rule.id if j.rule is not None else None)

    def _withdraw_sighting(self, key: Key, name: str, rule_id: int | None) -> None:
        """Connections to `key` (a raw IP) were held as unknown while no name was known for it, and
        the name is known now: the `pending` sighting gets it (a `pending_named` record). If rule
        `rule_id` decides the key by that name, the sighting is withdrawn instead (the recorder
        removes the entry): that rule would have made none had the name been known (SPEC §2.3: a
        match leaves no pending entry). Only when the name made the difference: a rule deciding the
        raw IP itself (made meanwhile) was there for a person to see: the entry stays, named."""
        if rule_id is not None and self.judge(key[0], key[1], key[2], None).decision != "pending":
            rule_id = None
        waiting = self.entry_waiting(key, name)
        self.journal.append(
            records.PENDING_NAMED, records.pending_named_record(key[0], key[1], key[2], name, rule_id, waiting)
        )

    def _gone_unnamed(self, key: Key) -> None:
        """The last connection held for `key`, a raw IP with no name known, went undecided."""
        gone = self._unnamed_gone
        keys = gone.pop(key[1], None)  # (put back last: insertion order is the oldest first)
        if keys is None:
            if len(gone) >= UNNAMED_KEYS:
                del gone[next(iter(gone))]
            keys = {}
        keys[key] = time.monotonic()
        gone[key[1]] = keys

    def unnamed_held_ips(self) -> set[str]:
        """The raw IPs of held connections judged without a name."""
        return {
            key[1] for key, waiters in self.holds.items() if any(h.resolved is None for h in waiters) and _is_ip(key[1])
        }

    def unnamed_gone_ips(self) -> list[str]:
        """The raw IPs of sightings made without a name whose connections all went undecided within
        UNNAMED_KEEP, the longest gone first (older ones are let go here)."""
        gone = self._unnamed_gone
        if gone:
            old = time.monotonic() - UNNAMED_KEEP
            for ip, keys in list(gone.items()):
                for key in [k for k, t in keys.items() if t < old]:
                    del keys[key]
                if not keys:
                    del gone[ip]
        return list(gone)

    def is_own_listener(self, host: str, port: int) -> bool:
        """The hard guard: never connect to the stack's own listeners on any local address (while a
        listener binds a wildcard address, any address of this machine: the kernel is asked, a UDP
        connect that never waits, greyproxy/localaddr.py; only for one of our ports)."""
        g = self.guard_ports
        return g.refuses(host, port) or (g.asks_kernel(host, port) and is_local_address(host))

    # -- the decision --
    def admit_now(
        self, container: str, host: str, port: int, method: str, client_gone: ClientGone = None
    ) -> Verdict | Coroutine[Any, Any, Verdict]:
        """The verdict for a connection to (host, port), given at once when nothing has to wait (the
        usual case: no coroutine is made); else the coroutine of the decision's rest, which waits (the
        name hook's lookup, a name's addresses for an address rule, a hold) and gives the verdict.
        `client_gone`: a future that completes when the client disconnects (ends a hold early), or a
        function making it, called only for a hold (a decision that does not wait makes no future).
        Its log entry is written when the verdict is given (an allowed tunnel's: see `finish_log`)."""
        t0 = _perf_counter()
        host = _normalise_host(host)
        hook = self.name_hook
        if hook is not None:
            wait = hook(container, host, port)
            if wait is not None:
                return self._admit_later(t0, container, host, port, method, client_gone, wait, None, None)
        return self._decide(t0, container, host, port, method, client_gone)

    async def admit(self, container: str, host: str, port: int, method: str, client_gone: ClientGone = None) -> Verdict:
        """`admit_now`'s verdict, waited for when it has to wait."""
        got = self.admit_now(container, host, port, method, client_gone)
        if type(got) is Verdict:
            return got
        return await got  # type: ignore[misc]

    def _decide(
        self, t0: float, container: str, host: str, port: int, method: str, client_gone: ClientGone
    ) -> Verdict | Coroutine[Any, Any, Verdict]:
        """`admit_now` once the name hook has nothing (more) to wait for."""
        resolved = self.resolved_name(host)
        self.decisions += 1
        key = (container, host, port, resolved)
        silent = self.silent.mode is not None
        if not silent:
            now = _time()  # (one clock reading for the rule's hit and the log entry)
            hit = self._kept(key, now)
            if hit is not None:
                cached = _new_verdict(hit[0], hit[1], hit[2], resolved)
                return self._decided(t0, container, host, port, method, cached, now)
        j = self.judge(container, host, port, resolved)
        if j.needs_addresses:
            # An address rule may deny where this name resolves to: that deny wins (no hold).
            return self._admit_later(t0, container, host, port, method, client_gone, None, j, resolved)
        if not silent and j.decision != "pending":
            self._remember(key, j)
        verdict = self._verdict(j, resolved)
        if verdict is None:
            return self._admit_later(t0, container, host, port, method, client_gone, None, None, resolved)
        return self._decided(t0, container, host, port, method, verdict)

    async def _admit_later(
        self,
        t0: float,
        container: str,
        host: str,
        port: int,
        method: str,
        client_gone: ClientGone,
        wait: Awaitable[Any] | None,
        j: Judgement | None,
        resolved: str | None,
    ) -> Verdict:
        """The rest of a decision that waits: for the name hook's lookup (`wait`), then the decision;
        for the addresses of a name an address rule may deny (`j`, the judgement without them); for
        a person (a hold)."""
        if wait is not None:
            await wait
            got = self._decide(t0, container, host, port, method, client_gone)
            return got if type(got) is Verdict else await got  # type: ignore[misc]
        if j is not None:
            addrs = await self._addresses_of(host, port)
            if addrs is not None:  # no address: the connect fails on its own (the guard judges any found)
                g = self.guard_ports
                # (a wildcard bind: which of them are this machine's, judged with them; see is_own_listener)
                local = local_addresses(addrs) if g.wildcard and port in g.own_ports else ()
                j = self.judge(container, host, port, resolved, addrs, local=local)
            verdict = self._verdict(j, resolved)
            if verdict is not None:
                return self._decided(t0, container, host, port, method, verdict)
        verdict = await self._hold(container, host, port, resolved, client_gone)
        return self._decided(t0, container, host, port, method, verdict)

    def _decided(
        self, t0: float, container: str, host: str, port: int, method: str, verdict: Verdict, now: float | None = None
    ) -> Verdict:
        """A verdict given: its time, the metrics, its log entry (an allowed tunnel's deferred when
        HTTPS interception is installed: `finish_log`); `now`: the clock (time.time) if read already."""
        elapsed = _perf_counter() - t0
        verdict.elapsed_ms = elapsed * 1000
        allowed = verdict.allowed
        if allowed:
            self.allowed_count += 1
        else:
            self.blocked_count += 1
        self.decision_seconds.observe(elapsed)
        if allowed and self.defer_tunnel_logs and (method == "CONNECT" or method == "SOCKS5"):
            verdict.log_pending = (container, host, port, method)
        else:
            self.record(container, host, port, method, verdict, None, now)
        return verdict

    # -- addresses (rules whose destination is an IP or a CIDR) --
    def _address_rules_apply(self, container: str, port: int) -> bool:
        return self.silent.active_mode() is None and self._rules.may_deny_address(container, port)

    async def _addresses_of(self, host: str, port: int) -> list[str] | None:
        """A name's addresses, looked up (off the loop) at most every ADDRESS_TTL seconds: the
        admission check may be a little stale, the guard judges the address really connected to."""
        now = time.monotonic()
        hit = self._addresses.get(host)
        if hit is not None and now - hit[1] < ADDRESS_TTL:
            return hit[0]
        try:
            found = await resolve(asyncio.get_running_loop(), host, port, RESOLVE_TIMEOUT)
        except UpstreamFailure:
            return None
        addrs = list(dict.fromkeys(ip for ip, _p in found))
        if len(self._addresses) >= ADDRESS_CACHE:
            self._addresses.clear()  # bounded (names come from clients): start over
        self._addresses[host] = (addrs, now)
        return addrs

    def keeps(self, container: str, port: int, conn: Any) -> bool:
        """Whether `conn`, an upstream connected earlier for `container`'s requests to `port` (parked
        in the pool, or kept on the client's connection between its requests), may serve the next
        one: its address is judged again by the address rules as they are now (without a log
        entry: a refused one is closed and the fresh connect is judged, and logged, as any)."""
        rules = self._rules
        if rules.address is None or not self._address_rules_apply(container, port):
            return True  # the usual case: no address rule could deny it
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if not peer:
            return False
        return rules.address_denial(container, peer[0], port) is None

    def guard(self, ip: str, port: int, adm: Admission) -> str | None:
        """Judge one address the admitted connection `adm` is about to connect to; why not, or None.

        Never the stack's own listeners; and an address an address rule denies for `adm`'s client
        (a name may resolve differently now than when it was admitted). Such a refusal is logged as
        a block by that rule, in place of the tunnel's pending allow entry.
        """
        if self.is_own_listener(ip, port):
            # (admission judged a name on one of our ports by its addresses: here only when it
            # resolves differently now, or a kept-alive re-check that does not resolve)
            self._refused_at_connect(adm, Verdict(False, "guard", None, adm.verdict.resolved_hostname))
            log.info(
                "%s -> %s:%d refused: it resolves to %s, one of this proxy's own listeners",
                adm.container,
                adm.host,
                adm.port,
                ip,
            )
            return "resolves to this proxy's own listener"
        if not self._address_rules_apply(adm.container, port):
            return None
        rule = self._rules.address_denial(adm.container, ip, port)
        if rule is None:
            return None
        self._hit(rule.id)
        host = _normalise_host(adm.host)
        self._refused_at_connect(adm, Verdict(False, "rule", rule.id, adm.verdict.resolved_hostname))
        log.info(
            "%s -> %s:%d refused: it resolves to %s, which rule %d denies",
            adm.container,
            host,
            adm.port,
            ip,
            rule.id,
        )
        return f"resolves to {ip}, which rule {rule.id} denies"

    def _refused_at_connect(self, adm: Admission, block: Verdict) -> None:
        """Log the guard's refusal of an admitted connection's address (`guard`), in place of the
        allowed tunnel's deferred entry; an allowed request's entry is written already, so this one
        follows it."""
        v = adm.verdict
        v.log_pending = None  # a deferred tunnel entry becomes this block instead
        block.elapsed_ms = v.elapsed_ms
        self.record(adm.container, _normalise_host(adm.host), adm.port, adm.method, block)

    def finish_log(self, verdict: Verdict, mitm_skip_reason: str | None = None) -> None:
        """Write a deferred tunnel log entry (once; later calls do nothing)."""
        pending = verdict.log_pending
        if pending is not None:  # (positional: a call with *args and a keyword costs ~3k instructions more)
            verdict.log_pending = None
            self.record(pending[0], pending[1], pending[2], pending[3], verdict, mitm_skip_reason)

    def judge(
        self,
        container: str,
        host: str,
        port: int,
        resolved: str | None,
        addresses: list[str] | None = None,
        explain: bool = False,
        local: Collection[str] = (),
    ) -> Judgement:
        """The decision (policy.judge: the same function GET /api/rules/explain calls)."""
        return judge(
            self._rules,
            container,
            host,
            port,
            resolved=resolved,
            silent=self.silent.active_mode(),
            guard=self.guard_ports,
            addresses=addresses,
            decide=self._decide_rules,
            explain=explain,
            local=local,
        )

    def _verdict(self, j: Judgement, resolved: str | None = None, count: bool = True) -> Verdict | None:
        """The verdict for a judgement (None: hold it); counts the winning rule's hit (`count`)."""
        if j.decision == "pending":
            return None
        if j.rule is not None:
            if count:
                self._hit(j.rule.id)
            return _new_verdict(j.decision == "allow", "rule", j.rule.id, resolved)
        return _new_verdict(j.decision == "silent_allow", j.decision, None, resolved)

    def _decide_now(self, container: str, host: str, port: int, resolved: str | None) -> Verdict | None:
        """Rules, silent mode and the guard without resolving the name (address rules judge a
        literal address only): a kept-alive request's re-check and the release of holds."""
        return self._verdict(self.judge(container, host, port, resolved))

    def check_request(self, container: str, host: str, port: int, counted: int | None = None) -> Verdict:
        """Per-request re-check on a kept-alive connection: rules only, no hold (already decided).
        Answered from `_verdicts` (the admission's cache, which the tunnel's own admission filled for
        the same destination) as `_decide` answers from it; what it judges, it keeps there the same way.

        `counted`: the rule whose hit the connection's own admission counted (a tunnel's requests):
        a request that rule decides again is no second hit (SPEC §2.1: a hit per decision of a
        connection); another rule deciding it (the rules changed since) counts one."""
        host = _normalise_host(host)
        resolved = self.resolved_name(host)
        key = (container, host, port, resolved)
        silent = self.silent.mode is not None
        if not silent:
            now = _time()
            hit = self._kept(key, now, False)
            if hit is not None:
                rule_id = hit[2]
                if rule_id is not None and rule_id != counted:
                    self._hit(rule_id, now)
                return _new_verdict(hit[0], hit[1], rule_id, None)
        j = self.judge(container, host, port, resolved)
        if not silent and not j.needs_addresses and j.decision != "pending":
            self._remember(key, j)
        v = self._verdict(j, None, False)
        if v is None:
            return Verdict(False, "default_deny")
        if v.rule_id is not None and v.rule_id != counted:
            self._hit(v.rule_id)
        return v

    async def _hold(
        self, container: str, host: str, port: int, resolved: str | None, client_gone: ClientGone
    ) -> Verdict:
        """Hold a connection for a person's decision; the verdict, its `resolved_hostname` the name
        it was last judged with."""
        v = await self._held(container, host, port, resolved, client_gone)
        if v.resolved_hostname is None:
            v.resolved_hostname = resolved if resolved is not None else self.resolved_name(host)
        return v

    async def _held(
        self, container: str, host: str, port: int, resolved: str | None, client_gone: ClientGone
    ) -> Verdict:
        if callable(client_gone):
            client_gone = client_gone()
        key: Key = (container, host, port)
        if key not in self.holds:
            if resolved is None and self.name_grace and _is_ip(host):
                # Workers: the client may have asked another worker's DNS proxy for this IP's name.
                resolved = (await self._name_waits.wait((host,), self.name_grace)).get(host)
                if resolved is not None:
                    v = self._decide_now(container, host, port, resolved)
                    if v is not None:
                        return v
            room = await self._pending_room(key)
            # A decision that came while the queue was looked at (a rule, silent mode, a name: a
            # look at the recorder over tcp:// takes milliseconds) released the holds there were,
            # not this one.
            if resolved is None:
                resolved = self.resolved_name(host)
            v = self._decide_now(container, host, port, resolved)
            if v is not None:
                v.resolved_hostname = resolved
                return v
            if not room:
                return Verdict(False, "queue_full")
        loop = asyncio.get_running_loop()
        held_at = time.perf_counter()
        hold = Hold(key, resolved, loop.create_future())
        waiters = self.holds.setdefault(key, [])
        waiters.append(hold)
        self._waiters_changed(key, len(waiters) - 1, len(waiters), resolved)
        waiting = self.entry_waiting(key, resolved)  # (the entry's: a sibling IP's holds count too)
        self.journal.append(records.PENDING, records.pending_record(container, host, port, resolved, waiting))
        try:
            wait = {hold.future}
            if client_gone is not None:
                wait.add(client_gone)
            done, _ = await asyncio.wait(wait, timeout=self.hold_timeout, return_when=asyncio.FIRST_COMPLETED)
            if hold.future in done:
                return hold.future.result()
            if client_gone is not None and client_gone in done:
                return Verdict(False, "client_gone")
            return Verdict(False, "hold_timeout")
        finally:
            self.hold_seconds.observe(time.perf_counter() - held_at)
            waiters = self.holds.get(key, [])
            if hold in waiters:
                waiters.remove(hold)
                self._waiters_changed(key, len(waiters) + 1, len(waiters), hold.resolved)
            if not waiters:
                self.holds.pop(key, None)
                if hold.resolved is None and not hold.future.done() and _is_ip(host):
                    self._gone_unnamed(key)

    async def _pending_room(self, key: Key) -> bool:
        """proxy.maxPending (SPEC §3.1): whether a connection to `key`, held by no connection here,
        may wait. One look at the database per such connection (a new destination: rare, and
        its client waits for a person anyway), one at a time: a key already queued (another
        worker's, or one nobody waits on any more) may, a new one while the queue is under the
        cap, counting the keys this process held in the last PENDING_IN_FLIGHT seconds that the
        database has not shown yet (their records on their way to the recorder). Exact across
        workers but for new keys that reach two of them within those milliseconds."""
        lookup = self.pending_lookup
        if lookup is None:  # (no database: the count at the last refresh and the keys held since)
            if self.pending_count + self.pending_admitted < self.max_pending:
                self.pending_admitted += 1
                return True
            return False
        async with self._pending_lock:
            now = time.monotonic()
            recent = self._pending_recent
            for k in [k for k, t in recent.items() if now - t > PENDING_IN_FLIGHT]:
                del recent[k]
            keys = [key, *[k for k in recent if k != key]]
            try:
                size, queued = await lookup(keys)
            except Exception as exc:
                # (a recorder away has been reported once by the view: no traceback per connection)
                from .store_view import RecorderAway

                log.warning(
                    "proxy.maxPending: the pending queue could not be read; going by the last count",
                    exc_info=not isinstance(exc, RecorderAway),
                )
                # as with no database: the last count and the keys admitted since, this one counted
                if self.pending_count + self.pending_admitted < self.max_pending:
                    self.pending_admitted += 1
                    return True
                return False
            self.pending_count, self.pending_admitted = size, 0
            for k, q in zip(keys[1:], queued[1:]):
                if q:
                    del recent[k]  # in the database now: counted in its size from here on
            if queued[0]:
                return True
            if size + len(recent) < self.max_pending:
                recent[key] = now
                return True
            return False

    def _waiters_changed(self, key: Key, previous: int, current: int, resolved: str | None) -> None:
        """`resolved`: the name the connection that came or went was judged under; it tells which
        pending entry the key's connections count for (another IP of a host has no entry of its own,
        SPEC §3.1: it bumps the entry of the host's first IP)."""
        self.publisher.publish(
            topics.WAITERS_CHANGED,
            {
                "container_name": key[0],
                "host": key[1],
                "port": key[2],
                "resolved_hostname": resolved,
                "previous_count": previous,
                "current_count": current,
            },
        )

    def waiters(self) -> list[dict[str, Any]]:
        """The connections held per key, with the name they were judged under (`_held_name`)."""
        return [
            {
                "container_name": k[0],
                "host": k[1],
                "port": k[2],
                "resolved_hostname": _held_name(v),
                "count": len(v),
            }
            for k, v in self.holds.items()
            if v
        ]

    def entry_waiting(self, key: Key, name: str | None) -> int:
        """The connections held here for the pending entry of `key` judged under `name`: those held
        for `key`, and those held for another host of its container and port whose name (a raw host
        with none: the host itself) is `name` (the entry's group, as the API groups its rows:
        container, resolved-or-raw host, port). One look at every held key: learn does as much."""
        held = self.holds
        n = len(held.get(key, ()))
        if name is None:
            name = key[1]  # (a key with no name is its group's name: a name's own key, or a raw host's)
        container, port = key[0], key[2]
        for k, waiters in held.items():
            if k[2] == port and k[0] == container and k != key:
                for hold in waiters:
                    if (hold.resolved or k[1]) == name:
                        n += 1
        return n

    def waiting(self) -> int:
        return sum(len(v) for v in self.holds.values())

    # -- re-evaluation on changes --
    def reevaluate_holds(self) -> int:
        """After a rule swap or a silent-mode change: release every hold a decision now covers."""
        released = 0
        for key, waiters in list(self.holds.items()):
            name: str | None = None
            rule_id: int | None = None
            for hold in list(waiters):
                if hold.future.done():
                    continue
                unnamed = hold.resolved is None
                if unnamed:
                    hold.resolved = self.resolved_name(key[1])
                    if hold.resolved is not None:
                        name = hold.resolved
                v = self._decide_now(key[0], key[1], key[2], hold.resolved)
                if v is not None:
                    hold.future.set_result(v)
                    released += 1
                    if unnamed and hold.resolved is not None:
                        rule_id = v.rule_id
            if name is not None:
                self._withdraw_sighting(key, name, rule_id)
        return released

    def block_holds(self, keys: list[Key], reason: str) -> int:
        """Block the connections held for these keys (dismissed, denied): those held for a key, and
        those held for another host of its container and port judged under the key's host as their
        name. A pending entry stands for its group (SPEC §3.1: another IP of the same host bumps the
        entry and has no row of its own); the API names the group by (container, resolved-or-raw
        host, port) among the keys of its rows."""
        wanted = set(keys)
        n = 0
        for key, waiters in list(self.holds.items()):
            exact = key in wanted
            for hold in waiters:
                if hold.future.done():
                    continue
                if exact or (hold.resolved is not None and (key[0], hold.resolved, key[2]) in wanted):
                    hold.future.set_result(Verdict(False, reason))
                    n += 1
        return n

    @property
    def rules(self) -> RuleSet:
        return self._rules

    @rules.setter
    def rules(self, rules: RuleSet) -> None:
        self._rules = rules
        # Rule decisions per (container, host, port, resolved name) for this rule set: the same few
        # destinations come back on every request. A decision stays right until the rule set is
        # replaced (and this cache with it) or its winning rule expires (a rule that loses now can
        # only lose more as others expire, and an expired rule never comes back).
        self._decisions: dict[tuple[str, str, int, str | None], tuple[Decision, float]] = {}
        # Whole verdicts of `admit` per (container, host, port, resolved name), by the same reasoning:
        # (allowed, reason, rule id, valid until). Only judgements made without silent mode (none is
        # used while a silent mode is set: it may end by the clock) and without looking up addresses
        # (those are re-judged each time); holds are never cached. Every rule swap (`set_rules`, this
        # setter) starts it over; silent mode changes (`set_silent`) too.
        self._verdicts: dict[tuple[str, str, int, str | None], tuple[bool, str, int | None, float]] = {}

    def _kept(
        self, key: tuple[str, str, int, str | None], now: float, count: bool = True
    ) -> tuple[bool, str, int | None, float] | None:
        """The verdict `_remember` kept for `key`, while its rule has not expired at `now`, its rule's
        hit counted (`count`; `_decide` and `check_request` answer from it alike); None: judge it."""
        hit = self._verdicts.get(key)
        if hit is None or not (hit[3] == _INF or now < hit[3]):
            return None
        if count and hit[2] is not None:
            self._hit(hit[2], now)
        return hit

    def _remember(self, key: tuple[str, str, int, str | None], j: Judgement) -> None:
        """Keep a judgement made without silent mode and without looking up addresses (`_verdicts`)."""
        if len(self._verdicts) >= DECISION_CACHE:
            self._verdicts.clear()  # bounded (destinations come from clients): start over
        rule = j.rule
        expires = rule.expires_at if rule is not None else None
        self._verdicts[key] = (
            j.decision == "allow",
            "rule" if rule is not None else j.decision,
            rule.id if rule is not None else None,
            expires if expires is not None else math.inf,
        )

    def _decide_rules(self, container: str, host: str, port: int, resolved: str | None) -> Decision:
        key = (container, host, port, resolved)
        hit = self._decisions.get(key)
        now = time.time()
        if hit is not None and now < hit[1]:
            return hit[0]
        d = self._rules.decide(container, host, port, resolved_hostname=resolved, now=now)
        if len(self._decisions) >= DECISION_CACHE:
            self._decisions.clear()  # bounded (destinations come from clients): start over
        expires = d.rule.expires_at if d.rule is not None else None
        self._decisions[key] = (d, expires if expires is not None else math.inf)
        return d

    def set_rules(self, rules: RuleSet, version: int) -> None:
        self.rules = rules
        self.rules_version = version
        self._summaries = {}
        self.reevaluate_holds()
        self.close_revoked()

    def close_revoked(self) -> int:
        """Close live connections whose allowing rule was deleted or turned to deny (SPEC §2.4), unless
        another rule allows them now. A rule that only expired keeps what it let in: expiry ends what
        the rule admits from then on, not the connections it admitted (an "allow once" rule expires
        30 s after the approval it answered; a clone or a stream it let through goes on)."""
        closed = 0
        for cid, lc in list(self.live.items()):
            if lc.rule_id is None:
                continue
            rule = self.rules.get(lc.rule_id)
            if rule is not None and rule.action == "allow":
                continue
            d = self.rules.decide(lc.container, lc.host, lc.port, resolved_hostname=lc.resolved)
            if d.rule is not None and d.rule.action == "allow":
                lc.rule_id = d.rule.id  # another rule still allows it
                continue
            log.info("closing %s -> %s:%d: rule %s no longer allows it", lc.container, lc.host, lc.port, lc.rule_id)
            self.live.pop(cid, None)
            lc.close()
            closed += 1
        return closed

    def close_identities(self, names: set[str]) -> int:
        """Close the live connections of these client identities (a claim rotated or deleted)."""
        closed = 0
        for cid, lc in list(self.live.items()):
            if lc.container in names:
                self.live.pop(cid, None)
                lc.close()
                closed += 1
        return closed

    # -- live connections --
    def track(self, container: str, host: str, port: int, verdict: Verdict, close: Callable[[], None]) -> int:
        self._live_ids += 1
        lc = LiveConn.__new__(LiveConn)  # (compiled: without the call of its __init__, once per connection)
        lc.container = container
        lc.host = _normalise_host(host)
        lc.port = port
        lc.resolved = verdict.resolved_hostname
        lc.rule_id = verdict.rule_id
        lc.close = close
        self.live[self._live_ids] = lc
        return self._live_ids

    def untrack(self, cid: int) -> None:
        self.live.pop(cid, None)

    # -- records --
    def _hit(self, rule_id: int, now: float | None = None) -> None:
        """Count a hit of rule `rule_id` (at `now`, time.time, if read already)."""
        h = self._hits.get(rule_id)
        if now is None:
            now = _time()
        if h is None:
            self._hits[rule_id] = [1, now]
        else:
            h[0] += 1
            h[1] = now

    def flush_hits(self) -> None:
        hits, self._hits = self._hits, {}
        for rule_id, (count, last) in hits.items():
            self.journal.append(records.RULE_HIT, records.rule_hit_record(rule_id, count, last))

    def record(
        self,
        container: str,
        host: str,
        port: int,
        method: str,
        verdict: Verdict,
        mitm_skip_reason: str | None = None,
        now: float | None = None,
    ) -> None:
        """The log entry of a decision (`now`: its time, time.time, if read already)."""
        summary = None
        if verdict.rule_id is not None:
            summary = self._summaries.get(verdict.rule_id)
            if summary is None:
                rule = self.rules.get(verdict.rule_id)
                if rule is not None:
                    summary = self._summaries[verdict.rule_id] = rule_summary(rule)
        self.journal.append(
            _LOG,
            log_values(  # (shape 2, positional: bus/records.py LOG_FIELDS; compiled, a C call)
                container,
                host,
                port,
                method,
                ALLOWED if verdict.allowed else BLOCKED,
                verdict.resolved_hostname,
                verdict.rule_id,
                summary,
                verdict.elapsed_ms,
                verdict.reason,
                mitm_skip_reason,
                self.container_ids.get(container, ""),
                now,
            ),
        )

    # -- silent mode --
    def set_silent(self, mode: str | None, duration: float | None, announce: bool = True) -> dict[str, Any]:
        """Silent mode on (for `duration` seconds, None: until restart) or off. `announce=False`:
        the API giving a worker the mode the others have (no news: no allowall.changed)."""
        s = self.silent
        if s._timer is not None:
            s._timer.cancel()
            s._timer = None
        s.mode = mode
        s.expires_at = time.time() + duration if (mode and duration) else None
        self._verdicts = {}  # (not used while a mode is set; started over anyway)
        if mode and duration:
            s._timer = asyncio.get_running_loop().call_later(duration, self._silent_expired)
        status = s.status()
        if self.announce_silent and announce:
            self.publisher.publish(topics.ALLOWALL_CHANGED, status)
        if mode:
            self.reevaluate_holds()
        return status

    def _silent_expired(self) -> None:
        self.silent._timer = None
        self.silent.mode = None
        self.silent.expires_at = None
        if self.announce_silent:
            self.publisher.publish(topics.ALLOWALL_CHANGED, self.silent.status())


slotted(globals(), "Verdict", "Admission", "LiveConn")  # (as Python: __slots__, see Verdict)
