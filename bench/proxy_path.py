"""The proxy's Python cost per plain-HTTP request, in process, without sockets.

The real request loop (`http_proxy.handle_http`: read head, gate decision, record, request hooks,
exchange) runs on uvloop over real `Conn`s whose transports are in memory: the client sends the
next request as soon as its answer is written, the origin answers a request as soon as it is
written. What the kernel does (the two sends and two reads per request) is not in the figure;
`bench/cpu_split.py` measures the whole process. A bare forwarder over the same in-memory
connections is measured too: what the loop and `Conn` themselves cost.

    .venv/bin/python bench/proxy_path.py [--requests N] [--rounds R] [--root DIR] [--no-record] [--functions]

`--root` imports the proxy from another checkout (e.g. a `git archive` of an older commit) so
old and new code can be measured alternately on the same machine. Figures: CPU µs per request
(`time.process_time`), the minimum over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.inproc import RESPONSE_KEPT as RESPONSE, MemTransport, NullJournal, NullPublisher, compiled_note  # noqa: E402

REQUEST = b"GET http://127.0.0.1:8080/1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


def _setup(no_record: bool) -> tuple[Any, Any]:
    from greyproxy.policy import RuleSet
    from greyproxy.policy.ruleset import Rule, builtin_rules
    from services.proxy import http_proxy
    from services.proxy.context import Limits, ProxyContext
    from services.proxy.credentials import LiveCredentials
    from services.proxy.gate import Gate
    from services.proxy.hooks import CredentialSubstitution, HookChain, RuleRecheck
    from services.proxy.pipeline import Recorder

    journal = NullJournal()
    gate = Gate(journal, NullPublisher(), {43051, 43052, 43053, 43080}, {"127.0.0.1"}, 30.0, 100)  # type: ignore[arg-type]
    rules = [Rule.from_dict({**r, "id": i + 1}) for i, r in enumerate(builtin_rules())]
    rules.append(Rule(id=99, container_pattern="bench*", destination_pattern="*"))
    gate.set_rules(RuleSet(rules), 1)
    ctx = ProxyContext(gate, Limits(idle_timeout=600.0, header_timeout=30.0))
    if not no_record:
        ctx.recorder = Recorder(journal)  # type: ignore[arg-type]
    creds = LiveCredentials("/nonexistent", None, None)  # type: ignore[arg-type]
    ctx.hooks = HookChain([RuleRecheck(gate), CredentialSubstitution(creds, None)])
    return ctx, http_proxy


async def _name_hook_like_dns(ctx: Any) -> None:
    """The DNS proxy's PTR fallback hook, as installed in the service (dns_proxy.DnsProxy.ensure_name)."""
    from services.proxy.dns_proxy import DnsProxy

    dns = DnsProxy(ctx.gate, ctx.gate.journal, None, None, 100, "127.0.0.1", 0)  # type: ignore[arg-type]
    dns._ptr_negative["127.0.0.1"] = time.monotonic() + 3600  # the real run's first lookup found no name
    ctx.gate.name_hook = dns.ensure_name


async def proxied(n: int, no_record: bool) -> float:
    """CPU seconds for n keep-alive requests through handle_http."""
    from services.proxy.conn import Conn
    from services.proxy.context import ClientConn

    ctx, http_proxy = _setup(no_record)
    await _name_hook_like_dns(ctx)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [n]

    async def connect(host: str, port: int, timeout: float, guard: Any) -> Conn:
        up = Conn()
        up.connection_made(MemTransport(up, lambda _d: loop.call_soon(up.data_received, RESPONSE)))
        return up

    http_proxy.connect = connect  # the origin is in memory
    client = ClientConn(ctx, http_proxy.handle_http)

    def answered(data: bytes) -> None:
        left[0] -= 1
        if left[0] > 0:
            loop.call_soon(client.data_received, REQUEST)
        elif not done.done():
            done.set_result(None)

    client.connection_made(MemTransport(client, answered))
    client.data_received(REQUEST)  # warm: first request (connect) not timed
    while left[0] > n - 1:
        await asyncio.sleep(0)
    t0 = time.process_time()
    await done
    spent = time.process_time() - t0
    client.transport.close()  # type: ignore[union-attr]
    await client.task  # type: ignore[misc]
    return spent / (n - 1)


async def bare(n: int) -> float:
    """CPU seconds per request for a bare forwarder over the same in-memory Conns."""
    from services.proxy.conn import Conn

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [n]
    client, up = Conn(), Conn()

    def answered(data: bytes) -> None:
        left[0] -= 1
        if left[0] > 0:
            loop.call_soon(client.data_received, REQUEST)
        elif not done.done():
            done.set_result(None)

    client.connection_made(MemTransport(client, answered))
    up.connection_made(MemTransport(up, lambda _d: loop.call_soon(up.data_received, RESPONSE)))

    async def forward() -> None:
        while not client.eof:
            if not client.buf and not await client.read_more():
                return
            up.write(client.take())
            if not await up.read_more():
                return
            client.write(up.take())

    task = asyncio.ensure_future(forward())
    t0 = time.process_time()
    client.data_received(REQUEST)
    await done
    spent = time.process_time() - t0
    task.cancel()
    return spent / n


def functions(rounds: int, n: int = 20000) -> None:
    """Per-function CPU µs (min over the rounds) of the request path's pieces."""
    from services.proxy import http1
    from services.proxy.hooks import Flow

    ctx, _ = _setup(False)
    gate = ctx.gate
    asyncio.run(_name_hook_like_dns(ctx))

    def run_coro(c: Any) -> Any:  # an async function that does not wait, run without a loop
        try:
            c.send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("it waited")

    head = http1.parse_request_head(REQUEST, 65536, 100)[0]  # type: ignore[index]
    if hasattr(gate, "admit_now"):  # (a decision that does not wait: its verdict, no coroutine)

        def decide() -> Any:
            return gate.admit_now("unknown-127.0.0.1", "127.0.0.1", 8080, "HTTP")

    else:  # (a checkout from before Gate.admit_now, --root)

        def decide() -> Any:
            return run_coro(gate.admit("unknown-127.0.0.1", "127.0.0.1", 8080, "HTTP"))

    verdict = decide()

    def hooks() -> bytes:
        flow = Flow("unknown-127.0.0.1", "http", head.host, head.port, head, verdict)
        ctx.hooks.run(flow)
        return flow.render("1.1")

    cases = [
        ("parse_request_head (wrk's GET)", lambda: http1.parse_request_head(REQUEST, 65536, 100)),
        ("parse_response_head (nginx's 200)", lambda: http1.parse_response_head(RESPONSE, 65536, "GET")),
        ("Gate.admit(_now) with the log record", decide),
        ("Flow + HookChain.run + Flow.render", hooks),
    ]
    for name, fn in cases:
        best = math.inf
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(n):
                fn()
            best = min(best, time.process_time() - t0)
        print(f"  {name:40s} {1e6 * best / n:6.2f} µs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="checkout to import from")
    ap.add_argument("--no-record", action="store_true", help="no transaction record (ctx.recorder None)")
    ap.add_argument("--functions", action="store_true", help="also time the path's pieces one by one")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.root)
    import logging

    import uvloop

    logging.disable(logging.WARNING)
    path = min(uvloop.run(proxied(args.requests, args.no_record)) for _ in range(args.rounds))
    base = min(uvloop.run(bare(args.requests)) for _ in range(args.rounds))
    print(
        f"{args.root}: request path {1e6 * path:.1f} µs/request, bare forwarder {1e6 * base:.1f} µs, "
        f"difference {1e6 * (path - base):.1f} µs (record {'off' if args.no_record else 'on'}; {compiled_note()})"
    )
    if args.functions:
        functions(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
