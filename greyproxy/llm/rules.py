"""Endpoint rules (SPEC §13.4): which dissector decodes a stored transaction.

A rule is a dict `{id, host_pattern, path_pattern, method, decoder_name, priority, enabled,
user_defined}`. Globs know only `*` (any run of characters, `.` and `/` included), anchored;
hosts compare case-insensitively.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .dissect import BY_NAME, DISSECTORS, Txn, builtin_match

BUILTIN_RULES: tuple[tuple[str, str, str], ...] = (
    ("api.anthropic.com", "/v1/messages", "anthropic"),
    ("api.openai.com", "/v1/responses", "openai"),
    ("api.openai.com", "/v1/chat/completions", "openai-chat"),
    ("openrouter.ai", "/api/v1/chat/completions", "openai-chat"),
    ("generativelanguage.googleapis.com", "/v1beta/models/*", "google-ai"),
)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
WS_METHODS = ("WS_REQ", "WS_RESP")


class RuleError(ValueError):
    """A rule body the API refuses (400), with the reference's message."""


@lru_cache(maxsize=1024)
def _glob(pattern: str, fold: bool) -> re.Pattern[str]:
    # '*' is the only wildcard here; linear in the matched text like the rules' globs (a path or
    # host with many '/' must not make '*/*/*/*' backtrack for seconds). Imported here: the policy
    # package (publicsuffixlist …) is not loaded by maintenance until a rule is matched.
    from greyproxy.policy.patterns import join_at_stars

    body = join_at_stars([re.escape(part) for part in pattern.split("*")], ".*")
    return re.compile(body, re.S | (re.I if fold else 0))


def glob_match(pattern: str, value: str, fold: bool = False) -> bool:
    return _glob(pattern, fold).match(value) is not None


def ordered(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Matching order: priority descending, user rules before built-ins, then id."""
    return sorted(rules, key=lambda r: (-int(r["priority"]), 0 if r["user_defined"] else 1, int(r["id"])))


def rule_matches(rule: dict[str, Any], txn: Txn) -> bool:
    method = str(rule["method"]).upper()
    if method != "*" and method != txn.method:
        return False
    hosts = [txn.host] + ([f"{txn.host}:{txn.port}"] if txn.port else [])
    if not any(glob_match(rule["host_pattern"], h, fold=True) for h in hosts):
        return False
    return glob_match(rule["path_pattern"], txn.path or "/")


def decoder_for(rules: list[dict[str, Any]], txn: Txn) -> str | None:
    """The dissector for `txn`: the first matching enabled rule (already in matching order) whose
    decoder exists; else the built-in matches; else None (not an LLM call)."""
    for rule in rules:
        if rule["enabled"] and rule["decoder_name"] in BY_NAME and rule_matches(rule, txn):
            return rule["decoder_name"]
    return builtin_match(txn)


# What a built-in match implies (see Dissector.hosts / url_has): the assembler's first look.
BUILTIN_HOSTS = frozenset(h for d in DISSECTORS for h in d.hosts)
BUILTIN_URL_HAS = tuple(dict.fromkeys(u for d in DISSECTORS for u in d.url_has))


def host_may_match(rules: list[dict[str, Any]], host: str, port: int | None) -> bool:
    """Whether some transaction to `host` (as stored) and `port` could be claimed, other than by a
    built-in through its URL (`BUILTIN_URL_HAS`): a superset of `decoder_for`, host by host, so the
    assembler reads only these hosts' rows (method and path are checked on those by decoder_for)."""
    host = str(host or "").lower()
    if host in BUILTIN_HOSTS:
        return True
    hosts = [host] + ([f"{host}:{port}"] if port else [])
    return any(
        rule["enabled"]
        and rule["decoder_name"] in BY_NAME
        and any(glob_match(rule["host_pattern"], h, fold=True) for h in hosts)
        for rule in rules
    )


def validate(body: dict[str, Any]) -> dict[str, Any]:
    """A POST/PUT body → the stored fields; RuleError with the reference's messages."""

    def text(name: str) -> str:
        value = body.get(name)
        if value is None or value == "":
            raise RuleError(f"{name} is required")
        if not isinstance(value, str):
            raise RuleError(f"{name} must be a string")
        if len(value) > 1000:
            raise RuleError(f"{name} is longer than 1000 characters")
        return value

    decoder = text("decoder_name")
    if decoder not in BY_NAME:
        raise RuleError(f"unknown decoder_name: {decoder}")
    host = body.get("host_pattern")
    if host is not None and not isinstance(host, str):
        raise RuleError("host_pattern must be a string")
    host = (host or "").strip()
    if host in ("", "*", "%"):
        raise RuleError("host_pattern must not be empty or a bare wildcard")
    if len(host) > 1000:
        raise RuleError("host_pattern is longer than 1000 characters")
    path = text("path_pattern")
    if not path.startswith("/"):
        raise RuleError("path_pattern must start with /")
    method = body.get("method")
    if method is None or method == "":
        method = "POST"
    if not isinstance(method, str):
        raise RuleError("method must be a string")
    method = method.strip().upper()
    allowed = HTTP_METHODS + (WS_METHODS if decoder == "openai-ws" else ())
    if method != "*" and method not in allowed:
        raise RuleError(f"invalid method: {body.get('method')}; expected a standard HTTP method or *")
    priority = body.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RuleError("priority must be an integer")
    if not -1_000_000 <= priority <= 1_000_000:
        raise RuleError("priority must be between -1000000 and 1000000")
    enabled = body.get("enabled", True)
    if enabled is None:
        enabled = True
    if not isinstance(enabled, bool):
        raise RuleError("enabled must be a boolean")
    return {
        "host_pattern": host,
        "path_pattern": path,
        "method": method,
        "decoder_name": decoder,
        "priority": priority,
        "enabled": enabled,
    }
