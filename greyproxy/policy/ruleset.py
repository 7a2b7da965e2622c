"""Rules and the immutable, indexed RuleSet that decides connections (SPEC §2.2, §2.3).

A RuleSet is built once from all rules (compile + index) and then only read, so
the proxies can swap in a new snapshot atomically whenever rules change.

Lookup cost per decision, with n rules:
  * exact hosts, ``**.x`` apexes  — one dict lookup each;
  * ``*.x`` / ``**.x`` suffixes   — one dict lookup per label of the host;
  * CIDRs                         — one dict lookup per distinct prefix length;
  * globs (``api.*``)             — one dict lookup per distinct length of their
    literal prefix/suffix; globs with neither (``*cdn*``) are scanned linearly,
    which is acceptable because such patterns are rare;
  * ``*`` destinations            — one bucket.
Inside a bucket rules are split by exact container name and kept in winning
order, so a scan stops at the first usable rule or as soon as nothing in the
bucket could beat the best rule found so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .patterns import (
    ContainerKind,
    DestKind,
    PortRanges,
    analyse_host,
    container_pattern,
    destination_pattern,
    normalise_host,
    parse_ip,
    port_pattern,
)

ACTIONS = ("allow", "deny")
# Lower index wins: a person's global rule overrides session rules, which override the seeded ones.
LAYERS: dict[str, int] = {"global": 0, "session": 1, "builtin": 2}
BUILTIN_HOSTS = ("localhost", "127.0.0.1", "::1")

MatchedOn = Literal["host", "resolved"]


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    container_pattern: str
    destination_pattern: str
    port_pattern: str = "*"
    action: str = "allow"
    source: str = "global"
    expires_at: float | None = None  # epoch seconds; None = never expires
    session_id: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Build from REST-named fields (a JSON body or a stored row); ValueError if bad."""
        for required in ("container_pattern", "destination_pattern"):
            if not isinstance(data.get(required), str):
                raise ValueError(f"{required} is required and must be a string")
        return cls(
            id=int(data.get("id") or 0),
            container_pattern=data["container_pattern"],
            destination_pattern=data["destination_pattern"],
            port_pattern=str(data.get("port_pattern") or "*"),
            action=_checked(str(data.get("action") or "allow"), ACTIONS, "action"),
            source=_checked(str(data.get("source") or "global"), tuple(LAYERS), "source"),
            expires_at=to_epoch(data.get("expires_at")),
            session_id=data.get("session_id"),
        )

    @classmethod
    def from_row(cls, row: Any) -> Rule:
        """Build from a mapping or any object with the REST field names as attributes (ORM rows)."""
        if isinstance(row, Mapping):
            return cls.from_dict(row)
        fields = ("id", "container_pattern", "destination_pattern", "port_pattern", "action",
                  "source", "expires_at", "session_id")  # fmt: skip
        return cls.from_dict({f: getattr(row, f, None) for f in fields})

    def is_active(self, now: float | None = None) -> bool:
        return self.expires_at is None or self.expires_at > (time.time() if now is None else now)


def _checked(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def to_epoch(value: Any) -> float | None:
    """expires_at in epoch seconds from None, a number, a datetime (naive = UTC) or RFC 3339."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, bool):
        raise ValueError("expires_at must be a timestamp")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        from greyproxy.timeutil import (
            parse_time,  # late import: policy stays usable on its own
        )

        return parse_time(value)
    raise ValueError(f"expires_at must be a timestamp, not {type(value).__name__}")


def rule_summary(rule: Rule) -> str:
    """'<container> → <dest>:<port>' as shown in logs and notifications."""
    return f"{rule.container_pattern} → {rule.destination_pattern}:{rule.port_pattern or '*'}"


def builtin_rules() -> list[dict[str, Any]]:
    """The rules seeded on first start: anything may reach the local machine's loopback names."""
    return [
        {
            "container_pattern": "*",
            "destination_pattern": host,
            "port_pattern": "*",
            "rule_type": "glob",
            "action": "allow",
            "source": "builtin",
            "expires_at": None,
            "session_id": None,
            "created_by": "builtin",
            "notes": "local development servers",
        }
        for host in BUILTIN_HOSTS
    ]


# --------------------------------------------------------------------------- compiled rules


class CompiledRule:
    """A Rule with its three patterns parsed; ``matches`` is the reference predicate."""

    __slots__ = ("container", "destination", "expires", "port", "rule", "specificity")

    def __init__(self, rule: Rule) -> None:
        _checked(rule.action, ACTIONS, "action")
        _checked(rule.source, tuple(LAYERS), "source")
        if not rule.container_pattern:
            raise ValueError("container_pattern must not be empty")
        self.rule = rule
        self.container = container_pattern(rule.container_pattern)
        self.destination = destination_pattern(rule.destination_pattern)
        self.port = port_pattern(rule.port_pattern)
        self.specificity = self.container.specificity + self.destination.specificity + self.port.specificity
        self.expires = math.inf if rule.expires_at is None else float(rule.expires_at)

    def matches(self, container: str, host: str, port: int) -> bool:
        """All three patterns match (expiry not considered); ``host`` may be un-normalised."""
        h = normalise_host(host)
        return (
            self.container.matches(container)
            and self.destination.matches(h, parse_ip(h))
            and self.port.matches(int(port))
        )

    def is_active(self, now: float) -> bool:
        return self.expires > now

    def precedence_key(self) -> tuple[int, int, int, int]:
        """Smaller wins: layer, then higher specificity, then deny before allow, then lower id."""
        r = self.rule
        return (LAYERS[r.source], -self.specificity, 0 if r.action == "deny" else 1, r.id)


def compile_rule(rule: Rule) -> CompiledRule:
    return CompiledRule(rule)


# --------------------------------------------------------------------------- index structures

# Hot-path records are plain tuples: (rank, expires, ports, container_glob, host_glob).
# rank is the rule's position in global winning order, so comparing ranks compares rules.
_Ports = frozenset[int] | PortRanges | None
_Match = Callable[[str], Any] | None
_Entry = tuple[int, float, _Ports, _Match, _Match]
# A bucket: entries by exact container name, plus entries whose container is '*' or a glob.
_Bucket = tuple[dict[str, tuple[_Entry, ...]], tuple[_Entry, ...]]


class _BucketBuilder:
    __slots__ = ("by_container", "others")

    def __init__(self) -> None:
        self.by_container: dict[str, list[_Entry]] = {}
        self.others: list[_Entry] = []

    def add(self, c: CompiledRule, rank: int, host_glob: _Match) -> None:
        ports = c.port.ports
        if c.container.kind is ContainerKind.EXACT:
            self.by_container.setdefault(c.container.text, []).append((rank, c.expires, ports, None, host_glob))
        else:
            self.others.append((rank, c.expires, ports, c.container.glob, host_glob))

    def freeze(self) -> _Bucket:
        # Entries were added in rank order, so each tuple is already sorted best-first.
        return ({k: tuple(v) for k, v in self.by_container.items()}, tuple(self.others))


def _freeze_all(builders: dict[Any, _BucketBuilder]) -> dict[Any, _Bucket]:
    return {k: b.freeze() for k, b in builders.items()}


def _scan(bucket: _Bucket, container: str, host: str, port: int, now: float, best: int) -> int:
    """Best (lowest) rank in ``bucket`` usable for this request, or ``best`` if none beats it."""
    by_container, others = bucket
    if by_container:
        seq = by_container.get(container)
        if seq:
            for rank, expires, ports, _cg, host_glob in seq:
                if rank >= best:
                    break  # sorted: nothing later in this list can win
                if (
                    expires > now
                    and (ports is None or port in ports)
                    and (host_glob is None or host_glob(host) is not None)
                ):
                    best = rank
                    break
    for rank, expires, ports, container_glob, host_glob in others:
        if rank >= best:
            break
        if (
            expires > now
            and (ports is None or port in ports)
            and (container_glob is None or container_glob(container) is not None)
            and (host_glob is None or host_glob(host) is not None)
        ):
            return rank
    return best


@dataclass(frozen=True, slots=True)
class Decision:
    rule: Rule | None
    matched_on: MatchedOn | None  # which name matched: the raw host or its resolved hostname

    @property
    def action(self) -> str | None:
        return None if self.rule is None else self.rule.action

    @property
    def allowed(self) -> bool:
        return self.rule is not None and self.rule.action == "allow"

    @property
    def denied(self) -> bool:
        return self.rule is not None and self.rule.action == "deny"


_NO_DECISION = Decision(None, None)


def is_address_rule(c: CompiledRule) -> bool:
    """A rule whose destination is an IP address or a CIDR range (not a name, not '*')."""
    d = c.destination
    return d.kind is DestKind.CIDR or (d.kind is DestKind.EXACT and parse_ip(d.value) is not None)


ADDRESS_CACHE = 4096  # (container, port) answers of may_deny_address kept per rule set


class RuleSet:
    """An immutable, indexed snapshot of rules. Build a new one whenever rules change.

    Address rules (destination an IP or a CIDR) also judge the addresses a *name* resolves to:
    `address_denial` says whether the rule winning among the address rules alone, for one
    resolved address, is a deny (SPEC §2.3 order applies among them). So `deny 127.0.0.0/8 port
    8081` also stops `localhost:8081`, and `deny 169.254.0.0/16` a name that resolves there,
    whatever allows the name. `may_deny_address` is the cheap pre-check (no lookup needed when
    no address deny could apply to that client and port).
    """

    __slots__ = (
        "_addr_cache",
        "_addr_denies",
        "_any",
        "_apex",
        "_by_id",
        "_cidr4",
        "_cidr6",
        "_exact",
        "_glob_prefix",
        "_glob_rest",
        "_glob_suffix",
        "_none",
        "_ordered",
        "_suffix",
        "address",
        "compiled",
        "rejected",
        "rules",
    )

    def __init__(self, rules: Iterable[Rule] = (), *, skip_invalid: bool = False, _nested: bool = False) -> None:
        """Compile and index ``rules``. A malformed rule raises ValueError naming its id,
        unless ``skip_invalid``: then it is left out and listed in ``rejected``."""
        self.rules: tuple[Rule, ...] = tuple(rules)
        compiled: list[CompiledRule] = []
        rejected: list[tuple[Rule, str]] = []
        for rule in self.rules:
            try:
                compiled.append(CompiledRule(rule))
            except ValueError as exc:
                if not skip_invalid:
                    raise ValueError(f"rule {rule.id}: {exc}") from None
                rejected.append((rule, str(exc)))
        self.rejected: tuple[tuple[Rule, str], ...] = tuple(rejected)
        compiled.sort(key=CompiledRule.precedence_key)
        self.compiled: tuple[CompiledRule, ...] = tuple(compiled)  # in winning order (explain reads it)
        self._ordered: tuple[Rule, ...] = tuple(c.rule for c in compiled)
        # The address rules as a rule set of their own (None when a deny cannot come out of it).
        address = [c for c in compiled if is_address_rule(c)] if not _nested else []
        self._addr_denies: tuple[CompiledRule, ...] = tuple(c for c in address if c.rule.action == "deny")
        self.address: RuleSet | None = RuleSet((c.rule for c in address), _nested=True) if self._addr_denies else None
        self._addr_cache: dict[tuple[str, int], float] = {}
        self._by_id: dict[int, Rule] = {r.id: r for r in self.rules}
        self._none = len(compiled)  # sentinel rank meaning "no rule"

        exact: dict[str, _BucketBuilder] = {}
        apex: dict[str, _BucketBuilder] = {}
        suffix: dict[str, _BucketBuilder] = {}
        any_dest = _BucketBuilder()
        cidr: dict[tuple[int, int], dict[int, _BucketBuilder]] = {}
        glob_prefix: dict[int, dict[str, _BucketBuilder]] = {}
        glob_suffix: dict[int, dict[str, _BucketBuilder]] = {}
        glob_rest = _BucketBuilder()

        def slot(table: dict[Any, _BucketBuilder], key: Any) -> _BucketBuilder:
            b = table.get(key)
            if b is None:
                b = table[key] = _BucketBuilder()
            return b

        for rank, c in enumerate(compiled):
            d = c.destination
            kind = d.kind
            if kind is DestKind.EXACT:
                slot(exact, d.value).add(c, rank, None)
            elif kind is DestKind.SUBDOMAINS:
                slot(suffix, d.value).add(c, rank, None)
            elif kind is DestKind.APEX_AND_SUBDOMAINS:
                # '**.x' lives in two tables: the apex 'x' itself, and 'x' as a proper suffix.
                slot(apex, d.value).add(c, rank, None)
                slot(suffix, d.value).add(c, rank, None)
            elif kind is DestKind.ANY:
                any_dest.add(c, rank, None)
            elif kind is DestKind.CIDR:
                net = d.network
                assert net is not None
                shift = net.max_prefixlen - net.prefixlen
                by_len = cidr.setdefault((net.version, net.prefixlen), {})
                slot(by_len, int(net.network_address) >> shift).add(c, rank, None)
            else:
                prefix, tail = d.prefix, d.suffix
                # Index on the longer literal end: it is the more selective key. When d.glob
                # is None one end is empty, so a hit on the other end's key is a full match.
                if prefix and len(prefix) >= len(tail):
                    slot(glob_prefix.setdefault(len(prefix), {}), prefix).add(c, rank, d.glob)
                elif tail:
                    slot(glob_suffix.setdefault(len(tail), {}), tail).add(c, rank, d.glob)
                else:
                    glob_rest.add(c, rank, d.glob)

        self._exact = _freeze_all(exact)
        self._apex = _freeze_all(apex)
        self._suffix = _freeze_all(suffix)
        any_bucket = any_dest.freeze()
        self._any: _Bucket | None = any_bucket if any_bucket[0] or any_bucket[1] else None
        cidr_tables: dict[int, list[tuple[int, dict[int, _Bucket]]]] = {4: [], 6: []}
        for (version, plen), table in sorted(cidr.items()):
            bits = 32 if version == 4 else 128
            cidr_tables[version].append((bits - plen, _freeze_all(table)))
        self._cidr4 = tuple(cidr_tables[4])
        self._cidr6 = tuple(cidr_tables[6])
        self._glob_prefix = tuple((n, _freeze_all(t)) for n, t in sorted(glob_prefix.items()))
        self._glob_suffix = tuple((n, _freeze_all(t)) for n, t in sorted(glob_suffix.items()))
        rest_bucket = glob_rest.freeze()
        self._glob_rest: _Bucket | None = rest_bucket if rest_bucket[0] or rest_bucket[1] else None

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({len(self.rules)} rules)"

    def get(self, rule_id: int) -> Rule | None:
        return self._by_id.get(rule_id)

    def may_deny_address(self, container: str, port: int, now: float | None = None) -> bool:
        """Whether some active address deny rule matches this client and port (any address)."""
        if not self._addr_denies:
            return False
        now = time.time() if now is None else now
        key = (container, int(port))
        until = self._addr_cache.get(key)
        if until is None:
            # Cached until the first of the matching rules expires (an expired rule never returns).
            until = min(
                (c.expires for c in self._addr_denies if c.container.matches(container) and c.port.matches(int(port))),
                default=-math.inf,
            )
            if len(self._addr_cache) >= ADDRESS_CACHE:
                self._addr_cache.clear()
            self._addr_cache[key] = until
        return until > now

    def address_denial(self, container: str, ip: str, port: int, now: float | None = None) -> Rule | None:
        """The deny rule that wins among the address rules for this resolved address, or None."""
        if self.address is None:
            return None
        rule = self.address.match(container, ip, port, now)
        return rule if rule is not None and rule.action == "deny" else None

    def match(self, container: str, host: str, port: int, now: float | None = None) -> Rule | None:
        """The winning active rule for this exact destination, or None."""
        name, version, ip = analyse_host(host)
        rank = self._best_rank(container, name, version, ip, int(port), time.time() if now is None else now)
        return None if rank == self._none else self._ordered[rank]

    def decide(
        self,
        container: str,
        host: str,
        port: int,
        resolved_hostname: str | None = None,
        now: float | None = None,
    ) -> Decision:
        """Match the raw host; only when nothing matches it, try the resolved hostname."""
        now = time.time() if now is None else now
        rule = self.match(container, host, port, now)
        if rule is not None:
            return Decision(rule, "host")
        if resolved_hostname:
            rule = self.match(container, resolved_hostname, port, now)
            if rule is not None:
                return Decision(rule, "resolved")
        return _NO_DECISION

    def _best_rank(self, container: str, host: str, version: int, ip: int, port: int, now: float) -> int:
        best = self._none
        bucket = self._exact.get(host)
        if bucket is not None:
            best = _scan(bucket, container, host, port, now, best)
        bucket = self._apex.get(host)
        if bucket is not None:
            best = _scan(bucket, container, host, port, now, best)
        suffix = self._suffix
        if suffix:
            # Walk proper label suffixes: a.b.example.com → b.example.com → example.com → com.
            dot = host.find(".")
            while dot >= 0:
                bucket = suffix.get(host[dot + 1 :])
                if bucket is not None:
                    best = _scan(bucket, container, host, port, now, best)
                dot = host.find(".", dot + 1)
        if self._any is not None:
            best = _scan(self._any, container, host, port, now, best)
        if version:
            # Only IP destinations consult CIDR rules; each prefix length is one dict probe.
            for shift, networks in self._cidr4 if version == 4 else self._cidr6:
                bucket = networks.get(ip >> shift)
                if bucket is not None:
                    best = _scan(bucket, container, host, port, now, best)
        for length, table in self._glob_prefix:
            bucket = table.get(host[:length])
            if bucket is not None:
                best = _scan(bucket, container, host, port, now, best)
        for length, table in self._glob_suffix:
            if length <= len(host):
                bucket = table.get(host[-length:])
                if bucket is not None:
                    best = _scan(bucket, container, host, port, now, best)
        if self._glob_rest is not None:
            best = _scan(self._glob_rest, container, host, port, now, best)
        return best
