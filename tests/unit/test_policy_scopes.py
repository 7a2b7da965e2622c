"""Pending-decision scopes and durations (SPEC §3.2)."""

from __future__ import annotations

import pytest

from greyproxy.policy import (
    Rule,
    RuleSet,
    parse_duration,
    registrable_domain,
    scope_patterns,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("once", 30.0),
        ("permanent", None),
        ("1h", 3600.0),
        ("12h", 43200.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("30d", 2592000.0),
        ("5m", 300.0),
        ("90m", 5400.0),
        ("3h", 10800.0),
        ("2d", 172800.0),
        (" 7D ", 604800.0),
        ("3650d", 3650 * 86400.0),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not one of"),
        ("forever", "not one of"),
        ("0h", "positive"),
        ("0m", "positive"),
        ("-1h", "not one of"),
        ("1.5h", "not one of"),
        ("10s", "not one of"),
        ("h", "not one of"),
        ("1 h", "not one of"),
        ("1w", "not one of"),
        ("3651d", "longer than"),
        ("87601h", "longer than"),
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


def test_parse_duration_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_duration(3600)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("api.github.com", "github.com"),
        ("github.com", "github.com"),
        ("a.b.co.uk", "b.co.uk"),
        ("b.co.uk", "b.co.uk"),
        ("A.B.CO.UK.", "b.co.uk"),
        ("x.y.example.com.au", "example.com.au"),
        ("registry.npmjs.org", "npmjs.org"),
        ("co.uk", "co.uk"),  # a public suffix itself: unchanged
        ("com", "com"),
        ("localhost", "localhost"),  # a single label: unchanged
        ("10.1.2.3", "10.1.2.3"),  # IPs: unchanged
        ("[::1]", "::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_registrable_domain(host: str, domain: str) -> None:
    assert registrable_domain(host) == domain


@pytest.mark.parametrize(
    ("scope", "container", "host", "port", "patterns"),
    [
        ("exact", "web", "api.github.com", 443, ("web", "api.github.com", "443")),
        ("any_port", "web", "api.github.com", 443, ("web", "api.github.com", "*")),
        ("subdomain_wildcard", "web", "api.github.com", 443, ("web", "**.github.com", "*")),
        ("subdomain_wildcard", "web", "a.b.co.uk", 443, ("web", "**.b.co.uk", "*")),
        ("subdomain_wildcard", "web", "github.com", 22, ("web", "**.github.com", "*")),
        ("subdomain_wildcard", "web", "10.1.2.3", 443, ("web", "10.1.2.3", "*")),
        ("subdomain_wildcard", "web", "[2001:DB8::0:1]", 443, ("web", "2001:db8::1", "*")),
        ("all_containers", "web", "api.github.com", 443, ("*", "api.github.com", "443")),
        ("exact", "web", "API.GitHub.com.", "8443", ("web", "api.github.com", "8443")),
        ("exact", "web", "[0:0::1]", 80, ("web", "::1", "80")),
        # names with glob characters are escaped: the rule matches only that literal name
        ("exact", "agent*", "example.com", 80, ("agent[*]", "example.com", "80")),
    ],
)
def test_scope_patterns(scope: str, container: str, host: str, port: int | str, patterns: tuple[str, str, str]) -> None:
    assert scope_patterns(scope, container, host, port) == patterns


def test_scope_rules_cover_the_request_they_came_from() -> None:
    # A rule built from a scope must match the very connection that was pending.
    for scope in ("exact", "any_port", "subdomain_wildcard", "all_containers"):
        for container, host, port in [
            ("web", "deep.api.github.com", 443),
            ("team/a", "a.b.co.uk", 8443),
            ("agent*", "10.0.0.7", 80),
            ("web", "::1", 3000),
        ]:
            c, d, p = scope_patterns(scope, container, host, port)
            rs = RuleSet([Rule(1, c, d, p)])
            assert rs.match(container, host, port) is not None, (scope, container, host)


@pytest.mark.parametrize(
    ("host", "pattern"),
    [
        ("co.uk", "co.uk"),
        ("github.io", "github.io"),
        ("GitHub.IO.", "github.io"),
        ("com", "com"),
        ("localhost", "localhost"),  # a single label: no registrable domain either
        ("pages.github.io", "**.pages.github.io"),  # under a public suffix: that site's own
    ],
)
def test_subdomain_wildcard_does_not_widen_past_a_registrable_domain(host: str, pattern: str) -> None:
    """SPEC §3.2: the wildcard is `**.<registrable domain>`. A host that is itself a public suffix
    has none: the host itself, any port (as an IP), never `**.github.io` (tester A #8)."""
    assert scope_patterns("subdomain_wildcard", "web", host, 443) == ("web", pattern, "*")
    c, d, p = scope_patterns("subdomain_wildcard", "web", host, 443)
    rs = RuleSet([Rule(1, c, d, p)])
    assert rs.match("web", host.lower().rstrip("."), 8443) is not None
    assert rs.match("web", "someone-else." + host.lower().rstrip("."), 443) is None or pattern.startswith("**.")


def test_scope_breadth() -> None:
    def covers(scope: str, container: str, host: str, port: int) -> bool:
        c, d, p = scope_patterns(scope, "web", "api.github.com", 443)
        return RuleSet([Rule(1, c, d, p)]).match(container, host, port) is not None

    assert not covers("exact", "web", "api.github.com", 80)
    assert covers("any_port", "web", "api.github.com", 80)
    assert not covers("any_port", "web", "github.com", 443)
    assert covers("subdomain_wildcard", "web", "github.com", 443)
    assert covers("subdomain_wildcard", "web", "x.y.github.com", 22)
    assert not covers("subdomain_wildcard", "db", "github.com", 443)
    assert covers("all_containers", "db", "api.github.com", 443)
    assert not covers("all_containers", "db", "api.github.com", 80)
    # an escaped container pattern does not act as a wildcard
    c, d, p = scope_patterns("exact", "agent*", "example.com", 80)
    assert RuleSet([Rule(1, c, d, p)]).match("agent-other", "example.com", 80) is None


@pytest.mark.parametrize(
    ("scope", "host", "message"),
    [
        ("everything", "example.com", "scope must be one of"),
        ("", "example.com", "scope must be one of"),
        ("exact", "", "cannot be turned into a rule"),
        ("exact", "10.0.0.0/8", "cannot be turned into a rule"),
        ("exact", "a b.com", "cannot be turned into a rule"),
    ],
)
def test_scope_patterns_rejects(scope: str, host: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scope_patterns(scope, "web", host, 443)
