"""The DNS proxy (SPEC §6): a caching forwarder on UDP and TCP that also feeds the gate's ip → name map.

Layers, top down:
- `DnsProxy` — the listeners (asyncio DatagramProtocol for UDP; an asyncio stream server with
  2-byte framing for TCP), the answer path, logging of queries, the PTR fallback for the gate and
  the watch of the `logDnsQueries` setting.
- `Forwarder` — upstream resolvers in order with failover, one try each under the configured
  timeout, a TCP retry when a UDP answer comes back truncated (dnspython's async queries).
- `AnswerCache` and the small pure helpers (`decode_query`, `answer_ttl`, `address_names`, ...):
  no sockets, unit-tested.

All wire work is dnspython's; nothing here parses DNS by hand beyond reading the two header words
of a packet dnspython rejected (to answer FORMERR with the client's id).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename

from bus import records, topics
from bus.journal import JournalWriter
from greyproxy.config import Config
from greyproxy.policy.patterns import analyse_host, normalise_host

from .gate import NAME_TTL, Gate
from .settings_watch import SettingsWatch
from .waits import KeyedWaits

# A pure function of the hosts asked for, which repeat (ensure_name runs for every decision): cached, bounded.
_analyse_host = functools.lru_cache(maxsize=4096)(analyse_host)

log = logging.getLogger("greyproxy.proxy.dns")

MAX_TTL = 86400  # never cache an answer longer than a day, whatever it claims
UDP_MIN_PAYLOAD = 512  # RFC 1035 limit for a client without EDNS
MAX_UDP_INFLIGHT = 4096  # queries being answered at once over UDP; beyond, drop (client retries)
MAX_TCP_CONNECTIONS = 512  # open TCP client connections
MAX_TCP_PIPELINE = 16  # queries answered concurrently on one TCP connection
MAX_TCP_QUERY = 16384  # a query frame larger than this closes the connection
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may sit between queries
TCP_FRAME_TIMEOUT = 5.0  # seconds to receive the rest of a frame once its length arrived
UPSTREAM_PENALTY = 30.0  # seconds a failing upstream is tried after the healthy ones
PTR_DEADLINE = 0.3  # seconds a connection waits for a reverse lookup
PTR_NEGATIVE_TTL = 300.0  # seconds an IP without a (confirmed) PTR name is not asked again
PTR_CACHE_LIMIT = 65536  # negative PTR entries kept
PERSIST_REFRESH = 3600.0  # re-journal an unchanged ip → name this often (keeps dns_cache fresh)
PERSIST_LIMIT = 65536  # ip → name pairs remembered as already journaled
NAMES_PRUNE_EVERY = 300.0  # seconds between sweeps of expired gate.names entries
ECHO_WAIT = 0.1  # proxy workers: seconds an answer with new names waits for the bus to echo them (`_echo`)
LOG_SETTING = "logDnsQueries"

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_COPIED_QUERY_FLAGS = dns.flags.RD | dns.flags.CD | dns.flags.AD
_FAILOVER_RCODES = (dns.rcode.SERVFAIL, dns.rcode.REFUSED)

CacheKey = tuple[str, int, int, bool, int]  # (qname, rdtype, rdclass, edns?, flags that change the answer)


# ----------------------------------------------------------------------------- pure parts


class AnswerCache:
    """Upstream answers (wire bytes) by query key, kept for their TTL; least recently used goes first."""

    def __init__(self, max_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_size = max(0, max_size)
        self.clock = clock
        self._entries: OrderedDict[CacheKey, tuple[bytes, float, float]] = OrderedDict()  # wire, stored, expires
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> tuple[bytes, int] | None:
        """(wire, age in whole seconds) of a live entry, or None."""
        entry = self._entries.get(key)
        now = self.clock()
        if entry is None or entry[2] <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0], int(now - entry[1])

    def put(self, key: CacheKey, wire: bytes, ttl: int) -> None:
        if ttl <= 0 or self.max_size == 0:
            return
        now = self.clock()
        self._entries[key] = (wire, now, now + min(ttl, MAX_TTL))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()


def cache_key(query: dns.message.Message) -> CacheKey:
    """What makes two queries share an answer: the question, EDNS presence and the DO/CD/RD bits."""
    q = query.question[0]
    bits = (query.flags & (dns.flags.CD | dns.flags.RD)) | (query.ednsflags & dns.flags.DO)
    return q.name.to_text().lower(), int(q.rdtype), int(q.rdclass), query.edns >= 0, int(bits)


def answer_ttl(response: dns.message.Message) -> int:
    """Seconds an answer may be cached: the least TTL of the answer section; for a negative answer the
    SOA's (RFC 2308); 0 = do not cache (errors, truncated answers, nothing to go by)."""
    if response.flags & dns.flags.TC:
        return 0
    rcode = response.rcode()
    if rcode == dns.rcode.NOERROR and response.answer:
        return max(0, min(min(rrset.ttl for rrset in response.answer), MAX_TTL))
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return max(0, min(rrset.ttl, rrset[0].minimum, MAX_TTL))
    return 0


def age_response(response: dns.message.Message, age: int) -> None:
    """Count down the TTLs of a cached answer by its age in the cache."""
    if age <= 0:
        return
    for section in (response.answer, response.authority, response.additional):
        for rrset in section:
            rrset.ttl = max(0, rrset.ttl - age)


def address_names(response: dns.message.Message) -> list[tuple[str, str]]:
    """(ip, queried name) for every A/AAAA record of a successful answer (CNAME chains map to the name asked)."""
    if response.rcode() != dns.rcode.NOERROR or not response.question:
        return []
    name = response.question[0].name.to_text(omit_final_dot=True).lower()
    if not name:
        return []
    out: list[tuple[str, str]] = []
    for rrset in response.answer:
        if rrset.rdtype in _ADDRESS_TYPES and rrset.rdclass == dns.rdataclass.IN:
            # 0.0.0.0 / :: is how filtering resolvers say "blocked": not an address of that name.
            out.extend(
                (normalise_host(rd.address), name)
                for rd in rrset
                if not ipaddress.ip_address(rd.address).is_unspecified
            )
    return out


def ptr_target(response: dns.message.Message) -> str | None:
    """The host name a PTR answer points at (lower case, no final dot), if any."""
    if response.rcode() != dns.rcode.NOERROR:
        return None
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.PTR and len(rrset):
            name = rrset[0].target.to_text(omit_final_dot=True).lower()
            return name or None
    return None


def _header_error(data: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare error answer built from the two header words of a packet dnspython could not parse;
    None when there is no header or the packet is itself a response (never answer those: loops)."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & dns.flags.QR:
        return None
    reply = dns.message.Message(id=qid)
    reply.flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD))  # keep the opcode and RD bits
    reply.set_rcode(rcode)
    return reply.to_wire()


def error_reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    reply = dns.message.make_response(query, recursion_available=True)
    reply.set_rcode(rcode)
    return reply.to_wire()


@dataclass(slots=True)
class Decoded:
    """A query to answer (`query` set), an immediate reply (`reply` set), or neither (drop)."""

    query: dns.message.Message | None = None
    reply: bytes | None = None


def decode_query(data: bytes) -> Decoded:
    """Client bytes → what to do with them. Never raises."""
    try:
        query = dns.message.from_wire(data)
    except Exception:  # dnspython raises many kinds for hostile input (and for TSIG we hold no key for)
        return Decoded(reply=_header_error(data, dns.rcode.FORMERR))
    try:
        if query.flags & dns.flags.QR:
            return Decoded()  # a response sent to us: dropping it avoids reflection loops
        if query.opcode() != dns.opcode.QUERY:
            return Decoded(reply=error_reply(query, dns.rcode.NOTIMP))
        if len(query.question) != 1 or query.answer or query.authority:
            return Decoded(reply=error_reply(query, dns.rcode.FORMERR))
        rdtype = query.question[0].rdtype
        if dns.rdatatype.is_metatype(rdtype) and rdtype != dns.rdatatype.ANY:
            return Decoded(reply=error_reply(query, dns.rcode.NOTIMP))  # AXFR/IXFR/OPT... are not forwarded
        return Decoded(query=query)
    except Exception:
        return Decoded(reply=_header_error(data, dns.rcode.FORMERR))


def forward_query(query: dns.message.Message) -> dns.message.Message:
    """The query we send upstream: same question and DNSSEC wishes, a fresh random id, no EDNS options
    (client cookies and subnets are not ours to pass on, and the answer is shared through the cache)."""
    q = query.question[0]
    use_edns: int | bool = query.edns if query.edns >= 0 else False
    fwd = dns.message.make_query(
        q.name,
        q.rdtype,
        q.rdclass,
        use_edns=use_edns,
        want_dnssec=bool(query.ednsflags & dns.flags.DO),
        payload=1232 if query.edns >= 0 else None,
    )
    fwd.flags = query.flags & _COPIED_QUERY_FLAGS
    return fwd


def parse_upstream(spec: str) -> tuple[str, int]:
    """'IP', 'IP:PORT', '[IPv6]:PORT' or a bare IPv6 → (ip, port). ValueError when malformed."""
    s = spec.strip()
    port = 53
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad DNS upstream {spec!r}")
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, _, p = s.partition(":")
        port = int(p)
    else:
        host = s
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if not 0 < port < 65536:
        raise ValueError(f"bad port in DNS upstream {spec!r}")
    return (host if "%" in host else str(ip)), port


def udp_limit(query: dns.message.Message) -> int:
    return max(UDP_MIN_PAYLOAD, query.payload) if query.edns >= 0 else UDP_MIN_PAYLOAD


# ----------------------------------------------------------------------------- upstreams


class Forwarder:
    """Asks the upstream resolvers in order; a failing one is moved to the back for a while."""

    def __init__(self, upstreams: list[tuple[str, int]], timeout: float) -> None:
        self.upstreams = upstreams
        self.timeout = timeout
        self._penalty: dict[tuple[str, int], float] = {}
        self.sent = 0
        self.failures = 0
        self.tcp_retries = 0

    def _order(self) -> list[tuple[str, int]]:
        now = time.monotonic()
        # Stable sort: config order among the healthy ones, then the penalised ones.
        return sorted(self.upstreams, key=lambda u: self._penalty.get(u, 0.0) > now)

    async def query(self, fwd: dns.message.Message) -> dns.message.Message | None:
        """The first usable answer, else the last SERVFAIL/REFUSED seen, else None (nobody answered)."""
        fallback: dns.message.Message | None = None
        for upstream in self._order():
            host, port = upstream
            try:
                self.sent += 1
                # ignore_errors: a stray or forged datagram does not end the wait for the real answer.
                resp = await dns.asyncquery.udp(
                    fwd, host, timeout=self.timeout, port=port, ignore_unexpected=True, ignore_errors=True
                )
                if resp.flags & dns.flags.TC:
                    self.tcp_retries += 1
                    resp = await dns.asyncquery.tcp(fwd, host, timeout=self.timeout, port=port)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # timeouts, refused ports, resets, garbage: try the next one
                self.failures += 1
                self._penalty[upstream] = time.monotonic() + UPSTREAM_PENALTY
                log.debug("DNS upstream %s:%d failed: %r", host, port, exc)
                continue
            if resp.rcode() in _FAILOVER_RCODES:
                fallback = resp  # often a per-name problem (e.g. DNSSEC): ask the next, but no penalty
                continue
            self._penalty.pop(upstream, None)
            return resp
        return fallback


# ----------------------------------------------------------------------------- upstreams


def _system_upstreams() -> list[tuple[str, int]]:
    """Nameservers from /etc/resolv.conf (worker thread: it reads a file)."""
    try:
        resolver = dns.resolver.Resolver(configure=True)
    except Exception as exc:
        log.warning("no DNS upstreams: cannot read /etc/resolv.conf (%s)", exc)
        return []
    out = []
    for ns in resolver.nameservers:
        with contextlib.suppress(ValueError):
            out.append(parse_upstream(str(ns)))
    return out


# ----------------------------------------------------------------------------- the server


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.proxy.on_datagram(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS UDP socket error: %r", exc)  # ICMP errors from clients that went away: nothing to do


class DnsProxy:
    def __init__(
        self,
        gate: Gate,
        journal: JournalWriter,
        executor: Executor,
        forwarder: Forwarder,
        cache_size: int,
        host: str,
        port: int,
        settings: SettingsWatch | None = None,
    ) -> None:
        self.gate = gate
        self.journal = journal
        self.executor = executor
        self.forwarder = forwarder
        self.cache = AnswerCache(cache_size)
        self.host = host
        self.port = port
        self.settings = settings
        self.log_queries = False
        self.reuse_port = False  # proxy workers share the address (SO_REUSEPORT)
        self._udp: _UdpServer | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._fetches: dict[CacheKey, asyncio.Future] = {}
        self._ptr: dict[str, asyncio.Task] = {}
        self._ptr_negative: OrderedDict[str, float] = OrderedDict()
        self._persisted: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._echo_waits = KeyedWaits()  # ip -> answers waiting for its echo (`_echo`)
        self._udp_inflight = 0
        self._tcp_conns = 0
        self.counts = {
            "queries": 0,
            "udp": 0,
            "tcp": 0,
            "cache_hits": 0,
            "servfail": 0,
            "malformed": 0,
            "dropped": 0,
            "names": 0,
            "ptr_lookups": 0,
            "ptr_names": 0,
        }

    # -- lifecycle --
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _t, self._udp = await loop.create_datagram_endpoint(
            lambda: _UdpServer(self), local_addr=(self.host, self.port), reuse_port=self.reuse_port or None
        )
        try:
            self._tcp = await asyncio.start_server(
                self._serve_tcp,
                self.host,
                self.port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                limit=MAX_TCP_QUERY + 2,
            )
        except BaseException:
            self._udp.transport.close()  # type: ignore[union-attr]
            raise
        if self.settings is not None:  # the proxy's one settings reader keeps logDnsQueries current
            self.settings.on_change(self._apply_settings)
        self._spawn(self._prune_names())
        self.gate.name_hook = self.ensure_name  # PTR fallback for connections to unnamed raw IPs

    def close(self) -> None:
        if self.gate.name_hook == self.ensure_name:
            self.gate.name_hook = None
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._tasks) + list(self._fetches.values()) + list(self._ptr.values()):
            t.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "cache_entries": len(self.cache),
            "upstream_queries": self.forwarder.sent,
            "upstream_failures": self.forwarder.failures,
            "tcp_retries": self.forwarder.tcp_retries,
            "upstreams": [f"{h}:{p}" for h, p in self.forwarder.upstreams],
            "log_queries": self.log_queries,
            "tcp_connections": self._tcp_conns,
        }

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- UDP --
    def on_datagram(self, server: _UdpServer, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._udp_inflight >= MAX_UDP_INFLIGHT:
            self.counts["dropped"] += 1
            return
        self._udp_inflight += 1
        self._spawn(self._udp_one(server, data, addr))

    async def _udp_one(self, server: _UdpServer, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.counts["udp"] += 1
            reply = await self.answer(data, str(addr[0]), tcp=False)
            if reply is not None and server.transport is not None and not server.transport.is_closing():
                server.transport.sendto(reply, addr)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("DNS UDP query failed")
        finally:
            self._udp_inflight -= 1

    # -- TCP --
    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_conns >= MAX_TCP_CONNECTIONS:
            self.counts["dropped"] += 1
            writer.close()
            return
        self._tcp_conns += 1
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]) if peer else "?"
        pending: set[asyncio.Task] = set()
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    size = struct.unpack("!H", head)[0]
                    if size < 12 or size > MAX_TCP_QUERY:
                        self.counts["malformed"] += 1
                        break  # no DNS header fits, or more than a query needs: the stream is not DNS
                    data = await asyncio.wait_for(reader.readexactly(size), TCP_FRAME_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    break
                while len(pending) >= MAX_TCP_PIPELINE:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.ensure_future(self._tcp_one(data, client_ip, writer))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:  # answers to queries already read still go out before we close
                await asyncio.wait(pending, timeout=self._answer_budget())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("DNS TCP connection failed")
        finally:
            for task in pending:
                task.cancel()
            self._tcp_conns -= 1
            writer.close()

    async def _tcp_one(self, data: bytes, client_ip: str, writer: asyncio.StreamWriter) -> None:
        self.counts["tcp"] += 1
        try:
            reply = await self.answer(data, client_ip, tcp=True)
            if reply is not None and not writer.is_closing():
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), TCP_IDLE_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, asyncio.TimeoutError):
            writer.close()
        except Exception:
            log.exception("DNS TCP query failed")

    def _answer_budget(self) -> float:
        """Longest an answer can take: one try per upstream plus a TCP retry."""
        return self.forwarder.timeout * (len(self.forwarder.upstreams) + 1) + 1.0

    # -- the answer path --
    async def answer(self, data: bytes, client_ip: str, tcp: bool) -> bytes | None:
        """Client bytes → reply bytes (None = send nothing)."""
        t0 = time.perf_counter()
        decoded = decode_query(data)
        if decoded.query is None:
            self.counts["malformed"] += 1
            return decoded.reply
        query = decoded.query
        self.counts["queries"] += 1
        try:
            reply = await self._answer_query(query, tcp)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("answering a DNS query failed")
            self.counts["servfail"] += 1
            reply = error_reply(query, dns.rcode.SERVFAIL)
        if self.log_queries:
            self._log_query(query, client_ip, (time.perf_counter() - t0) * 1000)
        return reply

    async def _answer_query(self, query: dns.message.Message, tcp: bool) -> bytes:
        key = cache_key(query)
        got = self.cache.get(key)
        if got is not None:
            self.counts["cache_hits"] += 1
            wire, age = got
        else:
            fetched = await self._fetch(key, query)
            if fetched is None:
                self.counts["servfail"] += 1
                return error_reply(query, dns.rcode.SERVFAIL)
            wire, age = fetched, 0
        response = dns.message.from_wire(wire)
        age_response(response, age)
        published = self.note_names(response)
        if published:
            # Proxy workers: the answer waits until the bus has sent our publication of each new
            # name back to us (`echoed`), at most ECHO_WAIT. The broker forwards a message to every
            # subscriber at once, so by then it is on its way into every other worker too, ahead of
            # the client's connection, which it makes only once it has the answer: else a worker
            # that takes the connection may judge the raw IP unnamed (an outside run: 0.2-1 % of
            # connections made at once after the answer, held as unknown while a rule allowed the name).
            await self._echo_waits.wait(published, ECHO_WAIT)
        response.id = query.id
        response.question = list(query.question)  # the client's own spelling (0x20 case randomisation)
        out = response.to_wire()
        if not tcp and len(out) > udp_limit(query):
            # Too big for this client's UDP: say so (TC) and let it come back over TCP.
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            out = response.to_wire()
        return out

    async def _fetch(self, key: CacheKey, query: dns.message.Message) -> bytes | None:
        """One upstream exchange per key at a time: identical concurrent queries share it."""
        fut = self._fetches.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch_upstream(key, query))
            self._fetches[key] = fut
            fut.add_done_callback(lambda _f: self._fetches.pop(key, None))
        return await asyncio.shield(fut)

    async def _fetch_upstream(self, key: CacheKey, query: dns.message.Message) -> bytes | None:
        response = await self.forwarder.query(forward_query(query))
        if response is None:
            return None
        if response.opt is not None and response.options:
            # Upstream cookies/padding are not for our clients (and the answer is shared).
            response.use_edns(response.edns, response.ednsflags, response.payload, options=[])
        wire = response.to_wire()
        self.cache.put(key, wire, answer_ttl(response))
        return wire

    # -- ip → name --
    def note_names(self, response: dns.message.Message) -> list[str] | None:
        """Every A/AAAA answer: into the gate's map at once, and to the journal when new or stale;
        with proxy workers, also to the other workers: the IPs published so (None: none)."""
        pairs = address_names(response)
        if not pairs:
            return None
        now = time.time()
        learn = self.gate.learn
        published: list[str] = []
        for ip, name in pairs:
            learn(ip, name, now)
            self._ptr_negative.pop(ip, None)
            last = self._persisted.get(ip)
            if last is not None and last[0] == name and now - last[1] < PERSIST_REFRESH:
                self._persisted.move_to_end(ip)
                continue
            self._persisted[ip] = (name, now)
            self._persisted.move_to_end(ip)
            if len(self._persisted) > PERSIST_LIMIT:
                self._persisted.popitem(last=False)
            self.counts["names"] += 1
            self.journal.append(records.DNS, records.dns_record(ip, name, now))
            if self.reuse_port:  # the other workers may get this client's connection
                self.gate.publisher.publish(topics.DNS_NAME, {"ip": ip, "hostname": name, "ts": now})
                published.append(ip)
        return published or None

    def echoed(self, ip: str) -> None:
        """Our own publication of `ip`'s name came back from the bus (service.py, `_listen_names`)."""
        self._echo_waits.wake(ip)

    async def _prune_names(self) -> None:
        """Drop ip → name entries past their memory lifetime (the gate ignores them anyway)."""
        while True:
            await asyncio.sleep(NAMES_PRUNE_EVERY)
            cutoff = time.time() - NAME_TTL
            for ip in [ip for ip, (_n, ts) in self.gate.names.items() if ts < cutoff]:
                del self.gate.names[ip]

    # -- PTR fallback for connections to raw IPs --
    def ensure_name(self, container: str, host: str, port: int) -> Awaitable[Any] | None:
        """Start a reverse lookup for an unnamed IP; what to await (up to PTR_DEADLINE) only when the
        name could change the decision (no rule, silent mode or guard already decides on the raw
        host), else None: a name, a host already named or known to have no name costs no coroutine."""
        h, version, _ip = _analyse_host(host)
        if not version:
            return None
        gate = self.gate
        if gate.resolved_name(h) is not None:
            return None
        expires = self._ptr_negative.get(h)
        if expires is not None:
            if expires > time.monotonic():
                return None
            del self._ptr_negative[h]
        task = self._ptr.get(h)
        if task is None:
            task = asyncio.ensure_future(self._reverse(h))
            self._ptr[h] = task
            task.add_done_callback(lambda _t: self._ptr.pop(h, None))
        decided = (
            gate.is_own_listener(h, port)
            or gate.silent.active_mode() is not None
            or gate.rules.decide(container, h, port).rule is not None
        )
        if not decided:
            return asyncio.wait({task}, timeout=PTR_DEADLINE)  # the lookup goes on past the deadline
        return None

    async def _reverse(self, ip: str) -> None:
        """PTR through the upstreams, confirmed forward (the name must resolve back to the IP: whoever
        owns an address controls its PTR, so an unconfirmed name could impersonate an allowed host)."""
        self.counts["ptr_lookups"] += 1
        name = None
        try:
            ptr = await self._lookup(dns.reversename.from_address(ip), dns.rdatatype.PTR)
            candidate = ptr_target(ptr) if ptr is not None else None
            if candidate:
                rdtype = dns.rdatatype.AAAA if ipaddress.ip_address(ip).version == 6 else dns.rdatatype.A
                fwd = await self._lookup(dns.name.from_text(candidate), rdtype)
                if fwd is not None and any(a == ip for a, _n in address_names(fwd)):
                    name = candidate
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("reverse lookup of %s failed: %r", ip, exc)
        if name is None:
            self._ptr_negative[ip] = time.monotonic() + PTR_NEGATIVE_TTL
            if len(self._ptr_negative) > PTR_CACHE_LIMIT:
                self._ptr_negative.popitem(last=False)
            return
        if self.gate.resolved_name(ip) is None:  # a forward answer that arrived meanwhile wins
            self.gate.learn(ip, name, time.time())
            self.counts["ptr_names"] += 1

    async def _lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message | None:
        """Our own query through the cache and the upstreams."""
        query = dns.message.make_query(name, rdtype)
        key = cache_key(query)
        got = self.cache.get(key)
        wire = got[0] if got is not None else await self._fetch(key, query)
        return dns.message.from_wire(wire) if wire is not None else None

    # -- logging queries (setting logDnsQueries) --
    def _log_query(self, query: dns.message.Message, client_ip: str, elapsed_ms: float) -> None:
        name = query.question[0].name.to_text(omit_final_dot=True).lower() or "."
        self.journal.append(
            records.LOG,
            records.log_values(
                f"unknown-{client_ip}", name, 53, "DNS", records.ALLOWED, response_time_ms=elapsed_ms, reason="dns"
            ),
        )

    def _apply_settings(self, values: dict[str, Any]) -> None:
        value = values.get(LOG_SETTING) is True
        if value != self.log_queries:
            log.info("DNS query logging %s", "on" if value else "off")
        self.log_queries = value


async def start_dns(
    cfg: Config,
    gate: Gate,
    journal: JournalWriter,
    executor: Executor,
    settings: SettingsWatch | None = None,
    reuse_port: bool = False,
) -> DnsProxy:
    """Start the DNS listeners on the `dns-proxy` address (UDP and TCP)."""
    lst = cfg.listeners["dns-proxy"]
    dcfg = cfg.section("dns")
    upstreams: list[tuple[str, int]] = []
    for spec in dcfg.get("upstreams") or []:
        try:
            upstreams.append(parse_upstream(str(spec)))
        except ValueError:
            log.warning("ignoring malformed DNS upstream %r (want IP or IP:PORT)", spec)
    if not upstreams:
        upstreams = await asyncio.get_running_loop().run_in_executor(executor, _system_upstreams)
    # Forwarding to our own listener would loop every query until it times out.
    wildcard = lst.host in ("", "0.0.0.0", "::")
    upstreams = [
        u
        for u in upstreams
        if not (
            u[1] == lst.port
            and (u[0] == lst.host or (wildcard and ipaddress.ip_address(u[0].split("%", 1)[0]).is_loopback))
        )
    ]
    if not upstreams:
        log.warning("DNS proxy has no upstream resolvers: every query will get SERVFAIL")
    forwarder = Forwarder(upstreams, float(dcfg.get("timeout") or 2.0))
    proxy = DnsProxy(gate, journal, executor, forwarder, int(dcfg.get("cacheSize") or 0), lst.host, lst.port, settings)
    proxy.reuse_port = reuse_port  # workers share the address (SO_REUSEPORT)
    await proxy.start()
    log.info(
        "dns-proxy listening on %s:%d (udp+tcp), upstreams %s",
        lst.host,
        lst.port,
        ", ".join(f"{h}:{p}" for h, p in upstreams) or "none",
    )
    return proxy
