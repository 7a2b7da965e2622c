"""/api/rules: list, create (deduplicated), partial update, delete, bulk ingest (SPEC §2.4)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import falcon
import falcon.asgi

from bus import topics
from greyproxy.policy import (
    ACTIONS,
    validate_container_pattern,
    validate_destination_pattern,
    validate_port_pattern,
)
from greyproxy.shapes import rule_json
from greyproxy.timeutil import parse_time

from . import store_ops
from .context import ApiContext
from .errors import ApiError, bad_request, not_found
from .store_ops import Cleaned, DuplicateRule, Key, RuleSpec
from .util import (
    bool_param,
    int_field,
    int_param,
    json_response,
    read_json,
    soft_call,
    str_field,
)

log = logging.getLogger("greyproxy.api")

RELOAD_TIMEOUT = 1.0  # seconds the proxy gets to swap in new rules before we answer anyway
BLOCK_TIMEOUT = 1.0
MAX_EXPIRES_IN = 3650 * 86400  # ten years: beyond that, a rule is permanent in all but name
MAX_INGEST = 10_000
MAX_NOTES = 10_000
MAX_CREATED_BY = 200


# --------------------------------------------------------------------------- proxy nudges


async def proxy_reload(ctx: ApiContext) -> None:
    """Let the proxy swap rules now, so held connections are released before we answer."""
    await soft_call(ctx.proxy, "rules.reload", {}, timeout=RELOAD_TIMEOUT, retries=1)


async def proxy_block(ctx: ApiContext, keys: Iterable[Key], reason: str) -> None:
    """Block the connections held for these keys at once (dismissed / denied)."""
    triples = sorted({(c, h, int(p)) for c, h, p in keys})
    if triples:
        await soft_call(
            ctx.proxy,
            "holds.block",
            {"keys": [list(k) for k in triples], "reason": reason},
            timeout=BLOCK_TIMEOUT,
            retries=1,
        )


def publish_rule_created(ctx: ApiContext, rule: dict[str, Any], replaced: Iterable[dict[str, Any]] = ()) -> None:
    for old in replaced:  # an expired identical rule made way for the new one
        ctx.publish(topics.RULE_DELETED, {"id": old["id"], "rule": rule_json(old)})
    ctx.publish(topics.RULE_CREATED, rule_json(rule))


def publish_cleaned(ctx: ApiContext, cleaned: Cleaned) -> None:
    """The pending entries a new or changed rule decided and the store removed (store_ops
    `_clean_decided`): announced as a person's decision by that rule would be."""
    for pending_id, rule in cleaned:
        topic = topics.PENDING_ALLOWED if rule["action"] == "allow" else topics.PENDING_DISMISSED
        ctx.publish(topic, {"pending_id": pending_id, "rule": rule_json(rule)})


def refuse_builtin(rule: dict[str, Any], verb: str) -> None:
    """Builtin rules are the seeded loopback allows: they are switched off as a whole in the config
    (greyproxy.builtinRules: false), never edited into something else (a deny) nor deleted (they
    are seeded once, on first start: a deleted one would never come back)."""
    if rule.get("source") == "builtin":
        raise bad_request(
            f"builtin rule {rule['id']} cannot be {verb}; set greyproxy.builtinRules: false"
            " in the config to switch the builtin rules off, and add your own rules"
        )


# --------------------------------------------------------------------------- validation


def _checked(fn: Callable[[str], str], value: str, where: str) -> str:
    try:
        return fn(value)
    except ValueError as exc:
        raise bad_request(f"{where}{exc}") from None


def _port_pattern(body: dict[str, Any], where: str) -> str:
    raw = body.get("port_pattern")
    if raw is None:
        return "*"
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise bad_request(f"{where}port_pattern must be a string like '443' or '8000-8999'")
    return _checked(validate_port_pattern, str(raw), where)


def _action(body: dict[str, Any], where: str, default: str | None) -> str | None:
    action = str_field(body, "action", default, where=where)
    if action is not None and action not in ACTIONS:
        raise bad_request(f"{where}action must be one of {', '.join(ACTIONS)}, not {action!r}")
    return action


def _rule_type(body: dict[str, Any], where: str) -> None:
    rule_type = str_field(body, "rule_type", where=where)
    if rule_type is not None and rule_type != "glob":
        raise bad_request(f"{where}rule_type must be 'glob', not {rule_type!r}")


def _expires_at_value(body: dict[str, Any], where: str) -> float | None:
    raw = body.get("expires_at")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise bad_request(f"{where}expires_at must be an RFC 3339 timestamp string or null")
    try:
        return parse_time(raw)
    except ValueError:
        raise bad_request(f"{where}expires_at must be an RFC 3339 timestamp, not {raw!r}") from None


def _expiry(body: dict[str, Any], where: str, now: float) -> float | None:
    """expires_at or expires_in_seconds (not both) as epoch seconds; None = never."""
    seconds = int_field(body, "expires_in_seconds", lo=1, hi=MAX_EXPIRES_IN, where=where)
    has_at = body.get("expires_at") not in (None, "")
    if seconds is not None and has_at:
        raise bad_request(f"{where}give expires_at or expires_in_seconds, not both")
    if seconds is not None:
        return now + seconds
    return _expires_at_value(body, where)


# The members a rule body may have (SPEC §2.4); anything else is a typo or a misunderstanding: 400.
CREATE_FIELDS = frozenset(
    {
        "container_pattern",
        "destination_pattern",
        "port_pattern",
        "action",
        "rule_type",
        "expires_at",
        "expires_in_seconds",
        "notes",
        "created_by",
    }
)
# An ingest item may be a rule as GET /api/rules lists it (an export): its read-only members are ignored.
EXPORTED_FIELDS = frozenset({"id", "created_at", "last_used_at", "is_active", "source", "session_id", "hit_count"})
UPDATE_FIELDS = frozenset(
    {
        "container_pattern",
        "destination_pattern",
        "port_pattern",
        "action",
        "rule_type",
        "expires_at",
        "expires_in_seconds",
        "notes",
    }
)


def _known_fields(body: dict[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        names = ", ".join(repr(k[:100]) for k in unknown[:10])
        raise bad_request(
            f"{where}unknown field{'s' if len(unknown) > 1 else ''} {names}; a rule takes "
            f"{', '.join(sorted(known - EXPORTED_FIELDS))}"
        )


def parse_rule_spec(body: Any, now: float, where: str = "", exported: bool = False) -> RuleSpec:
    """A POST /api/rules body (or one ingest item, `exported`) as a validated RuleSpec; 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request(f"{where}a rule must be a JSON object")
    _known_fields(body, CREATE_FIELDS | EXPORTED_FIELDS if exported else CREATE_FIELDS, where)
    container = str_field(body, "container_pattern", required=True, where=where)
    destination = str_field(body, "destination_pattern", required=True, where=where)
    _rule_type(body, where)
    expires_at = _expiry(body, where, now)
    if expires_at is not None and expires_at <= now:
        raise bad_request(f"{where}expires_at must be in the future")
    return RuleSpec(
        container_pattern=_checked(validate_container_pattern, container, where),
        destination_pattern=_checked(validate_destination_pattern, destination, where),
        port_pattern=_port_pattern(body, where),
        action=_action(body, where, "allow") or "allow",
        expires_at=expires_at,
        notes=str_field(body, "notes", max_len=MAX_NOTES, where=where),
        created_by=str_field(body, "created_by", max_len=MAX_CREATED_BY, where=where) or "api",
    )


def parse_rule_changes(body: dict[str, Any], now: float) -> dict[str, Any]:
    """The columns a PUT body changes (absent keys stay as they are)."""
    _known_fields(body, UPDATE_FIELDS, "")
    changes: dict[str, Any] = {}
    if "container_pattern" in body:
        value = str_field(body, "container_pattern", required=True)
        changes["container_pattern"] = _checked(validate_container_pattern, value, "")
    if "destination_pattern" in body:
        value = str_field(body, "destination_pattern", required=True)
        changes["destination_pattern"] = _checked(validate_destination_pattern, value, "")
    if "port_pattern" in body:
        changes["port_pattern"] = _port_pattern(body, "")
    if "action" in body:
        changes["action"] = _action(body, "", None)
        if changes["action"] is None:
            raise bad_request("action must be one of allow, deny")
    if "notes" in body:
        changes["notes"] = str_field(body, "notes", max_len=MAX_NOTES)
    _rule_type(body, "")
    if "expires_at" in body or "expires_in_seconds" in body:
        changes["expires_at"] = _expiry(body, "", now)  # null or "" clears it
    return changes


# --------------------------------------------------------------------------- resources


class RulesResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        action = req.get_param("action") or None
        if action is not None and action not in ACTIONS:
            raise bad_request(f"action must be one of {', '.join(ACTIONS)}")
        rows, total = await self.ctx.db(
            store_ops.list_rules,
            req.get_param("container") or None,
            req.get_param("destination") or None,
            action,
            bool_param(req, "include_expired"),
            int_param(req, "limit", 100, lo=1),
            int_param(req, "offset", 0, hi=10**9),
        )
        now = time.time()
        json_response(resp, {"items": [rule_json(r, now) for r in rows], "total": total})

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        spec = parse_rule_spec(await read_json(req), time.time())
        res = await self.ctx.db(store_ops.create_rule, spec)
        if res.created:
            publish_rule_created(self.ctx, res.rule, res.replaced)
            publish_cleaned(self.ctx, res.cleaned)
            await proxy_reload(self.ctx)
        json_response(resp, rule_json(res.rule), 201)  # 201 for a reused identical rule too, as the reference


class RuleResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, rule_id: int) -> None:
        rule = await self.ctx.db(store_ops.get_rule, rule_id)
        if rule is None:
            raise not_found(f"rule {rule_id} not found")
        json_response(resp, rule_json(rule))

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, rule_id: int) -> None:
        changes = parse_rule_changes(await read_json(req), time.time())
        current = await self.ctx.db(store_ops.get_rule, rule_id)
        if current is None:
            raise not_found(f"rule {rule_id} not found")
        refuse_builtin(current, "edited")
        try:
            result = await self.ctx.db(store_ops.update_rule, rule_id, changes)
        except DuplicateRule as exc:
            # POST answers an identical rule with the existing one; a PUT cannot merge two rules
            # (ids, hit counts, notes and expiry differ), so it refuses: edit or delete that one.
            raise ApiError(
                409,
                f"rule {exc.existing['id']} has the same container_pattern, destination_pattern,"
                " port_pattern and action already; edit or delete that rule instead",
            ) from None
        if result is None:
            raise not_found(f"rule {rule_id} not found")
        if result.before != result.after:
            self.ctx.publish(topics.RULE_UPDATED, rule_json(result.after))
            publish_cleaned(self.ctx, result.cleaned)
            await proxy_reload(self.ctx)
        json_response(resp, rule_json(result.after))

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, rule_id: int) -> None:
        current = await self.ctx.db(store_ops.get_rule, rule_id)
        if current is not None:
            refuse_builtin(current, "deleted")
        rule = await self.ctx.db(store_ops.delete_rule, rule_id)
        if rule is not None:
            self.ctx.publish(topics.RULE_DELETED, {"id": rule["id"], "rule": rule_json(rule)})
            await proxy_reload(self.ctx)  # the proxy also closes tunnels this rule had allowed
        json_response(resp, {"status": "ok", "deleted": rule is not None})


class RulesIngestResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        items = await read_json(req, expect=list)
        if len(items) > MAX_INGEST:
            raise bad_request(f"at most {MAX_INGEST} rules per ingest")
        now = time.time()
        # Validate everything first: one bad item rejects the whole batch.
        specs = [parse_rule_spec(item, now, where=f"item {i}: ", exported=True) for i, item in enumerate(items)]
        builtins = bool(self.ctx.cfg.section("greyproxy").get("builtinRules", True))
        res = await self.ctx.db(store_ops.ingest_rules, specs, None, builtins)
        for old in res.replaced:
            self.ctx.publish(topics.RULE_DELETED, {"id": old["id"], "rule": rule_json(old)})
        for rule in res.imported:
            self.ctx.publish(topics.RULE_CREATED, rule_json(rule))
        publish_cleaned(self.ctx, res.cleaned)
        if res.imported:
            await proxy_reload(self.ctx)  # releases the held connections the new allows cover
        json_response(
            resp, {"imported": len(res.imported), "skipped": res.skipped, "pending_cleaned": len(res.cleaned_keys)}
        )


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/rules"), RulesResource(ctx))
    app.add_route(route("/api/rules/ingest"), RulesIngestResource(ctx))
    app.add_route(route("/api/rules/{rule_id:id}"), RuleResource(ctx))
