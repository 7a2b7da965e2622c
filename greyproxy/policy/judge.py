"""The one decision function (SPEC §2.3, §4, §16 explain): what the proxy's gate does with a
destination, and, when asked, why.

`judge` is called by the gate for every connection and by GET /api/rules/explain; there is no
second copy of the order:

  1. the guard: never the stack's own listeners on a local address            → "guard"
  2. silent mode (allow-all / deny-all)                                       → "silent_allow"/"silent_deny"
  3. the rules: the winner for the raw host, else for its resolved hostname   → "allow"/"deny"
     (layer global > session > builtin, then higher specificity, then deny on a tie, then lower id)
  4. address rules (IP / CIDR destinations) judge the addresses the name resolves to: a deny there
     wins over an allow or over no rule at all                                → "deny"
  5. nothing matched                                                          → "pending" (held)

Step 4 needs the destination's addresses; when they are not given and an address deny could
apply, the answer says `needs_addresses` (the gate resolves the name and asks again). So does a
name on one of the stack's own ports: step 1 judges the addresses it resolves to as well; and,
while a listener binds a wildcard address, an address on one of them: whether it is one of this
machine's the caller asks the kernel (`Guard.asks_kernel`, greyproxy/localaddr.py) and passes
the answer as `local`.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from .patterns import normalise_host, parse_ip
from .ruleset import LAYERS, CompiledRule, Decision, Rule, RuleSet

DECISIONS = ("allow", "deny", "pending", "silent_allow", "silent_deny", "guard")
ALWAYS_LOCAL = frozenset({"localhost", "0.0.0.0", "::", "::1"})


class Guard:
    """The hard guard: the stack's own listener ports on any local address are never a destination.

    Local on its own: loopback, the unspecified addresses, `localhost` names and the hosts the
    listeners bind. While one of them binds a wildcard address (`wildcard`) it answers on every
    address of this machine too: which those are the kernel knows (greyproxy/localaddr.py), so
    that is asked outside this pure code, by whoever judges (the gate, explain), and only for an
    address on one of our ports (`asks_kernel`); `judge` takes the answer as its `local`."""

    __slots__ = ("local_hosts", "own_ports", "wildcard")

    def __init__(self, own_ports: Collection[int], local_hosts: Iterable[str]) -> None:
        self.own_ports = set(own_ports)
        hosts = {h.lower() for h in local_hosts}
        self.wildcard = any(_unspecified(h) for h in hosts)
        self.local_hosts = hosts | ALWAYS_LOCAL

    def refuses(self, host: str, port: int) -> bool:
        if port not in self.own_ports:
            return False
        h = host.lower().rstrip(".")
        if h in self.local_hosts or h.endswith(".localhost"):
            return True
        try:
            ip = ipaddress.ip_address(h.strip("[]"))
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return ip.is_loopback or ip.is_unspecified or str(ip) in self.local_hosts

    def asks_kernel(self, host: str, port: int) -> bool:
        """Whether `host` on `port` is refused exactly when it is an address of this machine: a
        listener binds a wildcard address, `port` is one of ours, `host` is an address that
        `refuses` does not refuse on its own."""
        return self.wildcard and port in self.own_ports and parse_ip(host) is not None and not self.refuses(host, port)

    @classmethod
    def from_config(cls, cfg: Any) -> Guard:
        """The guard for a loaded config: its listener ports and the hosts they (and the API) bind."""
        local = {lst.host for lst in cfg.listeners.values()} | ({cfg.api.host} if cfg.api else set())
        return cls(cfg.own_ports, local)


def _unspecified(host: str) -> bool:
    """Whether a bind host is a wildcard (every address of the machine)."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


@dataclass(slots=True)
class Candidate:
    """A rule whose destination names this host, its resolved hostname, or one of its addresses."""

    rule: Rule
    matched: bool  # container, destination, port all match and the rule is active
    specificity: int
    matched_on: str  # 'host', 'resolved' or 'address'
    why: str  # why it does not apply, or how it ranks


@dataclass(slots=True)
class Judgement:
    decision: str
    rule: Rule | None = None
    matched_on: str | None = None  # 'host', 'resolved', 'address' (an address rule judged an address)
    address: str | None = None  # the resolved address an address rule denied (or the guard refused)
    needs_addresses: bool = False  # step 4 may change the answer: resolve the name, ask again
    candidates: list[Candidate] | None = field(default=None)

    @property
    def layer(self) -> str | None:
        return None if self.rule is None else self.rule.source

    @property
    def allowed(self) -> bool:
        return self.decision in ("allow", "silent_allow")


def judge(
    rules: RuleSet,
    container: str,
    host: str,
    port: int,
    *,
    resolved: str | None = None,
    silent: str | None = None,
    guard: Guard | None = None,
    addresses: list[str] | None = None,
    decide: Callable[[str, str, int, str | None], Decision] | None = None,
    now: float | None = None,
    explain: bool = False,
    local: Collection[str] = (),
) -> Judgement:
    """The decision for `container` → `host:port` (host already normalised). `decide` replaces
    `rules.decide` (the gate passes its cached one); `explain` adds the candidates. `local`: those
    of `host` and `addresses` the caller found to be addresses of this machine (asked only when
    `guard.asks_kernel` says so; greyproxy/localaddr.py)."""
    # 1. the guard; a name on one of our ports may resolve to us: judged by its addresses (and so
    # is an address there while a listener binds a wildcard address: the caller asks the kernel)
    j: Judgement | None = None
    own_port_name = False
    if guard is not None and port in guard.own_ports:
        if guard.refuses(host, port) or host in local:
            j = Judgement("guard")
        elif addresses is not None:
            ip = next((a for a in addresses if guard.refuses(a, port) or a in local), None)
            if ip is not None:
                j = Judgement("guard", address=None if ip == host else ip)
        elif parse_ip(host) is None or guard.wildcard:
            own_port_name = True
    if j is None:
        j = _judge(rules, container, host, port, resolved, silent, addresses, decide, now)
        if own_port_name and j.decision not in ("deny", "silent_deny"):
            j.needs_addresses = True
    if explain:
        j.candidates = candidates(rules, container, host, port, resolved, addresses, now)
    return j


def _judge(
    rules: RuleSet,
    container: str,
    host: str,
    port: int,
    resolved: str | None,
    silent: str | None,
    addresses: list[str] | None,
    decide: Callable[[str, str, int, str | None], Decision] | None,
    now: float | None,
) -> Judgement:
    """Steps 2-5 of the module doc (the guard passed)."""
    if silent == "allow":
        return Judgement("silent_allow")
    if silent == "deny":
        return Judgement("silent_deny")
    d = (
        decide(container, host, port, resolved)
        if decide is not None
        else rules.decide(container, host, port, resolved_hostname=resolved, now=now)
    )
    if d.rule is not None and d.rule.action == "deny":
        return Judgement("deny", d.rule, d.matched_on)
    if rules.may_deny_address(container, port, now):
        if addresses is None:
            if parse_ip(host) is not None:
                addresses = [host]
            else:
                return Judgement(
                    "allow" if d.rule is not None else "pending", d.rule, d.matched_on, needs_addresses=True
                )
        for ip in addresses:
            rule = rules.address_denial(container, ip, port, now)
            if rule is not None:
                return Judgement("deny", rule, "address", address=ip)
    if d.rule is not None:
        return Judgement("allow", d.rule, d.matched_on)
    return Judgement("pending")


def candidates(
    rules: RuleSet,
    container: str,
    host: str,
    port: int,
    resolved: str | None = None,
    addresses: list[str] | None = None,
    now: float | None = None,
) -> list[Candidate]:
    """Every rule whose destination names this host (or its resolved name, or, for address rules,
    an address it resolves to), in winning order, each saying whether it applies and why not."""
    now = time.time() if now is None else now
    names = [("host", normalise_host(host))]
    if resolved:
        names.append(("resolved", normalise_host(resolved)))
    out: list[Candidate] = []
    for c in rules.compiled:
        on = _destination_hit(c, names, addresses)
        if on is None:
            continue
        why = _why_not(c, container, port, now)
        out.append(
            Candidate(
                c.rule,
                why is None,
                c.specificity,
                on,
                why or f"applies: {c.rule.source} layer, specificity {c.specificity}",
            )
        )
    return out


def _destination_hit(c: CompiledRule, names: list[tuple[str, str]], addresses: list[str] | None) -> str | None:
    for on, name in names:
        if c.destination.matches(name, parse_ip(name)):
            return on
    if addresses:
        for ip in addresses:
            if c.destination.matches(ip, parse_ip(ip)):
                return "address"
    return None


def _why_not(c: CompiledRule, container: str, port: int, now: float) -> str | None:
    if not c.container.matches(container):
        return f"container pattern {c.rule.container_pattern!r} does not match {container!r}"
    if not c.port.matches(int(port)):
        return f"port pattern {c.rule.port_pattern!r} does not match {port}"
    if not c.is_active(now):
        return "expired"
    return None


def reason(j: Judgement, container: str, host: str, port: int) -> str:
    """A sentence saying why `j` is the answer (from its candidates when it has them)."""
    dest = f"{host}:{port}"
    if j.decision == "guard":
        if j.address is not None:
            return (
                f"{host} resolves to {j.address}, and {j.address}:{port} is one of this proxy's own listeners: "
                "never a destination, whatever the rules say"
            )
        return f"{dest} is one of this proxy's own listeners: never a destination, whatever the rules say"
    if j.decision == "silent_allow":
        return "silent allow-all mode is on: everything is allowed (and logged) until it ends"
    if j.decision == "silent_deny":
        return "silent deny-all mode is on: everything is denied until it ends"
    if j.decision == "pending":
        return (
            f"no rule matches {container!r} → {dest}: the connection is held for a person's decision "
            "(a pending entry), then refused when the hold times out"
        )
    r = j.rule
    assert r is not None
    if j.matched_on == "address":
        return (
            f"{host} resolves to {j.address}, which address rule {r.id} ({r.destination_pattern}) denies; "
            "an address deny wins over any allow for the name"
        )
    head = f"rule {r.id} ({r.action}) wins"
    if j.matched_on == "resolved":
        head += f": no rule matches {host} itself, so the resolved hostname was tried"
    cands = [c for c in (j.candidates or []) if c.matched and c.matched_on == (j.matched_on or "host")]
    win = next((c for c in cands if c.rule.id == r.id), None)
    if win is None:
        return head
    lower_layer = [c for c in cands if LAYERS[c.rule.source] > LAYERS[r.source]]
    same_layer = [c for c in cands if c.rule.source == r.source and c.rule.id != r.id]
    tie = [c for c in same_layer if c.specificity == win.specificity]
    parts = [f"{r.source} layer, specificity {win.specificity}"]
    if lower_layer:
        parts.append(f"the {r.source} layer overrides {len(lower_layer)} matching rule(s) of lower layers")
    less = [c for c in same_layer if c.specificity < win.specificity]
    if less:
        parts.append(f"more specific than {len(less)} other matching rule(s) of its layer")
    if tie:
        if r.action == "deny" and any(c.rule.action == "allow" for c in tie):
            parts.append("deny wins a tie with an allow of the same specificity")
        else:
            parts.append("of equally specific rules with the same action, the lowest id wins")
    if j.decision == "allow" and j.address is None and j.needs_addresses:
        parts.append("address rules could still deny the addresses the name resolves to")
    return f"{head} ({'; '.join(parts)})"
