"""Proxy process: listeners, the in-memory rule set, holds, and the journal to the recorder."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable
from typing import Any

import orjson

from bus import curve, topics
from bus.journal import JournalWriter
from bus.pubsub import Subscriber
from bus.reqrep import ControlServer, RemoteError, ServiceUnavailable
from greyproxy import compiled, ports
from greyproxy.certs import CAWatcher
from greyproxy.config import Config
from greyproxy.policy import RuleSet
from greyproxy.runtime import ServiceRuntime, run_async_service, tune_gc
from greyproxy.store import open_database
from greyproxy.store import rules as rules_table

from .conn import RECEIVED
from .dns_proxy import DnsProxy, start_dns
from .docker_identity import DockerIdentity
from .gate import NAME_GRACE, NAME_TTL, Gate
from .context import Limits, ProxyContext, start_listener
from .credentials import LiveCredentials
from .hooks import CredentialSubstitution, HookChain, RuleRecheck, hooks_from_env
from .http_proxy import begin_http, handle_http
from .identities import USE_FLUSH_EVERY, IdentityGuard
from .mitm import Interceptor
from .pipeline import Recorder
from .settings_watch import SettingsWatch
from .socks5_proxy import handle_socks
from .store_view import LocalView, RecorderView, log_failure, view_for

log = logging.getLogger("greyproxy.proxy")

VERSION_CHECK_EVERY = 2.0  # seconds: heals a missed rules event
PENDING_COUNT_EVERY = 5.0
HITS_FLUSH_EVERY = 2.0
CA_CHECK_EVERY = 2.0  # seconds: rewritten CA files are picked up this fast
DNS_KEEP = 7 * 86400.0  # seconds: DNS names older than this are not reloaded at start
RECORDER_RETRY = 2.0  # seconds between tries while a remote proxy waits for the central recorder
SILENT_FILE = "silent.json"  # in the run dir: the silent mode as last set, for a worker that restarts

RULE_TOPICS = (
    topics.RULE_CREATED,
    topics.RULE_UPDATED,
    topics.RULE_DELETED,
    topics.RULES_CHANGED,
    topics.PENDING_ALLOWED,
    topics.PENDING_DISMISSED,
)


# Addresses whose names one look asks for (`names_for_holds`): one SQL IN list, with the cut-off
# under the 999 bound parameters of SQLite before 3.32.
NAMES_PER_LOOK = 900


class RuleLoader:
    """Builds rule snapshots off the event loop and swaps them into the gate."""

    def __init__(
        self,
        gate: Gate,
        executor: ThreadPoolExecutor,
        builtins: bool = True,
        view: LocalView | RecorderView | None = None,
    ) -> None:
        self.gate = gate
        self.executor = executor
        self.view = view or LocalView()  # the database, or the recorder's (proxy.rulesFrom)
        self.builtins = builtins  # greyproxy.builtinRules: false leaves the seeded loopback allows out
        self._look_at = [0, 0]  # where `names_for_holds`'s next look starts: held addresses, gone ones
        self._lock = asyncio.Lock()

    def _version(self) -> int:
        return self.view.rules_version()

    def _load(self) -> tuple[int, RuleSet]:
        version, rows = self.view.rules()  # one read transaction: the version matches the rows
        return version, rules_table.build(rows, self.builtins)

    async def reload(self, force: bool = False) -> bool:
        loop = asyncio.get_running_loop()
        async with self._lock:
            if not force:
                version = await loop.run_in_executor(self.executor, self._version)
                if version == self.gate.rules_version:
                    return False
            version, rules = await loop.run_in_executor(self.executor, self._load)
            self.gate.set_rules(rules, version)
            log.info("rules loaded: %d rules (version %d)", len(rules), version)
            return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(VERSION_CHECK_EVERY)
            try:
                await self.reload()
            except Exception:
                log_failure(log, "rule version check failed")
            # An expired rule changes the answer without changing the version (the held connections
            # are judged again; the live ones it let in stay, see close_revoked); so may silent mode
            # (its end by the clock). Also when the rules could not be read: with the ones it has.
            try:
                await self.names_for_holds()
            except Exception:
                log_failure(log, "names of held addresses not looked up")
            try:
                self.gate.reevaluate_holds()
            except Exception:
                log.exception("held connections not judged again")

    async def names_for_holds(self) -> None:
        """While connections to raw IPs no name is known for are held, or went within UNNAMED_KEEP
        (their sightings wait for a name too): the names the database has for them (the journal's
        `dns` records, which every worker's DNS proxy writes and which are resent after an
        outage), given to the gate (`Gate.learn`, which judges them again). Held addresses first;
        at most NAMES_PER_LOOK a look, taken in turn (`_window`). With
        proxy workers the bus brings another worker's names at once; this is for one it lost (an
        outside run: names first answered while the bus was down held their connections until the
        hold timeout). A name is the one seen within NAME_TTL, as in memory; a record is stamped with
        the time of its DNS answer, so one that reached the database late is found all the same."""
        held = self.gate.unnamed_held_ips()
        ask = self._window(sorted(held), NAMES_PER_LOOK, 0)
        if len(ask) < NAMES_PER_LOOK:
            gone = [ip for ip in self.gate.unnamed_gone_ips() if ip not in held]
            ask += self._window(gone, NAMES_PER_LOOK - len(ask), 1)
        if not ask:
            return
        ips = set(ask)
        now = time.time()
        rows = await asyncio.get_running_loop().run_in_executor(self.executor, self.view.dns_names, now - NAME_TTL, ask)
        for row in rows:
            if row[0] in ips and self.gate.resolved_name(row[0]) is None:
                self.gate.learn(str(row[0]), str(row[1]), now)

    def _window(self, ips: list[str], n: int, which: int) -> list[str]:
        """At most `n` of `ips`: all of them, or the next `n` from where the last look of this kind
        (`which`: 0 held, 1 gone) stopped, wrapping around, so that every address is asked for in
        turn however many there are (an outside run: 2 400 addresses whose clients left filled
        every look with the same first 1 000, and a name only the database had never came)."""
        if len(ips) <= n:
            return ips
        start = self._look_at[which] % len(ips)
        self._look_at[which] = start + n
        return (ips[start:] + ips[:start])[:n]


async def _reach_recorder(rt: ServiceRuntime, view: RecorderView, executor: ThreadPoolExecutor) -> None:
    """A proxy on another host (proxy.rulesFrom: recorder) starts once the central recorder
    answers. Until then it waits, and says why the recorder does not answer (its key refused,
    a wrong bus.serverKey, nothing listening: bus/curve.py's diagnose), again only when the
    reason changes. A key allowed on the central host takes effect without a restart, so the
    wait ends by itself once someone runs the `greyproxy keys allow` it names; the heartbeat
    publisher, refused meanwhile by the bus for good (libzmq does not retry a refusal), then
    connects again."""
    loop = asyncio.get_running_loop()
    said: str | None = None
    while True:
        try:
            await loop.run_in_executor(executor, view.probe)
        except ServiceUnavailable as exc:
            why = await loop.run_in_executor(
                executor, functools.partial(curve.diagnose, view.endpoint, name=rt.cfg.proxy_name)
            )
            if why is None:  # an ipc:// endpoint, or a tcp:// one whose CURVE handshake succeeds
                fine = " (the connection is fine)" if view.endpoint.startswith("tcp://") else ""
                why = f"{exc}{fine}: is the recorder process running there?"
            if why != said:
                log.warning("waiting for the recorder at %s: %s", view.endpoint, why)
                said = why
            await asyncio.sleep(RECORDER_RETRY)
            continue
        if said is not None:
            log.info("the recorder at %s answers", view.endpoint)
            rt.publisher.reconnect()
        return


async def _listen_identities(cfg: Config, ids: IdentityGuard) -> None:
    """identity.changed (names and versions only): load the claims again; and a periodic check
    of the stored version heals a missed event."""
    sub = Subscriber(cfg.bus["sub"], (topics.IDENTITY_CHANGED,))
    try:
        while True:
            try:
                await asyncio.wait_for(sub.recv(), VERSION_CHECK_EVERY)
            except asyncio.TimeoutError:
                pass
            try:
                await ids.reload()
            except Exception:
                log_failure(log, "identities reload failed")
    finally:
        sub.close()


async def _listen_bus(cfg: Config, loader: RuleLoader) -> None:
    sub = Subscriber(cfg.bus["sub"], RULE_TOPICS)
    try:
        # A rule written between the start-up load and this subscription sent its event to nobody:
        # one version check now (cheap) rather than at the next periodic one.
        await asyncio.sleep(0.1)
        try:
            await loader.reload()
        except Exception:
            log_failure(log, "rule reload failed")
        while True:
            await sub.recv()
            try:
                await loader.reload()
            except Exception:
                log_failure(log, "rule reload failed")
    finally:
        sub.close()


async def _listen_names(cfg: Config, gate: Gate, own: str, dns: DnsProxy | None) -> None:
    """Workers: an ip -> name another worker's DNS proxy learned (its client may connect through us);
    our own DNS proxy's, back from the bus (its answer waits for that: `DnsProxy._echo`)."""
    sub = Subscriber(cfg.bus["sub"], (topics.DNS_NAME,))
    try:
        while True:
            msg = await sub.recv()
            data = msg.get("data") or {}
            ip, name = data.get("ip"), data.get("hostname")
            if not (isinstance(ip, str) and isinstance(name, str)):
                continue
            if msg.get("source") != own:
                gate.learn(ip, name, time.time())
            elif dns is not None:
                dns.echoed(ip)
    finally:
        sub.close()


def _load_dns_names(view: LocalView | RecorderView) -> dict[str, tuple[str, float]]:
    rows = view.dns_names(time.time() - DNS_KEEP)
    # Memory keeps a name for NAME_TTL after it was last seen; a name reloaded at start counts as
    # seen now, or every mapping older than an hour would be dropped at the first prune.
    now = time.time()
    return {ip: (name, now) for ip, name in rows}


def _raise_fd_limit(limits: Limits) -> None:
    """Each proxied connection needs two descriptors (client + upstream), each idle upstream kept for
    reuse one: lift the soft RLIMIT_NOFILE towards the hard one, so maxConnections is reached before
    the process runs out of them."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    # Both ends of each, the idle upstream connections kept for reuse, plus listeners, bus, database, margin.
    want = 2 * limits.max_connections + limits.upstream_pool_total + 1024
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit: %s", exc)
        return
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "open-files limit %d is below what proxy.maxConnections=%d needs (%d): connections "
            "past it fail when accepted",
            soft,
            limits.max_connections,
            want,
        )


async def main(rt: ServiceRuntime) -> None:
    rt.ready = False  # until the listeners and the control socket serve (see the gather below)
    cfg = rt.cfg
    pcfg = cfg.section("proxy")
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="proxy-db")
    loop = asyncio.get_running_loop()
    view = view_for(cfg)
    if isinstance(view, LocalView):
        alone = "SUPERVISOR_ENABLED" not in os.environ  # `greyproxy run proxy`, not a process of `serve`
        if alone and cfg.bus["journal"].startswith("tcp://") and not cfg.db_path.exists():
            # A proxy on another host without rulesFrom: recorder judges with a database of its own,
            # made now: the central host's rules and decisions never reach it (docs/configuration.md).
            log.warning(
                "rulesFrom is database with a tcp:// journal (%s), and %s did not exist: this proxy judges with"
                " a database of its own, not the central host's rules and decisions; a proxy on another host"
                " wants proxy.rulesFrom: recorder",
                cfg.bus["journal"],
                cfg.db_path,
            )
        await loop.run_in_executor(executor, open_database, cfg.db_path)
    else:
        log.info("rules, settings and pending counts from the recorder at %s", cfg.bus["recorderControl"])
        await _reach_recorder(rt, view, executor)

    journal = JournalWriter(
        cfg.bus["journal"],
        outbox_limit=int(pcfg["journalOutbox"]),
        outbox_bytes=int(pcfg["journalOutboxMiB"]) * 1024 * 1024,
    )
    local_hosts = {lst.host for lst in cfg.listeners.values()} | ({cfg.api.host} if cfg.api else set())
    gate = Gate(journal, rt.publisher, cfg.own_ports, local_hosts, float(pcfg["holdTimeout"]), int(pcfg["maxPending"]))
    loader = RuleLoader(gate, executor, bool(cfg.section("greyproxy").get("builtinRules", True)), view)
    await loader.reload(force=True)
    gate.names.update(await loop.run_in_executor(executor, _load_dns_names, view))
    gate.pending_count = await loop.run_in_executor(executor, view.pending_count)

    def pending_lookup(keys: list[tuple[str, str, int]]) -> Awaitable[tuple[int, list[bool]]]:
        return loop.run_in_executor(executor, view.pending_state, keys)

    gate.pending_lookup = pending_lookup
    if cfg.silent_allow:
        gate.set_silent("allow", None)
    kept = load_silent(cfg.run_dir, time.time())
    if kept is not None:  # a worker restarted: the mode the others are in, before its first connection
        gate.set_silent(kept[0], kept[1], announce=False)
        log.info("silent mode %s taken from %s", kept[0] or "off", cfg.run_dir / SILENT_FILE)

    split = cfg.caps_split  # (a proxy run on its own takes the caps whole)
    limits = Limits(
        header_timeout=float(pcfg["headerTimeout"]),
        connect_timeout=float(pcfg["connectTimeout"]),
        idle_timeout=float(pcfg["idleTimeout"]),
        max_header_bytes=int(pcfg["maxHeaderBytes"]),
        max_headers=int(pcfg["maxHeaders"]),
        max_connections=-(-int(pcfg["maxConnections"]) // split),
        max_per_client=-(-int(pcfg["maxConnectionsPerClient"]) // split),
        upstream_pool_size=int(pcfg["upstreamPoolSize"]),
        upstream_idle_timeout=float(pcfg["upstreamIdleTimeout"]),
        half_closed_clients=bool(pcfg["halfClosedClients"]),
        workers=split,
        configured_max_connections=int(pcfg["maxConnections"]),
        configured_max_per_client=int(pcfg["maxConnectionsPerClient"]),
    )
    if split > 1:
        # The caps are split, not shared: each worker allows its share (the kernel spreads a
        # client's connections over the workers by their addresses, so one may refuse a little early).
        log.info(
            "worker %s of %d: caps split to %d connections, %d per client",
            cfg.worker,
            cfg.workers,
            limits.max_connections,
            limits.max_per_client,
        )
    _raise_fd_limit(limits)
    ctx = ProxyContext(gate, limits)
    ctx.identities = IdentityGuard(executor, journal, rt.publisher, gate, view)
    await ctx.identities.reload(force=True)
    dcfg = cfg.section("greyproxy")["docker"]
    if dcfg["enabled"]:
        ctx.docker = DockerIdentity(dcfg["socket"], float(dcfg["cacheTTL"]))
        log.info("container identity through the engine socket %s", dcfg["socket"])
    settings = SettingsWatch(cfg.bus["sub"], executor, view=view)
    await settings.load(force=True)
    certs = CAWatcher(cfg.data_dir)
    await loop.run_in_executor(executor, certs.check)
    mitm_cfg = cfg.section("mitm")
    # One transaction recorder for plain-HTTP forward-proxy requests and intercepted ones alike.
    recorder = Recorder(journal, int(cfg.section("capture")["maxBodyBytes"]))
    settings.on_change(recorder.settings_changed)
    ctx.recorder = recorder
    # The request hooks, in their order (hooks.py); test hooks only from the tests' environment.
    # Credential substitution decrypts from the tables itself (SPEC §12.6): a proxy without the
    # database (proxy.rulesFrom: recorder) has no credentials and refuses every placeholder.
    credentials = LiveCredentials(cfg.data_dir, executor, journal, local=isinstance(view, LocalView))
    await credentials.reload(force=True)
    identities = ctx.identities
    claimed = identities.claims.claimed if identities is not None else None
    if identities is not None:
        identities.on_released = credentials.release  # a released claim's sessions end with it (SPEC §16)
    ctx.hooks = HookChain([RuleRecheck(gate), CredentialSubstitution(credentials, claimed), *hooks_from_env()])
    interceptor = Interceptor(gate, recorder, certs, settings, list(mitm_cfg["bypass"]), mitm_cfg["upstreamCaFile"])
    ctx.tunnel_hook = interceptor
    gate.defer_tunnel_logs = True  # a tunnel's log entry waits for its mitm_skip_reason
    # Every proxy process gets the same silent-mode call through the API, which announces the change
    # and the end (services/api/proxies.py): a worker down at that moment cannot leave it unsaid.
    gate.announce_silent = False

    servers = []
    # Workers (proxy.workers > 1) share each listening address: the kernel spreads connections
    # (and DNS datagrams) over the sockets bound with SO_REUSEPORT.
    shared = cfg.workers > 1 or cfg.worker is not None
    if shared:  # a name another worker's DNS proxy gave may be on its way (Gate.learn)
        gate.name_grace = NAME_GRACE
    # (handler, how a connection begins: the HTTP proxy serves requests in the callbacks until one waits)
    handlers = {"http-proxy": (handle_http, begin_http), "socks5-proxy": (handle_socks, None)}
    for name, (handler, begin) in handlers.items():
        lst = cfg.listeners.get(name)
        if lst is None or not lst.port:
            continue
        start = functools.partial(start_listener, ctx, lst.host, lst.port, handler, reuse_port=shared, begin=begin)
        servers.append(await ports.bind_retrying(start, name, lst.host, lst.port, logger=log))
        log.info("%s listening on %s:%d", name, lst.host, lst.port)
    dns_lst = cfg.listeners.get("dns-proxy")
    dns: DnsProxy | None = None
    if dns_lst and dns_lst.port:
        start_dns_once = functools.partial(start_dns, cfg, gate, journal, executor, settings, reuse_port=shared)
        dns = await ports.bind_retrying(
            start_dns_once, "dns-proxy", dns_lst.host, dns_lst.port, (socket.SOCK_DGRAM, socket.SOCK_STREAM), logger=log
        )

    def stats(args: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            **ctx.stats(),
            "tunnels": len(gate.live),
            "waiting": gate.waiting(),
            "decisions": gate.decisions,
            "rules": len(gate.rules),
            "rules_version": gate.rules_version,
            "pending_count": gate.pending_count,
            "allowall": gate.silent.status(),
            "journal": journal.stats(),
            "metrics": {
                "connections": dict(gate.results),
                "decision_seconds": gate.decision_seconds.snapshot(),
                "hold_seconds": gate.hold_seconds.snapshot(),
                "bytes_received": RECEIVED.snapshot(),
            },
            **({"dns": dns.stats()} if dns is not None else {}),
            **({"docker": ctx.docker.stats()} if ctx.docker is not None else {}),
        }

    def allowall_set(args: dict[str, Any]) -> dict[str, Any]:
        mode = args.get("mode") or "allow"
        duration = args.get("duration_seconds") or 0
        if mode not in ("allow", "deny"):
            raise RemoteError("mode must be allow or deny", 400)
        if not isinstance(duration, int) or isinstance(duration, bool) or not 0 <= duration <= 28800:
            raise RemoteError("duration_seconds must be an integer from 0 to 28800", 400)
        seconds = float(duration) or None
        until = args.get("expires_at")  # the API giving the mode again: the others' end, to the ms
        if seconds and isinstance(until, (int, float)) and not isinstance(until, bool):
            seconds = min(max(0.001, float(until) - time.time()), 28800.0)
        status = gate.set_silent(mode, seconds, announce=False)
        save_silent(cfg.run_dir, mode, gate.silent.expires_at)
        return status

    def allowall_clear(args: dict[str, Any]) -> dict[str, Any]:
        status = gate.set_silent(None, None, announce=False)
        save_silent(cfg.run_dir, None, None)
        return status

    async def rules_reload(args: dict[str, Any]) -> dict[str, Any]:
        changed = await loader.reload(force=bool(args.get("force")))
        return {"reloaded": changed, "rules": len(gate.rules), "version": gate.rules_version}

    def holds_block(args: dict[str, Any]) -> dict[str, Any]:
        keys = []
        for k in args.get("keys") or []:
            try:
                keys.append((str(k[0]), str(k[1]).lower(), int(k[2])))
            except (IndexError, TypeError, ValueError):
                raise RemoteError("keys must be [container, host, port] triples", 400) from None
        return {"blocked": gate.block_holds(keys, str(args.get("reason") or "dismissed"))}

    async def credentials_reload(args: dict[str, Any]) -> dict[str, Any]:
        changed = await credentials.reload(force=bool(args.get("force")))
        return {"reloaded": changed, "version": credentials.version, "live": len(credentials.map)}

    async def cert_reload(args: dict[str, Any]) -> dict[str, Any]:
        return {"message": await loop.run_in_executor(executor, certs.reload)}

    async def identities_reload(args: dict[str, Any]) -> dict[str, Any]:
        ids = ctx.identities
        assert ids is not None
        changed = await ids.reload(force=bool(args.get("force")))
        return {"reloaded": changed, **ids.stats()}

    control = ControlServer(
        cfg.proxy_control,
        {
            "stats": stats,
            "waiters": lambda args: {"waiters": gate.waiters()},
            "allowall.get": lambda args: gate.silent.status(),
            "allowall.set": allowall_set,
            "allowall.clear": allowall_clear,
            "rules.reload": rules_reload,
            "holds.block": holds_block,
            "cert.reload": cert_reload,
            "credentials.reload": credentials_reload,
            "identities.reload": identities_reload,
        },
    )
    rt.add_stats(lambda: {k: v for k, v in stats().items() if k != "allowall"})
    rt.add_stats(
        lambda: {
            "mitm": interceptor.stats(),
            "capture": recorder.stats(),
            "request_hooks": {"chain": ctx.hooks.names, "refused": dict(ctx.hooks.refused)},
            "credentials": credentials.stats(),
            "identities": ctx.identities.stats() if ctx.identities else None,
        }
    )

    async def watch_ca() -> None:
        while True:
            await asyncio.sleep(CA_CHECK_EVERY)
            try:
                if await loop.run_in_executor(executor, certs.check):
                    log.info("interception CA reloaded: %s", certs.ca.fingerprint if certs.ca else "none")
            except Exception:
                log.exception("CA file check failed")

    async def periodic() -> None:
        last_count = last_use = time.monotonic()
        while True:
            await asyncio.sleep(HITS_FLUSH_EVERY)
            gate.flush_hits()
            if ctx.identities is not None and time.monotonic() - last_use > USE_FLUSH_EVERY:
                last_use = time.monotonic()
                ctx.identities.flush_use()
            if time.monotonic() - last_count > PENDING_COUNT_EVERY:
                last_count = time.monotonic()
                with contextlib.suppress(Exception):
                    count = await loop.run_in_executor(executor, view.pending_count)
                    gate.pending_count, gate.pending_admitted = count, 0

    states = compiled.status()
    log.info(
        "proxy up (hot modules compiled: %d of %d imported%s)",
        sum(v == "compiled" for v in states.values()),
        len(states),
        "" if states else "; pure Python: GREYPROXY_PURE, or not compiled at install",
    )
    tune_gc(GC_THRESHOLD)
    loop.call_soon(rt.mark_ready)  # after the gather below has started serving the control socket
    try:
        await asyncio.gather(
            journal.run(),
            control.serve(),
            loader.watch(),
            _listen_bus(cfg, loader),
            periodic(),
            _listen_identities(cfg, ctx.identities),
            settings.run(),
            watch_ca(),
            credentials.watch(),
            *([_listen_names(cfg, gate, rt.name, dns)] if shared else []),
        )
    finally:
        for s in servers:
            s.close()
        # The connections already open stop too (tunnels, kept-alive ones with an upstream): served
        # on during the last flush, what they recorded after it was lost with the process (an outside
        # run: ~40 completed exchanges per stop under load). Their ends are recorded, then flushed.
        live = list(gate.live.values())
        gate.live.clear()
        for lc in live:
            with contextlib.suppress(Exception):
                lc.close()
        if live:
            log.info("stopping: closed %d open connections", len(live))
            await asyncio.sleep(0.05)  # (their close callbacks write their records)
        ctx.pool.close_all()
        if dns is not None:
            dns.close()
        gate.flush_hits()
        credentials.flush_uses()
        # Give the recorder a last chance at what is still in the outbox (it is lost with the process).
        flusher = asyncio.ensure_future(journal.run())
        await journal.flush(2.0)
        flusher.cancel()
        control.close()


def save_silent(run_dir: Any, mode: str | None, expires_at: float | None) -> None:
    """Keep the silent mode just set (or cleared: {"mode": null}) in the run dir, for a proxy of this
    stack that starts later (`load_silent`): a worker restarted by supervisord is in the others' mode
    before it takes its first connection, not a moment after the API gives it the mode again. A few
    dozen bytes, on a control call: written on the loop. `greyproxy serve` clears it (SPEC §4: lost
    on restart). Workers write the same content at once: each replaces the file whole."""
    path = run_dir / SILENT_FILE
    tmp = run_dir / f".{SILENT_FILE}.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.write_text(orjson.dumps({"mode": mode, "expires_at": expires_at}).decode())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not keep the silent mode in %s: %s", path, exc)


def load_silent(run_dir: Any, now: float) -> tuple[str | None, float | None] | None:
    """(mode, seconds left or None) as `save_silent` kept it; None: nothing kept, or unreadable, or
    a mode whose end has passed (the configured mode holds then)."""
    try:
        data = orjson.loads((run_dir / SILENT_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    mode, until = data.get("mode"), data.get("expires_at")
    if mode is None:
        return None, None
    if mode not in ("allow", "deny") or (until is not None and not isinstance(until, (int, float))):
        return None
    if until is None:
        return mode, None
    left = float(until) - now
    return (mode, left) if left > 0 else None


# A connection, tunnel or request leaves no reference cycle behind (tests/unit/test_tunnel_cost.py):
# its objects are freed by their reference counts, so the cyclic collector has nothing to find in
# them. With the default threshold (700) it still ran every few connections, walking the young
# objects of every connection in flight, and a full collection every few seconds walked all that
# startup had built (rules, certificates, modules: ~45 000 objects, ~15 ms each time).
GC_THRESHOLD = (5000, 10, 10)


def run(cfg: Config) -> None:
    # Its name on the bus: "proxy", or "proxy-N" for worker N; the heartbeat also says where its
    # control endpoint is, so the API finds every worker (and proxies on other hosts).
    from bus import curve

    announce = {"role": "proxy", "control": cfg.proxy_control, "worker": cfg.worker}
    if cfg.proxy_control.startswith("tcp://") and curve.configured():
        announce["control_key"] = curve.public_key()  # the API checks our control endpoint by it
    run_async_service(cfg.proxy_name, cfg, main, announce=announce)
