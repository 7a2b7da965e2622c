"""GET <pathPrefix>/api/openapi.json: an OpenAPI 3.1 description of every route the app serves.

The paths come from the app's own router (falcon.inspect), so a route cannot be served without
being listed; what each operation takes and answers is written down here, next to the shapes
of SPEC §2–§10. An operation served but not described here is still listed, marked
`x-undocumented` (tests/unit/test_openapi.py fails on that), and a description left here for a
route that is gone is dropped (the same test fails on that too). Paths are relative to the
server URL, which is the configured pathPrefix.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
import falcon.inspect
import orjson

from greyproxy import __version__
from greyproxy.har import HAR_SCHEMA
from greyproxy.policy import ACTIONS, SCOPES
from greyproxy.redaction import DEFAULT_REDACTED_HEADERS

from .context import ApiContext
from .settings import MAX_EXTRA_HEADERS
from .util import MAX_ID

OPENAPI_VERSION = "3.1.0"
DOC_PATH = "/api/openapi.json"
_CONVERTER = re.compile(r"\{(\w+)(?::(\w+)(?:\([^)]*\))?)?\}")

JSON = "application/json"


# ----------------------------------------------------------------------------- schema helpers


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema or null (JSON Schema 2020-12 style, as OpenAPI 3.1 uses)."""
    if "$ref" in schema or "enum" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    return out


def obj(props: dict[str, Any], required: list[str] | tuple[str, ...] | None = None, **extra: Any) -> dict[str, Any]:
    """An object schema; every property is required unless `required` says otherwise."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else list(required),
        **extra,
    }


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
TS = {"type": "string", "format": "date-time", "description": "RFC 3339 UTC, e.g. 2026-04-10T12:00:00Z"}
TS_INPUT = {
    "type": "string",
    "description": "RFC 3339 (any offset) or YYYY-MM-DDTHH:MM (UTC)",
    "examples": ["2026-04-10T12:00:00Z", "2026-04-10T12:00"],
}
ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
PORT = {"type": "integer", "minimum": 0, "maximum": 65535}


def array_of(item: str, **extra: Any) -> dict[str, Any]:
    """An array of the named schema (`extra`: maxItems and the like)."""
    return {"type": "array", "items": ref(item), **extra}


def list_of(item: str, paged: bool = False) -> dict[str, Any]:
    """`{items: [item], total}` (paged: plus `page`, `pages`), the shape of every listing."""
    props: dict[str, Any] = {"items": array_of(item), "total": {"type": "integer", "minimum": 0}}
    if paged:
        props["page"] = {"type": "integer", "minimum": 1}
        props["pages"] = {"type": "integer", "minimum": 1}
    return obj(props)


SCHEMAS: dict[str, Any] = {
    "Error": obj(
        {"error": STR, "service": {"type": "string", "description": "the service that is down (503)"}},
        required=["error"],
        description='Every error: {"error": "<human readable message>"}.',
    ),
    "Rule": obj(
        {
            "id": INT,
            "container_pattern": STR,
            "destination_pattern": STR,
            "port_pattern": STR,
            "rule_type": {"type": "string", "enum": ["glob"]},
            "action": {"type": "string", "enum": list(ACTIONS)},
            "created_at": TS,
            "expires_at": nullable(TS),
            "last_used_at": nullable(TS),
            "created_by": STR,
            "notes": nullable(STR),
            "is_active": BOOL,
            "source": {"type": "string", "enum": ["global", "session", "builtin"]},
            "session_id": nullable(STR),
            "hit_count": {"type": "integer", "minimum": 0},
        },
        description="SPEC §2.1",
    ),
    "RuleInput": obj(
        {
            "container_pattern": {"type": "string", "description": "`*` or a glob (`*` does not cross `/`)"},
            "destination_pattern": {
                "type": "string",
                "description": "`*`, a CIDR, `**.a.com`, `*.a.com`, a glob or a host",
            },
            "port_pattern": {
                "type": ["string", "integer", "null"],
                "description": "`*`, `443`, `80,443`, `8000-8999`",
                "default": "*",
            },
            "action": nullable({"type": "string", "enum": list(ACTIONS), "default": "allow"}),
            "rule_type": nullable({"type": "string", "enum": ["glob"]}),
            "expires_at": nullable({"type": "string", "description": "RFC 3339; must be in the future"}),
            "expires_in_seconds": nullable({"type": "integer", "minimum": 1, "maximum": 3650 * 86400}),
            "notes": nullable({"type": "string", "maxLength": 10_000}),
            "created_by": nullable({"type": "string", "maxLength": 200, "default": "api"}),
        },
        required=["container_pattern", "destination_pattern"],
        description="POST /api/rules (and each item of an ingest); give expires_at or expires_in_seconds, not both",
    ),
    "RuleUpdate": obj(
        {
            "container_pattern": STR,
            "destination_pattern": STR,
            "port_pattern": {"type": ["string", "integer", "null"], "description": "null = `*`"},
            "action": {"type": "string", "enum": list(ACTIONS)},
            "rule_type": nullable({"type": "string", "enum": ["glob"]}),
            "expires_at": nullable({"type": "string", "description": 'RFC 3339; null or "" clears it'}),
            "expires_in_seconds": nullable({"type": "integer", "minimum": 1, "maximum": 3650 * 86400}),
            "notes": nullable({"type": "string", "maxLength": 10_000}),
        },
        required=[],
        description="PUT /api/rules/{id}: only the keys given change",
    ),
    "RuleList": list_of("Rule"),
    "IngestResult": obj({"imported": INT, "skipped": INT, "pending_cleaned": INT}),
    "Deleted": obj({"status": {"type": "string", "enum": ["ok"]}, "deleted": BOOL}),
    "Pending": obj(
        {
            "id": INT,
            "container_name": STR,
            "container_id": STR,
            "destination_host": STR,
            "destination_port": INT,
            "resolved_hostname": nullable(STR),
            "first_seen": TS,
            "last_seen": TS,
            "attempt_count": {"type": "integer", "minimum": 0},
            "waiting": {"type": "integer", "minimum": 0, "description": "connections held right now"},
        },
        description="SPEC §3.2 (rows sharing container, resolved-or-raw host and port shown as one group)",
    ),
    "PendingList": list_of("Pending"),
    "Count": obj({"count": {"type": "integer", "minimum": 0}}),
    "Decision": obj(
        {
            "scope": nullable({"type": "string", "enum": list(SCOPES), "default": "exact"}),
            "duration": {
                "type": ["string", "null"],
                "default": "permanent",
                "description": "once, 1h, 12h, 24h, 7d, 30d, permanent, <N>m, <N>h or <N>d",
                "examples": ["once", "1h", "permanent", "90m"],
            },
            "notes": nullable({"type": "string", "maxLength": 10_000}),
        },
        required=[],
    ),
    "DecisionResult": obj({"rule": ref("Rule"), "pending_removed": {"type": "boolean", "const": True}}),
    "Dismissed": obj({"status": {"type": "string", "enum": ["ok"]}, "removed": BOOL}),
    "BulkAllow": obj(
        {
            "pending_ids": {"type": "array", "items": ID, "maxItems": 10_000},
            "scope": nullable({"type": "string", "enum": list(SCOPES), "default": "exact"}),
            "duration": {"type": ["string", "null"], "default": "permanent"},
            "notes": nullable({"type": "string", "maxLength": 10_000}),
        },
        required=["pending_ids"],
    ),
    "BulkAllowResult": obj(
        {
            "rules_created": array_of("Rule"),
            "pending_removed": {"type": "integer", "minimum": 0},
            "not_found": {"type": "array", "items": INT},
        }
    ),
    "BulkDismiss": obj({"pending_ids": {"type": "array", "items": ID, "maxItems": 10_000}}),
    "BulkDismissResult": obj(
        {
            "status": {"type": "string", "enum": ["ok"]},
            "removed": {"type": "integer", "minimum": 0},
            "not_found": {"type": "array", "items": INT},
        }
    ),
    "LogEntry": obj(
        {
            "id": INT,
            "timestamp": TS,
            "container_name": STR,
            "container_id": STR,
            "destination_host": STR,
            "destination_port": INT,
            "resolved_hostname": nullable(STR),
            "method": {"type": "string", "description": "HTTP, CONNECT, SOCKS5 or DNS"},
            "result": {"type": "string", "enum": ["allowed", "blocked"]},
            "rule_id": nullable(INT),
            "rule_summary": nullable(STR),
            "response_time_ms": nullable(INT),
            "response_time_us": nullable(INT),
            "reason": nullable(STR),
            "mitm_skip_reason": nullable(STR),
        },
        description="SPEC §5: one per allow/deny decision",
    ),
    "LogPage": list_of("LogEntry", paged=True),
    "Stats": obj(
        {
            "period": obj({"from": TS, "to": TS}),
            "group_by": {"type": "string", "enum": ["hour", "day", "week"]},
            "total_requests": INT,
            "allowed": INT,
            "blocked": INT,
            "top_containers": array_of("ContainerCount"),
            "top_destinations": array_of("BlockedDestination", maxItems=10),
            "timeline": {"type": "array", "items": obj({"timestamp": TS, "allowed": INT, "blocked": INT})},
        },
        description="GET /api/logs/stats",
    ),
    "ContainerCount": obj(
        {
            "name": STR,
            "total": INT,
            "allowed": INT,
            "blocked": INT,
            "percentage": {"type": "number", "minimum": 0, "maximum": 100},
        }
    ),
    "BlockedDestination": obj(
        {
            "host": STR,
            "port": INT,
            "resolved_hostname": nullable(STR),
            "count": INT,
            "containers": {"type": "array", "items": STR},
        }
    ),
    "AllowAllStatus": obj(
        {
            "active": BOOL,
            "mode": {"enum": ["allow", "deny", None]},
            "expires_at": nullable(TS),
            "remaining_seconds": nullable({"type": "integer", "minimum": 0}),
        },
        description="SPEC §4: silent mode",
    ),
    "AllowAllInput": obj(
        {
            "mode": nullable({"type": "string", "enum": ["allow", "deny"], "default": "allow"}),
            "duration_seconds": nullable(
                {"type": "integer", "minimum": 0, "maximum": 28_800, "description": "0 or absent = until restart"}
            ),
        },
        required=[],
    ),
    "Transaction": obj(
        {
            "id": INT,
            "timestamp": TS,
            "container_name": STR,
            "destination_host": STR,
            "destination_port": INT,
            "method": STR,
            "url": STR,
            "request_headers": {"type": "object", "additionalProperties": {"type": "array", "items": STR}},
            "request_body_size": INT,
            "request_content_type": nullable(STR),
            "status_code": nullable(INT),
            "response_headers": {"type": "object", "additionalProperties": {"type": "array", "items": STR}},
            "response_body_size": INT,
            "response_content_type": nullable(STR),
            "duration_ms": nullable(INT),
            "duration_us": nullable(INT),
            "rule_id": nullable(INT),
            "result": STR,
            "conversation_id": nullable(STR),
            "substituted_credentials": {"type": "array"},
            "session_id": nullable(STR),
            "request_host": nullable(STR),
            "host_mismatch": BOOL,
            "error": nullable(STR),
            "block_reason": nullable(STR),
            "refused_credentials": {"type": "array", "items": STR},
            "request_body": nullable(STR),
            "response_body": nullable(STR),
            "request_body_encoding": nullable({"type": "string", "enum": ["base64"]}),
            "response_body_encoding": nullable({"type": "string", "enum": ["base64"]}),
            # only when a stored body could not be read back (a damaged row): why; the body is null
            "request_body_error": STR,
            "response_body_error": STR,
        },
        required=[
            "id",
            "timestamp",
            "container_name",
            "destination_host",
            "destination_port",
            "method",
            "url",
            "request_headers",
            "request_body_size",
            "request_content_type",
            "status_code",
            "response_headers",
            "response_body_size",
            "response_content_type",
            "duration_ms",
            "rule_id",
            "result",
            "conversation_id",
            "substituted_credentials",
            "session_id",
            "request_host",
            "host_mismatch",
            "error",
            "block_reason",
            "refused_credentials",
        ],
        description="SPEC §7 (request_body/response_body only in the detail view or with include_bodies=true;"
        ' a body that is not text under its charset is base64, with <side>_body_encoding "base64",'
        " SPEC §15)",
    ),
    "TransactionPage": list_of("Transaction", paged=True),
    "Har": {**copy.deepcopy(HAR_SCHEMA), "description": "HAR 1.2 (the required fields of the specification)"},
    "Settings": obj(
        {
            "theme": {"type": "string", "enum": ["system", "light", "dark"]},
            "notificationsEnabled": BOOL,
            "mitmEnabled": BOOL,
            "conversationsEnabled": BOOL,
            "redactedHeaders": {"type": "array", "items": STR},
            "logDnsQueries": BOOL,
            "notifications": obj(
                {"available": BOOL, "backend": {"type": "string", "enum": ["notify-send", "terminal-notifier", "none"]}}
            ),
        },
        description="SPEC §9",
    ),
    "SettingsUpdate": obj(
        {
            "theme": {"type": "string", "enum": ["system", "light", "dark"]},
            "notificationsEnabled": BOOL,
            "mitmEnabled": BOOL,
            "conversationsEnabled": BOOL,
            "logDnsQueries": BOOL,
            "redactedHeaders": {
                "type": "array",
                "maxItems": MAX_EXTRA_HEADERS + len(DEFAULT_REDACTED_HEADERS),
                "description": "the user's extras (defaults always apply; repeating them is harmless)",
                "items": {"type": "string", "pattern": r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,200}$"},
            },
            "notifications": obj({"enabled": BOOL}, required=[], additionalProperties=False),
        },
        required=[],
        additionalProperties=False,
        description="partial; an unknown key is a 400",
    ),
    "Notifications": obj(
        {
            "enabled": BOOL,
            "available": BOOL,
            "backend": {"type": "string", "enum": ["notify-send", "terminal-notifier", "none"]},
            "active_claims": {"type": "integer", "minimum": 0},
        }
    ),
    "NotificationsUpdate": obj({"enabled": BOOL}, additionalProperties=False),
    "CertStatus": obj(
        {
            "generated": BOOL,
            "certPath": STR,
            "keyPath": STR,
            "subject": nullable(STR),
            "expiresAt": nullable(TS),
            "fingerprintSha256": nullable(STR),
            "installed": BOOL,
            "installCommands": {"type": "object", "additionalProperties": STR},
            "error": {"type": "string", "description": "present when the CA files exist but cannot be read"},
        },
        required=[
            "generated",
            "certPath",
            "keyPath",
            "subject",
            "expiresAt",
            "fingerprintSha256",
            "installed",
            "installCommands",
        ],
        description="SPEC §7.1 (camelCase, as the reference)",
    ),
    "CertResult": obj({"message": STR, "certStatus": ref("CertStatus")}),
    "JobStarted": obj({"status": {"type": "string", "enum": ["started"]}, "job": STR}),
    "MaintenanceStatus": obj(
        {
            "jobs": {
                "type": "object",
                "additionalProperties": obj(
                    {
                        "running": BOOL,
                        "processed": INT,
                        "total": INT,
                        "started_at": nullable(TS),
                        "finished_at": nullable(TS),
                        "error": nullable(STR),
                    },
                    required=["running", "processed", "total"],
                ),
            },
            "assembler_version_current": INT,
            "assembler_version_stored": INT,
            "needs_rebuild": BOOL,
        }
    ),
    "ServiceState": obj(
        {
            "up": BOOL,
            "pid": nullable(INT),
            "last_seen": nullable(TS),
            "uptime": nullable(NUM),
            "state": {"type": "string", "enum": ["up", "starting", "down", "unreachable"]},
            "restarts": {
                "type": "integer",
                "description": "times a new process took this name after the last one ended without a clean stop"
                " (killed, crashed, or ended by bus.stallTimeout), since the stack started; `api` counts its own",
            },
            "last_restart": nullable(TS),
        },
        required=["up", "pid", "last_seen", "uptime", "state"],
    ),
    "Health": obj(
        {
            "service": {"type": "string", "enum": ["greyproxy"]},
            "version": STR,
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "ports": {"type": "object", "additionalProperties": INT},
            "services": {"type": "object", "additionalProperties": ref("ServiceState")},
            "database": obj({"up": BOOL, "path": STR}),
            "down": {"type": "array", "items": STR, "description": "what is down (503 only)"},
            "error": STR,
        },
        required=["service", "version", "status", "ports", "services"],
    ),
}
SCHEMAS["Dashboard"] = {
    "allOf": [
        ref("Stats"),
        obj(
            {
                "period_name": {"type": "string", "enum": ["today", "7d", "30d"]},
                "allow_rate": {"type": "number", "minimum": 0, "maximum": 100},
                "by_container": array_of("ContainerCount", maxItems=20),
                "top_blocked": array_of("BlockedDestination", maxItems=10),
                "recent": array_of("LogEntry"),
                "pending_count": {"type": "integer", "minimum": 0},
                "active_connections": {"type": "integer", "minimum": 0},
                "waiting": {"type": "integer", "minimum": 0},
                "allowall": ref("AllowAllStatus"),
            }
        ),
    ],
    "description": "GET /api/dashboard: the stats plus live figures",
}


# ----------------------------------------------------------------------------- operation helpers


def q(name: str, schema: dict[str, Any], description: str = "", required: bool = False) -> dict[str, Any]:
    """A query parameter. An optional one's empty value (`?limit=`) means the same as none."""
    p: dict[str, Any] = {"name": name, "in": "query", "required": required, "allowEmptyValue": True, "schema": schema}
    if required:
        del p["allowEmptyValue"]
    if description:
        p["description"] = description
    return p


def limit(default: int, hi: int = 10_000) -> dict[str, Any]:
    return q("limit", {"type": "integer", "minimum": 1, "maximum": hi, "default": default})


OFFSET = q("offset", {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0})
CONTAINER = q("container", STR, "exact container name")
CONTAINER_SUBSTRING = q("container", STR, "substring of the container name")
DESTINATION = q("destination", STR, "substring of the destination host or its resolved name")
FROM_DATE = q("from_date", TS_INPUT)
TO_DATE = q("to_date", TS_INPUT)
GROUP_BY = q("group_by", {"type": "string", "enum": ["hour", "day", "week", "auto"], "default": "auto"})
TEXT = {"type": "string", "maxLength": 1000}  # a free-text filter
# GET /api/transactions and its HAR export take the same filters.
TRANSACTION_FILTERS = [
    q("container", TEXT),
    q("destination", TEXT),
    q("method", {"type": "string", "maxLength": 32}),
    q("session_id", TEXT),
    q("conversation_id", TEXT),
    FROM_DATE,
    TO_DATE,
]


def response(description: str, schema: dict[str, Any] | None = None, media: str = JSON) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    return out


def err(description: str) -> dict[str, Any]:
    return response(description, ref("Error"))


def body(schema: dict[str, Any], required: bool = True, description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"required": required, "content": {JSON: {"schema": schema}}}
    if description:
        out["description"] = description
    return out


def op(
    summary: str,
    ok: dict[str, Any],
    *,
    code: str = "200",
    params: list[dict[str, Any]] | None = None,
    request: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    tag: str,
) -> dict[str, Any]:
    """One operation; every one may also answer 421/403 (LocalOnly), and 400/413 when it reads a body or query."""
    responses: dict[str, Any] = {code: ok}
    errs = dict(errors or {})
    if params or request:
        errs.setdefault("400", "bad input (the message names the field)")
    if request:
        errs.setdefault("413", "body larger than 4 MiB")
        errs.setdefault(
            "415", "a browser request (Origin or Sec-Fetch-* present) whose body is not Content-Type: application/json"
        )
    errs.setdefault(
        "403",
        "cross-origin request refused (an Origin other than the API's own or one in"
        " greyproxy.allowedOrigins, or Sec-Fetch-Site: cross-site)",
    )
    errs.setdefault("421", "misdirected request: the Host header is not this machine or an allowedHosts name")
    for status, text in sorted(errs.items()):
        responses[status] = err(text)
    out: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if params:
        out["parameters"] = params
    if request:
        out["requestBody"] = request
    return out


SERVICE_DOWN = "a service it needs (named in `service`) does not answer"
UNKNOWN_ID = {"404": "unknown id"}

# (path relative to the prefix, METHOD) -> operation. Path parameters are added from the route.
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/health", "GET"): op(
        "Each service's state; 503 with status degraded when one (or the database) is down",
        response("everything is up", ref("Health")),
        tag="health",
        errors={"503": "degraded"},
    ),
    ("/api/openapi.json", "GET"): op("This document", response("OpenAPI 3.1", {"type": "object"}), tag="health"),
    ("/api/rules", "GET"): op(
        "List rules, newest first",
        response("a page of rules", ref("RuleList")),
        tag="rules",
        params=[
            q("container", STR, "substring of the container pattern"),
            q("destination", STR, "substring of the destination pattern"),
            q("action", {"type": "string", "enum": list(ACTIONS)}),
            q("include_expired", {"type": "boolean", "default": False}),
            limit(100),
            OFFSET,
        ],
    ),
    ("/api/rules", "POST"): op(
        "Create a rule (an identical active rule is returned instead of a duplicate)",
        response("the rule", ref("Rule")),
        code="201",
        tag="rules",
        request=body(ref("RuleInput")),
    ),
    ("/api/rules/ingest", "POST"): op(
        "Import rules, all or nothing; identical active rules are skipped",
        response("counts", ref("IngestResult")),
        tag="rules",
        request=body(array_of("RuleInput", maxItems=10_000)),
    ),
    ("/api/rules/{rule_id}", "GET"): op("One rule", response("the rule", ref("Rule")), tag="rules", errors=UNKNOWN_ID),
    ("/api/rules/{rule_id}", "PUT"): op(
        "Change a rule's patterns, action, notes or expiry",
        response("the rule", ref("Rule")),
        tag="rules",
        request=body(ref("RuleUpdate")),
        errors={
            **UNKNOWN_ID,
            "400": "bad input (the message names the field), or a builtin rule (greyproxy.builtinRules: false"
            " switches those off)",
            "409": "another active rule has the same patterns and action (the message names it)",
        },
    ),
    ("/api/rules/{rule_id}", "DELETE"): op(
        "Delete a rule (live tunnels it allowed are closed)",
        response("deleted is false for an unknown id", ref("Deleted")),
        tag="rules",
        errors={
            "400": "invalid id (the path holds no integer id), or a builtin rule (greyproxy.builtinRules: false"
            " switches those off)"
        },
    ),
    ("/api/pending", "GET"): op(
        "The pending queue, newest last_seen first",
        response("a page of entries", ref("PendingList")),
        tag="pending",
        params=[CONTAINER_SUBSTRING, DESTINATION, limit(100), OFFSET],
    ),
    ("/api/pending/count", "GET"): op("Number of pending groups", response("the count", ref("Count")), tag="pending"),
    ("/api/pending/bulk-allow", "POST"): op(
        "Allow several entries",
        response("rules made", ref("BulkAllowResult")),
        tag="pending",
        request=body(ref("BulkAllow")),
    ),
    ("/api/pending/bulk-dismiss", "POST"): op(
        "Dismiss several entries",
        response("counts", ref("BulkDismissResult")),
        tag="pending",
        request=body(ref("BulkDismiss")),
    ),
    ("/api/pending/{pending_id}", "DELETE"): op(
        "Dismiss an entry without a rule (held connections are blocked)",
        response("removed is false for an unknown id", ref("Dismissed")),
        tag="pending",
    ),
    **{
        (f"/api/pending/{{pending_id}}/{action}", "POST"): op(
            f"{action.capitalize()} an entry with a rule",
            response("the rule", ref("DecisionResult")),
            tag="pending",
            request=body(ref("Decision"), required=False, description="optional; empty = {}"),
            errors=UNKNOWN_ID,
        )
        for action in ("allow", "deny")
    },
    ("/api/logs", "GET"): op(
        "The connection log, newest first",
        response("a page of entries", ref("LogPage")),
        tag="logs",
        params=[
            CONTAINER,
            DESTINATION,
            q("result", {"type": "string", "enum": ["allowed", "blocked"]}),
            FROM_DATE,
            TO_DATE,
            limit(50),
            OFFSET,
        ],
    ),
    ("/api/logs/stats", "GET"): op(
        "Totals, top containers and blocked destinations, timeline (default: today UTC)",
        response("the stats", ref("Stats")),
        tag="logs",
        params=[FROM_DATE, TO_DATE, GROUP_BY],
    ),
    ("/api/dashboard", "GET"): op(
        "The dashboard summary",
        response("stats plus live figures", ref("Dashboard")),
        tag="logs",
        params=[
            q("period", {"type": "string", "enum": ["today", "7d", "30d"], "default": "today"}),
            FROM_DATE,
            TO_DATE,
            GROUP_BY,
            q("recent_limit", {"type": "integer", "minimum": 0, "maximum": 100, "default": 10}),
        ],
    ),
    ("/api/transactions", "GET"): op(
        "Captured HTTP transactions, newest first",
        response("a page", ref("TransactionPage")),
        tag="transactions",
        params=[
            *TRANSACTION_FILTERS,
            limit(50, 1000),
            OFFSET,
            q("include_bodies", {"type": "boolean", "default": False}),
        ],
    ),
    ("/api/transactions/export.har", "GET"): op(
        "Every transaction the list's filters match, oldest first, as HAR 1.2 (streamed; bodies as stored, "
        "redacted headers stay redacted); `limit` and `offset` take a part of them",
        response("a HAR 1.2 document", ref("Har")),
        tag="transactions",
        params=[
            *TRANSACTION_FILTERS,
            q("limit", {"type": "integer", "minimum": 1, "maximum": 10**9}),
            OFFSET,
        ],
    ),
    ("/api/transactions/{tid}", "GET"): op(
        "One transaction with its bodies",
        response("the transaction", ref("Transaction")),
        tag="transactions",
        errors=UNKNOWN_ID,
    ),
    ("/api/allowall", "GET"): op(
        "Silent mode status",
        response("the status", ref("AllowAllStatus")),
        tag="allowall",
        errors={"503": SERVICE_DOWN},
    ),
    ("/api/allowall", "POST"): op(
        "Start (or restart) silent allow-all / deny-all",
        response("the status", ref("AllowAllStatus")),
        tag="allowall",
        request=body(ref("AllowAllInput"), required=False),
        errors={"503": SERVICE_DOWN},
    ),
    ("/api/allowall", "DELETE"): op(
        "Back to normal", response("the status", ref("AllowAllStatus")), tag="allowall", errors={"503": SERVICE_DOWN}
    ),
    ("/api/settings", "GET"): op("The settings", response("the settings", ref("Settings")), tag="settings"),
    ("/api/settings", "PUT"): op(
        "Change settings (partial)",
        response("the settings", ref("Settings")),
        tag="settings",
        request=body(ref("SettingsUpdate")),
    ),
    ("/api/notifications", "GET"): op("OS notifications", response("the state", ref("Notifications")), tag="settings"),
    ("/api/notifications", "PUT"): op(
        "Turn OS notifications on or off",
        response("the state", ref("Notifications")),
        tag="settings",
        request=body(ref("NotificationsUpdate")),
    ),
    ("/api/cert/status", "GET"): op("The interception CA", response("its status", ref("CertStatus")), tag="cert"),
    ("/api/cert/generate", "POST"): op(
        "Generate the CA",
        response("generated", ref("CertResult")),
        tag="cert",
        params=[q("force", {"type": "boolean", "default": False}, "replace an existing CA")],
        errors={"409": "a CA exists and force is not set"},
    ),
    ("/api/cert/download", "GET"): op(
        "The CA certificate (PEM)",
        response("the PEM", {"type": "string"}, media="application/x-pem-file"),
        tag="cert",
        errors={"404": "no CA has been generated"},
    ),
    ("/api/cert/reload", "POST"): op(
        "Make the proxy reload the CA",
        response("reloaded or unchanged", ref("CertResult")),
        tag="cert",
        errors={"503": SERVICE_DOWN},
    ),
    ("/api/maintenance/redact-headers", "POST"): op(
        "Re-apply header redaction to stored transactions",
        response("started", ref("JobStarted")),
        code="202",
        tag="maintenance",
        errors={"409": "the job is running already", "503": SERVICE_DOWN},
    ),
    ("/api/maintenance/status", "GET"): op(
        "Maintenance jobs",
        response("their progress", ref("MaintenanceStatus")),
        tag="maintenance",
        errors={"503": SERVICE_DOWN},
    ),
    ("/metrics", "GET"): op(
        "The processes' figures in the Prometheus text format (from their heartbeats)",
        response("Prometheus text exposition 0.0.4", {"type": "string"}, media="text/plain"),
        tag="health",
    ),
    ("/metrics", "HEAD"): op(
        "What GET /metrics answers, without the body (a probe)",
        response("Prometheus text exposition 0.0.4 (no body)", {"type": "string"}, media="text/plain"),
        tag="health",
    ),
    ("/ws", "GET"): {
        "summary": "The control WebSocket (SPEC §8; docs/events.md)",
        "tags": ["ws"],
        "description": "Connect with an `Upgrade: websocket` request. Events arrive as "
        '`{"type", "data"}`; commands are JSON objects with `command`. '
        "A plain GET (no upgrade) answers 426.",
        "x-websocket": True,
        "responses": {
            "101": {"description": "switching protocols (a WebSocket upgrade)"},
            "403": err("upgrade refused: foreign Host or Origin"),
            "421": err("misdirected request: foreign Host (plain HTTP)"),
            "426": err("not a WebSocket upgrade"),
        },
    },
}


# ----------------------------------------------------------------------------- credentials (SPEC §12)

_LABEL = {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,128}$"}
_PLACEHOLDER = {"type": "string", "pattern": r"^greyproxy:credential:v1:[A-Za-z0-9._-]{1,128}:[0-9a-f]{32}$"}
_HOSTS = {
    "type": "array",
    "maxItems": 50,
    "items": STR,
    "description": "destination patterns (SPEC §2.2) the credential may be sent to; [] = unbound",
}
_KEY_UNUSABLE = "the credential key (session.key) exists but cannot be used"
SCHEMAS.update(
    {
        "SessionInput": obj(
            {
                "session_id": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,128}$", "not": {"const": "global"}},
                "container_name": {"type": "string", "minLength": 1, "maxLength": 256},
                "mappings": {
                    "type": "object",
                    "maxProperties": 100,
                    "propertyNames": _PLACEHOLDER,
                    "additionalProperties": {"type": "string", "minLength": 1},
                    "description": "placeholder → value (never returned, never logged)",
                },
                "labels": {"type": "object", "description": "placeholder → label; keys not in mappings are ignored"},
                "hosts": {"type": "object", "additionalProperties": _HOSTS, "description": "placeholder → patterns"},
                "metadata": {"type": "object", "maxProperties": 50, "additionalProperties": {"type": "string"}},
                "ttl_seconds": {"type": "integer", "description": "absent or <= 0: 900; capped at 3600"},
                "global_credentials": {"type": "array", "items": STR, "description": "labels of global credentials"},
            },
            required=["session_id", "container_name"],
            description="SPEC §12.2: at least one of mappings, global_credentials",
        ),
        "SessionCreated": obj(
            {
                "session_id": STR,
                "expires_at": TS,
                "ttl_seconds": INT,
                "credential_count": INT,
                "global_credentials": {"type": "object", "additionalProperties": STR},
            }
        ),
        "Session": obj(
            {
                "session_id": STR,
                "container_name": STR,
                "credential_count": INT,
                "credential_labels": {"type": "array", "items": STR},
                "credentials": {
                    "type": "array",
                    "items": obj(
                        {
                            "label": STR,
                            "scope": {"type": "string", "enum": ["session", "global"]},
                            "hosts": {"type": "array", "items": STR},
                        }
                    ),
                },
                "metadata": {"type": "object", "additionalProperties": STR},
                "ttl_seconds": INT,
                "created_at": TS,
                "expires_at": TS,
                "last_heartbeat": TS,
                "substitution_count": INT,
            },
            description="SPEC §12.2: labels and hosts, never a placeholder or a value",
        ),
        "SessionHeartbeat": obj({"session_id": STR, "expires_at": TS}),
        "SessionDeleted": obj({"session_id": STR, "deleted": BOOL}),
        "CredentialInput": obj(
            {"label": _LABEL, "value": {"type": "string", "minLength": 1, "maxLength": 8192}, "hosts": _HOSTS},
            required=["label", "value"],
        ),
        "Credential": obj(
            {
                "id": {"type": "string", "pattern": r"^cred_[0-9a-f]{16}$"},
                "label": STR,
                "placeholder": _PLACEHOLDER,
                "value_preview": STR,
                "hosts": {"type": "array", "items": STR},
                "created_at": TS,
                "substitution_count": INT,
                "last_used_at": nullable(TS),
            },
            description="SPEC §12.3: the value itself is never returned",
        ),
        "CredentialDeleted": obj({"id": STR, "deleted": {"type": "boolean", "const": True}}),
    }
)
OPERATIONS.update(
    {
        ("/api/sessions", "GET"): op(
            "Live credential sessions, newest first (an array, as the reference)",
            response("the sessions", array_of("Session")),
            tag="credentials",
        ),
        ("/api/sessions", "POST"): op(
            "Register (or replace) a session: its placeholders substitute when this returns",
            response("the session", ref("SessionCreated")),
            tag="credentials",
            request=body(ref("SessionInput")),
            errors={"409": "a placeholder held by another live session, or too many sessions", "503": _KEY_UNUSABLE},
        ),
        ("/api/sessions/{session_id}", "DELETE"): op(
            "End a session: its placeholders are refused when this returns",
            response("deleted is false for an unknown id", ref("SessionDeleted")),
            tag="credentials",
        ),
        ("/api/sessions/{session_id}/heartbeat", "POST"): op(
            "Extend a live session by its ttl",
            response("the new expiry", ref("SessionHeartbeat")),
            tag="credentials",
            errors={"404": "session not found or expired"},
        ),
        ("/api/credentials", "GET"): op(
            "Global credentials, newest first (an array, as the reference)",
            response("the credentials", array_of("Credential")),
            tag="credentials",
        ),
        ("/api/credentials", "POST"): op(
            "Store a global credential (encrypted at rest); its placeholder is in the answer",
            response("the credential", ref("Credential")),
            tag="credentials",
            request=body(ref("CredentialInput")),
            errors={"409": "a credential with this label exists", "503": _KEY_UNUSABLE},
        ),
        ("/api/credentials/{cred_id}", "DELETE"): op(
            "Delete a global credential: refused everywhere when this returns",
            response("deleted", ref("CredentialDeleted")),
            tag="credentials",
            errors={"404": "credential not found"},
        ),
    }
)


# ----------------------------------------------------------------------------- the document


def served_operations(app: falcon.asgi.App, prefix: str) -> list[tuple[str, str, dict[str, str]]]:
    """(OpenAPI path relative to prefix, METHOD, {path param: converter}) for every responder served.

    A WebSocket responder counts as GET (the upgrade is a GET request).
    """
    out = []
    for route in falcon.inspect.inspect_routes(app):
        template = route.path
        if prefix and template.startswith(prefix):
            template = template[len(prefix) :]
        converters = {m.group(1): m.group(2) or "" for m in _CONVERTER.finditer(template)}
        path = _CONVERTER.sub(lambda m: "{" + m.group(1) + "}", template)
        methods = {("GET" if m.method == "WEBSOCKET" else m.method) for m in route.methods if not m.internal}
        for method in sorted(methods):
            out.append((path, method, converters))
    return out


def _path_param(name: str, converter: str) -> dict[str, Any]:
    if converter in ("id", "int"):
        return {"name": name, "in": "path", "required": True, "schema": copy.deepcopy(ID), "example": 1}
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def build_document(app: falcon.asgi.App, prefix: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for path, method, converters in served_operations(app, prefix):
        described = OPERATIONS.get((path, method))
        if described is None:
            operation: dict[str, Any] = {
                "summary": "undocumented",
                "x-undocumented": True,
                "responses": {"default": err("see the source")},
            }
        else:
            operation = copy.deepcopy(described)
        if converters:
            operation["parameters"] = [_path_param(n, c) for n, c in converters.items()] + operation.get(
                "parameters", []
            )
            operation["responses"].setdefault("400", err("invalid id (the path holds no integer id)"))
            operation["responses"].setdefault("404", err("no such row"))
        operation["operationId"] = _operation_id(method, path)
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Greyproxy REST API",
            "version": __version__,
            "description": 'Local egress firewall for AI agents. Errors are {"error": "..."}; '
            "only local callers are served (Host and Origin checks, see docs/configuration.md).",
        },
        "servers": [{"url": prefix or "/", "description": "this server (the configured pathPrefix)"}],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": copy.deepcopy(SCHEMAS)},
    }


def _operation_id(method: str, path: str) -> str:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", path.replace("{", "by_").replace("}", "")) if w and w != "api"]
    return method.lower() + "".join(w[:1].upper() + w[1:] for w in words)


class OpenApiResource:
    """Built on first request (by then every provider has added its routes), in a thread: the
    build takes ~0.3 s of Python, which on the loop held up every other request, /ws and the
    heartbeats meanwhile. Requests that come during it wait for the same build."""

    def __init__(self, app: falcon.asgi.App, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        self._data: bytes | None = None
        self._building: asyncio.Future[bytes] | None = None

    def document(self) -> dict[str, Any]:
        return build_document(self.app, self.prefix)

    def _build(self) -> bytes:
        return orjson.dumps(self.document())

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self._data is None:
            if self._building is None:
                self._building = asyncio.get_running_loop().run_in_executor(None, self._build)
            try:
                self._data = await asyncio.shield(self._building)
            except Exception:
                self._building = None  # the next request tries again
                raise
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._data


def install_extensions() -> None:
    """Add the descriptions kept beside their areas (idempotent). Imported here, not at module
    level: openapi_llm builds on this module's helpers, so either may be imported first."""
    from . import openapi_identity  # SPEC §16 routes
    from . import openapi_llm  # SPEC §13 routes: their descriptions live there

    openapi_llm.install()
    openapi_identity.install()


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> OpenApiResource:
    install_extensions()
    resource = OpenApiResource(app, ctx.cfg.path_prefix.rstrip("/"))
    app.add_route(route(DOC_PATH), resource)
    return resource
