"""GET /api/rules/explain (SPEC §16): what the proxy would do with a destination, and why.

Through the gate's own code path: the rule snapshot is built by the proxy's loader function
(greyproxy/store/rules.py `rule_set`, cached per rules_version), the decision made by `policy.judge` (the function
the gate calls), with silent mode as the proxy reports it (`allowall.get`), the guard from the same
config, the resolved hostname from the DNS cache (or `resolved=`), and, when an address rule could
deny it (or the guard judges it by its addresses), the destination's addresses looked up as the
gate looks them up, and asked, as the gate asks, whether they are this machine's own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from greyproxy.localaddr import local_addresses
from greyproxy.policy import Guard, RuleSet, judge, normalise_host, parse_ip
from greyproxy.policy.patterns import host_name_problem
from greyproxy.policy.judge import reason
from greyproxy.shapes import rule_json

from .context import ApiContext
from .errors import bad_request
from .util import ascii_int, json_response, soft_call

NAME_TTL = 3600.0  # the proxy keeps an ip -> name mapping this long (gate.NAME_TTL)
RESOLVE_TIMEOUT = 5.0
MAX_CANDIDATES = 200

_snapshot: tuple[int, bool, RuleSet] | None = None  # (rules_version, builtins, rule set)


def _rule_set(builtins: bool) -> RuleSet:
    from greyproxy.store.models import meta_value
    from greyproxy.store.rules import rule_set

    global _snapshot
    snap = _snapshot
    if snap is not None and snap[1] == builtins and snap[0] == meta_value("rules_version"):
        return snap[2]
    version, rules = rule_set(builtins)
    _snapshot = (version, builtins, rules)
    return rules


def _dns_name(ip: str) -> str | None:
    from greyproxy.store import dns_cache

    return dns_cache.name_of(ip, time.time() - NAME_TTL)


def _rows(ids: list[int]) -> dict[int, dict[str, Any]]:
    from greyproxy.store import rules as rules_table

    return {r["id"]: rule_json(r) for r in rules_table.get_many(ids)} if ids else {}


async def _addresses(host: str, port: int) -> list[str] | None:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except (OSError, asyncio.TimeoutError, UnicodeError):
        return None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_query(req: falcon.asgi.Request) -> tuple[str, str, int, str | None]:
    container = req.get_param("container") or ""
    host = req.get_param("host") or ""
    if not container:
        raise bad_request("container is required")
    if not host:
        raise bad_request("host is required")
    if len(container) > 1000 or len(host) > 1000:
        raise bad_request("container and host must be at most 1000 characters")
    raw_port = req.get_param("port")
    if raw_port is None:
        raise bad_request("port is required")
    port = ascii_int(raw_port)  # (int() alone takes '８０', ' 80 ', '+80', '8_0')
    if port is None:
        raise bad_request(f"port must be an integer from 1 to 65535, not {raw_port!r}")
    if not 1 <= port <= 65535:
        raise bad_request(f"port must be an integer from 1 to 65535, not {port}")
    try:
        host = normalise_host(host)
    except ValueError as exc:
        raise bad_request(f"host: {exc}") from None
    if not host or any(c in host for c in "/ \t\r\n@") or not host.isprintable():
        raise bad_request("host must be a host name or an IP address")
    if parse_ip(host) is None and (why := host_name_problem(host)) is not None:
        # what the proxy answers 400 "bad host" to ('127.1', '2130706433' (resolvers read them as
        # addresses), 'a!b.test', a 64-character label): not judged
        raise bad_request(f"host {host!r}: {why}")
    resolved = req.get_param("resolved") or None
    if resolved is not None:
        try:
            resolved = normalise_host(resolved)
        except ValueError as exc:
            raise bad_request(f"resolved: {exc}") from None
    return container, host, port, resolved


async def explain(ctx: ApiContext, container: str, host: str, port: int, resolved: str | None) -> dict[str, Any]:
    builtins = bool(ctx.cfg.section("greyproxy").get("builtinRules", True))
    rules = await ctx.db(_rule_set, builtins)
    silent_status = await soft_call(ctx.proxy, "allowall.get", {}, timeout=2.0, retries=1, default=None)
    silent = silent_status.get("mode") if isinstance(silent_status, dict) and silent_status.get("active") else None
    if resolved is None and parse_ip(host) is not None:
        resolved = await ctx.db(_dns_name, host)
    guard = Guard.from_config(ctx.cfg)
    j = judge(rules, container, host, port, resolved=resolved, silent=silent, guard=guard, explain=True)
    addresses = None
    if j.needs_addresses:
        addresses = await _addresses(host, port)
        if addresses is not None:
            # a wildcard bind: which are this machine's (the gate's question, gate.Gate._admit_later)
            local = local_addresses(addresses) if guard.wildcard and port in guard.own_ports else ()
            j = judge(
                rules,
                container,
                host,
                port,
                resolved=resolved,
                silent=silent,
                guard=guard,
                addresses=addresses,
                explain=True,
                local=local,
            )
    cands = (j.candidates or [])[:MAX_CANDIDATES]
    ids = sorted({c.rule.id for c in cands} | ({j.rule.id} if j.rule is not None else set()))
    rows = await ctx.db(_rows, ids)
    return {
        "decision": j.decision,
        "rule": rows.get(j.rule.id) if j.rule is not None else None,
        "layer": j.layer,
        "reason": reason(j, container, host, port),
        "matched_on": j.matched_on,
        "resolved_hostname": resolved,
        "addresses": addresses,
        "silent_mode": silent,
        "candidates": [
            {
                "rule": rows.get(c.rule.id),
                "matched": c.matched,
                "specificity": c.specificity,
                "matched_on": c.matched_on,
                "why": c.why,
                "winner": j.rule is not None and c.rule.id == j.rule.id,
            }
            for c in cands
        ],
    }


class ExplainResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        container, host, port, resolved = parse_query(req)
        json_response(resp, await explain(self.ctx, container, host, port, resolved))


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/rules/explain"), ExplainResource(ctx))
