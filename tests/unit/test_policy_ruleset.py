"""RuleSet decisions (SPEC §2.3): precedence, expiry, resolved-hostname fallback, the index."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greyproxy.policy import (
    CompiledRule,
    Decision,
    Rule,
    RuleSet,
    builtin_rules,
    compile_rule,
    rule_summary,
)
from harness.fuzz import examples

NOW = 1_800_000_000.0


def R(
    rid: int,
    container: str,
    dest: str,
    port: str = "*",
    action: str = "allow",
    source: str = "global",
    expires_at: float | None = None,
) -> Rule:
    return Rule(rid, container, dest, port, action, source, expires_at)


def winner(rules: list[Rule], container: str, host: str, port: int) -> int | None:
    rule = RuleSet(rules).match(container, host, port, now=NOW)
    return None if rule is None else rule.id


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("rules", "query", "expected"),
    [
        pytest.param(
            [R(1, "*", "example.com", action="allow"), R(2, "web", "example.com", action="deny")],
            ("web", "example.com", 443),
            2,
            id="exact-container-deny-beats-wildcard-container-allow",
        ),
        pytest.param(
            [R(1, "*", "example.com", action="deny"), R(2, "web", "example.com", action="allow")],
            ("web", "example.com", 443),
            2,
            id="exact-container-allow-beats-wildcard-container-deny",
        ),
        pytest.param(
            [R(1, "*", "example.com", action="deny"), R(2, "web", "example.com", action="allow")],
            ("db", "example.com", 443),
            1,
            id="other-container-falls-to-wildcard",
        ),
        pytest.param(
            [R(1, "w*", "example.com", action="deny"), R(2, "web", "example.com", action="allow")],
            ("web", "example.com", 443),
            2,
            id="exact-container-beats-glob-container",
        ),
        pytest.param(
            [R(1, "*", "example.com", action="allow"), R(2, "w*", "example.com", action="deny")],
            ("web", "example.com", 443),
            2,
            id="glob-container-beats-any-container",
        ),
        pytest.param(
            [R(1, "web", "example.com", action="allow"), R(2, "web", "example.com", action="deny")],
            ("web", "example.com", 443),
            2,
            id="deny-wins-a-tie",
        ),
        pytest.param(
            [R(5, "web", "example.com", action="deny"), R(9, "web", "example.com", action="allow")],
            ("web", "example.com", 443),
            5,
            id="deny-wins-a-tie-whatever-the-id",
        ),
        pytest.param(
            [R(7, "web", "example.com"), R(3, "web", "example.com")],
            ("web", "example.com", 443),
            3,
            id="full-tie-lowest-id",
        ),
        pytest.param(
            [R(1, "*", "*.example.com", action="deny"), R(2, "*", "api.example.com")],
            ("web", "api.example.com", 443),
            2,
            id="exact-destination-beats-wildcard",
        ),
        pytest.param(
            [R(1, "*", "*", action="deny"), R(2, "*", "**.example.com")],
            ("web", "example.com", 443),
            2,
            id="wildcard-destination-beats-star",
        ),
        pytest.param(
            [R(1, "*", "10.0.0.0/8", action="deny"), R(2, "*", "*.example.com")],
            ("web", "10.1.1.1", 443),
            1,
            id="cidr-counts-as-exact",
        ),
        pytest.param(
            [R(1, "*", "example.com", "*", "deny"), R(2, "*", "example.com", "443")],
            ("web", "example.com", 443),
            2,
            id="specific-port-adds-one",
        ),
        pytest.param(
            [R(1, "*", "example.com", "443", "deny"), R(2, "web", "*", "*")],
            ("web", "example.com", 443),
            2,
            id="container-weight-dominates-destination",
        ),
        pytest.param(
            [R(1, "*", "*.example.com", "443", "allow"), R(2, "*", "api.example.com", "*", "deny")],
            ("web", "api.example.com", 443),
            2,
            id="destination-weight-dominates-port",
        ),
        pytest.param(
            [
                R(1, "*", "*", action="allow", source="global"),
                R(2, "web", "localhost", "80", "deny", "builtin"),
            ],
            ("web", "localhost", 80),
            1,
            id="global-allow-beats-more-specific-builtin-deny",
        ),
        pytest.param(
            [R(1, "*", "*", action="deny"), R(2, "web", "localhost", source="builtin")],
            ("web", "localhost", 80),
            1,
            id="global-deny-beats-builtin-allow",
        ),
        pytest.param(
            [
                R(1, "*", "*", action="deny", source="session"),
                R(2, "web", "x.com", source="builtin"),
            ],
            ("web", "x.com", 80),
            1,
            id="session-beats-builtin",
        ),
        pytest.param(
            [R(1, "web", "x.com", source="session"), R(2, "*", "*", action="deny")],
            ("web", "x.com", 80),
            2,
            id="global-beats-session",
        ),
        pytest.param(
            [R(1, "web", "x.com", "80")],
            ("web", "x.com", 81),
            None,
            id="port-mismatch-no-match",
        ),
        pytest.param(
            [R(1, "team/*", "*")],
            ("team/a/b", "x.com", 80),
            None,
            id="container-star-does-not-cross-slash",
        ),
        pytest.param(
            [R(1, "team/*", "*")],
            ("team/a", "x.com", 80),
            1,
            id="container-star-within-segment",
        ),
        pytest.param(
            [R(1, "*", "*.example.com")],
            ("web", "example.com", 80),
            None,
            id="star-dot-excludes-apex",
        ),
        pytest.param(
            [R(1, "*", "10.0.0.0/8")],
            ("web", "ten.example", 80),
            None,
            id="cidr-never-matches-a-name",
        ),
        pytest.param(
            [R(1, "*", "::1", "8080")],
            ("web", "[0:0:0:0:0:0:0:1]", 8080),
            1,
            id="ipv6-canonical",
        ),
        pytest.param(
            [R(1, "*", "2001:db8::/32", action="deny"), R(2, "*", "2001:db8::7")],
            ("web", "2001:DB8:0::7", 443),
            1,
            id="ipv6-cidr-ties-with-exact-so-deny-wins",
        ),
        pytest.param(
            [R(1, "*", "2001:db8::/32", action="deny"), R(2, "*", "2001:db8::7")],
            ("web", "2001:db8::8", 443),
            1,
            id="ipv6-cidr",
        ),
        pytest.param(
            [R(1, "*", "API.Example.COM.")],
            ("web", "api.example.com", 443),
            1,
            id="case-and-trailing-dot",
        ),
        pytest.param(
            [R(1, "*", "api.*"), R(2, "*", "*.github.com", action="deny")],
            ("web", "api.github.com", 443),
            2,
            id="glob-and-suffix-tie-deny-first",
        ),
        pytest.param(
            [R(1, "*", "api?.*"), R(2, "*", "[xy].github.com")],
            ("web", "y.github.com", 443),
            2,
            id="class-glob",
        ),
        pytest.param(
            [R(1, "*", "api?.*"), R(2, "*", "[xy].github.com")],
            ("web", "api2.github.com", 443),
            1,
            id="question-glob",
        ),
        pytest.param(
            [R(1, "*", "*-cdn.example.net")],
            ("web", "eu-cdn.example.net", 443),
            1,
            id="suffix-indexed-glob",
        ),
        pytest.param(
            [R(1, "*", "*cdn*")],
            ("web", "a.cdn3.example.net", 443),
            1,
            id="unindexable-glob",
        ),
    ],
)
def test_precedence(rules: list[Rule], query: tuple[str, str, int], expected: int | None) -> None:
    assert winner(rules, *query) == expected


# --------------------------------------------------------------------------- expiry


def test_expired_rules_are_ignored() -> None:
    rules = [
        R(1, "web", "example.com", action="deny", expires_at=NOW - 1),
        R(2, "*", "example.com", action="allow"),
    ]
    assert winner(rules, "web", "example.com", 443) == 2


def test_rule_expiring_exactly_now_is_inactive() -> None:
    rs = RuleSet([R(1, "*", "example.com", expires_at=NOW)])
    assert rs.match("web", "example.com", 1, now=NOW) is None
    assert rs.match("web", "example.com", 1, now=NOW - 0.5) is not None


def test_expiry_defaults_to_wall_clock() -> None:
    rs = RuleSet([R(1, "*", "a.com", expires_at=1.0), R(2, "*", "b.com", expires_at=4e9)])
    assert rs.match("web", "a.com", 1) is None
    assert rs.match("web", "b.com", 1) is not None


def test_only_expired_rules_means_no_match() -> None:
    rs = RuleSet([R(1, "*", "*", expires_at=NOW - 100)])
    assert rs.decide("web", "example.com", 443, now=NOW) == Decision(None, None)


# --------------------------------------------------------------------------- resolved hostname


def test_resolved_hostname_used_when_raw_host_matches_nothing() -> None:
    rs = RuleSet([R(1, "*", "*.github.com")])
    d = rs.decide("web", "140.82.112.3", 443, resolved_hostname="api.github.com", now=NOW)
    assert d.rule is not None and d.rule.id == 1
    assert d.matched_on == "resolved"
    assert d.allowed and not d.denied and d.action == "allow"


def test_raw_host_match_takes_precedence_over_resolved() -> None:
    # The resolved-name rule is more specific, but the raw host matched, so it is never consulted.
    rs = RuleSet([R(1, "*", "140.82.0.0/16", action="deny"), R(2, "web", "api.github.com")])
    d = rs.decide("web", "140.82.112.3", 443, resolved_hostname="api.github.com", now=NOW)
    assert d.rule is not None and d.rule.id == 1
    assert d.matched_on == "host"
    assert d.denied


def test_expired_raw_match_falls_through_to_resolved() -> None:
    rs = RuleSet([R(1, "*", "140.82.112.3", expires_at=NOW - 5), R(2, "*", "api.github.com")])
    d = rs.decide("web", "140.82.112.3", 443, resolved_hostname="api.github.com", now=NOW)
    assert (d.rule.id if d.rule else None, d.matched_on) == (2, "resolved")


def test_no_match_anywhere() -> None:
    rs = RuleSet([R(1, "*", "*.github.com")])
    d = rs.decide("web", "1.2.3.4", 443, resolved_hostname="example.org", now=NOW)
    assert d == Decision(None, None)
    assert not d.allowed and not d.denied and d.action is None


# --------------------------------------------------------------------------- construction


def test_ruleset_basics() -> None:
    rules = [R(3, "*", "a.com"), R(1, "*", "b.com")]
    rs = RuleSet(rules)
    assert len(rs) == 2
    assert rs.rules == tuple(rules)
    assert rs.get(1) == rules[1] and rs.get(99) is None
    assert len(RuleSet()) == 0
    assert RuleSet().match("web", "a.com", 1) is None


def test_invalid_rule_raises_naming_the_rule() -> None:
    with pytest.raises(ValueError, match=r"rule 7: .*port"):
        RuleSet([R(7, "*", "a.com", port="99999")])
    with pytest.raises(ValueError, match=r"rule 8: .*CIDR"):
        RuleSet([R(8, "*", "10.0.0.0/40")])
    with pytest.raises(ValueError, match="rule 9: action"):
        RuleSet([R(9, "*", "a.com", action="maybe")])
    with pytest.raises(ValueError, match="rule 10: source"):
        RuleSet([R(10, "*", "a.com", source="other")])


def test_skip_invalid_keeps_the_good_rules() -> None:
    good, bad = R(1, "*", "a.com"), R(2, "*", "a.com", port="x")
    rs = RuleSet([bad, good], skip_invalid=True)
    assert rs.match("web", "a.com", 1, now=NOW) == good
    assert [r.id for r, _ in rs.rejected] == [2]


def test_rule_from_dict() -> None:
    rule = Rule.from_dict(
        {
            "id": 42,
            "container_pattern": "opencode",
            "destination_pattern": "*.npmjs.org",
            "port_pattern": "443",
            "rule_type": "glob",
            "action": "deny",
            "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
            "source": "session",
            "session_id": "s1",
            "hit_count": 3,
        }
    )
    assert rule == Rule(42, "opencode", "*.npmjs.org", "443", "deny", "session", 1893456000.0, "s1")


@pytest.mark.parametrize(
    ("expires", "epoch"),
    [
        (None, None),
        ("", None),
        (1893456000, 1893456000.0),
        (1893456000.5, 1893456000.5),
        (datetime(2030, 1, 1), 1893456000.0),  # naive = UTC
        ("2030-01-01T00:00:00Z", 1893456000.0),
        ("2030-01-01T02:00:00+02:00", 1893456000.0),
    ],
)
def test_rule_from_dict_expiry_forms(expires: Any, epoch: float | None) -> None:
    rule = Rule.from_dict({"container_pattern": "*", "destination_pattern": "x", "expires_at": expires})
    assert rule.expires_at == epoch
    assert (rule.id, rule.port_pattern, rule.action, rule.source) == (0, "*", "allow", "global")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"destination_pattern": "x"}, "container_pattern is required"),
        (
            {"container_pattern": "*", "destination_pattern": None},
            "destination_pattern is required",
        ),
        ({"container_pattern": "*", "destination_pattern": "x", "action": "block"}, "action"),
        ({"container_pattern": "*", "destination_pattern": "x", "source": "me"}, "source"),
        ({"container_pattern": "*", "destination_pattern": "x", "expires_at": "soon"}, "RFC 3339"),
        ({"container_pattern": "*", "destination_pattern": "x", "expires_at": [1]}, "timestamp"),
        ({"container_pattern": "*", "destination_pattern": "x", "expires_at": True}, "timestamp"),
    ],
)
def test_rule_from_dict_rejects(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rule.from_dict(data)


def test_rule_from_row_object() -> None:
    class Row:
        id = 5
        container_pattern = "web"
        destination_pattern = "a.com"
        port_pattern = "80"
        action = "allow"
        source = "global"
        expires_at = None
        session_id = None

    assert Rule.from_row(Row()) == Rule(5, "web", "a.com", "80")
    assert Rule.from_row({"id": 5, "container_pattern": "web", "destination_pattern": "a.com"}).id == 5


def test_rule_is_active() -> None:
    assert R(1, "*", "x").is_active(NOW)
    assert R(1, "*", "x", expires_at=NOW + 1).is_active(NOW)
    assert not R(1, "*", "x", expires_at=NOW).is_active(NOW)


def test_rule_summary() -> None:
    assert rule_summary(R(1, "opencode", "*.npmjs.org", "443")) == "opencode → *.npmjs.org:443"
    assert rule_summary(R(1, "*", "x.com", "")) == "* → x.com:*"


def test_builtin_rules_allow_loopback() -> None:
    seeded = builtin_rules()
    assert [d["destination_pattern"] for d in seeded] == ["localhost", "127.0.0.1", "::1"]
    assert all(
        (d["container_pattern"], d["port_pattern"], d["action"], d["source"]) == ("*", "*", "allow", "builtin")
        for d in seeded
    )
    rs = RuleSet(Rule.from_dict({**d, "id": i + 1}) for i, d in enumerate(seeded))
    for host in ("localhost", "LOCALHOST.", "127.0.0.1", "[::1]", "0:0::1"):
        assert rs.decide("anyone", host, 3000, now=NOW).allowed, host
    assert rs.match("anyone", "127.0.0.2", 3000, now=NOW) is None
    assert rs.match("anyone", "sub.localhost", 3000, now=NOW) is None


def test_index_handles_many_rules_per_bucket() -> None:
    # Many containers on one host: the per-container split must still find the right one.
    rules = [R(i, f"c{i}", "api.example.com", str(1000 + i)) for i in range(1, 500)]
    rules.append(R(1000, "*", "**.example.com", action="deny"))
    rs = RuleSet(rules)
    assert rs.match("c250", "api.example.com", 1250, now=NOW).id == 250  # type: ignore[union-attr]
    assert rs.match("c250", "api.example.com", 1251, now=NOW).id == 1000  # type: ignore[union-attr]
    assert rs.match("nobody", "example.com", 1, now=NOW).id == 1000  # type: ignore[union-attr]


def test_compiled_rule_predicate() -> None:
    c = compile_rule(R(1, "web", "**.example.com", "443"))
    assert isinstance(c, CompiledRule)
    assert c.specificity == 200 + 10 + 1
    assert c.matches("web", "EXAMPLE.com.", 443)
    assert not c.matches("web", "example.com", 80)
    assert not c.matches("db", "example.com", 443)


# --------------------------------------------------------------------------- property test

LABELS = ["a", "api", "com"]  # a small alphabet so random patterns and hosts often meet
IPS = ["10.0.0.1", "10.1.2.3", "192.168.1.1", "::1", "2001:db8::5", "2001:db8:1::9"]
CIDRS = ["10.0.0.0/8", "10.1.0.0/16", "192.168.1.0/24", "10.0.0.1/32", "::/0", "2001:db8::/32",
         "2001:db8:1::/48", "0.0.0.0/0"]  # fmt: skip
CONTAINERS = ["web", "db", "team/a", "team/b"]
CONTAINER_PATTERNS = [*CONTAINERS, "*", "team/*", "w?b", "[dw]*", "*b", "*/*"]
PORT_PATTERNS = ["*", "443", "80,443", "8000-8999", "1-100", "50,8080"]
PORTS = [50, 80, 443, 8080, 8500]

names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=3).map(".".join)
hosts = st.one_of(names, st.sampled_from(IPS))


@st.composite
def host_globs(draw: st.DrawFn) -> str:
    """A glob derived from a real name: a slice → '*', or one character → '?' or a class."""
    name = draw(names)
    i = draw(st.integers(0, len(name)))
    j = draw(st.integers(i, len(name)))
    how = draw(st.sampled_from(["star", "question", "class"]))
    if how == "star" or i == len(name):
        if draw(st.booleans()):  # bias towards a bare prefix or suffix: those are index keys
            i, j = (0, j) if draw(st.booleans()) else (i, len(name))
        return name[:i] + "*" + name[j:]
    if how == "question":
        return name[:i] + "?" + name[i + 1 :]
    return name[:i] + f"[{name[i]}x]" + name[i + 1 :]


def cased(text: str, upper: bool, dot: bool) -> str:
    return (text.upper() if upper else text) + ("." if dot and text != "*" else "")


destination_patterns = st.builds(
    cased,
    st.one_of(
        # Repeated branches weight the draw: globs often, '*' (which matches everything) rarely.
        st.integers(0, 3).map(lambda n: "*" if n == 0 else "api.*"),
        hosts,
        names.map(lambda n: "*." + n),
        names.map(lambda n: "**." + n),
        host_globs(),
        host_globs(),
        host_globs(),
        st.sampled_from(CIDRS),
    ),
    st.booleans(),
    st.booleans(),
)


@st.composite
def rule_lists(draw: st.DrawFn) -> list[Rule]:
    count = draw(st.integers(0, 15))
    return [
        Rule(
            id=draw(st.integers(1, 40)),  # duplicate ids are allowed: the index must still agree
            container_pattern=draw(st.sampled_from(CONTAINER_PATTERNS)),
            destination_pattern=draw(destination_patterns),
            port_pattern=draw(st.sampled_from(PORT_PATTERNS)),
            action=draw(st.sampled_from(["allow", "deny"])),
            source=draw(st.sampled_from(["global", "session", "builtin"])),
            expires_at=draw(st.sampled_from([None, NOW - 10, NOW + 10])),
        )
        for _ in range(count)
    ]


def reference_match(rules: list[Rule], container: str, host: str, port: int) -> Rule | None:
    """Brute force: every active rule whose predicate matches, best precedence key wins."""
    live = [c for c in map(compile_rule, rules) if c.is_active(NOW) and c.matches(container, host, port)]
    return min(live, key=CompiledRule.precedence_key).rule if live else None


def reference_key(rule: Rule | None) -> tuple[int, int, int, int] | None:
    return None if rule is None else compile_rule(rule).precedence_key()


def instance_of(pattern: str, filler: str) -> str:
    """A host the destination pattern is likely to match: wildcards filled in, CIDRs → an IP."""
    if "/" in pattern:
        return pattern.split("/")[0]
    out = pattern.replace("**.", "").replace("*", filler).replace("?", "a")
    while "[" in out and "]" in out[out.index("[") :]:
        start = out.index("[")
        out = out[:start] + out[start + 1] + out[out.index("]", start) + 1 :]
    return out


@st.composite
def queries(draw: st.DrawFn, rules: list[Rule]) -> tuple[str, str, int]:
    """(container, host, port), mostly built from one rule so the index is exercised by hits."""
    container = draw(st.sampled_from(CONTAINERS))
    port = draw(st.sampled_from(PORTS))
    if not rules or draw(st.integers(0, 3)) == 0:
        return container, draw(st.builds(cased, hosts, st.booleans(), st.booleans())), port
    rule = draw(st.sampled_from(rules))
    if rule.container_pattern in CONTAINERS:
        container = rule.container_pattern
    if rule.port_pattern != "*":
        port = int(rule.port_pattern.split(",")[0].split("-")[0])
    filler = draw(st.sampled_from(["", "a", "api.a", "com"]))
    return container, instance_of(rule.destination_pattern, filler), port


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rules=rule_lists())
def test_index_agrees_with_brute_force(data: st.DataObject, rules: list[Rule]) -> None:
    container, host, port = data.draw(queries(rules), label="query")
    got = RuleSet(rules).match(container, host, port, now=NOW)
    want = reference_match(rules, container, host, port)
    # Compare by precedence key: with duplicate ids two distinct rules can tie completely.
    assert reference_key(got) == reference_key(want)
    if got is not None:
        assert compile_rule(got).matches(container, host, port) and got.is_active(NOW)


@settings(max_examples=examples(200), deadline=None)
@given(
    rules=rule_lists(),
    container=st.sampled_from(CONTAINERS),
    ip=st.sampled_from(IPS),
    resolved=names,
    port=st.sampled_from(PORTS),
)
def test_decide_agrees_with_reference_fallback(
    rules: list[Rule], container: str, ip: str, resolved: str, port: int
) -> None:
    d = RuleSet(rules).decide(container, ip, port, resolved_hostname=resolved, now=NOW)
    raw = reference_match(rules, container, ip, port)
    if raw is not None:
        assert (reference_key(d.rule), d.matched_on) == (reference_key(raw), "host")
        return
    via = reference_match(rules, container, resolved, port)
    assert reference_key(d.rule) == reference_key(via)
    assert d.matched_on == (None if via is None else "resolved")
