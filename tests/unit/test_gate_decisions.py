"""The gate's per-destination decision cache (services/proxy/gate.py): it must answer exactly what
the rule set answers now, across rule swaps and rule expiry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from greyproxy.policy import Rule, RuleSet
from services.proxy.gate import Gate


class Journal:
    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def append(self, kind: str, data: Any) -> str:
        self.records.append((kind, data))
        return str(len(self.records))


class Publisher:
    def publish(self, topic: str, data: Any) -> None:
        pass


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
