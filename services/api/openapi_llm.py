"""OpenAPI descriptions of the LLM conversation routes (SPEC §13), kept apart from openapi.py so
that area stays one small hook: openapi.py imports this module, which adds its schemas and
operations to openapi.SCHEMAS / openapi.OPERATIONS."""

from __future__ import annotations

import copy
from typing import Any

from greyproxy.llm.dissect import DISSECTORS
from greyproxy.llm.rules import HTTP_METHODS, WS_METHODS

from . import openapi as o

USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
_NINT = o.nullable(o.INT)
USAGE = o.obj(
    {**{f: _NINT for f in USAGE_FIELDS}, "raw": o.nullable({"type": "object"})},
    description="SPEC §13.3: one request's usage",
)
USAGE_TOTAL = o.obj(
    {**{f: _NINT for f in USAGE_FIELDS}, "requests": o.INT, "requests_with_usage": o.INT},
    description="SPEC §13.3: summed usage",
)
CALL = o.obj({"tool": o.STR, "input_preview": o.STR, "tool_summary": o.STR, "tool_use_id": o.STR})
RESPONSE = o.nullable(o.obj({"text": o.STR, "thinking": o.STR, "tool_calls": {"type": "array", "items": CALL}}))
DECODER = {"type": "string", "enum": [d.name for d in DISSECTORS]}

ITEM_PROPS: dict[str, Any] = {
    "id": o.STR,
    "model": o.STR,
    "container_name": o.STR,
    "provider": o.STR,
    "client_name": o.STR,
    "started_at": o.nullable(o.TS),
    "ended_at": o.nullable(o.TS),
    "updated_at": o.nullable(o.TS),
    "turn_count": o.INT,
    "message_count": o.INT,
    "first_prompt": o.nullable(o.STR),
    "system_prompt_summary": o.nullable(o.STR),
    "parent_conversation_id": o.nullable(o.STR),
    "last_turn_has_response": o.BOOL,
    "last_stop_reason": o.nullable(o.STR),
    "linked_subagents": {
        "type": "array",
        "items": o.obj(
            {
                "conversation_id": o.STR,
                "turn_count": o.INT,
                "started_at": o.nullable(o.TS),
                "ended_at": o.nullable(o.TS),
                "first_prompt": o.nullable(o.STR),
            }
        ),
    },
    "request_ids": {"type": "array", "items": o.INT},
    "incomplete": o.BOOL,
    "incomplete_reason": o.nullable(o.STR),
    "metadata": {"type": "object"},
    "usage": o.ref("UsageTotal"),
    "usage_with_subagents": o.ref("UsageTotal"),
}

SCHEMAS: dict[str, Any] = {
    "Usage": USAGE,
    "UsageTotal": USAGE_TOTAL,
    "Dissectors": o.obj({"dissectors": {"type": "array", "items": o.obj({"name": o.STR, "description": o.STR})}}),
    "EndpointRule": o.obj(
        {
            "id": o.INT,
            "host_pattern": o.STR,
            "path_pattern": o.STR,
            "method": o.STR,
            "decoder_name": o.STR,
            "priority": o.INT,
            "enabled": o.BOOL,
            "user_defined": o.BOOL,
        },
        description="SPEC §13.4",
    ),
    "EndpointRuleInput": o.obj(
        {
            "host_pattern": {
                "type": "string",
                "minLength": 1,
                "maxLength": 1000,
                "description": "a host or host:port glob (`*` only); not empty nor a bare wildcard",
            },
            "path_pattern": {"type": "string", "pattern": "^/", "maxLength": 1000},
            "decoder_name": DECODER,
            "method": o.nullable(
                {
                    "type": "string",
                    "maxLength": 32,
                    "default": "POST",
                    "description": f"* or one of {', '.join(HTTP_METHODS)} (any case; stored upper-cased),"
                    f" or {' / '.join(WS_METHODS)} for openai-ws",
                }
            ),
            "priority": o.nullable({"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000, "default": 0}),
            "enabled": o.nullable({"type": "boolean", "default": True}),
        },
        required=["host_pattern", "path_pattern", "decoder_name"],
        description="POST and PUT (full replacement) of /api/endpoint-rules; WS_REQ/WS_RESP only with openai-ws",
    ),
    "EndpointRuleList": o.obj({"rules": o.array_of("EndpointRule")}),
    "Ok": o.obj({"ok": {"type": "boolean", "const": True}}),
    "Conversation": o.obj(ITEM_PROPS, required=list(ITEM_PROPS), description="SPEC §13.6"),
    "ConversationDetail": o.obj(
        {
            **ITEM_PROPS,
            "system_prompt": o.STR,
            "turns": {
                "type": "array",
                "items": o.obj(
                    {
                        "turn_number": o.INT,
                        "user_prompt": o.STR,
                        "steps": {"type": "array"},
                        "api_calls_in_turn": o.INT,
                        "request_ids": {"type": "array", "items": o.INT},
                        "timestamp": o.nullable(o.TS),
                        "timestamp_end": o.nullable(o.TS),
                        "duration_ms": o.INT,
                        "model": o.nullable(o.STR),
                        "usage": o.ref("UsageTotal"),
                    }
                ),
            },
            "messages": {"type": "array"},
        },
        required=[*ITEM_PROPS, "system_prompt", "turns", "messages"],
    ),
    "ConversationList": o.list_of("Conversation"),
    "TransactionLlm": o.nullable(
        o.obj(
            {
                "dissector": o.STR,
                "provider": o.STR,
                "model": o.STR,
                "session_key": o.nullable(o.STR),
                "stop_reason": o.nullable(o.STR),
                "usage": USAGE,
                "response": RESPONSE,
            }
        )
    ),
}

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/dissectors", "GET"): o.op(
        "The LLM API dissectors (valid decoder_names)",
        o.response("the dissectors", o.ref("Dissectors")),
        tag="conversations",
    ),
    ("/api/endpoint-rules", "GET"): o.op(
        "Endpoint rules in matching order (built-ins and disabled ones included)",
        o.response("the rules", o.ref("EndpointRuleList")),
        tag="conversations",
    ),
    ("/api/endpoint-rules", "POST"): o.op(
        "Map a host/path to a dissector",
        o.response("the rule", o.ref("EndpointRule")),
        code="201",
        tag="conversations",
        request=o.body(o.ref("EndpointRuleInput")),
        errors={"409": "a user rule with the same host, path and method exists"},
    ),
    ("/api/endpoint-rules/{rid}", "PUT"): o.op(
        "Replace a user rule",
        o.response("replaced", o.ref("Ok")),
        tag="conversations",
        request=o.body(o.ref("EndpointRuleInput")),
        errors={
            "400": "bad input, or a built-in rule",
            "404": "rule not found",
            "409": "a user rule with the same host, path and method exists",
        },
    ),
    ("/api/endpoint-rules/{rid}", "DELETE"): o.op(
        "Delete a user rule",
        o.response("deleted", o.ref("Ok")),
        tag="conversations",
        errors={"400": "a built-in rule", "404": "rule not found"},
    ),
    ("/api/conversations", "GET"): o.op(
        "Top-level conversations, newest ended first",
        o.response("a page", o.ref("ConversationList")),
        tag="conversations",
        params=[
            o.q("container", o.TEXT, "exact container name"),
            *(o.q(name, o.TEXT) for name in ("model", "provider", "client")),
            o.FROM_DATE,
            o.TO_DATE,
            o.limit(50, 500),
            o.OFFSET,
        ],
    ),
    ("/api/conversations/{cid}", "GET"): o.op(
        "One conversation with its turns and messages; an id ending in /subagents lists its subagents",
        o.response(
            "the conversation, or its subagents", {"anyOf": [o.ref("ConversationDetail"), o.ref("ConversationList")]}
        ),
        tag="conversations",
        errors={"404": "not found"},
    ),
    ("/api/maintenance/rebuild-conversations", "POST"): o.op(
        "Re-derive every conversation from the stored transactions",
        o.response("started", o.ref("JobStarted")),
        code="202",
        tag="maintenance",
        errors={"409": "the job is running already, or conversation tracking is disabled", "503": o.SERVICE_DOWN},
    ),
}


def install() -> None:
    o.SCHEMAS.update(SCHEMAS)
    # Inline (not a $ref): the Transaction schema stays self-contained.
    o.SCHEMAS["Transaction"]["properties"]["llm"] = copy.deepcopy(SCHEMAS["TransactionLlm"])
    o.SCHEMAS["MaintenanceStatus"]["properties"]["conversations"] = o.obj(
        {"enabled": o.BOOL, "last_processed_id": o.INT, "backlog": o.INT}
    )
    o.OPERATIONS.update(OPERATIONS)
