"""Address rules (issue 13 item 2): a rule whose destination is an IP or a CIDR also judges the
addresses a name resolves to, and the address each connection is about to use; a deny there wins.

RuleSet.address_denial / may_deny_address are pure; the Gate tests drive admit() and then guard()
for that admission, as a listener does (admit, then upstream.connect calling the admission, its
guard, per address).
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bus import records
from greyproxy.policy import Rule, RuleSet
from services.proxy.gate import Admission, Gate
from harness.fuzz import examples
from harness.fakes import Journal, Publisher


BUILTINS = [Rule(90, "*", h, "*", "allow", "builtin") for h in ("localhost", "127.0.0.1", "::1")]


def gate_with(*rules: Rule) -> Gate:
    g = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
    g.set_rules(RuleSet([*rules, *BUILTINS]), 1)
    return g


def logs(g: Gate) -> list[dict[str, Any]]:
    return [records.log_fields(d) for k, d in g.journal.records if k == "log"]  # type: ignore[attr-defined]


def test_ruleset_address_denial() -> None:
    rs = RuleSet(
        [
            Rule(1, "*", "127.0.0.0/8", "8081", "deny"),
            Rule(2, "agent", "*", "*", "allow"),
            Rule(3, "*", "10.1.2.3", "443", "allow"),
            Rule(4, "*", "10.0.0.0/8", "*", "deny"),
            *BUILTINS,
        ]
    )
    assert rs.may_deny_address("agent", 8081) and rs.may_deny_address("x", 22)  # 10/8 denies any port
    assert rs.address_denial("agent", "127.0.0.1", 8081).id == 1
    assert rs.address_denial("agent", "127.0.0.1", 8080) is None  # the builtin allow wins there
    assert rs.address_denial("agent", "10.9.9.9", 443).id == 4
    assert rs.address_denial("agent", "10.1.2.3", 443) is None  # a more specific address allow wins (port +1)
    assert rs.address_denial("agent", "10.1.2.3", 80).id == 4  # IP and CIDR weigh the same: deny on a tie
    assert rs.address_denial("agent", "192.0.2.1", 443) is None
    assert RuleSet([Rule(1, "*", "10.0.0.0/8", "*", "allow")]).may_deny_address("x", 1) is False
    assert RuleSet([Rule(1, "*", "evil.example", "*", "deny")]).may_deny_address("x", 1) is False  # a name


def test_a_name_resolving_into_a_denied_range_is_blocked_at_admission() -> None:
    g = gate_with(Rule(1, "*", "127.0.0.0/8", "8081", "deny"), Rule(2, "agent", "*", "*", "allow"))

    async def run() -> None:
        for host in ("localhost", "LOCALHOST.", "127.0.0.1", "::ffff:127.0.0.1"):
            v = await g.admit("agent", host, 8081, "HTTP")
            assert (v.allowed, v.reason, v.rule_id) == (False, "rule", 1), host
        v = await g.admit("agent", "localhost", 8080, "HTTP")  # another port: the broad allow
        assert (v.allowed, v.rule_id) == (True, 2)
        v = await g.admit("other", "localhost", 8081, "HTTP")  # no name rule at all: denied, not held
        assert (v.allowed, v.rule_id) == (False, 1)

    asyncio.run(run())
    blocked = [e for e in logs(g) if e["result"] == "blocked"]
    assert len(blocked) == 5 and all(e["rule_id"] == 1 and e["reason"] == "rule" for e in blocked)
    assert g.pending_count == 0


def test_silent_allow_bypasses_address_rules_like_all_rules() -> None:
    g = gate_with(Rule(1, "*", "127.0.0.0/8", "*", "deny"))

    async def run() -> None:
        g.set_silent("allow", None)
        v = await g.admit("agent", "localhost", 8081, "HTTP")
        assert v.allowed and v.reason == "silent_allow"
        assert Admission(g, "agent", "localhost", 8081, "HTTP", v)("127.0.0.1", 8081) is None

    asyncio.run(run())


def test_guard_judges_the_address_actually_connected_to() -> None:
    # The name was fine when admitted (say it resolved elsewhere then); the address the connection
    # is about to use is denied: refused, logged as a block by that rule, in place of the tunnel's entry.
    g = gate_with(Rule(1, "*", "169.254.0.0/16", "*", "deny"), Rule(2, "agent", "*", "*", "allow"))
    g.defer_tunnel_logs = True

    async def run() -> None:
        v = await g.admit("agent", "metadata.invalid", 80, "CONNECT")  # does not resolve: nothing to judge yet
        assert v.allowed and v.log_pending is not None
        adm = Admission(g, "agent", "Metadata.Invalid.", 80, "CONNECT", v)  # the host as the client gave it
        assert adm("192.0.2.7", 80) is None
        why = adm("169.254.169.254", 80)
        assert why and "169.254.169.254" in why and "rule 1" in why
        assert v.log_pending is None
        g.finish_log(v)  # what the listener does after the failure: nothing more is written
        assert adm("127.0.0.1", 1) is not None  # the own-listener guard as before, logged as the guard's

    asyncio.run(run())
    entries = logs(g)
    assert [(e["result"], e["reason"], e["rule_id"]) for e in entries] == [
        ("blocked", "rule", 1),
        ("blocked", "guard", None),
    ]
    assert {(e["destination_host"], e["method"]) for e in entries} == {("metadata.invalid", "CONNECT")}


def test_the_guard_judges_the_admission_it_is_given() -> None:
    """Address rules per client: each connect is judged for the admission passed to it, whatever
    was admitted since (nothing about the last admission is kept anywhere else)."""
    g = gate_with(Rule(1, "bob", "192.0.2.0/24", "*", "deny"), Rule(2, "*", "*", "*", "allow"))

    async def run() -> None:
        va = await g.admit("alice", "svc.example", 80, "HTTP")
        vb = await g.admit("bob", "svc.example", 80, "HTTP")  # (does not resolve: allowed by the name)
        a = Admission(g, "alice", "svc.example", 80, "HTTP", va)
        b = Admission(g, "bob", "svc.example", 80, "HTTP", vb)
        assert a("192.0.2.1", 80) is None  # alice's, though bob was admitted last
        assert "rule 1" in (b("192.0.2.1", 80) or "")
        assert a("192.0.2.1", 80) is None
        assert a("127.0.0.1", 1) and b("127.0.0.1", 1)  # the own listeners: for everyone

    asyncio.run(run())
    blocked = [e for e in logs(g) if e["result"] == "blocked"]
    assert [(e["container_name"], e["rule_id"]) for e in blocked if e["reason"] == "rule"] == [("bob", 1)]
    assert sorted(e["container_name"] for e in blocked if e["reason"] == "guard") == ["alice", "bob"]


@given(st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "192.0.2.7", "10.1.2.3"]), st.sampled_from([1, 80, 443]))
@settings(max_examples=examples(60), deadline=None)
def test_the_guard_without_address_rules_is_the_gate_guard(ip: str, port: int) -> None:
    """No address rule (the usual case, which `Admission.__call__` answers without `Gate.guard`):
    the same answer as `Gate.guard`; the own listeners refused on a loopback address, nothing else."""
    g = gate_with(Rule(2, "*", "*", "*", "allow"))
    v = asyncio.run(g.admit("alice", "svc.example", port, "CONNECT"))
    a = Admission(g, "alice", "svc.example", port, "CONNECT", v)
    assert a(ip, port) == g.guard(ip, port, a)
    refused = port == 1 and ip in ("127.0.0.1", "::1", "0.0.0.0")
    assert (a(ip, port) == "resolves to this proxy's own listener") is refused
    assert refused or a(ip, port) is None


addresses = st.ip_addresses(v=4).map(str)
prefixes = st.integers(min_value=0, max_value=32)


@given(
    st.lists(
        st.tuples(
            addresses,
            prefixes,
            st.sampled_from(["allow", "deny"]),
            st.sampled_from(["*", "agent"]),
            st.sampled_from(["*", "80", "443,8080"]),
        ),
        max_size=8,
    ),
    addresses,
    st.sampled_from([80, 443, 8080]),
)
@settings(max_examples=examples(300), deadline=None)
def test_address_denial_is_the_winning_address_rule(raw: list, ip: str, port: int) -> None:
    # The reference model: among the address rules alone, SPEC §2.3 order; a deny winner is the answer.
    rules = [
        Rule(i + 1, c, str(ipaddress.ip_network(f"{a}/{p}", strict=False)), ports, action)
        for i, (a, p, action, c, ports) in enumerate(raw)
    ]
    rs = RuleSet(rules)
    winner = RuleSet(rules).match("agent", ip, port)
    want = winner.id if winner is not None and winner.action == "deny" else None
    got = rs.address_denial("agent", ip, port)
    assert (got.id if got else None) == want
    if want is not None:
        assert rs.may_deny_address("agent", port)


def test_a_names_addresses_are_looked_up_once_per_ttl(monkeypatch) -> None:
    # With an address deny that applies to every port, each request to a name would need a lookup:
    # the admission check reuses them for a while; the guard still judges each connect.
    import services.proxy.gate as gate_mod

    calls: list[str] = []
    answers = {"api.example.com": ["192.0.2.10"], "rebinder.example": ["192.0.2.20"]}

    async def fake_resolve(loop, host, port, timeout):  # noqa: ANN001, ANN202
        calls.append(host)
        return [(ip, port) for ip in answers[host]]

    monkeypatch.setattr(gate_mod, "resolve", fake_resolve)
    g = gate_with(Rule(1, "*", "169.254.0.0/16", "*", "deny"), Rule(2, "agent", "*", "*", "allow"))

    async def run() -> None:
        for _ in range(50):
            v = await g.admit("agent", "api.example.com", 443, "HTTP")
            assert v.allowed and v.rule_id == 2
        assert calls == ["api.example.com"]
        v = await g.admit("agent", "rebinder.example", 80, "HTTP")
        assert v.allowed
        answers["rebinder.example"] = ["169.254.169.254"]  # rebound after admission: cached says fine...
        v = await g.admit("agent", "rebinder.example", 80, "HTTP")
        assert v.allowed
        adm = Admission(g, "agent", "rebinder.example", 80, "HTTP", v)
        assert "rule 1" in (adm("169.254.169.254", 80) or "")  # ...the connect to it is refused
        g._addresses.clear()  # past the TTL: the admission sees the new address
        v = await g.admit("agent", "rebinder.example", 80, "HTTP")
        assert (v.allowed, v.rule_id) == (False, 1)

    asyncio.run(run())
