"""Dissectors (SPEC §13.2/13.3) on provider-shaped fixtures, and fuzzed: they never raise."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llm_fixtures as F
from greyproxy.llm import dissect as D
from greyproxy.llm import rules as R
from greyproxy.llm.text import cut_bytes, sse_events, tool_summary
from harness.fuzz import examples


def run(r: dict[str, Any], name: str | None = None) -> dict[str, Any] | None:
    t = D.Txn.from_row(r)
    return D.run(name or D.builtin_match(t), t)


def plain(usage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in usage.items() if k != "raw"}


# ------------------------------------------------------------------ anthropic (acceptance 4, 5)


def test_anthropic_sse_text_tool_input_stop_and_usage() -> None:
    body = F.anthropic_sse(
        ["Hello", " world"],
        ("Read", "toolu_9", ['{"file_', 'path": "/home/user/src/main.go"}']),
        stop="tool_use",
        usage_start={
            "input_tokens": 10,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5,
            "output_tokens": 1,
        },
        usage_end={"output_tokens": 42},
    )
    r = F.row(F.ANTHROPIC, F.claude_request([{"role": "user", "content": "hi"}], "You are terse."), body, ts=F.T0)
    ex = run(r)
    assert ex is not None and ex["provider"] == "anthropic" and ex["model"] == "claude-opus-4-6"
    assert ex["response"]["text"] == "Hello world"
    call = ex["response"]["tool_calls"][0]
    assert call["tool"] == "Read" and call["tool_use_id"] == "toolu_9"
    assert json.loads(call["input_preview"]) == {"file_path": "/home/user/src/main.go"}  # input_json_delta joined
    assert call["tool_summary"] == "src/main.go"
    assert ex["stop_reason"] == "tool_use"
    # input = input + cache read + cache write; message_delta's output_tokens overrides message_start's.
    assert plain(ex["usage"]) == {
        "input_tokens": 115,
        "output_tokens": 42,
        "cache_read_tokens": 100,
        "cache_write_tokens": 5,
        "reasoning_tokens": None,
    }
    assert ex["usage"]["raw"]["output_tokens"] == 42
    assert ex["system"] == [{"type": "text", "text": "You are terse."}]  # a string system is accepted


def test_anthropic_json_response() -> None:
    r = F.row(
        F.ANTHROPIC,
        F.claude_request([{"role": "user", "content": "hi"}], F.MAIN_SYSTEM),
        F.anthropic_json("Hello world", ("Read", "toolu_9", {"file_path": "/home/user/src/main.go"}), stop="tool_use"),
        ts=F.T0,
        resp_ct="application/json",
    )
    ex = run(r)
    assert ex["response"]["text"] == "Hello world" and ex["stop_reason"] == "tool_use"
    assert ex["response"]["tool_calls"][0]["tool_summary"] == "src/main.go"
    assert plain(ex["usage"]) == {
        "input_tokens": 50112,
        "output_tokens": 900,
        "cache_read_tokens": 48000,
        "cache_write_tokens": 2100,
        "reasoning_tokens": None,
    }


@pytest.mark.parametrize("kind", ["legacy", "json", "object"])
def test_anthropic_session_key_forms(kind: str) -> None:
    r = F.row(F.ANTHROPIC, F.claude_request([{"role": "user", "content": "hi"}], "s", user_id=kind), None, ts=F.T0)
    assert run(r)["session_key"] == F.SID


@pytest.mark.parametrize("value", ["", None])
def test_anthropic_empty_user_id_has_no_key(value: Any) -> None:
    r = F.row(F.ANTHROPIC, F.claude_request([{"role": "user", "content": "hi"}], "s", user_id=value), None, ts=F.T0)
    assert run(r)["session_key"] is None


def test_anthropic_header_session_and_redacted_header() -> None:
    body = {"model": "claude-opus-4-6", "messages": [{"role": "user", "content": "hi"}]}
    r = F.row(F.ANTHROPIC, body, None, ts=F.T0, req_headers={"X-Claude-Code-Session-Id": [F.SID]})
    assert run(r)["session_key"] == F.SID
    r = F.row(F.ANTHROPIC, body, None, ts=F.T0, req_headers={"X-Claude-Code-Session-Id": ["[REDACTED]"]})
    assert run(r)["session_key"] is None


def test_anthropic_truncated_body_gives_key_and_model_by_regex() -> None:
    full = F.claude_code_session()[0]
    cut = F.truncated(full, keep=len(full["request_body"]) - 3)  # the cap cut its closing brackets
    ex = run(cut)
    assert ex["message_count"] == 0 and ex["messages"] == []
    assert ex["model"] == "claude-opus-4-6" and ex["session_key"] == F.SID


def test_anthropic_messages_blocks() -> None:
    ex = run(F.claude_code_session()[5])
    roles = [m["role"] for m in ex["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"] and ex["message_count"] == 5
    tool_use = ex["messages"][1]["content"][1]
    assert tool_use == {
        "type": "tool_use",
        "name": "Read",
        "id": "toolu_01",
        "input": '{"file_path":"/home/user/src/main_test.go"}',
        "tool_summary": "src/main_test.go",
    }
    result = ex["messages"][4]["content"][0]
    assert result["type"] == "tool_result" and result["content"] == "Add is called from main.go:12"  # text parts joined
    assert ex["response"]["thinking"] == "The caller passes ints; fine."
    assert [t["name"] for t in ex["tools"]] == ["Bash", "Read", "Edit", "Agent", "Grep"]


# ------------------------------------------------------------------ openai Responses (acceptance 7)


def test_responses_parallel_calls_keep_their_own_arguments() -> None:
    ex = run(F.opencode_session()[0])
    calls = ex["response"]["tool_calls"]
    assert [c["tool"] for c in calls] == ["grep", "glob"]
    assert json.loads(calls[0]["input_preview"]) == {"pattern": "load_config", "path": "/src"}
    assert json.loads(calls[1]["input_preview"]) == {"pattern": "**/*.yaml"}
    assert calls[0]["tool_summary"] == "pattern: load_config in src" and calls[1]["tool_summary"] == "**/*.yaml"
    assert ex["stop_reason"] == "completed" and ex["session_key"] == F.OC_PARENT
    assert plain(ex["usage"]) == {
        "input_tokens": 5000,
        "output_tokens": 300,
        "cache_read_tokens": 4096,
        "cache_write_tokens": None,
        "reasoning_tokens": 128,
    }


def test_responses_arguments_by_output_index_and_incomplete_status() -> None:
    body = F.responses_sse_calls([("fc_1", "call_1", "bash", ['{"command":', '"ls"}'])], status="incomplete")
    body = body.replace('"item_id": "fc_1", ', "")  # deltas carrying only output_index
    r = F.row(F.OPENAI_RESPONSES, {"model": "gpt-5", "input": "hi"}, body, ts=F.T0)
    ex = run(r)
    assert json.loads(ex["response"]["tool_calls"][0]["input_preview"]) == {"command": "ls"}
    assert ex["stop_reason"] == "max_output_tokens"


def test_responses_request_items() -> None:
    ex = run(F.opencode_session()[3])
    assert ex["system"][0]["text"].startswith("You are opencode")  # role system → system
    msgs = ex["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert [b["id"] for b in msgs[1]["content"]] == ["call_a", "call_b"]  # both calls on one assistant message
    assert [b["tool_use_id"] for b in msgs[2]["content"]] == ["call_a", "call_b"]
    assert ex["response"]["text"] == "The config is loaded in src/config.py by load_config()."


def test_responses_session_header_fallback() -> None:
    r = F.row(
        F.OPENAI_RESPONSES,
        {"model": "gpt-5", "input": [{"role": "developer", "content": "be brief"}]},
        None,
        ts=F.T0,
        req_headers={"session_id": ["abc-123"]},
    )
    ex = run(r)
    assert ex["session_key"] == "abc-123" and ex["system"] == [{"type": "text", "text": "be brief"}]


def test_responses_json() -> None:
    resp = json.dumps(
        {
            "id": "resp_1",
            "object": "response",
            "status": "completed",
            "model": "gpt-5",
            "output": [
                {"type": "function_call", "call_id": "c1", "name": "read", "arguments": '{"filePath":"/a/b/c.py"}'},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            ],
            "usage": {"input_tokens": 9, "output_tokens": 3},
        }
    )
    r = F.row(F.OPENAI_RESPONSES, {"model": "gpt-5", "input": "hi"}, resp, ts=F.T0, resp_ct="application/json")
    ex = run(r)
    assert ex["response"]["text"] == "ok" and ex["response"]["tool_calls"][0]["tool_summary"] == "b/c.py"
    assert ex["usage"]["input_tokens"] == 9 and ex["stop_reason"] == "completed"


# ------------------------------------------------------------------ openai-chat (acceptance 7)


def test_chat_stream_with_include_usage_and_parallel_calls() -> None:
    ex = run(F.local_chat_session()[0], "openai-chat")
    calls = ex["response"]["tool_calls"]
    assert [(c["tool"], json.loads(c["input_preview"])) for c in calls] == [
        ("read_file", {"path": "README.md"}),
        ("run", {"cmd": "ls"}),
    ]
    assert ex["stop_reason"] == "tool_calls"
    assert plain(ex["usage"]) == {
        "input_tokens": 1500,
        "output_tokens": 40,
        "cache_read_tokens": 1024,
        "cache_write_tokens": None,
        "reasoning_tokens": 0,
    }
    assert ex["system"][0]["text"] == F.LONG_SYSTEM and ex["model"] == "qwen2.5-coder:32b"


def test_chat_json_and_tool_messages() -> None:
    ex = run(F.local_chat_session()[1], "openai-chat")
    assert ex["response"]["text"] == "The README has a title only." and ex["stop_reason"] == "stop"
    assert ex["usage"]["input_tokens"] == 1600 and ex["usage"]["output_tokens"] == 12
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant", "user"]
    assert [b["tool_use_id"] for b in ex["messages"][2]["content"]] == ["call_1", "call_2"]


def test_chat_builtin_match_openrouter_and_reasoning() -> None:
    r = F.row(
        "https://openrouter.ai/api/v1/chat/completions",
        F.chat_request([{"role": "user", "content": "x"}]),
        F.chat_stream(["ok"], reasoning="thinking hard"),
        ts=F.T0,
    )
    ex = run(r)
    assert ex["provider"] == "openai-chat" and ex["response"]["thinking"] == "thinking hard"


# ------------------------------------------------------------------ google-ai (acceptance 7)


def test_gemini_alt_sse_model_from_url_and_usage() -> None:
    ex = run(F.gemini_session()[1])
    assert ex["provider"] == "google-ai" and ex["model"] == "gemini-2.5-pro" and ex["session_key"] is None
    assert ex["response"]["text"] == "There are two Go files: main.go and main_test.go."
    assert ex["stop_reason"] == "STOP"
    assert plain(ex["usage"]) == {
        "input_tokens": 7000,
        "output_tokens": 350,
        "cache_read_tokens": 6000,
        "cache_write_tokens": None,
        "reasoning_tokens": 300,
    }
    msgs = ex["messages"]
    assert msgs[2]["role"] == "assistant" and msgs[2]["content"][0]["tool_summary"] == "List Go files"
    assert msgs[3]["content"][0]["type"] == "tool_result" and msgs[3]["content"][0]["name"] == "run_shell_command"


def test_gemini_signature_only_part_and_json_array() -> None:
    body = {"contents": [{"role": "model", "parts": [{"thoughtSignature": "abc"}]}]}
    resp = json.dumps(
        [
            {"candidates": [{"content": {"parts": [{"text": "a"}]}}]},
            {
                "candidates": [{"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS"}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2},
            },
        ]
    )
    r = F.row(
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        body,
        resp,
        ts=F.T0,
        resp_ct="application/json",
    )
    ex = run(r)
    assert ex["messages"][0]["content"] == [{"type": "thinking", "thinking": "[thinking: opaque signature]"}]
    assert ex["response"]["text"] == "ab" and ex["stop_reason"] == "MAX_TOKENS" and ex["usage"]["output_tokens"] == 2


# ------------------------------------------------------------------ openai-ws (acceptance 8)


def test_host_mismatch_is_not_dissected() -> None:
    r = F.claude_code_session()[0]
    assert run(r) is not None
    assert run(dict(r, host_mismatch=True)) is None and run(dict(r, host_mismatch=False)) is not None


def test_openai_ws_frames() -> None:
    rows = F.codex_ws_session()
    req = run(rows[1])
    assert req["provider"] == "openai" and req["dissector"] == "openai-ws" and req["client_hint"] == "codex"
    assert req["session_key"] == F.CODEX_KEY and req["message_count"] == 2
    resp = run(rows[2])
    assert resp["response"]["text"] == "Hello." and resp["usage"]["input_tokens"] == 3200
    assert resp["stop_reason"] == "completed"
    assert run(rows[4]) is None  # a delta frame: nothing
    tiny = dict(rows[1], request_body='{"a":1}')
    assert run(tiny) is None  # under 10 bytes


# ------------------------------------------------------------------ helpers (acceptance 12)


def test_summaries_and_truncation() -> None:
    assert tool_summary("read", {"file_path": "/home/user/src/main.go"}) == "src/main.go"
    assert tool_summary("grep", {"pattern": "TODO", "path": "/src"}) == "pattern: TODO in src"
    assert cut_bytes("日本語", 4) == "日"
    assert tool_summary("Bash", {"command": "ls -la", "description": "List files"}) == "List files"
    assert tool_summary("exec_command", '{"cmd": ["bash", "-lc", "make test"]}') == "bash -lc make test"
    assert tool_summary("apply_patch", {"input": "*** Begin Patch\n*** Update File: src/app/main.py\n@@"}) == "main.py"
    assert tool_summary("Agent", {"prompt": "p"}) == "p"
    assert tool_summary("WebFetch", {"url": "https://x.y"}) == "https://x.y"
    assert tool_summary("mystery", {"b": "2", "a": "1", "long": "x" * 41, "n": 3}) == "a=1, b=2"
    assert tool_summary("bash", {"command": "y" * 100}) == "y" * 80 + "..."


def test_sse_parsing_rules() -> None:
    body = 'event:a\r\ndata:{"x":1}\r\n\r\nevent: b\ndata: line1\ndata: line2\n\ndata: [DONE]\n\ndata: cut'
    assert sse_events(body) == [("a", '{"x":1}'), ("b", "line1\nline2"), ("", "cut")]


# ------------------------------------------------------------------ endpoint rules (acceptance 2, matching)


def _rule(
    rid: int,
    host: str,
    path: str,
    decoder: str,
    method: str = "POST",
    priority: int = 0,
    user: bool = True,
    enabled: bool = True,
) -> dict[str, Any]:
    return {
        "id": rid,
        "host_pattern": host,
        "path_pattern": path,
        "method": method,
        "decoder_name": decoder,
        "priority": priority,
        "enabled": enabled,
        "user_defined": user,
    }


def test_rule_matching_order_and_globs() -> None:
    t = D.Txn.from_row(F.row("https://api.openai.com/v1/chat/completions?x=1", {}, None, ts=F.T0))
    builtin = _rule(3, "api.openai.com", "/v1/chat/completions", "openai-chat", user=False)
    user = _rule(9, "api.openai.com", "/v1/*/completions", "openai")
    assert R.decoder_for(R.ordered([builtin, user]), t) == "openai"  # same priority: the user rule first
    assert R.decoder_for(R.ordered([builtin, dict(user, enabled=False)]), t) == "openai-chat"
    assert R.decoder_for(R.ordered([dict(builtin, priority=5), user]), t) == "openai-chat"
    local = D.Txn.from_row(F.row(F.LOCAL, {}, None, ts=F.T0))
    assert (
        R.decoder_for([_rule(1, "LiteLLM.local:4000", "/v1/chat/completions", "openai-chat")], local) == "openai-chat"
    )
    assert (
        R.decoder_for([_rule(1, "litellm.local", "/v1/chat/completions", "openai-chat", method="GET")], local) is None
    )
    assert R.decoder_for([_rule(1, "*.local", "/v1/*", "openai-chat", method="*")], local) == "openai-chat"
    assert R.decoder_for([], local) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"host_pattern": "x", "path_pattern": "/a", "decoder_name": "nope"}, "unknown decoder_name: nope"),
        ({"host_pattern": "x", "path_pattern": "a", "decoder_name": "openai"}, "path_pattern must start with /"),
        (
            {"host_pattern": "*", "path_pattern": "/a", "decoder_name": "openai"},
            "host_pattern must not be empty or a bare wildcard",
        ),
        (
            {"host_pattern": "%", "path_pattern": "/a", "decoder_name": "openai"},
            "host_pattern must not be empty or a bare wildcard",
        ),
        (
            {"host_pattern": "", "path_pattern": "/a", "decoder_name": "openai"},
            "host_pattern must not be empty or a bare wildcard",
        ),
        (
            {"host_pattern": "x", "path_pattern": "/a", "decoder_name": "openai", "method": "FOOBAR"},
            "invalid method: FOOBAR; expected a standard HTTP method or *",
        ),
        (
            {"host_pattern": "x", "path_pattern": "/a", "decoder_name": "openai", "method": "WS_REQ"},
            "invalid method: WS_REQ; expected a standard HTTP method or *",
        ),
    ],
)
def test_rule_validation_messages(body: dict[str, Any], message: str) -> None:
    with pytest.raises(R.RuleError, match=f"^{message.replace('*', '[*]')}$"):
        R.validate(body)


def test_rule_validation_accepts() -> None:
    v = R.validate(
        {"host_pattern": "*.example.com", "path_pattern": "/v1/*", "decoder_name": "openai", "method": "post"}
    )
    assert v == {
        "host_pattern": "*.example.com",
        "path_pattern": "/v1/*",
        "method": "POST",
        "decoder_name": "openai",
        "priority": 0,
        "enabled": True,
    }
    assert (
        R.validate({"host_pattern": "h", "path_pattern": "/", "decoder_name": "openai-ws", "method": "ws_resp"})[
            "method"
        ]
        == "WS_RESP"
    )
    assert (
        R.validate({"host_pattern": "h", "path_pattern": "/", "decoder_name": "openai", "method": "*"})["method"] == "*"
    )


# ------------------------------------------------------------------ fuzz: never raise

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "role",
                    "content",
                    "text",
                    "messages",
                    "input",
                    "model",
                    "system",
                    "tools",
                    "delta",
                    "choices",
                    "candidates",
                    "parts",
                    "usage",
                    "response",
                    "output",
                    "metadata",
                    "user_id",
                    "index",
                    "item",
                    "item_id",
                    "output_index",
                    "arguments",
                    "function",
                    "tool_calls",
                    "functionCall",
                    "name",
                    "id",
                    "message",
                    "content_block",
                    "partial_json",
                    "stop_reason",
                    "usageMetadata",
                    "contents",
                    "instructions",
                    "status",
                    "call_id",
                    "output",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


def _body(draw_value: Any) -> str:
    return json.dumps(draw_value)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from([d.name for d in D.DISSECTORS]),
    method=st.sampled_from(["POST", "WS_REQ", "WS_RESP"]),
    req=_json_values | st.text(max_size=200),
    resp=_json_values | st.text(max_size=200),
    sse_mode=st.booleans(),
    headers=st.dictionaries(st.text(max_size=10), st.lists(st.text(max_size=20), max_size=2), max_size=3),
)
def test_dissectors_never_raise(
    name: str, method: str, req: Any, resp: Any, sse_mode: bool, headers: dict[str, list[str]]
) -> None:
    req_text = req if isinstance(req, str) else json.dumps(req)
    if sse_mode:
        items = resp if isinstance(resp, list) else [resp]
        resp_text = "".join(f"event: x\ndata: {json.dumps(i)}\n\n" for i in items)
    else:
        resp_text = resp if isinstance(resp, str) else json.dumps(resp)
    r = F.row(
        "https://api.openai.com/v1/responses?alt=sse",
        req_text,
        resp_text,
        ts=F.T0,
        method=method,
        req_headers=headers,
        resp_ct="text/event-stream" if sse_mode else "application/json",
    )
    t = D.Txn.from_row(r)
    fn = D.BY_NAME[name].fn
    ex = fn(t)  # the bare function, not the guarded run(): a raise here is a bug
    if ex is not None:
        json.dumps(ex)
        assert isinstance(ex["messages"], list) and isinstance(ex["model"], str)


def _fixture_rows() -> list[dict[str, Any]]:
    rows = (
        F.claude_code_session()
        + F.codex_ws_session()
        + F.opencode_session()
        + F.gemini_session()
        + F.local_chat_session()
    )
    return [r for r in rows if r["request_body"] or r["response_body"]]


FIXTURE_ROWS = _fixture_rows()


@st.composite
def mutated(draw: Any, value: Any, depth: int = 0) -> Any:
    """`value` with random subtrees replaced by random JSON (garbage where a provider's shape is)."""
    if draw(st.integers(0, 5)) == 0:
        return draw(_json_values)
    if isinstance(value, dict):
        return {k: draw(mutated(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, list):
        return [draw(mutated(v, depth + 1)) for v in value]
    return value


def _mutate_body(draw: Any, text: str | None) -> str | None:
    if not text:
        return text
    try:
        return json.dumps(draw(mutated(json.loads(text))))
    except json.JSONDecodeError:  # an SSE body: mutate each event's data
        out = []
        for line in text.split("\n"):
            if line.startswith("data: ") and line[6:].startswith("{"):
                line = "data: " + json.dumps(draw(mutated(json.loads(line[6:]))))
            out.append(line)
        return "\n".join(out)


@settings(max_examples=examples(400), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), index=st.integers(0, len(FIXTURE_ROWS) - 1))
def test_dissectors_never_raise_on_mutated_provider_traffic(data: Any, index: int) -> None:
    r = dict(FIXTURE_ROWS[index])
    r["request_body"] = _mutate_body(data.draw, r["request_body"])
    r["response_body"] = _mutate_body(data.draw, r["response_body"])
    t = D.Txn.from_row(r)
    for d in D.DISSECTORS:
        ex = d.fn(t)
        if ex is not None:
            json.dumps(ex)


@settings(max_examples=examples(200), deadline=None)
@given(
    row=st.fixed_dictionaries(
        {},
        optional={
            "id": st.integers() | st.text(),
            "method": st.text() | st.none() | st.integers(),
            "url": st.text() | st.none(),
            "destination_host": st.text() | st.integers(),
            "destination_port": st.integers() | st.text(),
            "request_headers": st.text() | st.integers() | st.none(),
            "request_body": st.text() | st.binary(),
            "response_body": st.text() | st.binary() | st.integers(),
            "timestamp": st.floats(allow_nan=False, allow_infinity=False) | st.none(),
        },
    )
)
def test_txn_from_any_row(row: dict[str, Any]) -> None:
    try:
        t = D.Txn.from_row(row)
    except (TypeError, ValueError):
        return  # id/timestamp not numbers: a stored row never has that
    for d in D.DISSECTORS:
        d.fn(t)
        d.matches(t)
    R.decoder_for([_rule(1, "*x*", "/*", "openai", method="*")], t)


# ------------------------------------------------------------------ bodies that do not parse (cut by the capture cap, invalid)

SCREENSHOT = "iVBORw0KGgoAAAANSUhEUgAA" + "A" * 2_600_000  # a pasted ~2.6 MB base64 PNG


def claude_code_ordered(messages: list[dict[str, Any]], sid: str = F.SID) -> dict[str, Any]:
    """A request body with Claude Code's key order: `messages` before `system`, `tools` and
    `metadata` (so a body cut inside the messages has lost the session key and system prompt)."""
    return {
        "model": "claude-opus-4-6",
        "messages": messages,
        "system": F.MAIN_SYSTEM,
        "tools": [
            {"name": t, "description": f"The {t} tool", "input_schema": {"type": "object"}} for t in ("Bash", "Read")
        ],
        "metadata": {"user_id": F.claude_user_id("legacy", sid)},
        "max_tokens": 32000,
        "stream": True,
    }


def cut_at_capture_cap(r: dict[str, Any]) -> dict[str, Any]:
    """`r` as stored when its request body was over capture.maxBodyBytes: its first bytes only."""
    from greyproxy.capture import DEFAULT_MAX_BODY

    raw = r["request_body"].encode()
    assert len(raw) > DEFAULT_MAX_BODY
    return r | {"request_body": raw[:DEFAULT_MAX_BODY].decode("utf-8", "ignore"), "request_body_size": len(raw)}


def test_a_body_cut_by_the_capture_cap_keeps_model_and_response_and_says_it_did_not_parse() -> None:
    """SPEC §13.2: an unparseable body gives the model (and a session key) by regex, message_count 0;
    the response (small, complete) is dissected as usual. The extraction says the request body did
    not parse (`request_parsed`), so assembly never judges its thread by the system text and tools
    it cannot see."""
    msgs = [
        {"role": "user", "content": "fix the layout"},
        {"role": "assistant", "content": "Let me look at the CSS."},
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": SCREENSHOT}},
                {"type": "text", "text": "why is the button misplaced?"},
            ],
        },
    ]
    full = F.row(F.ANTHROPIC, claude_code_ordered(msgs), F.anthropic_sse(["It is absolutely positioned."]), ts=F.T0)
    whole = run(full)
    assert whole["request_parsed"] is True and whole["message_count"] == 3
    ex = run(cut_at_capture_cap(full))
    assert ex["request_parsed"] is False and ex["message_count"] == 0 and ex["messages"] == []
    assert ex["system"] == [] and ex["tools"] == []
    assert ex["model"] == "claude-opus-4-6"
    assert ex["session_key"] is None  # metadata.user_id came after the cut point
    assert ex["response"]["text"] == "It is absolutely positioned." and ex["stop_reason"] == "end_turn"
    assert ex["usage"]["output_tokens"] == 900
    with_header = cut_at_capture_cap(full) | {"request_headers": {"X-Claude-Code-Session-Id": [F.SID]}}
    assert run(with_header)["session_key"] == F.SID


@pytest.mark.parametrize("which", ["openai-chat", "openai", "google-ai"])
def test_an_invalid_json_body_does_not_parse_and_keeps_the_response(which: str) -> None:
    if which == "openai-chat":
        r = F.local_chat_session()[1]
        name: str | None = "openai-chat"
    elif which == "openai":
        r, name = F.opencode_session()[3], None
    else:
        r, name = F.gemini_session()[1], None
    r = r | {"request_body": r["request_body"][:-1] + ",}"}  # a trailing comma: not JSON
    ex = run(r, name)
    assert ex["request_parsed"] is False and ex["message_count"] == 0
    assert ex["model"] != "unknown" and ex["response"] is not None
