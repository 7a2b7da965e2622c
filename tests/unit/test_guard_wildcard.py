"""The hard guard while the stack binds a wildcard address (SPEC §2.3: the proxies never connect to
the stack's own listeners "on any local address").

Bound to 0.0.0.0 or `::`, the listeners answer on every address of the machine, not only on
loopback and the configured hosts: an address of this machine on one of our ports is refused like
127.0.0.1 is (found by asking the kernel, greyproxy/localaddr.py), by the gate's decision (logged
blocked by the guard), at connect, and by explain's judge; a bind to 127.0.0.1 asks nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import pytest

from bus import records
from greyproxy.localaddr import is_local_address, local_addresses
from greyproxy.policy import Guard, Rule, RuleSet, judge
from greyproxy.policy.judge import reason
from services.proxy.gate import Admission, Gate, Verdict
from harness.fakes import Journal, Publisher

OWN = 43051  # one of the stack's ports in these tests


def _own_address(family: socket.AddressFamily, far: str) -> str | None:
    """A non-loopback address of this machine: the source the kernel picks towards `far` (a UDP
    connect sends nothing), or None (no route: no such address)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((far, 9))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(ip).is_loopback else ip


V4 = _own_address(socket.AF_INET, "198.51.100.1")
V6 = _own_address(socket.AF_INET6, "2001:db8::1")
MINE = [ip for ip in (V4, V6) if ip is not None]
needs_address = pytest.mark.skipif(not MINE, reason="this machine has no non-loopback address")


def _not_mine(ip: str) -> str:
    """An address next to `ip` (same network) that is not one of this machine's."""
    addr = ipaddress.ip_address(ip)
    for step in range(1, 50):
        other = str(addr + step)
        if not is_local_address(other):
            return other
    raise AssertionError(f"no non-local address near {ip}")


@needs_address
def test_the_kernel_says_which_addresses_are_this_machines() -> None:
    for ip in MINE:
        assert is_local_address(ip), ip
        assert not is_local_address(_not_mine(ip))
    assert is_local_address("127.0.0.1") and is_local_address("::1")
    assert not is_local_address("not-an-address")
    if V4 is not None:
        assert is_local_address(f"::ffff:{V4}")  # connects to the IPv4 address
        assert local_addresses([V4, _not_mine(V4), "127.0.0.1"]) == [V4, "127.0.0.1"]


def _link_local() -> str | None:
    """An IPv6 link-local address of this machine (from /proc), or None."""
    try:
        with open("/proc/net/if_inet6") as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[0].startswith("fe80"):
            return str(ipaddress.ip_address(bytes.fromhex(fields[0])))
    return None


LINK_LOCAL = _link_local()


@pytest.mark.skipif(LINK_LOCAL is None, reason="this machine has no IPv6 link-local address")
def test_a_link_local_address_without_its_zone_is_this_machines() -> None:
    """`fe80::…` with no zone cannot be routed by the probe alone (EINVAL), yet a connect through the
    proxy reached the API at it under a `::` bind (outside tester C): asked on every interface."""
    assert LINK_LOCAL is not None
    assert is_local_address(LINK_LOCAL)
    assert is_local_address(f"[{LINK_LOCAL}]")
    assert not is_local_address(_not_mine(LINK_LOCAL))


def test_a_wildcard_bind_judges_an_address_on_our_ports_by_what_the_kernel_says() -> None:
    rules = RuleSet([Rule(1, "*", "*", action="allow")])
    for host in ("0.0.0.0", "::", "*"):
        assert Guard({OWN}, {host}).wildcard
    wild = Guard({OWN, 43080}, {"127.0.0.1", "0.0.0.0"})
    first = judge(rules, "sandbox", "192.0.2.2", OWN, guard=wild, silent="allow")
    assert (first.decision, first.needs_addresses) == ("silent_allow", True)  # ask, then judge again
    j = judge(rules, "sandbox", "192.0.2.2", OWN, guard=wild, addresses=["192.0.2.2"], local=["192.0.2.2"])
    assert (j.decision, j.rule, j.address) == ("guard", None, None)
    assert "192.0.2.2:43051 is one of this proxy's own listeners" in reason(j, "sandbox", "192.0.2.2", OWN)
    named = judge(rules, "sandbox", "me.example", OWN, guard=wild, addresses=["192.0.2.2"], local=["192.0.2.2"])
    assert (named.decision, named.address) == ("guard", "192.0.2.2")
    other = judge(rules, "sandbox", "192.0.2.9", OWN, guard=wild, addresses=["192.0.2.9"], local=[])
    assert (other.decision, other.needs_addresses) == ("allow", False)  # another machine's port
    assert not judge(rules, "sandbox", "192.0.2.2", 443, guard=wild).needs_addresses  # not our port
    assert wild.asks_kernel("192.0.2.2", OWN) and not wild.asks_kernel("127.0.0.1", OWN)
    assert not wild.asks_kernel("192.0.2.2", 443) and not wild.asks_kernel("me.example", OWN)
    # bound to loopback: the listeners are not on the machine's other addresses; nothing is asked
    tight = Guard({OWN}, {"127.0.0.1"})
    assert not tight.wildcard and not tight.asks_kernel("192.0.2.2", OWN)
    j = judge(rules, "sandbox", "192.0.2.2", OWN, guard=tight)
    assert (j.decision, j.needs_addresses) == ("allow", False)


def _gate(bind: str) -> Gate:
    g = Gate(Journal(), Publisher(), {OWN}, {bind}, 5.0, 10)
    g.set_rules(RuleSet([Rule(1, "*", "*", action="allow")]), 1)
    return g


def _logs(g: Gate) -> list[tuple[Any, ...]]:
    out = []
    for kind, data in g.journal.records:
        if kind == records.LOG:
            f = dict(records.log_fields(data))
            out.append((f["container_name"], f["destination_host"], f["result"], f["reason"], f["rule_id"]))
    return out


@needs_address
@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_the_gate_refuses_this_machines_address_on_our_port_when_bound_to_a_wildcard(bind: str) -> None:
    async def main() -> None:
        g = _gate(bind)
        for ip in MINE:
            v = await g.admit("sandbox", ip, OWN, "CONNECT")
            assert (v.allowed, v.reason, v.rule_id) == (False, "guard", None), ip
            assert g.is_own_listener(ip, OWN)
        far = _not_mine(MINE[0])
        v = await g.admit("sandbox", far, OWN, "CONNECT")  # another machine's port of the same number
        assert (v.allowed, v.reason, v.rule_id) == (True, "rule", 1)
        assert _logs(g) == [("sandbox", ip, "blocked", "guard", None) for ip in MINE] + [
            ("sandbox", far, "allowed", "rule", 1)
        ]
        # at connect (a name admitted before it resolved here, a kept-alive re-check): refused, logged
        adm = Admission(g, "sandbox", "me.example", OWN, "HTTP", Verdict(True, "rule", 1))
        assert adm(MINE[0], OWN) == "resolves to this proxy's own listener"
        assert adm(far, OWN) is None
        assert _logs(g)[-1] == ("sandbox", "me.example", "blocked", "guard", None)

    asyncio.run(main())


@needs_address
def test_a_loopback_bind_does_not_refuse_the_machines_other_addresses() -> None:
    async def main() -> None:
        g = _gate("127.0.0.1")
        v = await g.admit("sandbox", MINE[0], OWN, "CONNECT")
        assert (v.allowed, v.reason) == (True, "rule")  # nothing of ours listens there
        assert not g.is_own_listener(MINE[0], OWN)

    asyncio.run(main())
