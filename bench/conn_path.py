"""The proxy's CPU per new connection, in process, over real loopback sockets.

The proxy's HTTP listener (`context.start_listener` + `http_proxy.handle_http`, connections begun
in their callbacks by `http_proxy.begin_http` as the service starts them when the tree has it, with
the real gate, caps, identities off, the HTTPS interception hook and a log record encoded per
connection as the journal would) runs on uvloop in this process; nginx is the origin; the load generator is a
separate process:

- `tunnels-splice`: bench/harness/tunnelbench.c (CONNECT, wait for the 200, one GET through the
  tunnel, close), interception off: every tunnel is looked at (first bytes) and spliced;
- `tunnels`: the same with interception on: the GET inside the tunnel is read as plain HTTP and recorded;
- `newconn`: wrk with `Connection: close`, a plain-HTTP request on a new connection each time;
- `bare`: a 40-line uvloop Protocol tunnel (harness/bare_tunnel.py: parse CONNECT, `create_connection`,
  200, relay) under the `tunnels-splice` load: the floor for Python on uvloop (`bench/run.py` runs the
  same tunnel as its own process, the `bare-uvloop` column).

The figure is this process's CPU (user + system, `getrusage`) per tunnel/request: the proxy's own
work including its syscalls and what the kernel does in them, without the rest of the stack
(bus, recorder) and without the journal's zmq send (the record is encoded, then dropped).

    .venv/bin/python bench/conn_path.py [--duration S] [--rounds R] [--root DIR] [--profile FILE] [LOAD ...]

`--root` imports the proxy from another checkout (e.g. a `git archive` of an older commit) so old
and new code can be measured alternately; `--profile` writes a cProfile of the last round.
Needs nginx, wrk, a C compiler (bench/setup.sh system).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from harness.bare_tunnel import bare_listener  # noqa: E402
from harness.loads import lua_absolute, run_tunnelbench, run_wrk, tunnelbench_binary  # noqa: E402
from harness.origin import NginxOrigin  # noqa: E402
from harness.procs import stop_all  # noqa: E402
from harness.inproc import (  # noqa: E402
    RESPONSE_CLOSE as RESPONSE,
    RESPONSE_KEPT,
    MemTransport,
    NullJournal,
    NullPublisher,
    compiled_note,
)

LOADS = ("tunnels-splice", "tunnels", "newconn", "bare")
CONNS = 20


class FixedSettings:
    """What the Interceptor needs of SettingsWatch: one on_change call with the values."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def on_change(self, fn: Any) -> None:
        fn(self.values)


def proxy_context(mitm: bool, tmp: Path) -> Any:
    from greyproxy.certs import CAWatcher
    from greyproxy.policy import RuleSet
    from greyproxy.policy.ruleset import Rule, builtin_rules
    from services.proxy.context import Limits, ProxyContext
    from services.proxy.credentials import LiveCredentials
    from services.proxy.gate import Gate
    from services.proxy.hooks import CredentialSubstitution, HookChain, RuleRecheck
    from services.proxy.mitm import Interceptor
    from services.proxy.pipeline import Recorder

    journal = NullJournal()
    gate = Gate(journal, NullPublisher(), {43051, 43052, 43053, 43080}, {"127.0.0.1"}, 30.0, 100)  # type: ignore[arg-type]
    rules = [Rule.from_dict({**r, "id": i + 1}) for i, r in enumerate(builtin_rules())]
    gate.set_rules(RuleSet(rules), 1)
    ctx = ProxyContext(gate, Limits())
    recorder = Recorder(journal)  # type: ignore[arg-type]
    ctx.recorder = recorder
    creds = LiveCredentials("/nonexistent", None, None)  # type: ignore[arg-type]
    ctx.hooks = HookChain([RuleRecheck(gate), CredentialSubstitution(creds, None)])
    certs = CAWatcher(tmp)
    certs.check()
    ctx.tunnel_hook = Interceptor(gate, recorder, certs, FixedSettings({"mitmEnabled": mitm}), [])  # type: ignore[arg-type]
    gate.defer_tunnel_logs = True
    return ctx


async def proxy_listener(mitm: bool, tmp: Path) -> asyncio.AbstractServer:
    from services.proxy import http_proxy
    from services.proxy.context import start_listener

    # As the service starts it (a tree from before `begin_http`: the handler's task at accept).
    begin = getattr(http_proxy, "begin_http", None)
    extra = {"begin": begin} if begin is not None else {}
    return await start_listener(proxy_context(mitm, tmp), "127.0.0.1", 0, http_proxy.handle_http, **extra)


async def one_round(load: str, origin_port: int, secs: float, tb: str | None, root: Path, profile: Any) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="gp-connpath-"))
    server = await (bare_listener() if load == "bare" else proxy_listener(load == "tunnels", tmp))
    gc.collect()  # as the proxy's service does once started (runtime.tune_gc)
    gc.freeze()
    gc.set_threshold(5000, 10, 10)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()

    def drive(duration: float) -> dict:
        if load == "newconn":
            return run_wrk(port, lua_absolute(origin_port, close=True), CONNS, duration, root)
        assert tb is not None
        return run_tunnelbench(tb, port, origin_port, CONNS, duration)

    try:
        await loop.run_in_executor(None, drive, 1.0)  # warm-up
        await asyncio.sleep(0.3)
        if profile is not None:
            profile.enable()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        res = await loop.run_in_executor(None, drive, secs)
        await asyncio.sleep(0.3)  # let the last connections close
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if profile is not None:
            profile.disable()
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if "error" in res:
        raise SystemExit(f"{load}: {res['error']}")
    n = max(1, res["requests"])
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    print(
        f"  {load:15s} {res['rps']:7,.0f}/s  {1e6 * (user + system) / n:6.1f} µs each "
        f"(user {1e6 * user / n:5.1f}, system {1e6 * system / n:5.1f}), {res['errors']} errors",
        flush=True,
    )
    return (user + system) / n


# ----------------------------------------------------------------------------- in memory (--memory)

ORIGIN = "127.0.0.1:8080"
CONNECT = f"CONNECT {ORIGIN} HTTP/1.1\r\nHost: {ORIGIN}\r\n\r\n".encode()
GET_IN_TUNNEL = f"GET /1k HTTP/1.1\r\nHost: {ORIGIN}\r\nConnection: close\r\n\r\n".encode()
GET_CLOSE = f"GET http://{ORIGIN}/1k HTTP/1.1\r\nHost: {ORIGIN}\r\nConnection: close\r\n\r\n".encode()


async def in_memory(load: str, n: int, profile: Any) -> float:
    """CPU seconds per connection of the proxy's Python alone: the listener's protocol objects over
    in-memory transports. The client and the origin answer each write at once (call_soon); the
    origin sends its response and closes (`newconn`: keeps its connection, as nginx does for the
    proxy's upstream requests, so the proxy's upstream pool serves the next client connection), then
    the client closes."""
    from services.proxy import http_proxy
    from services.proxy.conn import Conn
    from services.proxy.context import ClientConn

    tmp = Path(tempfile.mkdtemp(prefix="gp-connpath-"))
    ctx = proxy_context(load == "tunnels", tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    loop = asyncio.get_running_loop()

    async def connect(host: str, port: int, timeout: float, guard: Any) -> Conn:
        return origin_conn()

    class MemConnecting:
        """`upstream.Connecting` over memory (a tree that connects a CONNECT's upstream from the
        client's callbacks): connected at once, as `connect` here."""

        def __init__(self, host: str, port: int, timeout: float, guard: Any, done: Any, loop: Any) -> None:
            self.done = done

        def start(self) -> bool:
            self.done(origin_conn(), None)
            return True

    def origin_conn() -> Conn:
        up = Conn()

        def origin_got(data: bytes) -> None:
            if load == "newconn":  # as nginx answers the proxy's upstream request: kept alive (pooled)
                loop.call_soon(up.data_received, RESPONSE_KEPT)
                return
            loop.call_soon(up.data_received, RESPONSE)
            loop.call_soon(up.eof_received)
            loop.call_soon(up.transport.close)  # type: ignore[union-attr]

        up.connection_made(MemTransport(up, origin_got))
        return up

    real_connect = http_proxy.connect
    http_proxy.connect = connect
    from services.proxy import keepalive

    real_connecting = getattr(keepalive, "Connecting", None)
    if real_connecting is not None:
        keepalive.Connecting = MemConnecting  # type: ignore[attr-defined,misc]
    try:
        begin = getattr(http_proxy, "begin_http", None)  # as the service's listener starts a connection

        async def one() -> None:
            client = (
                ClientConn(ctx, http_proxy.handle_http, begin) if begin else ClientConn(ctx, http_proxy.handle_http)
            )

            def client_got(data: bytes) -> None:
                if data.startswith(b"HTTP/1.1 200 Connection established"):
                    loop.call_soon(client.data_received, GET_IN_TUNNEL)
                elif data.startswith(b"HTTP/1.1 200 OK"):
                    loop.call_soon(client.eof_received)
                    loop.call_soon(client.transport.close)  # type: ignore[union-attr]

            client.connection_made(MemTransport(client, client_got))
            client.data_received(GET_CLOSE if load == "newconn" else CONNECT)
            if client.task is not None:  # (none when served in the callbacks to its end)
                await client.task
            while not client.closed:
                await asyncio.sleep(0)

        for _ in range(200):  # warm
            await one()
        gc.collect()
        gc.freeze()
        gc.set_threshold(5000, 10, 10)
        if profile is not None:
            profile.enable()
        t0 = time.process_time()
        for _ in range(n):
            await one()
        spent = time.process_time() - t0
        if profile is not None:
            profile.disable()
        assert ctx.active == 0 and not ctx.gate.live, (ctx.active, ctx.gate.live)
    finally:
        http_proxy.connect = real_connect
        if real_connecting is not None:
            keepalive.Connecting = real_connecting  # type: ignore[attr-defined,misc]
    return spent / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("loads", nargs="*", help=f"{', '.join(LOADS)} (default: tunnels-splice newconn)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per round (default 5)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", default=str(BENCH.parent), help="checkout to import the proxy from")
    ap.add_argument("--memory", action="store_true", help="in memory: the proxy's Python alone, no sockets")
    ap.add_argument("--count", type=int, default=20000, help="connections per round with --memory")
    ap.add_argument("--profile", help="write a cProfile of the last round of the last load here")
    args = ap.parse_args(argv)
    loads = args.loads or ["tunnels-splice", "newconn"]
    bad = [x for x in loads if x not in LOADS]
    if bad:
        ap.error(f"unknown load {bad[0]!r} ({', '.join(LOADS)})")
    sys.path.insert(0, args.root)
    import logging

    import uvloop

    logging.disable(logging.WARNING)
    if args.memory:
        print(f"{args.root} (in memory):")
        for load in loads:
            if load == "bare":
                continue
            best = float("inf")
            for i in range(args.rounds):
                profile = None
                if args.profile and load == loads[-1] and i == args.rounds - 1:
                    import cProfile

                    profile = cProfile.Profile()
                best = min(best, uvloop.run(in_memory(load, args.count, profile)))
                if profile is not None:
                    profile.dump_stats(args.profile)
            print(f"  {load:15s} {1e6 * best:6.1f} µs each (min of {args.rounds})")
        print(f"  ({compiled_note()})")
        return 0
    tb = None
    if any(x != "newconn" for x in loads):
        tb, why = tunnelbench_binary(BENCH / "out" / "bin")
        if tb is None:
            print(f"conn_path: {why}", file=sys.stderr)
            return 2
    if not shutil.which("nginx") or ("newconn" in loads and not shutil.which("wrk")):
        print("conn_path: needs nginx and wrk (bench/setup.sh system)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gp-connpath-"))
    origin = NginxOrigin(work / "origin", 1 << 20, None).start()
    print(f"{args.root}:")
    try:
        for load in loads:
            best = float("inf")
            for i in range(args.rounds):
                profile = None
                if args.profile and load == loads[-1] and i == args.rounds - 1:
                    import cProfile

                    profile = cProfile.Profile()
                best = min(best, uvloop.run(one_round(load, origin.port, args.duration, tb, work, profile)))
                if profile is not None:
                    profile.dump_stats(args.profile)
                time.sleep(0.5)
            print(f"{load}: min {1e6 * best:.1f} µs")
        print(f"({compiled_note()})")
    finally:
        origin.stop()
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
