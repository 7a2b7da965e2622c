"""/api/settings and /api/notifications (SPEC §9): flat keys, each stored as a JSON value."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from bus import topics
from greyproxy.redaction import DEFAULT_REDACTED_HEADERS  # one list: what the proxy applies is what we show

from . import store_ops
from .context import ApiContext
from .errors import bad_request
from .notify import detect_backend
from .util import json_response, read_json

THEMES = ("system", "light", "dark")
BOOLEAN_KEYS = ("notificationsEnabled", "mitmEnabled", "conversationsEnabled", "logDnsQueries")
BOOLEAN_DEFAULTS = {
    "notificationsEnabled": True,
    "mitmEnabled": True,
    "conversationsEnabled": True,
    "logDnsQueries": False,
}
NOTIFICATION_FACTS = ("available", "backend", "active_claims")  # shown by GET, ignored on PUT (round trips)
MAX_EXTRA_HEADERS = 200
MAX_HEADER_PATTERN = 200
_HEADER_PATTERN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 token chars ('*' doubles as wildcard)


def _config_notifications_default(ctx: ApiContext) -> bool:
    """greyproxy.notifications.enabled from the config file: the default until a person chooses."""
    try:
        value = ctx.cfg.raw["greyproxy"]["notifications"]["enabled"]
    except (KeyError, TypeError):
        return True
    return value if isinstance(value, bool) else True


def resolve_settings(stored: dict[str, Any], notifications_default: bool = True) -> dict[str, Any]:
    """The effective settings from stored values: defaults fill gaps; malformed stored values are ignored."""
    theme = stored.get("theme")
    out: dict[str, Any] = {"theme": theme if theme in THEMES else "system"}
    for key in BOOLEAN_KEYS:
        default = notifications_default if key == "notificationsEnabled" else BOOLEAN_DEFAULTS[key]
        value = stored.get(key)
        out[key] = value if isinstance(value, bool) else default
    extras = stored.get("redactedHeaders")
    extras = [h for h in extras if isinstance(h, str)] if isinstance(extras, list) else []
    out["redactedHeaders"] = [*DEFAULT_REDACTED_HEADERS, *extras]
    return out


async def current_settings(ctx: ApiContext) -> dict[str, Any]:
    stored = await ctx.db(store_ops.read_settings)
    return resolve_settings(stored, _config_notifications_default(ctx))


def notifications_info() -> dict[str, Any]:
    backend = detect_backend()
    return {"available": backend.available, "backend": backend.name}


def settings_body(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "notifications": notifications_info()}


def _extra_headers(value: Any) -> list[str]:
    """The user's own header patterns: defaults and repeats dropped (a GET → PUT round trip is harmless)."""
    if not isinstance(value, list):
        raise bad_request("redactedHeaders must be an array of header names")
    if len(value) > MAX_EXTRA_HEADERS + len(DEFAULT_REDACTED_HEADERS):
        raise bad_request(f"redactedHeaders may hold at most {MAX_EXTRA_HEADERS} extra names")
    seen = {h.lower() for h in DEFAULT_REDACTED_HEADERS}
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise bad_request(f"redactedHeaders[{i}] must be a string")
        name = item.strip()
        if not name or len(name) > MAX_HEADER_PATTERN or not _HEADER_PATTERN.match(name):
            raise bad_request(f"redactedHeaders[{i}] {item!r} is not a header name or pattern")
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def parse_settings_changes(body: dict[str, Any]) -> dict[str, Any]:
    """Stored-form changes from a PUT body; 400 naming an unknown key or a wrongly typed value."""
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key == "theme":
            if value not in THEMES or not isinstance(value, str):
                raise bad_request(f"theme must be one of {', '.join(THEMES)}")
            changes[key] = value
        elif key in BOOLEAN_KEYS:
            if not isinstance(value, bool):
                raise bad_request(f"{key} must be a boolean")
            changes[key] = value
        elif key == "redactedHeaders":
            changes[key] = _extra_headers(value)
        elif key == "notifications":
            # The reference's nested form {"enabled": bool}; available/backend are facts, not settings.
            if not isinstance(value, dict):
                raise bad_request("notifications must be an object")
            for sub, sub_value in value.items():
                if sub == "enabled":
                    if not isinstance(sub_value, bool):
                        raise bad_request("notifications.enabled must be a boolean")
                    changes.setdefault("notificationsEnabled", sub_value)
                elif sub not in NOTIFICATION_FACTS:
                    raise bad_request(f"unknown setting: notifications.{sub}")
        else:
            raise bad_request(f"unknown setting: {key}")
    return changes


async def apply_settings(ctx: ApiContext, changes: dict[str, Any]) -> dict[str, Any]:
    """Persist, then announce the full effective settings to every process."""
    if not changes:
        return await current_settings(ctx)
    stored = await ctx.db(store_ops.write_settings, changes)
    settings = resolve_settings(stored, _config_notifications_default(ctx))
    ctx.publish(topics.SETTINGS_CHANGED, settings)
    return settings


class SettingsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, settings_body(await current_settings(self.ctx)))

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        changes = parse_settings_changes(await read_json(req))
        json_response(resp, settings_body(await apply_settings(self.ctx, changes)))


def notifications_body(ctx: ApiContext, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "enabled": settings["notificationsEnabled"],
        **notifications_info(),
        "active_claims": ctx.notification_claims,
    }


class NotificationsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, notifications_body(self.ctx, await current_settings(self.ctx)))

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req)
        unknown = sorted(set(body) - {"enabled", *NOTIFICATION_FACTS})
        if unknown:
            raise bad_request(f"unknown field: {unknown[0]}")
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise bad_request("enabled must be a boolean")
        settings = await apply_settings(self.ctx, {"notificationsEnabled": enabled})
        json_response(resp, notifications_body(self.ctx, settings))


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/settings"), SettingsResource(ctx))
    app.add_route(route("/api/notifications"), NotificationsResource(ctx))
