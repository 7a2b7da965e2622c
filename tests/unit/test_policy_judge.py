"""policy.judge: the one decision function of the gate and of explain (SPEC §2.3, §4, §16)."""

from __future__ import annotations

from greyproxy.policy import Guard, Rule, RuleSet, judge
from greyproxy.policy.judge import reason

GUARD = Guard({43051, 43080}, {"127.0.0.1"})


def rs(*rules: Rule) -> RuleSet:
    return RuleSet(rules)


def test_order_guard_silent_rules_address_pending() -> None:
    rules = rs(Rule(1, "*", "*", action="allow"))
    assert judge(rules, "a", "127.0.0.1", 43080, guard=GUARD, silent="allow").decision == "guard"
    assert judge(rules, "a", "x.example", 443, guard=GUARD, silent="deny").decision == "silent_deny"
    assert judge(rules, "a", "x.example", 443, guard=GUARD, silent="allow").decision == "silent_allow"
    assert judge(rules, "a", "x.example", 443, guard=GUARD).decision == "allow"
    assert judge(rs(), "a", "x.example", 443, guard=GUARD).decision == "pending"


def test_deny_wins_a_tie_and_layers_come_first() -> None:
    allow = Rule(1, "a", "x.example", action="allow")
    deny = Rule(2, "a", "x.example", action="deny")
    j = judge(rs(allow, deny), "a", "x.example", 443, explain=True)
    assert (j.decision, j.rule, j.layer) == ("deny", deny, "global")
    assert "deny wins a tie" in reason(j, "a", "x.example", 443)
    assert [c.rule.id for c in j.candidates or []] == [2, 1] and all(c.matched for c in j.candidates or [])
    session = Rule(3, "a", "x.example", "443", action="allow", source="session")  # more specific, lower layer
    broad = Rule(4, "*", "*", action="deny")
    j = judge(rs(session, broad), "a", "x.example", 443, explain=True)
    assert j.rule == broad and "overrides" in reason(j, "a", "x.example", 443)


def test_address_rules_judge_resolved_addresses() -> None:
    rules = rs(Rule(1, "*", "db.internal", action="allow"), Rule(2, "*", "10.0.0.0/8", action="deny"))
    first = judge(rules, "a", "db.internal", 5432)
    assert first.decision == "allow" and first.needs_addresses
    j = judge(rules, "a", "db.internal", 5432, addresses=["10.1.2.3"], explain=True)
    assert (j.decision, j.rule.id if j.rule else None, j.matched_on, j.address) == ("deny", 2, "address", "10.1.2.3")
    assert "resolves to 10.1.2.3" in reason(j, "a", "db.internal", 5432)
    assert {c.matched_on for c in j.candidates or []} == {"host", "address"}
    assert judge(rules, "a", "db.internal", 5432, addresses=["192.0.2.1"]).decision == "allow"
    assert judge(rules, "a", "10.9.9.9", 80).decision == "deny"  # a literal address needs no lookup


def test_candidates_say_why_a_rule_does_not_apply() -> None:
    rules = rs(
        Rule(1, "b", "x.example", action="allow"),
        Rule(2, "a", "x.example", "80", action="allow"),
        Rule(3, "a", "x.example", action="allow", expires_at=1.0),
        Rule(4, "a", "y.example", action="deny"),
    )
    j = judge(rules, "a", "x.example", 443, explain=True)
    assert j.decision == "pending"
    why = {c.rule.id: c.why for c in j.candidates or []}
    assert set(why) == {1, 2, 3}  # rule 4 names another destination
    assert "container" in why[1] and "port" in why[2] and why[3] == "expired"


def test_resolved_hostname_only_when_the_host_matches_nothing() -> None:
    rules = rs(Rule(1, "*", "api.example", action="allow"))
    j = judge(rules, "a", "203.0.113.5", 443, resolved="api.example", explain=True)
    assert j.decision == "allow" and j.matched_on == "resolved"
    assert "resolved hostname" in reason(j, "a", "203.0.113.5", 443)


def test_a_name_on_one_of_our_ports_is_judged_by_the_addresses_it_resolves_to() -> None:
    """SPEC §2.3 hard guard: a name that resolves to the stack's own listener (an /etc/hosts entry, a
    DNS name of this machine) is refused as `guard` when judged, not allowed by a rule and only
    refused at connect (which logged it as allowed, and explain disagreed with the proxy)."""
    rules = rs(Rule(8, "rb", "vm", action="allow"))
    first = judge(rules, "rb", "vm", 43080, guard=GUARD)
    assert (first.decision, first.needs_addresses) == ("allow", True)
    j = judge(rules, "rb", "vm", 43080, guard=GUARD, addresses=["127.0.0.1"])
    assert (j.decision, j.rule, j.address) == ("guard", None, "127.0.0.1")
    assert "vm resolves to 127.0.0.1" in reason(j, "rb", "vm", 43080)
    for mode in ("allow", None):  # the guard comes before silent mode, as for a literal address
        assert (
            judge(rules, "rb", "vm", 43080, guard=GUARD, silent=mode, addresses=["::1", "127.0.0.1"]).decision
            == "guard"
        )
    # elsewhere the same name is an ordinary destination; a port of ours elsewhere is not ours
    other = judge(rules, "rb", "vm", 8080, guard=GUARD)
    assert (other.decision, other.needs_addresses) == ("allow", False)
    assert judge(rules, "rb", "vm", 43080, guard=GUARD, addresses=["192.0.2.7"]).decision == "allow"
    # a deny needs no lookup; neither does silent deny; an unknown name still waits for its addresses
    assert not judge(rs(Rule(9, "rb", "vm", action="deny")), "rb", "vm", 43080, guard=GUARD).needs_addresses
    assert not judge(rules, "rb", "vm", 43080, guard=GUARD, silent="deny").needs_addresses
    assert judge(rs(), "rb", "vm", 43080, guard=GUARD).needs_addresses
