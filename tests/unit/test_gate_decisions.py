"""The gate's per-destination decision cache (services/proxy/gate.py): it must answer exactly what
the rule set answers now, across rule swaps, rule expiry, silent mode and names learnt; and the
whole verdicts `admit` keeps (`Gate._verdicts`), which a request's re-check inside a tunnel
(`check_request`) reads and fills too, answer what an uncached judgement answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bus import records
from greyproxy.policy import Rule, RuleSet
from services.proxy.gate import Gate
from harness.fakes import Journal, Publisher


def gate_with(*rules: Rule) -> Gate:
    g = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
    g.set_rules(RuleSet(rules), 1)
    return g


def admit(g: Gate, container: str, host: str, port: int = 443):  # noqa: ANN201
    return asyncio.run(g.admit(container, host, port, "HTTP"))


def test_cached_decisions_follow_rule_swaps() -> None:
    g = gate_with(Rule(1, "*", "api.example.com", action="allow"))
    assert admit(g, "a", "api.example.com").rule_id == 1
    assert admit(g, "a", "api.example.com").rule_id == 1  # from the cache
    g.set_rules(RuleSet([Rule(2, "*", "api.example.com", action="deny")]), 2)
    v = admit(g, "a", "api.example.com")
    assert (v.allowed, v.rule_id) == (False, 2)
    g.rules = RuleSet([Rule(3, "a", "*.example.com", action="allow")])  # direct assignment too
    assert admit(g, "a", "api.example.com").rule_id == 3
    assert admit(g, "b", "api.example.com").reason == "hold_timeout"  # other container: no rule


def test_a_cached_winner_stops_at_its_expiry() -> None:
    soon = time.time() + 0.3
    g = gate_with(
        Rule(1, "*", "api.example.com", action="allow", expires_at=soon), Rule(2, "*", "*.example.com", action="deny")
    )
    assert admit(g, "a", "api.example.com").rule_id == 1
    assert admit(g, "a", "api.example.com").rule_id == 1
    time.sleep(max(0.0, soon - time.time()) + 0.05)
    v = admit(g, "a", "api.example.com")
    assert (v.allowed, v.rule_id) == (False, 2)  # the next rule in precedence, at once


def test_the_cache_is_bounded() -> None:
    from services.proxy import gate as gate_mod

    g = gate_with(Rule(1, "*", "*", action="allow"))
    for i in range(gate_mod.DECISION_CACHE + 10):
        assert admit(g, "a", f"h{i}.example.com").allowed
    assert len(g._decisions) <= gate_mod.DECISION_CACHE


# -- the verdict cache (Gate._verdicts): admit answers what an uncached judgement answers, always --

_HOSTS = ["api.example.com", "x.example.com", "10.0.0.1", "127.0.0.1", "other.test"]
_RULES = st.builds(
    lambda i, c, d, p, a, ttl: Rule(i, c, d, p, a, expires_at=None if ttl is None else time.time() + ttl),
    st.integers(1, 9),
    st.sampled_from(["*", "a", "b"]),
    st.sampled_from(["*", "api.example.com", "*.example.com", "10.0.0.0/8", "127.0.0.1", "name.test"]),
    st.sampled_from(["*", "443", "80"]),
    st.sampled_from(["allow", "deny"]),
    st.sampled_from([None, None, -1.0, 3600.0]),
)
_STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["admit", "check"]),
            st.sampled_from(["a", "b"]),
            st.sampled_from(_HOSTS),
            st.sampled_from([443, 80, 1]),
        ),
        st.tuples(st.just("rules"), st.lists(_RULES, max_size=4)),
        st.tuples(st.just("silent"), st.sampled_from([None, "allow", "deny"])),
        st.tuples(st.just("name"), st.sampled_from(["10.0.0.1", "127.0.0.1"]), st.sampled_from(["name.test", None])),
    ),
    max_size=25,
)


def _expected(g: Gate, container: str, host: str, port: int) -> tuple[bool, str, int | None]:
    """What an uncached gate answers: the judgement now (a hold times out: no one decides it here)."""
    j = g.judge(container, host, port, g.resolved_name(host))
    if j.decision == "pending":
        return (False, "hold_timeout", None)
    if j.rule is not None:
        return (j.decision == "allow", "rule", j.rule.id)
    return (j.decision == "silent_allow", j.decision, None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_RULES, max_size=4), _STEPS)
@example(
    [Rule(1, "*", "*", "*", "allow")],
    [("admit", "a", "x.example.com", 443), ("silent", "deny"), ("admit", "a", "x.example.com", 443)],
)
@example(
    [Rule(1, "*", "name.test", "*", "deny"), Rule(2, "*", "*", "*", "allow")],
    [("admit", "a", "10.0.0.1", 443), ("name", "10.0.0.1", "name.test"), ("admit", "a", "10.0.0.1", 443)],
)
def test_cached_verdicts_answer_as_an_uncached_judgement(first: list[Rule], steps: list[Any]) -> None:
    g = Gate(Journal(), Publisher(), {1}, {"127.0.0.1"}, 0.001, 10)  # type: ignore[arg-type]

    async def run() -> None:
        g.set_rules(RuleSet(first), 1)
        for i, step in enumerate(steps):
            if step[0] == "admit":
                _, c, h, p = step
                want = _expected(g, c, h, p)
                v = await g.admit(c, h, p, "HTTP")
                assert (v.allowed, v.reason, v.rule_id) == want, step
            elif step[0] == "check":
                _, c, h, p = step
                want = _expected(g, c, h, p)
                if want[1] == "hold_timeout":
                    want = (False, "default_deny", None)  # a re-check never holds
                v = g.check_request(c, h, p)
                assert (v.allowed, v.reason, v.rule_id) == want, step
            elif step[0] == "rules":
                g.set_rules(RuleSet(step[1]), i + 2)
            elif step[0] == "silent":
                g.set_silent(step[1], None)
            elif step[2] is None:
                g.names.pop(step[1], None)
            else:
                g.names[step[1]] = (step[2], time.time())

    asyncio.run(run())


def test_a_cached_verdict_gives_way_to_silent_mode_and_back() -> None:
    g = gate_with(Rule(1, "*", "api.example.com", action="allow"))

    async def run() -> None:
        assert (await g.admit("a", "api.example.com", 443, "HTTP")).rule_id == 1
        assert ("a", "api.example.com", 443, None) in g._verdicts  # cached
        g.set_silent("deny", 0.2)
        v = await g.admit("a", "api.example.com", 443, "HTTP")
        assert (v.allowed, v.reason) == (False, "silent_deny")
        g.silent.expires_at = time.time() - 1  # over by the clock before its timer fired
        v = await g.admit("a", "api.example.com", 443, "HTTP")
        assert (v.allowed, v.rule_id) == (True, 1)
        g.set_silent(None, None)

    asyncio.run(run())


def test_cached_verdicts_count_hits_and_log_every_request() -> None:
    g = gate_with(Rule(1, "*", "api.example.com", action="allow"))
    for _ in range(3):
        admit(g, "a", "api.example.com")
    assert g._hits[1][0] == 3
    logged = [records.log_fields(d) for k, d in g.journal.records if k == "log"]  # type: ignore[attr-defined]
    assert [(r["rule_id"], r["result"], r["destination_host"]) for r in logged] == [
        (1, "allowed", "api.example.com")
    ] * 3


def test_a_request_check_in_a_tunnel_reads_the_verdict_its_admission_kept(monkeypatch: Any) -> None:
    """SPEC §15 / issue 18 item 1: `check_request` (each request inside a tunnel) answers from the verdict the tunnel's CONNECT
    kept, without judging again, and counts the rule's hit as a judgement would; a destination it
    judged itself is kept for the next check; a rule swap starts over."""
    g = gate_with(Rule(1, "*", "api.example.com", action="allow"), Rule(2, "*", "x.example.com", action="deny"))
    from services.proxy import gate as gate_mod

    judged: list[str] = []
    judge = gate_mod.judge

    def counting(rules: Any, container: str, host: str, *a: Any, **kw: Any) -> Any:
        judged.append(host)
        return judge(rules, container, host, *a, **kw)

    monkeypatch.setattr(gate_mod, "judge", counting)
    assert admit(g, "a", "API.example.com.").rule_id == 1
    assert judged == ["api.example.com"]
    for _ in range(3):
        v = g.check_request("a", "api.example.com", 443)
        assert (v.allowed, v.reason, v.rule_id) == (True, "rule", 1)
    assert judged == ["api.example.com"]  # answered from the admission's verdict
    assert g._hits[1][0] == 4
    v = g.check_request("a", "x.example.com", 443)
    assert (v.allowed, v.rule_id) == (False, 2)
    assert g.check_request("a", "x.example.com", 443).rule_id == 2
    assert judged == ["api.example.com", "x.example.com"]  # judged once, then kept
    v = g.check_request("a", "nobody.example.com", 443)
    assert (v.allowed, v.reason) == (False, "default_deny")
    assert ("a", "nobody.example.com", 443, None) not in g._verdicts  # no rule: never kept
    g.set_rules(RuleSet([Rule(3, "*", "api.example.com", action="deny")]), 2)
    v = g.check_request("a", "api.example.com", 443)
    assert (v.allowed, v.rule_id) == (False, 3)


# -- client_gone given as a function (the proxy passes `ClientConn.gone`): called for a hold only --


def test_client_gone_function_is_called_only_for_a_hold() -> None:
    g = gate_with(Rule(1, "*", "api.example.com", action="allow"))
    g.hold_timeout = 5.0
    calls: list[int] = []

    async def main() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        gone = loop.create_future()

        def make() -> asyncio.Future:
            calls.append(1)
            return gone

        allowed = await g.admit("a", "api.example.com", 443, "HTTP", make)
        assert calls == []  # a decision that does not wait makes no future
        loop.call_later(0.05, gone.set_result, None)  # the client disconnects while held
        held = await asyncio.wait_for(g.admit("a", "unknown.example.com", 443, "HTTP", make), 2)
        return allowed, held

    allowed, held = asyncio.run(main())
    assert allowed.allowed and allowed.rule_id == 1
    assert calls == [1]
    assert (held.allowed, held.reason) == (False, "client_gone")


def test_a_tunnels_requests_decided_by_its_own_rule_are_no_second_hit() -> None:
    """SPEC §2.1: a hit whenever the rule decides a connection. An intercepted request is judged
    again (`check_request`), but the rule the tunnel's admission counted deciding it again is not
    a second hit (before: one `curl https://…` through interception counted 2); another rule deciding
    it (the rules changed since) counts, judged or answered from the kept verdicts alike."""
    g = gate_with(Rule(1, "*", "api.example.com", action="allow"))
    v = admit(g, "a", "api.example.com")
    assert g._hits[1][0] == 1
    for _ in range(3):
        assert g.check_request("a", "api.example.com", 443, v.rule_id).rule_id == 1
    assert g._hits[1][0] == 1
    g.set_rules(RuleSet([Rule(2, "*", "api.example.com", action="deny")]), 2)
    assert g.check_request("a", "api.example.com", 443, v.rule_id).rule_id == 2  # judged
    assert g.check_request("a", "api.example.com", 443, v.rule_id).rule_id == 2  # kept
    assert g._hits[2][0] == 2
    assert g.check_request("a", "api.example.com", 443).rule_id == 2  # no admission counted: a hit
    assert g._hits[2][0] == 3
