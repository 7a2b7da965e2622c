"""`greyproxy explain NAME HOST[:PORT]`: what the proxy does with a destination, and why (SPEC §16).

Asks the running API (GET /api/rules/explain, the gate's own decision function) and prints the
decision, the winning rule, the reason and every candidate rule with its specificity.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import EXTRA_COMMANDS, _add_config_args, _load
from .config import ConfigError


def split_target(target: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 literal → (host, port)."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif target.count(":") == 1:
        host, _, port = target.partition(":")
    else:
        host, port = target, ""
    if not host:
        raise ConfigError(f"{target!r}: no host")
    try:
        n = int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"{target!r}: the port must be a number") from None
    if not 1 <= n <= 65535:
        raise ConfigError(f"{target!r}: the port must be from 1 to 65535")
    return host, n


def render(body: dict) -> str:
    rule = body.get("rule")
    lines = [f"decision: {body['decision']}"]
    if rule:
        lines.append(
            f"rule:     #{rule['id']} {rule['action']} {rule['container_pattern']} → "
            f"{rule['destination_pattern']}:{rule['port_pattern']} ({body.get('layer')} layer)"
        )
    lines.append(f"reason:   {body['reason']}")
    if body.get("resolved_hostname"):
        lines.append(f"resolved: {body['resolved_hostname']}")
    if body.get("addresses"):
        lines.append(f"addresses: {', '.join(body['addresses'])}")
    cands = body.get("candidates") or []
    if cands:
        lines.append("candidates (winning order):")
        for c in cands:
            r = c.get("rule") or {}
            mark = "*" if c.get("winner") else ("+" if c["matched"] else "-")
            lines.append(
                f"  {mark} #{r.get('id')} {r.get('action', '?'):5} {r.get('source', '?'):7} "
                f"spec {c['specificity']:>3}  {r.get('container_pattern')} → {r.get('destination_pattern')}:"
                f"{r.get('port_pattern')}  [{c['matched_on']}] {c['why']}"
            )
        lines.append("  (* the winner, + applies, - does not apply)")
    else:
        lines.append("candidates: no rule names this destination")
    return "\n".join(lines) + "\n"


def cmd_explain(args: argparse.Namespace) -> int:
    import httpx

    cfg = _load(args)
    host, port = split_target(args.target, args.port)
    params = {"container": args.name, "host": host, "port": str(port)}
    if args.resolved:
        params["resolved"] = args.resolved
    url = f"{cfg.api_base()}/api/rules/explain"
    try:
        r = httpx.get(url, params=params, timeout=15.0, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"greyproxy: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return 1
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text[:200]}
    if r.status_code != 200:
        print(f"greyproxy: explain failed ({r.status_code}): {body.get('error', body)}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(body, indent=2) + "\n" if args.json else render(body))
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Explain what the proxy does with NAME's connections to HOST[:PORT], and why."
    parser.add_argument("name", help="the client identity (container name / proxy user name)")
    parser.add_argument("target", metavar="HOST[:PORT]", help="the destination ([v6]:port for IPv6)")
    parser.add_argument("--port", type=int, default=443, help="the port when HOST has none (default 443)")
    parser.add_argument("--resolved", metavar="NAME", help="the hostname an IP destination was resolved from")
    parser.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    _add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    return cmd_explain(args)


EXTRA_COMMANDS["explain"] = (
    configure,
    run,
    "explain what the proxy does with a client's connections to HOST[:PORT], and why",
)
