"""SPEC §16 explain through the real stack: GET /api/rules/explain and `greyproxy explain` say what
the proxy does (deny on a tie, layers, silent mode, the guard, address-judged denies), and a
hypothesis property test compares explain's decision with what real connections through the proxy
get, over random rule sets (replaced through the API for each example) and destinations.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Stack, add_rule, curl_proxy, log_entries, plain_origin, wait_for
from harness.fuzz import examples

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin() as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"proxy": {"holdTimeout": 0.3}}) as s:
        yield s


def explain(stack: Stack, container: str, host: str, port: int, **extra: str) -> dict:
    r = stack.get("/api/rules/explain", params={"container": container, "host": host, "port": str(port), **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_explain_names_the_winner_and_why(stack: Stack, origin: int) -> None:
    c = "ex-" + uuid.uuid4().hex[:6]
    allow = add_rule(stack, container_pattern=c, destination_pattern="tie.example", action="allow")
    deny = add_rule(stack, container_pattern=c, destination_pattern="tie.example", action="deny")
    body = explain(stack, c, "tie.example", 443)
    assert body["decision"] == "deny" and body["rule"]["id"] == deny["id"] and body["layer"] == "global"
    assert "deny wins a tie" in body["reason"]
    ids = {x["rule"]["id"]: x for x in body["candidates"]}
    assert ids[allow["id"]]["matched"] and ids[deny["id"]]["winner"] and not ids[allow["id"]]["winner"]
    assert ids[deny["id"]]["specificity"] == ids[allow["id"]]["specificity"]

    # Nothing matches → pending; another container's rule is listed as a candidate that does not apply.
    other = explain(stack, c + "-other", "tie.example", 443)
    assert other["decision"] == "pending" and other["rule"] is None and other["layer"] is None
    assert all(not x["matched"] and "does not match" in x["why"] for x in other["candidates"])

    # Layers: a global rule beats the builtin allow of 127.0.0.1, whatever the specificity.
    assert explain(stack, c, "127.0.0.1", origin)["layer"] == "builtin"
    g = add_rule(stack, container_pattern="*", destination_pattern="*", port_pattern=str(origin), action="deny")
    body = explain(stack, c, "127.0.0.1", origin)
    assert body["decision"] == "deny" and body["rule"]["id"] == g["id"] and "overrides" in body["reason"]
    assert curl_proxy(stack, f"http://127.0.0.1:{origin}/", c, "x")[0] == "403"

    # The guard: the stack's own API port.
    body = explain(stack, c, "127.0.0.1", stack.ports["api"])
    assert body["decision"] == "guard" and body["rule"] is None

    # Address-judged: a CIDR deny stops a name that resolves into it, over an allow of the name.
    add_rule(stack, container_pattern=c, destination_pattern="localhost", port_pattern="9", action="allow")
    cidr = add_rule(stack, container_pattern=c, destination_pattern="127.0.0.0/8", port_pattern="9", action="deny")
    body = explain(stack, c, "localhost", 9)
    assert body["decision"] == "deny" and body["rule"]["id"] == cidr["id"] and "127.0.0.1" in body["addresses"]
    assert "resolves to" in body["reason"]

    # Silent mode: the proxy's own state.
    assert stack.request("POST", "/api/allowall", json={"mode": "deny", "duration_seconds": 60}).status_code == 200
    try:
        assert explain(stack, c, "tie.example", 443)["decision"] == "silent_deny"
    finally:
        stack.request("DELETE", "/api/allowall")
    assert explain(stack, c, "tie.example", 443)["decision"] == "deny"


def test_explain_refuses_bad_queries(stack: Stack) -> None:
    for params in (
        {},
        {"container": "a"},
        {"container": "a", "host": "x.example"},
        {"container": "a", "host": "x.example", "port": "0"},
        {"container": "a", "host": "x.example", "port": "http"},
        # a port as int() alone reads them: full-width digits, blanks, a sign, an underscore
        {"container": "a", "host": "x.example", "port": "\uff18\uff10"},
        {"container": "a", "host": "x.example", "port": " 80 "},
        {"container": "a", "host": "x.example", "port": "+80"},
        {"container": "a", "host": "x.example", "port": "8_0"},
        {"container": "a", "host": "a b", "port": "80"},
        # what the proxy refuses as a bad host (a resolver reads them as 127.0.0.1): not "pending"
        {"container": "a", "host": "2130706433", "port": "80"},
        {"container": "a", "host": "127.1", "port": "80"},
        {"container": "a", "host": "0x7f.0.0.1", "port": "80"},
        {"container": "a", "host": "a!b.test", "port": "80"},  # the proxy answers these 400 too
        {"container": "a", "host": "a" * 64 + ".test", "port": "80"},
    ):
        r = stack.get("/api/rules/explain", params=params)
        assert r.status_code == 400 and r.json()["error"], (params, r.text)
    ok = stack.get("/api/rules/explain", params={"container": "a", "host": "127.0.0.1", "port": "80"})
    assert ok.status_code == 200 and ok.json()["decision"] == "allow"  # the builtin rule


def test_cli_prints_the_explanation(stack: Stack) -> None:
    c = "cli-" + uuid.uuid4().hex[:6]
    rule = add_rule(stack, container_pattern=c, destination_pattern="*.cli.example", action="allow")
    done = subprocess.run(
        [sys.executable, "-m", "greyproxy", "explain", c, "api.cli.example:8443", "-C", str(stack.cfg_path)],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "decision: allow" in done.stdout and f"#{rule['id']} allow" in done.stdout and "reason:" in done.stdout


# ----------------------------------------------------------------------------- property: explain = proxy

CONTAINERS = ("*", "{c}", "pt*", "nobody")
DESTINATIONS = ("127.0.0.1", "localhost", "127.0.0.0/8", "*", "*host", "10.0.0.0/8")
ACTIONS = ("allow", "deny")


def rule_sets(origin: int) -> st.SearchStrategy:
    ports = st.sampled_from(("*", str(origin), str(origin + 1 if origin < 65535 else 1)))
    one = st.tuples(st.sampled_from(CONTAINERS), st.sampled_from(DESTINATIONS), ports, st.sampled_from(ACTIONS))
    return st.lists(one, max_size=5)


def outcome(entry: dict) -> str:
    """The decision a log entry shows, in explain's words."""
    if entry["reason"] in ("silent_allow", "silent_deny", "guard"):
        return entry["reason"]
    if entry["reason"] in ("hold_timeout", "queue_full"):
        return "pending"
    assert entry["reason"] == "rule", entry
    return "allow" if entry["result"] == "allowed" else "deny"


def test_explain_agrees_with_the_proxy(stack: Stack, origin: int) -> None:
    counter = iter(range(10_000))

    @settings(
        max_examples=examples(25),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        rules=rule_sets(origin),
        host=st.sampled_from(("127.0.0.1", "localhost")),
        guard=st.booleans(),
        silent=st.sampled_from((None, None, None, "allow", "deny")),
    )
    def check(rules: list[tuple[str, str, str, str]], host: str, guard: bool, silent: str | None) -> None:
        c = f"pt{next(counter)}"
        for r in stack.get("/api/rules", params={"limit": 1000, "include_expired": "true"}).json()["items"]:
            if r["source"] != "builtin":
                stack.request("DELETE", f"/api/rules/{r['id']}")
        for cp, dp, pp, action in rules:
            add_rule(stack, container_pattern=cp.format(c=c), destination_pattern=dp, port_pattern=pp, action=action)
        if silent:
            stack.request("POST", "/api/allowall", json={"mode": silent, "duration_seconds": 60})
        try:
            port = stack.ports["socks5-proxy"] if guard else origin
            said = explain(stack, c, host, port)
            curl_proxy(stack, f"http://{host}:{port}/", c, "x")
            entries = wait_for(
                lambda: log_entries(stack, c, limit=5),
                10,
                message="the connection's log entry",
            )
        finally:
            if silent:
                stack.request("DELETE", "/api/allowall")
        got = outcome(entries[0])
        assert said["decision"] == got, (rules, host, port, silent, said, entries[0])
        if said["rule"] is not None:
            assert entries[0]["rule_id"] == said["rule"]["id"], (said, entries[0])

    check()
