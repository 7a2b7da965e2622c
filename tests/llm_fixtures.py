"""Realistic LLM API traffic as stored transactions (SPEC §7 rows), written from the providers'
public API documentation: Claude Code (Anthropic Messages, SSE and JSON), Codex (Responses over
WebSocket), OpenCode (Responses SSE, a `task` subagent), Gemini CLI (generateContent, alt=sse)
and an OpenAI-compatible local server (Chat Completions, streamed with include_usage and JSON).

Each builder returns rows without ids; `number()` gives them ids. Shared by the unit tests, the
incremental = rebuild property test, the stack tests and bench/llm_assembler.py.
"""

from __future__ import annotations

import json
from typing import Any

SID = "9d4a2584-4176-4653-be44-7d5f270feb21"
CLAUDE_UA = "claude-cli/2.0.31 (external, cli)"
T0 = 1_790_000_000.0


def sse(events: list[tuple[str | None, dict[str, Any] | str]]) -> str:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
    return "".join(out)


def row(
    url: str,
    req: Any,
    resp: str | None,
    *,
    ts: float,
    container: str = "claude",
    method: str = "POST",
    req_headers: dict[str, list[str]] | None = None,
    resp_ct: str = "text/event-stream",
    duration: float = 1200.0,
    status: int = 200,
) -> dict[str, Any]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    body = req if isinstance(req, str) or req is None else json.dumps(req)
    return {
        "timestamp": ts,
        "container_name": container,
        "destination_host": u.hostname,
        "destination_port": u.port or (443 if u.scheme in ("https", "wss") else 80),
        "method": method,
        "url": url,
        "request_headers": req_headers or {},
        "request_body": body,
        "request_body_size": len(body or ""),
        "request_content_type": "application/json" if body else None,
        "status_code": status,
        "response_headers": {"content-type": [resp_ct]} if resp else {},
        "response_body": resp,
        "response_body_size": len(resp or ""),
        "response_content_type": resp_ct if resp else None,
        "duration_ms": duration,
        "rule_id": None,
        "result": "allowed",
        "conversation_id": None,
        "substituted_credentials": [],
        "session_id": None,
    }


def number(rows: list[dict[str, Any]], start: int = 1) -> list[dict[str, Any]]:
    for i, r in enumerate(rows, start):
        r["id"] = i
    return rows


# ------------------------------------------------------------------ Anthropic (Claude Code)

ANTHROPIC = "https://api.anthropic.com/v1/messages"


def anthropic_sse(
    text_parts: list[str],
    tool: tuple[str, str, list[str]] | None = None,
    stop: str = "end_turn",
    model: str = "claude-opus-4-6",
    usage_start: dict[str, int] | None = None,
    usage_end: dict[str, int] | None = None,
    thinking: str | None = None,
) -> str:
    start_usage = usage_start or {
        "input_tokens": 12,
        "cache_creation_input_tokens": 2100,
        "cache_read_input_tokens": 48000,
        "output_tokens": 1,
    }
    ev: list[tuple[str | None, Any]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
        )
    ]
    idx = 0
    if thinking:
        ev.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": idx, "content_block": {"type": "thinking", "thinking": ""}},
            )
        )
        ev.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": idx,
                    "delta": {"type": "thinking_delta", "thinking": thinking},
                },
            )
        )
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": idx}))
        idx += 1
    if text_parts:
        ev.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": idx, "content_block": {"type": "text", "text": ""}},
            )
        )
        ev.append(("ping", {"type": "ping"}))
        for part in text_parts:
            ev.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": idx, "delta": {"type": "text_delta", "text": part}},
                )
            )
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": idx}))
        idx += 1
    if tool:
        name, tid, chunks = tool
        ev.append(
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": idx,
                    "content_block": {"type": "tool_use", "id": tid, "name": name, "input": {}},
                },
            )
        )
        for c in chunks:
            ev.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": idx,
                        "delta": {"type": "input_json_delta", "partial_json": c},
                    },
                )
            )
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": idx}))
    ev.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": usage_end or {"output_tokens": 900},
            },
        )
    )
    ev.append(("message_stop", {"type": "message_stop"}))
    return sse(ev)


def anthropic_json(
    text: str,
    tool: tuple[str, str, dict[str, Any]] | None = None,
    stop: str = "end_turn",
    usage: dict[str, int] | None = None,
) -> str:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    if tool:
        content.append({"type": "tool_use", "id": tool[1], "name": tool[0], "input": tool[2]})
    return json.dumps(
        {
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message",
            "role": "assistant",
            "model": "claude-opus-4-6",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage
            or {
                "input_tokens": 12,
                "cache_creation_input_tokens": 2100,
                "cache_read_input_tokens": 48000,
                "output_tokens": 900,
            },
        }
    )


def claude_user_id(kind: str, sid: str = SID) -> Any:
    if kind == "legacy":
        return f"user_4f1c0d3e2b1a09f8e7d6c5b4a3928170_account_0b7c8e1e-1d2a-4f37-9d0a-33c1f1a4b2c9_session_{sid}"
    if kind == "json":
        return json.dumps(
            {
                "device_id": "4f1c0d3e2b1a09f8e7d6",
                "account_uuid": "0b7c8e1e-1d2a-4f37-9d0a-33c1f1a4b2c9",
                "session_id": sid,
            }
        )
    if kind == "object":
        return {"session_id": sid}
    return kind  # "" / None


def claude_request(
    messages: list[dict[str, Any]],
    system: Any,
    *,
    user_id: Any = "legacy",
    model: str = "claude-opus-4-6",
    tools: list[str] = ("Bash", "Read", "Edit", "Agent", "Grep"),
    sid: str = SID,
) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 32000,
        "stream": True,
        "system": system,
        "messages": messages,
        "tools": [{"name": t, "description": f"The {t} tool", "input_schema": {"type": "object"}} for t in tools],
        "metadata": {
            "user_id": claude_user_id(user_id, sid)
            if isinstance(user_id, str) and user_id in ("legacy", "json", "object")
            else user_id
        },
    }


MAIN_SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
    {
        "type": "text",
        "text": "You are an interactive CLI tool. " + "Follow the instructions. " * 480,
        "cache_control": {"type": "ephemeral"},
    },
]
SUB_SYSTEM = "S" * 2000  # a subagent's system prompt: 2 000 bytes


def claude_code_session(t: float = T0, sid: str = SID, container: str = "claude") -> list[dict[str, Any]]:
    """Main thread with a Read call, an Agent call answered by a subagent, and a haiku utility request."""
    h = {"user-agent": [CLAUDE_UA], "x-api-key": ["[REDACTED]"], "anthropic-version": ["2023-06-01"]}
    u1 = {
        "role": "user",
        "content": [
            {"type": "text", "text": "<system-reminder>\nAs you answer, use the context below.\n</system-reminder>"},
            {"type": "text", "text": "fix the failing test"},
        ],
    }
    a1 = {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look at the test."},
            {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "Read",
                "input": {"file_path": "/home/user/src/main_test.go"},
            },
        ],
    }
    r1 = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01",
                "content": "package main\n\nfunc TestAdd(t *testing.T) {}",
            }
        ],
    }
    a2 = {
        "role": "assistant",
        "content": [
            {
                "type": "tool_use",
                "id": "toolu_02",
                "name": "Agent",
                "input": {
                    "description": "Find callers",
                    "prompt": "Find every caller of Add",
                    "subagent_type": "Explore",
                },
            }
        ],
    }
    r2 = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_02",
                "content": [{"type": "text", "text": "Add is called from main.go:12"}],
            }
        ],
    }
    rows = [
        row(
            ANTHROPIC,
            claude_request([u1], MAIN_SYSTEM, sid=sid),
            anthropic_sse(
                ["Let me look ", "at the test."],
                ("Read", "toolu_01", ['{"file_path": ', '"/home/user/src/main_test.go"}']),
                stop="tool_use",
            ),
            ts=t,
            container=container,
            req_headers=h,
        ),
        # Utility: title generation on haiku, tiny system prompt.
        row(
            ANTHROPIC,
            claude_request(
                [{"role": "user", "content": "fix the failing test"}],
                "Summarize this coding conversation in under 50 characters.",
                model="claude-haiku-4-5",
                tools=[],
                sid=sid,
            ),
            anthropic_json("Fix failing test", usage={"input_tokens": 80, "output_tokens": 6}),
            ts=t + 1,
            container=container,
            req_headers=h,
            resp_ct="application/json",
        ),
        row(
            ANTHROPIC,
            claude_request([u1, a1, r1], MAIN_SYSTEM, sid=sid),
            anthropic_sse(
                [],
                ("Agent", "toolu_02", ['{"description": "Find callers", ', '"prompt": "Find every caller of Add"}']),
                stop="tool_use",
            ),
            ts=t + 3,
            container=container,
            req_headers=h,
        ),
        # The subagent: same session, a 2 000-byte system prompt.
        row(
            ANTHROPIC,
            claude_request(
                [{"role": "user", "content": "Find every caller of Add"}], SUB_SYSTEM, tools=["Grep", "Read"], sid=sid
            ),
            anthropic_sse(
                [], ("Grep", "toolu_s1", ['{"pattern": "Add\\\\(", "path": "/home/user/src"}']), stop="tool_use"
            ),
            ts=t + 4,
            container=container,
            req_headers=h,
        ),
        row(
            ANTHROPIC,
            claude_request(
                [
                    {"role": "user", "content": "Find every caller of Add"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "toolu_s1", "name": "Grep", "input": {"pattern": "Add\\("}}
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_s1", "content": "main.go:12: Add(1, 2)"}
                        ],
                    },
                ],
                SUB_SYSTEM,
                tools=["Grep", "Read"],
                sid=sid,
            ),
            anthropic_sse(["Add is called from main.go:12"]),
            ts=t + 6,
            container=container,
            req_headers=h,
        ),
        row(
            ANTHROPIC,
            claude_request([u1, a1, r1, a2, r2], MAIN_SYSTEM, sid=sid),
            anthropic_sse(["The test is fixed."], thinking="The caller passes ints; fine."),
            ts=t + 8,
            container=container,
            req_headers=h,
        ),
    ]
    return rows


# ------------------------------------------------------------------ Codex (Responses over WebSocket)

CODEX_WS = "wss://api.openai.com/v1/responses"
CODEX_KEY = "019a2b3c-4d5e-7f60-8a9b-0c1d2e3f4a5b"
CODEX_TOOLS = [
    {"type": "function", "name": n, "description": f"{n} tool", "parameters": {"type": "object"}}
    for n in ("shell", "apply_patch", "spawn_agent", "wait_agent")
]


def codex_create(input_items: list[dict[str, Any]], prev: str | None = None) -> dict[str, Any]:
    body = {
        "type": "response.create",
        "model": "gpt-5.1-codex",
        "instructions": "You are Codex, based on GPT-5.",
        "input": input_items,
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium"},
        "store": False,
        "stream": True,
        "prompt_cache_key": CODEX_KEY,
        "client_metadata": {"x-codex-turn-metadata": json.dumps({"turn_id": "t1"})},
    }
    if prev:
        body["previous_response_id"] = prev
    return body


def codex_completed(text: str, rid: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "response.completed",
        "sequence_number": 9,
        "response": {
            "id": rid,
            "object": "response",
            "status": "completed",
            "model": "gpt-5.1-codex",
            "output": [
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                },
            ],
            "usage": usage,
        },
    }


def codex_ws_session(t: float = T0, container: str = "codex") -> list[dict[str, Any]]:
    env = {
        "type": "message",
        "role": "user",
        "content": [
            {
                "type": "input_text",
                "text": "<environment_context>\n  <cwd>/home/user/src</cwd>\n  <shell>bash</shell>\n</environment_context>",
            }
        ],
    }
    hello = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    name = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "what's your name"}]}
    u1 = {
        "input_tokens": 3200,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 40,
        "output_tokens_details": {"reasoning_tokens": 30},
        "total_tokens": 3240,
    }
    u2 = {
        "input_tokens": 3300,
        "input_tokens_details": {"cached_tokens": 3072},
        "output_tokens": 20,
        "output_tokens_details": {"reasoning_tokens": 10},
        "total_tokens": 3320,
    }
    ws = dict(container=container, method="WS_REQ", resp_ct="", duration=0)
    return [
        row(CODEX_WS, codex_create([]) | {"generate": False}, None, ts=t, **ws),
        row(CODEX_WS, codex_create([env, hello]), None, ts=t + 1, **ws),
        _ws_resp(codex_completed("Hello.", "resp_1", u1), t + 2, container),
        row(CODEX_WS, codex_create([name], prev="resp_1"), None, ts=t + 5, **ws),
        _ws_resp({"type": "response.output_text.delta", "delta": "Codex."}, t + 6, container),
        _ws_resp(codex_completed("Codex.", "resp_2", u2), t + 6.5, container),
    ]


def _ws_resp(payload: dict[str, Any], ts: float, container: str) -> dict[str, Any]:
    r = row(CODEX_WS, None, None, ts=ts, container=container, method="WS_RESP", duration=0)
    text = json.dumps(payload)
    r.update(
        response_body=text,
        response_body_size=len(text),
        response_content_type=None,
        request_content_type=None,
        status_code=None,
    )
    return r


# ------------------------------------------------------------------ OpenCode (Responses SSE)

OPENAI_RESPONSES = "https://api.openai.com/v1/responses"
OC_PARENT = "ses_5a1b2c3d4e5fAbCdEf012345"
OC_CHILD = "ses_6f7e8d9c0b1aFeDcBa987654"


def responses_sse_calls(
    calls: list[tuple[str, str, str, list[str]]],
    text: str = "",
    usage: dict[str, Any] | None = None,
    status: str = "completed",
) -> str:
    """A Responses stream with parallel function calls: (item_id, call_id, name, argument chunks)."""
    ev: list[tuple[str | None, Any]] = [
        (
            "response.created",
            {"type": "response.created", "response": {"id": "resp_oc", "status": "in_progress", "model": "gpt-5"}},
        )
    ]
    for i, (item_id, call_id, name, _chunks) in enumerate(calls):
        ev.append(
            (
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "output_index": i,
                    "item": {
                        "type": "function_call",
                        "id": item_id,
                        "call_id": call_id,
                        "name": name,
                        "arguments": "",
                        "status": "in_progress",
                    },
                },
            )
        )
    # Interleaved deltas, as parallel calls stream.
    longest = max((len(c[3]) for c in calls), default=0)
    for k in range(longest):
        for i, (item_id, _cid, _n, chunks) in enumerate(calls):
            if k < len(chunks):
                ev.append(
                    (
                        "response.function_call_arguments.delta",
                        {
                            "type": "response.function_call_arguments.delta",
                            "item_id": item_id,
                            "output_index": i,
                            "delta": chunks[k],
                        },
                    )
                )
    for i, (item_id, _cid, _n, chunks) in enumerate(calls):
        ev.append(
            (
                "response.function_call_arguments.done",
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item_id,
                    "output_index": i,
                    "arguments": "".join(chunks),
                },
            )
        )
    if text:
        ev.append(
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "item_id": "msg_x",
                    "output_index": len(calls),
                    "content_index": 0,
                    "delta": text,
                },
            )
        )
    ev.append(
        (
            "response.completed",
            {
                "type": "response.completed",
                "response": {
                    "id": "resp_oc",
                    "status": status,
                    "model": "gpt-5",
                    "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                    "usage": usage
                    or {
                        "input_tokens": 5000,
                        "input_tokens_details": {"cached_tokens": 4096},
                        "output_tokens": 300,
                        "output_tokens_details": {"reasoning_tokens": 128},
                        "total_tokens": 5300,
                    },
                },
            },
        )
    )
    return sse(ev)


OC_TOOLS = [
    {"type": "function", "name": n, "description": f"{n} tool", "parameters": {"type": "object"}, "strict": False}
    for n in ("bash", "read", "edit", "glob", "grep", "task", "todowrite")
]
OC_SUB_TOOLS = [t for t in OC_TOOLS if t["name"] in ("bash", "read", "glob", "grep")]


def opencode_session(t: float = T0, container: str = "opencode") -> list[dict[str, Any]]:
    h = {"user-agent": ["opencode/1.0.35 ai-sdk/provider-utils/3.0.9 runtime/bun/1.3.0"]}
    sysmsg = {"role": "system", "content": "You are opencode, an interactive CLI agent. " * 20}
    u1 = {"role": "user", "content": [{"type": "input_text", "text": "where is the config loaded?"}]}
    c1 = {
        "type": "function_call",
        "call_id": "call_a",
        "name": "grep",
        "arguments": '{"pattern":"load_config","path":"/src"}',
    }
    c2 = {"type": "function_call", "call_id": "call_b", "name": "glob", "arguments": '{"pattern":"**/*.yaml"}'}
    o1 = {"type": "function_call_output", "call_id": "call_a", "output": "src/config.py:10: def load_config"}
    o2 = {"type": "function_call_output", "call_id": "call_b", "output": "config.yaml"}
    c3 = {
        "type": "function_call",
        "call_id": "call_t",
        "name": "task",
        "arguments": '{"description":"Explore config","prompt":"Read the config module","subagent_type":"general"}',
    }
    o3 = {
        "type": "function_call_output",
        "call_id": "call_t",
        "output": f"task_id: {OC_CHILD} (for resuming to continue this task if needed)\n\n<task_result>\nIt is loaded in src/config.py\n</task_result>",
    }

    def req(
        items: list[dict[str, Any]], key: str = OC_PARENT, tools: list[dict[str, Any]] = OC_TOOLS
    ) -> dict[str, Any]:
        return {
            "model": "gpt-5",
            "input": [sysmsg, *items],
            "tools": tools,
            "store": False,
            "stream": True,
            "prompt_cache_key": key,
            "reasoning": {"effort": "medium", "summary": "auto"},
            "include": ["reasoning.encrypted_content"],
        }

    sub_u = {"role": "user", "content": [{"type": "input_text", "text": "Read the config module"}]}
    return [
        row(
            OPENAI_RESPONSES,
            req([u1]),
            responses_sse_calls(
                [
                    ("fc_1", "call_a", "grep", ['{"pattern":', '"load_config",', '"path":"/src"}']),
                    ("fc_2", "call_b", "glob", ['{"pattern":', '"**/*.yaml"}']),
                ]
            ),
            ts=t,
            container=container,
            req_headers=h,
        ),
        row(
            OPENAI_RESPONSES,
            req([u1, c1, c2, o1, o2]),
            responses_sse_calls(
                [
                    (
                        "fc_3",
                        "call_t",
                        "task",
                        [
                            '{"description":"Explore config",',
                            '"prompt":"Read the config module",',
                            '"subagent_type":"general"}',
                        ],
                    )
                ]
            ),
            ts=t + 2,
            container=container,
            req_headers=h,
        ),
        row(
            OPENAI_RESPONSES,
            req([sub_u], key=OC_CHILD, tools=OC_SUB_TOOLS),
            responses_sse_calls([], text="It is loaded in src/config.py"),
            ts=t + 3,
            container=container,
            req_headers=h,
        ),
        row(
            OPENAI_RESPONSES,
            req([u1, c1, c2, o1, o2, c3, o3]),
            responses_sse_calls([], text="The config is loaded in src/config.py by load_config()."),
            ts=t + 6,
            container=container,
            req_headers=h,
        ),
    ]


# ------------------------------------------------------------------ Gemini CLI

GEMINI = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"


def gemini_sse(
    texts: list[str],
    call: tuple[str, dict[str, Any]] | None = None,
    usage: dict[str, int] | None = None,
    finish: str = "STOP",
) -> str:
    ev: list[tuple[str | None, Any]] = []
    for t in texts:
        chunk: dict[str, Any] = {
            "candidates": [{"content": {"role": "model", "parts": [{"text": t}]}, "index": 0}],
            "modelVersion": "gemini-2.5-pro",
        }
        ev.append((None, chunk))
    last: dict[str, Any] = {
        "candidates": [{"content": {"role": "model", "parts": []}, "finishReason": finish, "index": 0}],
        "usageMetadata": usage
        or {
            "promptTokenCount": 7000,
            "candidatesTokenCount": 50,
            "totalTokenCount": 7350,
            "thoughtsTokenCount": 300,
            "cachedContentTokenCount": 6000,
        },
        "modelVersion": "gemini-2.5-pro",
    }
    if call:
        last["candidates"][0]["content"]["parts"].append(
            {"functionCall": {"name": call[0], "args": call[1]}, "thoughtSignature": "CiQB0e2Kb..."}
        )
    ev.append((None, last))
    return sse(ev)


def gemini_session(t: float = T0, container: str = "gemini") -> list[dict[str, Any]]:
    h = {"user-agent": ["GeminiCLI/0.9.0 (linux; x64)"], "x-goog-api-key": ["[REDACTED]"]}
    system = {"parts": [{"text": "You are an interactive CLI agent specializing in software engineering tasks. " * 30}]}
    tools = [
        {
            "functionDeclarations": [
                {"name": n, "description": f"{n} tool", "parameters": {"type": "OBJECT"}}
                for n in ("read_file", "run_shell_command", "search_file_content")
            ]
        }
    ]
    ctx = {
        "role": "user",
        "parts": [{"text": "<session_context>\nThis is the Gemini CLI. Today is Friday.\n</session_context>"}],
    }
    u1 = {"role": "user", "parts": [{"text": "list the go files"}]}
    m1 = {
        "role": "model",
        "parts": [
            {
                "functionCall": {
                    "name": "run_shell_command",
                    "args": {"command": "ls *.go", "description": "List Go files"},
                },
                "thoughtSignature": "CiQB0e2Kb...",
            }
        ],
    }
    f1 = {
        "role": "user",
        "parts": [{"functionResponse": {"name": "run_shell_command", "response": {"output": "main.go\nmain_test.go"}}}],
    }

    def req(contents: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "contents": contents,
            "systemInstruction": system,
            "tools": tools,
            "generationConfig": {"temperature": 0, "thinkingConfig": {"includeThoughts": True}},
        }

    return [
        row(
            GEMINI,
            req([ctx, u1]),
            gemini_sse([], call=("run_shell_command", {"command": "ls *.go", "description": "List Go files"})),
            ts=t,
            container=container,
            req_headers=h,
        ),
        row(
            GEMINI,
            req([ctx, u1, m1, f1]),
            gemini_sse(["There are two Go files: ", "main.go and main_test.go."]),
            ts=t + 2,
            container=container,
            req_headers=h,
        ),
        # Utility: next-speaker check on flash-lite, no session: its own group.
        row(
            GEMINI.replace("gemini-2.5-pro", "gemini-2.5-flash-lite").replace(
                ":streamGenerateContent?alt=sse", ":generateContent"
            ),
            {"contents": [u1], "generationConfig": {"responseMimeType": "application/json"}},
            json.dumps(
                {
                    "candidates": [
                        {
                            "content": {"role": "model", "parts": [{"text": '{"next_speaker":"user"}'}]},
                            "finishReason": "STOP",
                        }
                    ],
                    "usageMetadata": {"promptTokenCount": 300, "candidatesTokenCount": 9, "totalTokenCount": 309},
                }
            ),
            ts=t + 3,
            container=container,
            req_headers=h,
            resp_ct="application/json",
        ),
    ]


# ------------------------------------------------------------------ OpenAI-compatible local server (chat completions)

LOCAL = "http://litellm.local:4000/v1/chat/completions"
CHAT_TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"{n} tool", "parameters": {"type": "object"}}}
    for n in ("read_file", "run")
]
LONG_SYSTEM = "You are a helpful coding agent working in a repository. " * 100


def chat_stream(
    text_parts: list[str],
    calls: list[tuple[str, str, list[str]]] = (),
    finish: str = "stop",
    usage: dict[str, Any] | None = None,
    reasoning: str | None = None,
) -> str:
    ev: list[tuple[str | None, Any]] = []
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1790000000, "model": "qwen2.5-coder:32b"}
    ev.append(
        (None, base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    )
    if reasoning:
        ev.append(
            (None, base | {"choices": [{"index": 0, "delta": {"reasoning_content": reasoning}, "finish_reason": None}]})
        )
    for p in text_parts:
        ev.append((None, base | {"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}))
    for i, (cid, name, chunks) in enumerate(calls):
        ev.append(
            (
                None,
                base
                | {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [
                                    {
                                        "index": i,
                                        "id": cid,
                                        "type": "function",
                                        "function": {"name": name, "arguments": ""},
                                    }
                                ]
                            },
                            "finish_reason": None,
                        }
                    ]
                },
            )
        )
        for c in chunks:
            ev.append(
                (
                    None,
                    base
                    | {
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"tool_calls": [{"index": i, "function": {"arguments": c}}]},
                                "finish_reason": None,
                            }
                        ]
                    },
                )
            )
    ev.append((None, base | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    ev.append(
        (
            None,
            base
            | {
                "choices": [],
                "usage": usage
                or {
                    "prompt_tokens": 1500,
                    "completion_tokens": 40,
                    "total_tokens": 1540,
                    "prompt_tokens_details": {"cached_tokens": 1024},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
            },
        )
    )
    ev.append((None, "[DONE]"))
    return sse(ev)


def chat_json(text: str, finish: str = "stop", calls: list[tuple[str, str, str]] = ()) -> str:
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        msg["tool_calls"] = [
            {"id": c, "type": "function", "function": {"name": n, "arguments": a}} for c, n, a in calls
        ]
    return json.dumps(
        {
            "id": "chatcmpl-2",
            "object": "chat.completion",
            "created": 1790000000,
            "model": "qwen2.5-coder:32b",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1600, "completion_tokens": 12, "total_tokens": 1612},
        }
    )


def chat_request(messages: list[dict[str, Any]], stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "qwen2.5-coder:32b",
        "messages": [{"role": "system", "content": LONG_SYSTEM}, *messages],
        "tools": CHAT_TOOLS,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def local_chat_session(t: float = T0, container: str = "agent", url: str = LOCAL) -> list[dict[str, Any]]:
    u1 = {"role": "user", "content": "read the README"}
    a1 = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path":"README.md"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "run", "arguments": '{"cmd":"ls"}'}},
        ],
    }
    t1 = {"role": "tool", "tool_call_id": "call_1", "content": "# Project"}
    t2 = {"role": "tool", "tool_call_id": "call_2", "content": "README.md"}
    return [
        row(
            url,
            chat_request([u1]),
            chat_stream(
                [],
                [("call_1", "read_file", ['{"path":', '"README.md"}']), ("call_2", "run", ['{"cmd":"ls"}'])],
                finish="tool_calls",
            ),
            ts=t,
            container=container,
        ),
        row(
            url,
            chat_request([u1, a1, t1, t2], stream=False),
            chat_json("The README has a title only."),
            ts=t + 2,
            container=container,
            resp_ct="application/json",
        ),
    ]


def truncated(r: dict[str, Any], keep: int = 120) -> dict[str, Any]:
    """A request body cut by the capture cap."""
    out = dict(r)
    out["request_body"] = (r["request_body"] or "")[:keep]
    return out


# Message counts of shrinking_chat_session's requests: up to 5, down by exactly 1 (the same
# group), then down by 2 (SPEC §13.5.1: a fall by more than 1 starts a new group), then up again.
SHRINKING_COUNTS = (1, 3, 5, 4, 2, 3)


def shrinking_chat_session(t: float = T0, container: str = "agent", url: str = LOCAL) -> list[dict[str, Any]]:
    """Sessionless chat completions (one system text, so one fingerprint), 2 s apart, whose message
    counts are SHRINKING_COUNTS: an agent that trimmed its history once a little and once a lot."""
    turns = [
        {"role": "user", "content": "list the files"},
        {"role": "assistant", "content": "README.md and main.py."},
        {"role": "user", "content": "what does main.py do"},
        {"role": "assistant", "content": "It prints hello."},
        {"role": "user", "content": "make it print goodbye"},
    ]
    return [
        row(
            url,
            chat_request(turns[:n], stream=False),
            chat_json(f"answer {i}"),
            ts=t + 2 * i,
            container=container,
            resp_ct="application/json",
        )
        for i, n in enumerate(SHRINKING_COUNTS)
    ]
