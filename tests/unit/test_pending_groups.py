"""A pending entry stands for its group (SPEC §3.1, §3.2): a connection to another IP of the same
host bumps the entry of the host's first IP and gets no row of its own, so the proxy holds it under
a key no row names. Dismissing the entry must block it too, and the entry's `waiting` must count it:
in the gate's own records and events (services/proxy/gate.py), in GET /api/pending's figures
(services/api/pending.py) and in the totals /ws clients get (services/api/ws/hub.py).

Before: dismiss blocked only the row's key (the sibling waited out the hold timeout, logged
`hold_timeout`), and `waiting` said 1 while two connections were held (`attempt_count` 2)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bus import records, topics
from greyproxy.policy import RuleSet
from harness.fakes import Journal
from services.api import pending as api_pending
from services.api.ws import hub as ws_hub
from services.proxy.gate import Gate

NAME = "multi.test"
IP1, IP2 = "10.0.0.1", "10.0.0.2"


class Publisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def publish(self, topic: str, data: Any) -> None:
        self.events.append((topic, data))


def held_gate() -> tuple[Gate, Journal, Publisher]:
    journal, publisher = Journal(), Publisher()
    g = Gate(journal, publisher, {1}, set(), 5.0, 100)  # type: ignore[arg-type]
    g.set_rules(RuleSet([]), 1)
    now = time.time()
    g.names[IP1] = (NAME, now)  # the client asked our DNS proxy for the name: both IPs came back
    g.names[IP2] = (NAME, now)
    return g, journal, publisher


async def hold_both(g: Gate, *others: tuple[str, str, int]) -> list[asyncio.Task]:
    tasks = [asyncio.ensure_future(g.admit("c", ip, 443, "SOCKS5")) for ip in (IP1, IP2)]
    tasks += [asyncio.ensure_future(g.admit(c, h, p, "SOCKS5")) for c, h, p in others]
    for _ in range(50):
        await asyncio.sleep(0.01)
        if g.waiting() == len(tasks):
            return tasks
    raise AssertionError(f"held {g.waiting()} of {len(tasks)}")


def test_dismissing_the_entry_blocks_the_connection_held_for_a_sibling_ip() -> None:
    """The API names the group by (container, resolved-or-raw host, port) among the row keys it
    sends (`store_ops._delete_group`): the sibling IP's hold, judged under that name, goes too;
    connections of another container, port or name stay held."""
    g, _journal, _pub = held_gate()

    async def main() -> tuple[list[Any], int]:
        tasks = await hold_both(g, ("other", IP2, 443), ("c", IP2, 80), ("c", "else.test", 443))
        blocked = g.block_holds([("c", IP1, 443), ("c", NAME, 443)], "dismissed")
        done, _ = await asyncio.wait(tasks[:2], timeout=1.0)
        assert len(done) == 2, "the sibling IP's connection must be blocked at once"
        assert g.waiting() == 3 and not any(t.done() for t in tasks[2:])
        g.block_holds([("other", IP2, 443), ("c", IP2, 80), ("c", "else.test", 443)], "dismissed")
        await asyncio.gather(*tasks[2:])
        return [t.result() for t in tasks[:2]], blocked

    verdicts, blocked = asyncio.run(main())
    assert blocked == 2
    assert [(v.allowed, v.reason) for v in verdicts] == [(False, "dismissed"), (False, "dismissed")]


def test_the_entrys_waiting_counts_the_sibling_ips_connections() -> None:
    """The second sighting (it bumps the first IP's entry) says `waiting` 2; `waiters` and
    `waiters.changed` carry the name each key's connections were judged under."""
    g, journal, pub = held_gate()

    async def main() -> list[dict[str, Any]]:
        tasks = await hold_both(g, ("c", IP2, 80))
        got = g.waiters()
        g.block_holds([("c", NAME, 443), ("c", NAME, 80)], "dismissed")
        await asyncio.gather(*tasks)
        return got

    waiters = asyncio.run(main())
    sightings = [d for k, d in journal.records if k == records.PENDING]
    assert [(d["destination_host"], d["destination_port"], d["waiting"]) for d in sightings] == [
        (IP1, 443, 1),
        (IP2, 443, 2),
        (IP2, 80, 1),  # another port: another entry
    ]
    assert sorted((w["host"], w["port"], w["resolved_hostname"], w["count"]) for w in waiters) == [
        (IP1, 443, NAME, 1),
        (IP2, 80, NAME, 1),
        (IP2, 443, NAME, 1),
    ]
    changed = [d for t, d in pub.events if t == topics.WAITERS_CHANGED]
    assert changed and all(d["resolved_hostname"] == NAME for d in changed)
    assert g.entry_waiting(("c", IP1, 443), NAME) == 0  # all gone


def test_a_connection_by_the_name_itself_counts_the_ips_connections() -> None:
    """A client connecting by the name (key host `multi.test`, no resolved name) is in the same
    group as the IPs judged under it: its sighting's `waiting` counts them (once it counted only its
    own key, so the recorder said 1 where the API and /ws said 2)."""
    g, journal, _pub = held_gate()

    async def main() -> None:
        first = asyncio.ensure_future(g.admit("c", IP1, 443, "SOCKS5"))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if g.waiting() == 1:
                break
        by_name = asyncio.ensure_future(g.admit("c", NAME, 443, "SOCKS5"))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if g.waiting() == 2:
                break
        assert g.entry_waiting(("c", NAME, 443), None) == 2
        g.block_holds([("c", NAME, 443)], "dismissed")
        await asyncio.gather(first, by_name)

    asyncio.run(main())
    sightings = [d for k, d in journal.records if k == records.PENDING]
    assert [(d["destination_host"], d["waiting"]) for d in sightings] == [(IP1, 1), (NAME, 2)]


def test_a_name_learnt_late_reports_the_entrys_waiting() -> None:
    """`pending_named` (a raw IP's sighting named later) carries the entry's `waiting` too: the
    connections held for the key and for the other IPs already judged under that name."""
    g, journal, _pub = held_gate()
    del g.names[IP2]

    async def main() -> None:
        tasks = await hold_both(g)
        g.learn(IP2, NAME, time.time())
        g.block_holds([("c", NAME, 443)], "dismissed")
        await asyncio.gather(*tasks)

    asyncio.run(main())
    named = [d for k, d in journal.records if k == records.PENDING_NAMED]
    assert [(d["destination_host"], d["waiting"]) for d in named] == [(IP2, 2)]


def test_api_waiting_counts_every_connection_of_the_group() -> None:
    """GET /api/pending's `waiting` of an entry (one row: the sibling IP has none): the waiters of
    its rows' keys, of its name itself, and of another host judged under its name."""
    row = {
        "container_name": "c",
        "destination_host": IP1,
        "destination_port": 443,
        "resolved_hostname": NAME,
        "hosts": [IP1],
    }
    held: api_pending.Held = {
        ("c", 443): [(IP1, NAME, 1), (IP2, NAME, 2), (NAME, None, 1), ("10.9.9.9", "other.test", 5)],
        ("c", 80): [(IP2, NAME, 7)],
        ("d", 443): [(IP2, NAME, 9)],
    }
    assert api_pending.entry_waiting(row, held) == 4
    unnamed = {**row, "resolved_hostname": None}
    assert api_pending.entry_waiting(unnamed, held) == 1  # a raw IP's entry: its own key only


class _Ctx:
    def publish(self, topic: str, data: Any) -> None:
        pass


def test_ws_totals_count_the_sibling_ips_connections() -> None:
    """/ws clients get the entry's total over the proxy processes: the sibling IP's key counts for
    the entry named so (its waiters.changed says under which name it was judged)."""
    hub = ws_hub.Hub(_Ctx())  # type: ignore[arg-type]
    for source, ip in (("proxy-0", IP1), ("proxy-1", IP2), ("proxy-0", "10.9.9.9")):
        hub.totals(
            topics.WAITERS_CHANGED,
            {
                "container_name": "c",
                "host": ip,
                "port": 443,
                "resolved_hostname": NAME if ip != "10.9.9.9" else "other.test",
                "previous_count": 0,
                "current_count": 1,
            },
            source,
        )
    entry = {
        "container_name": "c",
        "destination_host": IP1,
        "destination_port": 443,
        "resolved_hostname": NAME,
        "waiting": 1,
    }
    assert hub.totals(topics.PENDING_UPDATED, entry, "recorder")["waiting"] == 2
    told: list[tuple[str, Any]] = []
    hub.dispatch = lambda topic, data: told.append((topic, data))  # type: ignore[method-assign]
    hub.forget_source("proxy-1")
    assert told[0][1]["resolved_hostname"] == NAME and told[0][1]["current_count"] == 0
    assert hub.totals(topics.PENDING_UPDATED, entry, "recorder")["waiting"] == 1
    assert hub._held_names.keys() == hub._held.keys()
