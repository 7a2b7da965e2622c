"""LLM conversation tracking through the real stack (SPEC §13 acceptance).

Agents' traffic goes through the proxy with interception to trustme origins on 127.0.0.2 that
answer like the providers (the fixtures of tests/llm_fixtures.py: each origin answers a request
body with the response recorded for it); endpoint rules map the test origin's paths to the
dissectors. One stack serves the module; each test uses its own containers and session keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson
import pytest
import trustme

import llm_fixtures as F
import harness
from conftest import (
    Stack,
    https_origin,
    intercepting_stack,
    server_context,
    wait_for,
    websocket_origin,
)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

ORIGIN = "127.0.0.2"
RESPONSES: dict[str, tuple[str, str]] = {}  # sha256(request body) -> (content type, response body)
WS_SCRIPT: dict[str, list[str]] = {}  # sha256(WS_REQ payload) -> frames to answer with


def _key(body: str | bytes) -> str:
    return hashlib.sha256(body if isinstance(body, bytes) else body.encode()).hexdigest()


class _Provider(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the response registered for its body (404 when none)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype, text = RESPONSES.get(_key(body), ("application/json", '{"error": "no fixture"}'))
        data = text.encode()
        self.send_response(200 if _key(body) in RESPONSES else 404)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def origin(origin_ca: trustme.CA) -> Iterator[int]:
    with https_origin(origin_ca, ORIGIN, _Provider) as port:
        yield port


@pytest.fixture(scope="module")
def plain_origin() -> Iterator[int]:
    with harness.plain_origin(_Provider, ORIGIN) as port:
        yield port


async def _ws_provider(ws) -> None:  # noqa: ANN001
    async for msg in ws:
        for frame in WS_SCRIPT.get(_key(msg), []):
            await ws.send(frame)


@pytest.fixture(scope="module")
def ws_origin(origin_ca: trustme.CA) -> Iterator[int]:
    with websocket_origin(_ws_provider, ORIGIN, ssl=server_context(origin_ca, ORIGIN)) as port:
        yield port


RULES = [
    ("/v1/messages", "anthropic", "POST"),
    ("/v1/responses", "openai", "POST"),
    ("/v1/chat/completions", "openai-chat", "POST"),
    ("/v1beta/models/*", "google-ai", "POST"),
    ("/v1/responses", "openai-ws", "WS_REQ"),
    ("/v1/responses", "openai-ws", "WS_RESP"),
]


@pytest.fixture(scope="module")
def stack(origin_ca_file: Path) -> Iterator[Stack]:
    with intercepting_stack(None, origin_ca_file, allow=(ORIGIN,)) as s:
        for path, decoder, method in RULES:
            r = s.request(
                "POST",
                "/api/endpoint-rules",
                json={"host_pattern": f"{ORIGIN}:*", "path_pattern": path, "decoder_name": decoder, "method": method},
            )
            assert r.status_code == 201, r.text
        yield s


# ---------------------------------------------------------------- helpers


def _ctx(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.data_dir / "ca-cert.pem"))


def send(stack: Stack, rows: list[dict[str, Any]], container: str, port: int, scheme: str = "https") -> list[float]:
    """Each fixture row as a real request through the proxy (as `container`); returns when each answered."""
    done = []
    proxy = f"http://{container}@127.0.0.1:{stack.ports['http-proxy']}"
    with httpx.Client(proxy=proxy, verify=_ctx(stack), timeout=10, trust_env=False) as client:
        for r in rows:
            u = urlsplit(r["url"])
            body = r["request_body"] or ""
            RESPONSES[_key(body)] = (r["response_content_type"] or "application/json", r["response_body"] or "")
            headers = {k: v[0] for k, v in r["request_headers"].items()} | {"Content-Type": "application/json"}
            url = f"{scheme}://{ORIGIN}:{port}{u.path}" + (f"?{u.query}" if u.query else "")
            resp = client.post(url, content=body.encode(), headers=headers)
            assert resp.status_code == 200, resp.text
            assert resp.text == (r["response_body"] or "")
            done.append(time.monotonic())
    return done


def conversation(stack: Stack, cid: str, timeout: float = 5.0, pred: Any = None) -> dict[str, Any]:
    def get() -> dict[str, Any] | None:
        r = stack.get(f"/api/conversations/{cid}")
        if r.status_code != 200:
            return None
        body = r.json()
        return body if pred is None or pred(body) else None

    return wait_for(get, timeout, interval=0.05, message=f"conversation {cid}")


def txns(stack: Stack, container: str) -> list[dict[str, Any]]:
    return stack.get("/api/transactions", params={"container": container, "limit": 1000}).json()["items"]


# ---------------------------------------------------------------- acceptance 1, 2: REST


def test_fresh_store_is_rebuilt_at_start(stack: Stack) -> None:
    """SPEC §13.1: a stored assembler version below the code's starts the rebuild job by itself."""
    from greyproxy.llm import ASSEMBLER_VERSION

    def rebuilt() -> dict[str, Any] | None:
        status = stack.get("/api/maintenance/status").json()
        job = status["jobs"].get("rebuild-conversations") or {}
        return status if job.get("finished_at") and not job.get("running") else None

    status = wait_for(rebuilt, 15, message="the automatic rebuild")
    assert status["assembler_version_stored"] == status["assembler_version_current"] == ASSEMBLER_VERSION
    assert status["needs_rebuild"] is False and status["jobs"]["rebuild-conversations"]["error"] is None
    assert status["conversations"]["enabled"] is True


def test_dissectors_listed(stack: Stack) -> None:
    r = stack.get("/api/dissectors")
    assert r.status_code == 200
    assert r.json() == {
        "dissectors": [
            {"name": "anthropic", "description": "Anthropic Messages API (/v1/messages)"},
            {"name": "openai", "description": "OpenAI Responses API (/v1/responses)"},
            {"name": "google-ai", "description": "Google Gemini API (/v1beta/models)"},
            {
                "name": "openai-chat",
                "description": "OpenAI Chat Completions API, also used by LiteLLM, Ollama, and "
                "other compatible endpoints",
            },
            {"name": "openai-ws", "description": "OpenAI Responses API over WebSocket (Codex)"},
        ]
    }


def test_endpoint_rules_rest(stack: Stack) -> None:
    rules = stack.get("/api/endpoint-rules").json()["rules"]
    builtins = [
        (r["host_pattern"], r["path_pattern"], r["decoder_name"], r["method"], r["priority"])
        for r in rules
        if not r["user_defined"]
    ]
    assert builtins == [
        ("api.anthropic.com", "/v1/messages", "anthropic", "POST", 0),
        ("api.openai.com", "/v1/responses", "openai", "POST", 0),
        ("api.openai.com", "/v1/chat/completions", "openai-chat", "POST", 0),
        ("openrouter.ai", "/api/v1/chat/completions", "openai-chat", "POST", 0),
        ("generativelanguage.googleapis.com", "/v1beta/models/*", "google-ai", "POST", 0),
    ]
    # User rules of equal priority come before the built-ins.
    assert [r["user_defined"] for r in rules] == sorted((r["user_defined"] for r in rules), reverse=True)

    def post(**body: Any) -> httpx.Response:
        return stack.request("POST", "/api/endpoint-rules", json=body)

    base = {"host_pattern": "*.example.com", "path_pattern": "/v1/*/completions", "decoder_name": "openai-chat"}
    for body, message in [
        (base | {"decoder_name": "nope"}, "unknown decoder_name: nope"),
        (base | {"path_pattern": "v1"}, "path_pattern must start with /"),
        (base | {"host_pattern": "*"}, "host_pattern must not be empty or a bare wildcard"),
        (base | {"host_pattern": ""}, "host_pattern must not be empty or a bare wildcard"),
        (base | {"method": "FOOBAR"}, "invalid method: FOOBAR; expected a standard HTTP method or *"),
    ]:
        r = post(**body)
        assert (r.status_code, r.json()) == (400, {"error": message}), body
    r = post(**base, method="post", enabled=False)
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["method"] == "POST" and rule["enabled"] is False and rule["user_defined"] is True
    assert post(**base).status_code == 409  # same host, path and method
    star = post(**base | {"host_pattern": "star.example.com"}, method="*")
    assert star.status_code == 201 and star.json()["method"] == "*"
    listed = stack.get("/api/endpoint-rules").json()["rules"]
    assert any(r["id"] == rule["id"] and r["enabled"] is False for r in listed)  # disabled rules listed
    builtin_id = next(r["id"] for r in listed if not r["user_defined"])
    r = stack.request("PUT", f"/api/endpoint-rules/{builtin_id}", json=base)
    assert (r.status_code, r.json()) == (400, {"error": "cannot modify built-in rule"})
    r = stack.request("DELETE", f"/api/endpoint-rules/{builtin_id}")
    assert (r.status_code, r.json()) == (400, {"error": "cannot delete built-in rule"})
    for method in ("PUT", "DELETE"):
        r = stack.request(method, "/api/endpoint-rules/999999", json=base)
        assert (r.status_code, r.json()) == (404, {"error": "rule not found"})
    r = stack.request("PUT", f"/api/endpoint-rules/{rule['id']}", json=base | {"priority": 3, "enabled": True})
    assert (r.status_code, r.json()) == (200, {"ok": True})
    assert stack.request("DELETE", f"/api/endpoint-rules/{rule['id']}").json() == {"ok": True}
    assert stack.request("DELETE", f"/api/endpoint-rules/{star.json()['id']}").json() == {"ok": True}


# ---------------------------------------------------------------- acceptance 3: a rule, plain HTTP, within 2 s


def test_rule_maps_a_self_hosted_endpoint_plain_http(stack: Stack, plain_origin: int) -> None:
    r = stack.request(
        "POST",
        "/api/endpoint-rules",
        json={
            "host_pattern": f"{ORIGIN}:{plain_origin}",
            "path_pattern": "/v1/chat/completions",
            "decoder_name": "openai-chat",
        },
    )
    assert r.status_code == 201
    rows = F.local_chat_session(container="litellm")
    done = send(stack, rows[:1], "litellm", plain_origin, scheme="http")
    tid = wait_for(lambda: [t["id"] for t in txns(stack, "litellm")], 5, message="the recorded request")[0]
    conv = conversation(stack, f"session_inferred_{tid}", timeout=5)
    assert time.monotonic() - done[0] < 2.0, "not in its conversation within 2 s"
    assert conv["provider"] == "openai-chat" and conv["client_name"] == "generic" and conv["turn_count"] == 1
    assert stack.get(f"/api/transactions/{tid}").json()["conversation_id"] == conv["id"]


# ---------------------------------------------------------------- acceptance 4, 7, 9, 10


def test_claude_code_session_through_the_proxy(stack: Stack, origin: int) -> None:
    sid = str(uuid.uuid4())
    rows = F.claude_code_session(sid=sid)
    done = send(stack, rows, "claude", origin)
    main_id = f"session_{sid}"
    sub_id = f"{main_id}/subagent_2000_1"
    main = conversation(stack, main_id, pred=lambda c: c["metadata"]["total_requests"] == 3)
    assert time.monotonic() - done[-1] < 2.5
    ids = sorted(
        t["id"]
        for t in txns(stack, "claude")
        if sid in (stack.get(f"/api/transactions/{t['id']}").json()["request_body"] or "")
    )
    assert len(ids) == 6
    # Acceptance 4: the SSE response as the transaction's llm view.
    llm = stack.get(f"/api/transactions/{ids[0]}").json()["llm"]
    assert llm["dissector"] == "anthropic" and llm["provider"] == "anthropic" and llm["stop_reason"] == "tool_use"
    assert llm["response"]["text"] == "Let me look at the test."
    assert llm["response"]["tool_calls"][0]["tool_summary"] == "src/main_test.go"
    assert llm["usage"]["input_tokens"] == 50112 and llm["usage"]["cache_write_tokens"] == 2100
    assert llm["session_key"] == sid
    assert stack.get(f"/api/transactions/{ids[1]}").json()["llm"]["response"]["text"] == "Fix failing test"  # JSON
    # Acceptance 9: subagent linked; id raw and %2F-encoded; /subagents; utility usage in the parent.
    assert main["parent_conversation_id"] is None and main["client_name"] == "claude-code"
    assert [s["conversation_id"] for s in main["linked_subagents"]] == [sub_id]
    agent = [c for t in main["turns"] for s in t["steps"] for c in s.get("tool_calls", []) if c["tool"] == "Agent"]
    assert agent[0]["linked_conversation_id"] == sub_id
    raw = stack.get(f"/api/conversations/{sub_id}")
    encoded = stack.get(f"/api/conversations/{quote(sub_id, safe='')}")
    assert raw.status_code == encoded.status_code == 200 and raw.json()["id"] == encoded.json()["id"] == sub_id
    assert raw.json()["parent_conversation_id"] == main_id
    for path in (f"{main_id}/subagents", quote(f"{main_id}/subagents", safe="")):
        subs = stack.get(f"/api/conversations/{path}").json()
        assert subs["total"] == 1 and subs["items"][0]["id"] == sub_id
    assert stack.get("/api/conversations/session_nope/subagents").status_code == 404
    assert ids[1] not in main["request_ids"] and main["metadata"]["utility_requests"] == 1
    # Acceptance 10: usage = the sum of its requests' llm.usage; turns + utility add up; with subagents.
    usages = {i: stack.get(f"/api/transactions/{i}").json()["llm"]["usage"] for i in ids}
    for field in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
        assert main["usage"][field] == sum(usages[i][field] or 0 for i in (ids[0], ids[1], ids[2], ids[5]))
        turns = sum(t["usage"][field] or 0 for t in main["turns"]) + (usages[ids[1]][field] or 0)
        assert turns == main["usage"][field]
        sub = stack.get(f"/api/conversations/{sub_id}").json()
        assert main["usage_with_subagents"][field] == main["usage"][field] + sub["usage"][field]
    assert main["usage"]["requests"] == 4
    listed = stack.get("/api/conversations", params={"client": "claude-code", "container": "claude"}).json()
    assert main_id in [c["id"] for c in listed["items"]] and sub_id not in [c["id"] for c in listed["items"]]
    assert "turns" not in listed["items"][0] and set(listed["items"][0]) >= {"usage_with_subagents", "metadata"}


def test_a_session_id_sent_only_in_the_header_names_the_conversation(stack: Stack, origin: int) -> None:
    """SPEC §13.2: with no session key in the body, the anthropic dissector takes Claude Code's
    `X-Claude-Code-Session-Id` header. The header goes through the proxy's redaction first (§7
    `*session*`), which stored it as [REDACTED]: the requests joined an inferred conversation."""
    sid = str(uuid.uuid4())
    rows = []
    for r in F.claude_code_session(sid=sid)[:1]:  # the main thread's first request
        body = json.loads(r["request_body"])
        body.pop("metadata", None)
        assert sid not in json.dumps(body)
        rows.append(
            r
            | {
                "request_body": json.dumps(body),
                "request_headers": r["request_headers"] | {"X-Claude-Code-Session-Id": [sid]},
            }
        )
    send(stack, rows, "hdronly", origin)
    main = conversation(stack, f"session_{sid}")
    assert main["metadata"]["total_requests"] == 1 and main["client_name"] == "claude-code"
    stored = stack.get(f"/api/transactions/{main['request_ids'][0]}").json()["request_headers"]
    assert stored["X-Claude-Code-Session-Id"] == [sid] and stored["X-Api-Key"] == ["[REDACTED]"]


def test_responses_chat_and_gemini_through_the_proxy(stack: Stack, origin: int) -> None:
    """Acceptance 7: parallel Responses calls, chat completions usage (stream and JSON), Gemini alt=sse."""
    send(stack, F.opencode_session(), "opencode", origin)
    parent = conversation(stack, f"session_{F.OC_PARENT}", pred=lambda c: c["metadata"]["total_requests"] == 3)
    first = stack.get(f"/api/transactions/{parent['turns'][0]['request_ids'][0]}").json()["llm"]
    calls = first["response"]["tool_calls"]
    assert [json.loads(c["input_preview"]) for c in calls] == [
        {"pattern": "load_config", "path": "/src"},
        {"pattern": "**/*.yaml"},
    ]
    assert parent["linked_subagents"][0]["conversation_id"] == f"session_{F.OC_PARENT}/subagent_1"

    send(stack, F.local_chat_session(container="chat-a"), "chat-a", origin)
    ids = sorted(
        t["id"]
        for t in wait_for(
            lambda: txns(stack, "chat-a") if len(txns(stack, "chat-a")) == 2 else None,
            5,
            message="two chat transactions",
        )
    )
    conv = conversation(stack, f"session_inferred_{ids[0]}", pred=lambda c: c["metadata"]["total_requests"] == 2)
    streamed = stack.get(f"/api/transactions/{ids[0]}").json()["llm"]["usage"]
    plain = stack.get(f"/api/transactions/{ids[1]}").json()["llm"]["usage"]
    assert (streamed["input_tokens"], streamed["cache_read_tokens"], plain["input_tokens"]) == (1500, 1024, 1600)
    assert stack.get(f"/api/transactions/{ids[0]}").json()["llm"]["session_key"] is None  # sessionless
    assert conv["usage"]["input_tokens"] == 3100

    send(stack, F.gemini_session(), "gemini", origin)
    gem = sorted(
        t["id"]
        for t in wait_for(
            lambda: txns(stack, "gemini") if len(txns(stack, "gemini")) == 3 else None,
            5,
            message="three gemini transactions",
        )
    )
    conv = conversation(stack, f"session_inferred_{gem[0]}", pred=lambda c: c["metadata"]["total_requests"] == 2)
    llm = stack.get(f"/api/transactions/{gem[1]}").json()["llm"]
    assert llm["model"] == "gemini-2.5-pro" and llm["usage"]["input_tokens"] == 7000
    assert llm["usage"]["output_tokens"] == 350 and llm["usage"]["reasoning_tokens"] == 300
    assert conv["client_name"] == "gemini-cli" and conv["turns"][0]["user_prompt"] == "list the go files"


# ---------------------------------------------------------------- acceptance 8: Codex over WebSocket


def test_sessionless_history_cut_by_more_than_one_message_is_a_new_conversation(stack: Stack, origin: int) -> None:
    """SPEC §13.5.1 (acceptance 11's grouping): message counts 1, 3, 5, 4, 2, 3 from one client with
    one system text: the fall by 1 stays in the conversation, the fall by 2 starts a new one."""
    c = "shrink-" + uuid.uuid4().hex[:6]
    send(stack, F.shrinking_chat_session(container=c), c, origin)
    ids = sorted(
        t["id"]
        for t in wait_for(
            lambda: txns(stack, c) if len(txns(stack, c)) == len(F.SHRINKING_COUNTS) else None,
            5,
            message="six chat transactions",
        )
    )
    first = conversation(stack, f"session_inferred_{ids[0]}", pred=lambda conv: len(conv["request_ids"]) >= 4)
    second = conversation(stack, f"session_inferred_{ids[4]}", pred=lambda conv: len(conv["request_ids"]) >= 2)
    assert (first["request_ids"], second["request_ids"]) == (ids[:4], ids[4:])
    assert first["container_name"] == second["container_name"] == c
    assert [t["user_prompt"] for t in second["turns"]] == ["list the files", "what does main.py do"]
    listed = stack.get("/api/conversations", params={"container": c}).json()
    assert sorted(x["id"] for x in listed["items"]) == sorted([first["id"], second["id"]])


def test_codex_websocket_session(stack: Stack, ws_origin: int) -> None:
    from websockets.sync.client import connect

    rows = F.codex_ws_session()
    reqs = [r for r in rows if r["method"] == "WS_REQ"]
    WS_SCRIPT[_key(reqs[1]["request_body"])] = [rows[2]["response_body"]]
    WS_SCRIPT[_key(reqs[2]["request_body"])] = [rows[4]["response_body"], rows[5]["response_body"]]
    proxy = f"http://codex:x@127.0.0.1:{stack.ports['http-proxy']}"
    with connect(f"wss://{ORIGIN}:{ws_origin}/v1/responses", ssl=_ctx(stack), proxy=proxy, open_timeout=10) as ws:
        ws.send(reqs[0]["request_body"])
        ws.send(reqs[1]["request_body"])
        assert "Hello." in ws.recv(timeout=5)
        ws.send(reqs[2]["request_body"])
        ws.recv(timeout=5)
        assert "Codex." in ws.recv(timeout=5)
    conv = conversation(
        stack, f"session_{F.CODEX_KEY}", timeout=5, pred=lambda c: c["usage"]["requests_with_usage"] == 2
    )
    assert conv["provider"] == "openai" and conv["client_name"] == "codex"
    assert [[s.get("text") for s in t["steps"]] for t in conv["turns"]] == [["Hello."], ["Codex."]]
    assert conv["usage"]["input_tokens"] == 6500 and conv["usage"]["output_tokens"] == 60
    resp_frame = stack.get(f"/api/transactions/{conv['turns'][1]['request_ids'][-1]}").json()
    assert resp_frame["method"] == "WS_RESP" and resp_frame["llm"]["session_key"] == F.CODEX_KEY
    assert resp_frame["llm"]["response"]["text"] == "Codex." and resp_frame["conversation_id"] == conv["id"]


# ---------------------------------------------------------------- acceptance 15, 16, 14, 17


def _ws(stack: Stack):
    from websockets.sync.client import connect

    c = connect(stack.api.replace("http://", "ws://", 1) + "/ws", open_timeout=5, legacy=True)
    assert orjson.loads(c.recv(timeout=5))["type"] == "connected"
    return c


def _drain(c, until: Any, timeout: float) -> list[dict[str, Any]]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = orjson.loads(c.recv(timeout=max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            break
        seen.append(msg)
        if until(msg):
            return seen
    raise AssertionError(f"not seen within {timeout}s: {[m.get('type') for m in seen][-20:]}")


def test_events_new_then_updated(stack: Stack, origin: int) -> None:
    sid = str(uuid.uuid4())
    rows = F.claude_code_session(sid=sid)
    cid = f"session_{sid}"
    with contextlib.closing(_ws(stack)) as c:
        send(stack, rows[:1], "claude-ev", origin)
        seen = _drain(c, lambda m: m["type"] == "conversation.new" and m["data"]["conversation_id"] == cid, 5)
        new = seen[-1]["data"]
        assert set(new) == {"conversation_id", "parent_conversation_id", "turn_count", "ended_at", "usage"}
        assert new["turn_count"] == 1 and new["usage"]["requests"] == 1
        send(stack, rows[2:3], "claude-ev", origin)
        seen = _drain(c, lambda m: m["type"] == "conversation.updated" and m["data"]["conversation_id"] == cid, 5)
        assert seen[-1]["data"]["usage"]["requests"] == 2


def test_disabled_tracking_then_backlog(stack: Stack, origin: int) -> None:
    assert stack.request("PUT", "/api/settings", json={"conversationsEnabled": False}).status_code == 200
    try:
        sid = str(uuid.uuid4())
        send(stack, F.claude_code_session(sid=sid)[:1], "claude-off", origin)
        wait_for(lambda: txns(stack, "claude-off") or None, 5, message="recording goes on")
        time.sleep(2.5)
        assert stack.get(f"/api/conversations/session_{sid}").status_code == 404
        r = stack.request("POST", "/api/maintenance/rebuild-conversations")
        assert (r.status_code, r.json()) == (409, {"error": "conversation tracking is disabled"})
        status = stack.get("/api/maintenance/status").json()["conversations"]
        assert status["enabled"] is False and status["backlog"] >= 1
    finally:
        assert stack.request("PUT", "/api/settings", json={"conversationsEnabled": True}).status_code == 200
    conversation(stack, f"session_{sid}", timeout=5)


def _insert_bulk(stack: Stack, n_sessions: int) -> None:
    """Many stored LLM transactions written straight into the store (as if recorded earlier)."""
    import llm_db

    conn = sqlite3.connect(str(stack.db_path), timeout=30, isolation_level=None)
    try:
        rows = []
        t0 = time.time() - 3600  # recent: older rows would be pruned (retention) under the test
        for i in range(n_sessions):
            for r in F.local_chat_session(t0 + i, container=f"bulk-{i}", url=f"https://{ORIGIN}:1/v1/chat/completions"):
                rows.append(r)
        conn.execute("BEGIN IMMEDIATE")
        llm_db.insert(conn, rows)
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_rebuild_job(stack: Stack, origin: int) -> None:
    """Acceptance 14 and 16's "none during a rebuild"."""
    send(stack, F.local_chat_session(container="doomed"), "doomed", origin)
    doomed = sorted(
        t["id"]
        for t in wait_for(
            lambda: txns(stack, "doomed") if len(txns(stack, "doomed")) == 2 else None, 5, message="doomed transactions"
        )
    )
    conversation(stack, f"session_inferred_{doomed[0]}", timeout=5)
    _insert_bulk(stack, 1500)
    wait_for(
        lambda: stack.get("/api/conversations", params={"container": "bulk-1499"}).json()["total"] == 1,
        60,
        interval=0.5,
        message="the bulk assembled",
    )
    time.sleep(1.0)  # that pass's events are published once it ends
    conn = sqlite3.connect(str(stack.db_path), timeout=30)
    conn.execute(f"DELETE FROM http_transactions WHERE id IN ({doomed[0]}, {doomed[1]})")
    conn.commit()
    conn.close()
    with contextlib.closing(_ws(stack)) as c:
        r = stack.request("POST", "/api/maintenance/rebuild-conversations")
        assert (r.status_code, r.json()) == (202, {"status": "started", "job": "rebuild-conversations"})
        again = stack.request("POST", "/api/maintenance/rebuild-conversations")
        assert again.status_code == 409
        totals = []
        while True:
            totals.append(stack.get("/api/conversations", params={"limit": 1}).json()["total"])
            if not stack.get("/api/maintenance/status").json()["jobs"]["rebuild-conversations"]["running"]:
                break
            time.sleep(0.05)
        assert min(totals) > 0, "conversations were unreadable during the rebuild"
        seen = _drain(
            c,
            lambda m: (
                m["type"] == "maintenance.progress"
                and m["data"]["job"] == "rebuild-conversations"
                and m["data"]["done"]
            ),
            30,
        )
    progress = [m["data"] for m in seen if m["type"] == "maintenance.progress"]
    assert progress[-1]["processed"] == progress[-1]["total"] >= 3000 and "error" not in progress[-1]
    assert not [m for m in seen if m["type"].startswith("conversation.")], "conversation events during a rebuild"
    assert stack.get(f"/api/conversations/session_inferred_{doomed[0]}").status_code == 404
    status = stack.get("/api/maintenance/status").json()
    assert status["needs_rebuild"] is False and status["assembler_version_stored"] >= 1


def test_maintenance_killed_under_traffic(stack: Stack, origin: int) -> None:
    """Acceptance 17: recording goes on while maintenance is down; after its restart every
    transaction is assembled once."""
    import os
    import signal

    sid = str(uuid.uuid4())
    h = {"user-agent": [F.CLAUDE_UA]}
    rows, msgs = [], []
    for i in range(30):
        msgs = msgs + [{"role": "user", "content": f"step {i}"}]
        rows.append(
            F.row(
                F.ANTHROPIC,
                F.claude_request(list(msgs), F.MAIN_SYSTEM, sid=sid),
                F.anthropic_sse([f"ok {i}"]),
                ts=F.T0,
                req_headers=h,
            )
        )
        msgs = msgs + [{"role": "assistant", "content": f"ok {i}"}]
    pid = stack.pid("maintenance")
    sender = threading.Thread(target=send, args=(stack, rows, "claude-kill", origin))
    sender.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    sender.join(60)
    wait_for(lambda: len(txns(stack, "claude-kill")) == 30, 10, message="30 recorded while maintenance was down")
    wait_for(lambda: (stack.pid("maintenance") or pid) != pid, 30, message="maintenance restarted")
    conv = conversation(stack, f"session_{sid}", timeout=30, pred=lambda c: c["metadata"]["total_requests"] == 30)
    ids = [t["id"] for t in txns(stack, "claude-kill")]
    assert sorted(conv["request_ids"]) == sorted(ids) and len(set(conv["request_ids"])) == 30
    assert conv["turn_count"] == 30


def test_conversation_list_filters(stack: Stack, origin: int) -> None:
    send(stack, F.gemini_session(), "gemini-f", origin)
    wait_for(
        lambda: stack.get("/api/conversations", params={"container": "gemini-f"}).json()["total"] == 1,
        5,
        message="the gemini conversation",
    )

    def ids(**params: Any) -> list[str]:
        r = stack.get("/api/conversations", params=params)
        assert r.status_code == 200, r.text
        return [c["id"] for c in r.json()["items"]]

    (gid,) = ids(container="gemini-f")
    assert gid in ids(provider="google-ai", client="gemini-cli", model="gemini-2.5-pro")
    assert gid not in ids(provider="anthropic")
    assert gid in ids(from_date="2000-01-01T00:00:00Z") and gid not in ids(to_date="2000-01-01T00:00:00Z")
    everything = stack.get("/api/conversations", params={"limit": 500}).json()
    ended = [c["ended_at"] for c in everything["items"]]
    assert ended == sorted(ended, reverse=True) and everything["total"] >= len(everything["items"])
    assert all(c["parent_conversation_id"] is None for c in everything["items"])  # top-level only
    page = stack.get("/api/conversations", params={"limit": 1, "offset": 1}).json()["items"]
    assert page == everything["items"][1:2] or page[0]["id"] == everything["items"][1]["id"]
    for bad in (
        {"limit": 501},
        {"limit": 0},
        {"from_date": "yesterday"},
        {"from_date": "2030-01-01T00:00:00Z", "to_date": "2020-01-01T00:00:00Z"},
    ):
        assert stack.get("/api/conversations", params=bad).status_code == 400, bad
    assert stack.get("/api/conversations/nope").json() == {"error": "not found"}
