"""The rule pattern dialect (SPEC §2.2): each pattern kind on its own."""

from __future__ import annotations

import pytest

from greyproxy.policy.patterns import (
    ContainerKind,
    ContainerPattern,
    DestinationPattern,
    DestKind,
    PortPattern,
    escape_glob,
    glob_literal_ends,
    normalise_host,
    parse_ip,
    validate_container_pattern,
    validate_destination_pattern,
    validate_port_pattern,
)


def dest_matches(pattern: str, host: str) -> bool:
    h = normalise_host(host)
    return DestinationPattern.parse(pattern).matches(h, parse_ip(h))


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        # '*' matches any destination, names and IPs alike
        ("*", "example.com", True),
        ("*", "10.0.0.1", True),
        ("*", "::1", True),
        # *.example.com: subdomains at any depth, never the apex
        ("*.example.com", "example.com", False),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "a.b.c.example.com", True),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.com.evil.net", False),
        # **.example.com: the apex too
        ("**.example.com", "example.com", True),
        ("**.example.com", "api.example.com", True),
        ("**.example.com", "x.y.example.com", True),
        ("**.example.com", "notexample.com", False),
        ("**.example.com", "com", False),
        # exact equality only
        ("example.com", "example.com", True),
        ("example.com", "api.example.com", False),
        ("example.com", "example.co", False),
        # case-insensitive, trailing dot ignored on either side
        ("Example.COM", "example.com", True),
        ("example.com", "EXAMPLE.com.", True),
        ("*.Example.com.", "API.example.COM", True),
        ("**.example.com", "EXAMPLE.COM.", True),
        # other globs: '*' crosses dots
        ("api.*", "api.github.com", True),
        ("api.*", "api.x.y.z", True),
        ("api.*", "www.api.github.com", False),
        ("api.*", "api", False),
        ("*cdn*", "static.cdn-1.example.net", True),
        ("*cdn*", "example.net", False),
        ("registry.npmjs.*", "registry.npmjs.org", True),
        ("*.example.*", "a.example.org", True),
        ("*.example.*", "example.org", False),
        ("*-api.example.com", "eu-api.example.com", True),
        ("*-api.example.com", "eu.api.example.com", False),
        ("api?.example.com", "api1.example.com", True),
        ("api?.example.com", "api.example.com", False),
        ("api?.example.com", "api12.example.com", False),
        ("[ab].example.com", "a.example.com", True),
        ("[ab].example.com", "b.example.com", True),
        ("[ab].example.com", "c.example.com", False),
        ("[!ab].example.com", "c.example.com", True),
        ("[!ab].example.com", "a.example.com", False),
        ("[A-C]x.com", "bx.com", True),
        # CIDR v4 and v6 (non-strict network addresses accepted)
        ("10.0.0.0/8", "10.200.3.4", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("10.1.2.3/16", "10.1.255.1", True),
        ("192.168.1.7/32", "192.168.1.7", True),
        ("192.168.1.7/32", "192.168.1.8", False),
        ("2001:db8::/32", "2001:db8:0:1::5", True),
        ("2001:db8::/32", "[2001:DB8::5]", True),
        ("2001:db8::/32", "2001:db9::5", False),
        ("::/0", "10.0.0.1", False),  # families never cross
        ("0.0.0.0/0", "::1", False),
        # a CIDR never matches a hostname, even one that looks numeric-ish
        ("10.0.0.0/8", "10.example.com", False),
        ("0.0.0.0/0", "localhost", False),
        ("::/0", "example.com", False),
        # IPv6 literals compare in canonical form
        ("::1", "0:0:0:0:0:0:0:1", True),
        ("0:0::1", "[::1]", True),
        ("2001:DB8:0:0::1", "2001:db8::1", True),
        ("::1", "::2", False),
        ("[::1]", "::1", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.10", False),
    ],
)
def test_destination_patterns(pattern: str, host: str, expected: bool) -> None:
    assert dest_matches(pattern, host) is expected


@pytest.mark.parametrize(
    ("pattern", "kind", "specificity"),
    [
        ("*", DestKind.ANY, 0),
        ("10.0.0.0/8", DestKind.CIDR, 20),
        ("**.example.com", DestKind.APEX_AND_SUBDOMAINS, 10),
        ("*.example.com", DestKind.SUBDOMAINS, 10),
        ("api.*", DestKind.GLOB, 10),
        ("*.exa?ple.com", DestKind.GLOB, 10),
        ("**.ex[a]mple.com", DestKind.GLOB, 10),
        ("example.com", DestKind.EXACT, 20),
        ("::1", DestKind.EXACT, 20),
    ],
)
def test_destination_classification(pattern: str, kind: DestKind, specificity: int) -> None:
    parsed = DestinationPattern.parse(pattern)
    assert parsed.kind is kind
    assert parsed.specificity == specificity


@pytest.mark.parametrize("pattern", ["", "   ", "10.0.0.0/33", "example.com/8", "10.0.0/x"])
def test_bad_destination_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        DestinationPattern.parse(pattern)


@pytest.mark.parametrize(
    ("pattern", "container", "expected"),
    [
        ("*", "anything/at/all", True),
        ("*", "", True),
        ("opencode", "opencode", True),
        ("opencode", "OpenCode", False),  # case-sensitive
        ("opencode", "opencode-2", False),
        ("open*", "opencode", True),
        ("open*", "Opencode", False),
        ("team/*", "team/a", True),
        ("team/*", "team/a/b", False),  # '*' does not cross '/'
        ("team/*", "team/", True),
        ("*/web", "proj/web", True),
        ("*/web", "a/proj/web", False),
        ("*/*/web", "a/proj/web", True),
        ("agent-?", "agent-1", True),
        ("agent-?", "agent-12", False),
        ("agent-?", "agent-/", False),
        ("agent-[12]", "agent-2", True),
        ("agent-[12]", "agent-3", False),
        ("agent-[!12]", "agent-3", True),
        ("a[", "a[", True),  # an unclosed '[' is literal
        ("a.b*", "a.b.c", True),  # '.' is literal, not a regex wildcard
        ("a.b*", "axb", False),
        ("unknown-*", "unknown-127.0.0.1", True),
    ],
)
def test_container_patterns(pattern: str, container: str, expected: bool) -> None:
    assert ContainerPattern.parse(pattern).matches(container) is expected


@pytest.mark.parametrize(
    ("pattern", "specificity"),
    [("*", 0), ("web-*", 100), ("w?b", 100), ("[ab]", 100), ("web", 200)],
)
def test_container_specificity(pattern: str, specificity: int) -> None:
    assert ContainerPattern.parse(pattern).specificity == specificity


@pytest.mark.parametrize(
    ("pattern", "normalised", "inside", "outside"),
    [
        ("*", "*", [1, 443, 65535], []),
        ("", "*", [1, 80], []),
        (None, "*", [22], []),
        ("443", "443", [443], [80, 444, 442]),
        ("80,443", "80,443", [80, 443], [81, 442, 8080]),
        (" 80 , 443 ", "80,443", [80, 443], [81]),
        ("8000-8999", "8000-8999", [8000, 8500, 8999], [7999, 9000]),
        ("22,8000-8002", "22,8000-8002", [22, 8001], [23, 8003]),
        ("443-443", "443", [443], [442, 444]),
        ("1-65535", "1-65535", [1, 30000, 65535], [0]),
        ("1000-60000", "1000-60000", [1000, 60000], [999, 60001]),
    ],
)
def test_port_patterns(pattern: str | None, normalised: str, inside: list[int], outside: list[int]) -> None:
    parsed = PortPattern.parse(pattern)
    assert parsed.text == normalised
    assert validate_port_pattern(pattern) == normalised
    assert all(parsed.matches(p) for p in inside)
    assert not any(parsed.matches(p) for p in outside)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("0", "outside 1..65535"),
        ("65536", "outside 1..65535"),
        ("abc", "not a port"),
        ("80,", "not a port"),
        (",80", "not a port"),
        ("80;443", "not a port"),
        ("9000-8000", "backwards"),
        ("8000-", "not a port"),
        ("-5", "not a port"),
        ("1-2-3", "not a port"),
        ("+80", "not a port"),
        ("٨٠", "not a port"),  # non-ASCII digits are not ports
        ("80,*", "not a port"),
        ("4 43", "not a port"),
    ],
)
def test_malformed_ports(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PortPattern.parse(pattern)


def test_port_specificity() -> None:
    assert PortPattern.parse("*").specificity == 0
    assert PortPattern.parse("443").specificity == 1


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("  example.com ", "example.com"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("2001:DB8:0000::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::FFFF:102:304", "1.2.3.4"),  # v4-mapped: RFC 5952 dotted tail
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),  # the longest zero run is the one elided
        ("10.0.0.1", "10.0.0.1"),
        ("localhost", "localhost"),
    ],
)
def test_normalise_host(host: str, expected: str) -> None:
    assert normalise_host(host) == expected


@pytest.mark.parametrize(
    ("host", "is_ip"),
    [
        ("10.0.0.1", True),
        ("::1", True),
        ("1.2.3.4.5", False),
        ("1e100.net", False),
        ("example.com", False),
        ("123", False),
        ("", False),
    ],
)
def test_parse_ip(host: str, is_ip: bool) -> None:
    assert (parse_ip(host) is not None) is is_ip


@pytest.mark.parametrize(
    ("pattern", "ends"),
    [
        ("api.*", ("api.", "")),
        ("*.cdn.net", ("", ".cdn.net")),
        ("a*b?c", ("a", "c")),
        ("x[ab]y*z", ("x", "z")),
        ("[]]x", ("", "x")),
        ("*", ("", "")),
    ],
)
def test_glob_literal_ends(pattern: str, ends: tuple[str, str]) -> None:
    assert glob_literal_ends(pattern) == ends


def test_escape_glob_makes_a_literal_pattern() -> None:
    escaped = escape_glob("we*ird?[x]")
    assert escaped == "we[*]ird[?][[]x]"
    assert ContainerPattern.parse(escaped).matches("we*ird?[x]")
    assert not ContainerPattern.parse(escaped).matches("weXird?[x]")


def test_escaped_names_rank_and_match_as_exact_names() -> None:
    """An `exact` approval of a container 'w*1' stores 'w[*]1' (escape_glob). It ranked as a glob
    (121, SPEC §2.3), so a later glob deny 'w?*' for the same host and port tied with it and won."""
    from greyproxy.policy import Rule, RuleSet, scope_patterns

    container_p, dest_p, port_p = scope_patterns("exact", "w*1", "h.test", 80)
    assert container_p == "w[*]1"
    parsed = ContainerPattern.parse(container_p)
    assert (parsed.kind, parsed.specificity) == (ContainerKind.EXACT, 200)
    assert parsed.matches("w*1") and not parsed.matches("wx1") and not parsed.matches("w[*]1")
    rules = RuleSet([Rule(1, container_p, dest_p, port_p, "allow"), Rule(2, "w?*", "h.test", "80", "deny")])
    assert rules.match("w*1", "h.test", 80).id == 1  # 221 beats the glob deny's 121
    assert rules.match("wx1", "h.test", 80).id == 2
    for pattern in ("a[?]b[[]c", "x[", "[/]y"):  # every wildcard escaped (an unclosed '[' is literal)
        assert ContainerPattern.parse(pattern).specificity == 200, pattern
    for pattern in ("w[*]*", "w[ab]", "w[!a]", "w?"):
        assert ContainerPattern.parse(pattern).kind is ContainerKind.GLOB, pattern
    dest = DestinationPattern.parse("a[*]b.test")  # destinations alike: exact (20), only that name
    assert (dest.kind, dest.specificity) == (DestKind.EXACT, 20)
    assert dest.matches("a*b.test") and not dest.matches("axb.test")


def test_validate_destination_pattern() -> None:
    assert validate_destination_pattern("  *.example.com ") == "*.example.com"
    assert validate_destination_pattern("10.0.0.0/8") == "10.0.0.0/8"
    for bad, message in [
        ("", "empty"),
        ("   ", "empty"),
        ("exa mple.com", "whitespace"),
        ("10.0.0.0/99", "CIDR"),
        ("host/8", "CIDR"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_destination_pattern(bad)
    with pytest.raises(ValueError, match="string"):
        validate_destination_pattern(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "stored"),
    [
        ("DUP.Test", "dup.test"),
        ("dup.test.", "dup.test"),
        ("*.Example.COM.", "*.example.com"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("FE80::1", "fe80::1"),
        ("API.*", "api.*"),
    ],
)
def test_destination_patterns_are_stored_as_they_match(pattern: str, stored: str) -> None:
    """SPEC §2.2: compared case-insensitively, trailing dot ignored, IPv6 in canonical form: stored
    so, equal patterns are equal text (the duplicate guard compares the stored text)."""
    assert validate_destination_pattern(pattern) == stored
    assert validate_destination_pattern(stored) == stored


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("dup.test:443", "holds a port: give the host alone ('dup.test') and the port in port_pattern ('443')"),
        ("[::1]:8080", "holds a port"),
        ("http://a.test/", "is a URL: give the host alone ('a.test')"),
        ("a.test/api", "a host name is given alone, without a path"),
        ("a..", "empty label"),
        # the proxy refuses hosts whose last label is a number ("bad host"): no rule may name one
        ("010.0.0.1", "a name ending in a number never matches"),
        ("1.2.3", "a name ending in a number never matches"),
        ("256.1.1.1", "a name ending in a number never matches"),
        ("2130706433", "a name ending in a number never matches"),
        ("0x7f.0.0.1", "a name ending in a number never matches"),
        ("a..b", "empty label"),
        (".", "empty label"),
        ("x.[1]", "a name ending in a number never matches"),  # an escaped digit is still a digit
        ("a[*]b.test", "not a host name"),
        ("a!b.test", "not a host name"),
        # (outside tester C, a third time) the fixed part of a '*.' / '**.' pattern, checked alike
        ("*.a%b.test", "can never match: after its wildcard, not a host name"),
        ("**.a..b", "can never match: after its wildcard, a host name has no empty label"),
        ("*.example.123", "can never match: after its wildcard, a name ending in a number"),
        ("a" * 64 + ".test", "not a host name"),
    ],
)
def test_destination_patterns_that_never_match_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        validate_destination_pattern(pattern)
    assert message in str(caught.value)


def test_equal_cidrs_and_port_lists_are_stored_alike() -> None:
    """SPEC §2.4's twins: `10.0.0.1/8`, `10.0.0.0/08` and `10.0.0.0/8` are one range; `443,80,80`
    and `80,443` one port list (outside tester C found each stored as a rule of its own)."""
    assert {validate_destination_pattern(p) for p in ("10.0.0.1/8", "10.0.0.0/08", "10.0.0.0/8")} == {"10.0.0.0/8"}
    assert validate_port_pattern("443,80,80") == validate_port_pattern("80,443") == "80,443"
    # (outside tester C, again) ranges: overlapping and adjacent ones merged, all ports is '*'
    assert validate_port_pattern("80,81") == validate_port_pattern("80-81") == "80-81"
    assert validate_port_pattern("80-90,85") == validate_port_pattern("81-90,80") == "80-90"
    # an IPv4-mapped range is its IPv4 range (stored mapped, a deny never matched); /32 the address
    assert validate_destination_pattern("::ffff:192.0.2.0/120") == "192.0.2.0/24"
    assert validate_destination_pattern("10.0.0.1/32") == validate_destination_pattern("10.0.0.1") == "10.0.0.1"
    # an IPv6 zone matches nothing more: one rule per address or range
    assert validate_destination_pattern("fe80::1%eth0/128") == validate_destination_pattern("fe80::1") == "fe80::1"
    assert validate_destination_pattern("fe80::%eth0/64") == "fe80::/64"
    assert validate_destination_pattern("10.0.0.*") == "10.0.0.*"  # a glob of addresses stays a glob


def test_validate_container_pattern() -> None:
    assert validate_container_pattern(" web ") == "web"
    assert validate_container_pattern("team/*") == "team/*"
    with pytest.raises(ValueError, match="empty"):
        validate_container_pattern("")
    with pytest.raises(ValueError, match="whitespace"):
        validate_container_pattern("my container")
    with pytest.raises(ValueError, match="string"):
        validate_container_pattern(3)  # type: ignore[arg-type]


def test_ipv4_mapped_ipv6_is_judged_as_ipv4() -> None:
    from greyproxy.policy import Rule, RuleSet

    assert normalise_host("::ffff:10.1.2.3") == "10.1.2.3"
    assert normalise_host("[::FFFF:a01:203]") == "10.1.2.3"
    rs = RuleSet([Rule(1, "*", "10.1.2.3", "*", "deny"), Rule(2, "*", "10.0.0.0/8", "*", "deny", expires_at=None)])
    assert rs.match("c", "::ffff:10.1.2.3", 80).id == 1
    assert rs.match("c", "::ffff:10.9.9.9", 80).id == 2


# ---------------------------------------------------------------- issue 13 item 5: Unicode and controls

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from harness.fuzz import examples  # noqa: E402

from greyproxy.policy import Rule, RuleSet  # noqa: E402
from greyproxy.policy.patterns import ascii_host  # noqa: E402


@pytest.mark.parametrize(
    "pattern, stored",
    [
        ("日本.example", "xn--wgv71a.example"),
        ("xn--wgv71a.example", "xn--wgv71a.example"),
        ("*.日本.example", "*.xn--wgv71a.example"),
        ("**.BÜCHER.de", "**.xn--bcher-kva.de"),
        ("api.example.com", "api.example.com"),
        ("10.0.0.0/8", "10.0.0.0/8"),
    ],
)
def test_destination_patterns_are_stored_in_punycode(pattern: str, stored: str) -> None:
    assert validate_destination_pattern(pattern) == stored


@pytest.mark.parametrize(
    "pattern",
    [
        "a\x00b.example",
        "\u202egro.elgoog",
        "ex\u200bample.com",
        "x\x07.com",
        "日*.example",
        "a\u2066b.com",
        "\u061c.example",
    ],
)
def test_control_and_bidi_characters_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        validate_destination_pattern(pattern)


def test_container_patterns_refuse_controls_too() -> None:
    for bad in ("a\x00", "team\u202e", "x\x1b[31m"):
        with pytest.raises(ValueError):
            validate_container_pattern(bad)
    assert validate_container_pattern("équipe-日本") == "équipe-日本"  # Unicode names themselves are fine


@given(st.text(max_size=40))
@settings(max_examples=examples(500), deadline=None)
def test_any_destination_pattern_is_refused_or_stored_clean(text: str) -> None:
    try:
        stored = validate_destination_pattern(text)
    except ValueError:
        return
    assert stored.isascii() or not stored  # Unicode names are stored in IDNA form
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in stored)
    assert validate_destination_pattern(stored) == stored  # idempotent
    RuleSet([Rule(1, "*", stored)])  # and it compiles


@given(st.lists(st.text(alphabet="abcÜ日本ü", min_size=1, max_size=8), min_size=1, max_size=3).map(".".join))
@settings(max_examples=examples(300), deadline=None)
def test_a_unicode_rule_matches_its_name_in_either_form(name: str) -> None:
    try:
        stored = validate_destination_pattern(name)
        ascii_name = ascii_host(name)
    except ValueError:
        return
    rs = RuleSet([Rule(1, "*", stored, action="deny")])
    assert rs.match("c", ascii_name, 443) is not None
    assert rs.match("c", name, 443) is not None  # a raw Unicode name is judged in IDNA form


# --------------------------------------------------------------------------- globs: linear time
# SPEC §2.2 (the pattern dialect: container and destination globs), judged in linear time.
# glob_to_regex takes the text between two '*' at its first place (an atomic group) instead of
# backtracking through every placement. The reference below is an independent matcher (dynamic
# programming over the glob's tokens), so the two must agree on every glob and text.

from greyproxy.policy.patterns import compile_container_glob, compile_host_glob  # noqa: E402

GLOB_TOKENS = ["a", "b", "-", ".", "/", "*", "?", "[ab]", "[!a]", "[/]", "[+-0]", "[a-c]"]


def _tokens(pattern: str) -> list[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = pattern.index("]", i + 2 if pattern[i + 1] == "!" else i + 1)
            out.append(pattern[i : j + 1])
            i = j + 1
        else:
            out.append(pattern[i])
            i += 1
    return out


def reference_glob(pattern: str, text: str, *, cross_slash: bool) -> bool:
    """Does `text` match `pattern`? '*' any run (of non-'/' unless cross_slash), '?' one char
    (not '/' unless cross_slash), a class one char as fnmatch reads it."""
    import fnmatch

    reach = [True] + [False] * len(text)  # reach[j]: the tokens so far can match text[:j]
    for tok in _tokens(pattern):
        nxt = [False] * (len(text) + 1)
        if tok == "*":
            for j in range(len(text) + 1):
                nxt[j] = reach[j] or (j > 0 and nxt[j - 1] and (cross_slash or text[j - 1] != "/"))
        else:
            for j in range(1, len(text) + 1):
                ch = text[j - 1]
                if tok == "?":
                    ok = cross_slash or ch != "/"
                else:
                    ok = fnmatch.fnmatchcase(ch, tok)  # a literal or a class: one character
                nxt[j] = reach[j - 1] and ok
        reach = nxt
    return reach[len(text)]


def test_reference_glob_agrees_with_fnmatch_where_star_crosses_slashes() -> None:
    import fnmatch
    import itertools

    for toks in itertools.product(GLOB_TOKENS, repeat=2):
        pattern = "".join(toks)
        for text in ("", "a", "ab", "a/", "-.", "/b", "ab-", "c,0"):
            assert reference_glob(pattern, text, cross_slash=True) == fnmatch.fnmatchcase(text, pattern), (
                pattern,
                text,
            )


@given(
    st.lists(st.sampled_from(GLOB_TOKENS), min_size=1, max_size=9).map("".join),
    st.text(alphabet="ab-./c", max_size=14),
)
@settings(max_examples=examples(3000), deadline=None)
# A container glob whose text between '*'s can match '/' ('[!a]'): its first place ('-b') leaves a
# '/' the next '*' cannot cross; the later one ('/b') matches. It must not be committed to.
@example("*[!a]b*b", "-b/bb")
def test_linear_globs_match_exactly_what_backtracking_ones_do(pattern: str, text: str) -> None:
    assert (compile_host_glob(pattern)(text) is not None) == reference_glob(pattern, text, cross_slash=True), (
        pattern,
        text,
    )
    assert (compile_container_glob(pattern)(text) is not None) == reference_glob(pattern, text, cross_slash=False), (
        pattern,
        text,
    )


@pytest.mark.parametrize(
    "pattern, text",
    [
        ("*-*-*-*.example.com", "-" * 63 + "." + "-" * 63 + "." + "-" * 63 + "." + "-" * 61),
        ("*a*a*a*b", "a" * 250),
        ("*.*.*.example.com", "." * 250),
    ],
)
def test_a_glob_with_many_stars_does_not_backtrack_on_a_hostile_name(pattern: str, text: str) -> None:
    """The client chooses the name it connects to; the rule is the operator's. Translated plainly
    (`.*-.*-.*-.*\\.example\\.com`), each of these took 20-140 ms to fail on this machine, on the
    proxy's event loop, and each '*' more multiplies that by the name's length. Now a few µs: the
    bound below is a thousand times that, and ten times under the old cost."""
    from harness.util import best_time

    for compile_glob in (compile_host_glob, compile_container_glob):
        glob = compile_glob(pattern)
        assert glob(text) is None
        best = best_time(glob, text)
        assert best < 0.002, (compile_glob.__name__, pattern, best)
