"""The DNS proxy's pure parts: the answer cache (TTL, LRU), TTL rules, ip → name extraction, query
decoding (fuzzed), plus the answer path in-process against a scripted forwarder (no sockets)."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.proxy.dns_proxy import (
    MAX_TTL,
    AnswerCache,
    DnsProxy,
    Forwarder,
    address_names,
    age_response,
    answer_ttl,
    cache_key,
    decode_query,
    forward_query,
    parse_upstream,
    ptr_target,
    udp_limit,
)
from services.proxy.gate import NAME_TTL, Gate
from harness.fuzz import examples


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(name: str) -> tuple:
    return (name, 1, 1, True, 0)


def _response(
    name: str, rdtype: str, values: list[str], ttl: int = 300, rcode: int = dns.rcode.NOERROR
) -> dns.message.Message:
    r = dns.message.make_response(dns.message.make_query(name, rdtype))
    r.set_rcode(rcode)
    if values:
        r.answer.append(dns.rrset.from_text_list(name, ttl, "IN", rdtype, values))
    return r


# ----------------------------------------------------------------------------- AnswerCache


def test_cache_expires_by_ttl_and_reports_age() -> None:
    clock = Clock()
    cache = AnswerCache(10, clock)
    cache.put(_key("a."), b"wire", 60)
    assert cache.get(_key("a.")) == (b"wire", 0)
    clock.now += 59.5
    assert cache.get(_key("a.")) == (b"wire", 59)
    clock.now += 0.5
    assert cache.get(_key("a.")) is None
    assert len(cache) == 0  # an expired entry is dropped when met


def test_cache_is_lru_bounded() -> None:
    cache = AnswerCache(3, Clock())
    for n in "abc":
        cache.put(_key(n), n.encode(), 100)
    assert cache.get(_key("a")) is not None  # a is now the most recent; b is the oldest
    cache.put(_key("d"), b"d", 100)
    assert len(cache) == 3 and cache.evictions == 1
    assert cache.get(_key("b")) is None
    assert [cache.get(_key(n)) is not None for n in "acd"] == [True, True, True]
    cache.put(_key("c"), b"c2", 100)  # replacing refreshes too
    cache.put(_key("e"), b"e", 100)
    assert cache.get(_key("a")) is None and cache.get(_key("c"))[0] == b"c2"


def test_cache_skips_zero_ttl_and_zero_size_and_caps_ttl() -> None:
    clock = Clock()
    cache = AnswerCache(10, clock)
    cache.put(_key("z"), b"z", 0)
    assert cache.get(_key("z")) is None
    off = AnswerCache(0, clock)
    off.put(_key("z"), b"z", 100)
    assert len(off) == 0
    cache.put(_key("long"), b"l", 10 * MAX_TTL)
    clock.now += MAX_TTL + 1
    assert cache.get(_key("long")) is None


# ----------------------------------------------------------------------------- TTLs


def test_answer_ttl_is_the_least_answer_ttl() -> None:
    r = _response("x.test.", "A", ["10.0.0.1"], ttl=300)
    r.answer.append(dns.rrset.from_text_list("x.test.", 30, "IN", "AAAA", ["::1"]))
    assert answer_ttl(r) == 30


def test_answer_ttl_negative_uses_soa_and_errors_are_not_cached() -> None:
    nx = _response("nope.test.", "A", [], rcode=dns.rcode.NXDOMAIN)
    nx.authority.append(dns.rrset.from_text("test.", 900, "IN", "SOA", "ns.test. h.test. 1 2 3 4 60"))
    assert answer_ttl(nx) == 60
    nx.authority[0].ttl = 20
    assert answer_ttl(nx) == 20
    assert answer_ttl(_response("nope.test.", "A", [], rcode=dns.rcode.NXDOMAIN)) == 0  # no SOA: nothing to go by
    assert answer_ttl(_response("x.test.", "A", [], rcode=dns.rcode.SERVFAIL)) == 0
    tc = _response("x.test.", "A", ["10.0.0.1"])
    tc.flags |= dns.flags.TC
    assert answer_ttl(tc) == 0
    assert answer_ttl(_response("x.test.", "A", ["10.0.0.1"], ttl=10**7)) == MAX_TTL


def test_age_response_counts_ttls_down() -> None:
    r = _response("x.test.", "A", ["10.0.0.1"], ttl=300)
    r.additional.append(dns.rrset.from_text_list("y.test.", 5, "IN", "A", ["10.0.0.2"]))
    age_response(r, 100)
    assert r.answer[0].ttl == 200 and r.additional[0].ttl == 0


# ----------------------------------------------------------------------------- ip → name


def test_address_names_map_every_address_to_the_queried_name() -> None:
    r = dns.message.make_response(dns.message.make_query("WWW.Example.TEST.", "A"))
    r.answer.append(dns.rrset.from_text("WWW.Example.TEST.", 60, "IN", "CNAME", "edge.cdn.test."))
    r.answer.append(dns.rrset.from_text_list("edge.cdn.test.", 60, "IN", "A", ["10.1.1.1", "10.1.1.2"]))
    assert address_names(r) == [("10.1.1.1", "www.example.test"), ("10.1.1.2", "www.example.test")]
    six = _response("v6.test.", "AAAA", ["2001:DB8:0:0::1"])
    assert address_names(six) == [("2001:db8::1", "v6.test")]
    assert address_names(_response("x.test.", "A", ["10.0.0.1"], rcode=dns.rcode.NXDOMAIN)) == []
    assert address_names(_response("x.test.", "TXT", ['"hi"'])) == []
    assert address_names(_response("blocked.test.", "A", ["0.0.0.0"])) == []  # a filtering resolver's "no"


def test_ptr_target() -> None:
    r = _response("1.0.0.10.in-addr.arpa.", "PTR", ["Host.Example.TEST."])
    assert ptr_target(r) == "host.example.test"
    assert ptr_target(_response("1.0.0.10.in-addr.arpa.", "PTR", [])) is None


def test_cache_key_ignores_case_and_id_but_not_type_edns_or_dnssec_bits() -> None:
    a = dns.message.make_query("Example.TEST.", "A", use_edns=0)
    b = dns.message.make_query("example.test.", "A", use_edns=0)
    assert cache_key(a) == cache_key(b)
    assert cache_key(a) != cache_key(dns.message.make_query("example.test.", "AAAA", use_edns=0))
    assert cache_key(a) != cache_key(dns.message.make_query("example.test.", "A"))
    assert cache_key(a) != cache_key(dns.message.make_query("example.test.", "A", want_dnssec=True))
    cd = dns.message.make_query("example.test.", "A", use_edns=0)
    cd.flags |= dns.flags.CD
    assert cache_key(a) != cache_key(cd)


# ----------------------------------------------------------------------------- decoding client bytes


def test_decode_valid_query() -> None:
    q = dns.message.make_query("example.test.", "A")
    d = decode_query(q.to_wire())
    assert d.query is not None and d.query.id == q.id and d.reply is None


def test_decode_rejects_bad_input() -> None:
    assert decode_query(b"").query is None and decode_query(b"").reply is None
    assert decode_query(b"\x00" * 11).reply is None  # no header: drop
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff"
    r = dns.message.from_wire(decode_query(garbage).reply)
    assert r.id == 0xABCD and r.rcode() == dns.rcode.FORMERR and r.flags & dns.flags.QR
    response = dns.message.make_response(dns.message.make_query("x.test.", "A")).to_wire()
    assert decode_query(response).query is None and decode_query(response).reply is None  # never answer a response
    notify = dns.message.make_query("x.test.", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(decode_query(notify.to_wire()).reply).rcode() == dns.rcode.NOTIMP
    axfr = dns.message.make_query("x.test.", "AXFR")
    assert dns.message.from_wire(decode_query(axfr.to_wire()).reply).rcode() == dns.rcode.NOTIMP
    two = dns.message.make_query("x.test.", "A")
    two.question.append(dns.message.make_query("y.test.", "A").question[0])
    assert dns.message.from_wire(decode_query(two.to_wire()).reply).rcode() == dns.rcode.FORMERR


@settings(max_examples=examples(500), deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda name, junk, cut: (dns.message.make_query(f"{name}.test.", "A").to_wire() + junk)[:cut],
            st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True),
            st.binary(max_size=20),
            st.integers(0, 80),
        ),
    )
)
def test_decode_never_raises_and_replies_are_well_formed(data: bytes) -> None:
    d = decode_query(data)
    if d.reply is not None:
        r = dns.message.from_wire(d.reply)
        assert r.flags & dns.flags.QR and r.id == struct.unpack_from("!H", data)[0]


def test_forward_query_is_fresh_and_clean() -> None:
    from dns.edns import GenericOption

    q = dns.message.make_query(
        "Example.test.", "AAAA", use_edns=0, want_dnssec=True, payload=4096, options=[GenericOption(10, b"12345678")]
    )
    q.flags |= dns.flags.CD
    fwd = forward_query(q)
    assert fwd.question == q.question and not fwd.options and fwd.edns == 0
    assert fwd.ednsflags & dns.flags.DO and fwd.flags & dns.flags.CD and fwd.flags & dns.flags.RD
    assert fwd.payload == 1232
    assert forward_query(dns.message.make_query("x.test.", "A")).edns == -1


def test_parse_upstream_and_udp_limit() -> None:
    assert parse_upstream("1.1.1.1") == ("1.1.1.1", 53)
    assert parse_upstream("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_upstream("[2001:db8::1]:53") == ("2001:db8::1", 53)
    assert parse_upstream("2001:db8::1") == ("2001:db8::1", 53)
    for bad in ("example.com", "1.1.1.1:0", "1.1.1.1:x", "[::1]x"):
        with pytest.raises(ValueError):
            parse_upstream(bad)
    assert udp_limit(dns.message.make_query("x.", "A")) == 512
    assert udp_limit(dns.message.make_query("x.", "A", use_edns=0, payload=4096)) == 4096
    assert udp_limit(dns.message.make_query("x.", "A", use_edns=0, payload=100)) == 512


# ----------------------------------------------------------------------------- the gate's 1 h expiry


def test_gate_forgets_names_after_an_hour() -> None:
    gate = Gate(None, None, set(), set(), 1.0, 10)  # type: ignore[arg-type]
    gate.names["10.0.0.1"] = ("fresh.test", time.time() - 60)
    gate.names["10.0.0.2"] = ("stale.test", time.time() - NAME_TTL - 1)
    assert gate.resolved_name("10.0.0.1") == "fresh.test"
    assert gate.resolved_name("10.0.0.2") is None
    assert gate.resolved_name("10.0.0.3") is None


# ----------------------------------------------------------------------------- answer path, in process


class ScriptedForwarder(Forwarder):
    """Answers from a dict after a delay; counts what it was asked."""

    def __init__(self, answers: dict[str, list[str]], delay: float = 0.0) -> None:
        super().__init__([("192.0.2.1", 53)], 0.5)
        self.answers = answers
        self.delay = delay
        self.asked: list[str] = []

    async def query(self, fwd: dns.message.Message) -> dns.message.Message | None:
        name = fwd.question[0].name.to_text()
        self.asked.append(name)
        await asyncio.sleep(self.delay)
        if name not in self.answers:
            return None
        r = dns.message.make_response(fwd)
        r.answer.append(dns.rrset.from_text_list(name, 120, "IN", "A", self.answers[name]))
        return r


class Journal:
    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def append(self, kind: str, data: Any) -> str:
        self.records.append((kind, data))
        return str(len(self.records))


def _proxy(fwd: Forwarder) -> tuple[DnsProxy, Gate, Journal]:
    journal = Journal()
    gate = Gate(journal, None, set(), set(), 1.0, 10)  # type: ignore[arg-type]
    proxy = DnsProxy(gate, journal, None, fwd, 100, "127.0.0.1", 0)  # type: ignore[arg-type]  # no executor: no settings here
    return proxy, gate, journal


def test_answer_path_coalesces_caches_and_maps_names() -> None:
    fwd = ScriptedForwarder({"api.test.": ["10.9.0.1", "10.9.0.2"]}, delay=0.05)
    proxy, gate, journal = _proxy(fwd)

    async def run() -> list[dns.message.Message]:
        queries = []
        for qid in range(5):
            q = dns.message.make_query("api.test.", "A")
            q.id = qid
            queries.append(q.to_wire())
        replies = await asyncio.gather(*(proxy.answer(w, "127.0.0.1", tcp=False) for w in queries))
        again = await proxy.answer(queries[0], "127.0.0.1", tcp=False)
        return [dns.message.from_wire(r) for r in [*replies, again]]

    replies = asyncio.run(run())
    assert fwd.asked == ["api.test."]  # five concurrent identical queries, one upstream exchange, then cache
    assert [r.id for r in replies] == [0, 1, 2, 3, 4, 0]
    assert all(sorted(rd.address for rd in r.answer[0]) == ["10.9.0.1", "10.9.0.2"] for r in replies)
    assert gate.resolved_name("10.9.0.1") == "api.test" and gate.resolved_name("10.9.0.2") == "api.test"
    dns_records = [d for k, d in journal.records if k == "dns"]
    assert sorted(d["ip"] for d in dns_records) == ["10.9.0.1", "10.9.0.2"]  # journaled once, not per answer
    assert proxy.stats()["cache_hits"] == 1


def test_answer_path_servfail_and_udp_truncation() -> None:
    many = [f"10.8.{i // 200}.{i % 200 + 1}" for i in range(60)]
    proxy, _gate, _j = _proxy(ScriptedForwarder({"big.test.": many}))

    async def run() -> tuple[bytes, bytes, bytes]:
        lost = await proxy.answer(dns.message.make_query("lost.test.", "A").to_wire(), "127.0.0.1", tcp=False)
        small = await proxy.answer(dns.message.make_query("big.test.", "A").to_wire(), "127.0.0.1", tcp=False)
        full = await proxy.answer(dns.message.make_query("big.test.", "A").to_wire(), "127.0.0.1", tcp=True)
        return lost, small, full

    lost, small, full = asyncio.run(run())
    assert dns.message.from_wire(lost).rcode() == dns.rcode.SERVFAIL
    assert len(small) <= 512 and dns.message.from_wire(small).flags & dns.flags.TC
    assert len(dns.message.from_wire(full).answer[0]) == 60


def test_with_workers_an_answer_with_new_names_waits_for_their_echo_from_the_bus() -> None:
    """Proxy workers (SPEC §15): the name a DNS answer teaches goes to the other workers over the
    bus. An outside run found connections made at once after the answer reaching a worker the name
    had not reached yet. The answer now waits (at most ECHO_WAIT) until the bus has sent our own
    publication back: by then the broker has forwarded it to every worker, before the client can
    connect. Names already known go out at once; without an echo (the bus down) it waits ECHO_WAIT."""
    from services.proxy.dns_proxy import ECHO_WAIT

    class Bus:
        def __init__(self, echo_after: float | None) -> None:
            self.echo_after = echo_after
            self.sent: list[dict[str, Any]] = []

        def publish(self, topic: str, data: dict[str, Any]) -> None:
            self.sent.append(data)
            if self.echo_after is not None:
                asyncio.get_running_loop().call_later(self.echo_after, proxy.echoed, data["ip"])

    fwd = ScriptedForwarder({"a.test.": ["10.9.0.1"], "b.test.": ["10.9.0.2", "10.9.0.3"]})
    proxy, gate, _journal = _proxy(fwd)
    proxy.reuse_port = True

    async def timed(name: str) -> float:
        t0 = time.perf_counter()
        await proxy.answer(dns.message.make_query(name, "A").to_wire(), "127.0.0.1", tcp=False)
        return time.perf_counter() - t0

    async def run() -> None:
        gate.publisher = bus = Bus(echo_after=0.03)
        assert 0.03 <= await timed("a.test.") < ECHO_WAIT  # waited for the echo, not the whole wait
        assert 0.03 <= await timed("b.test.") < ECHO_WAIT  # both of its names echoed
        assert sorted(d["ip"] for d in bus.sent) == ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
        assert await timed("a.test.") < 0.02  # known already: no publication, no wait
        assert len(bus.sent) == 3 and not proxy._echo_waits
        gate.publisher = Bus(echo_after=None)  # the bus is down: the answer still goes, late
        fwd.answers["c.test."] = ["10.9.0.4"]
        assert ECHO_WAIT <= await timed("c.test.") < ECHO_WAIT + 0.1
        assert not proxy._echo_waits

    asyncio.run(run())
    assert gate.resolved_name("10.9.0.4") == "c.test"
