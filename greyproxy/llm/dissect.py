"""Dissectors (SPEC §13.2): one stored transaction in, an extraction (or None) out.

Pure functions, no I/O. They never raise on garbage: `dissect()` turns any unexpected shape into
"nothing" for that part (or no extraction at all), never an exception.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from ..bodies import read_side
from . import usage as U
from .text import (
    INPUT_BYTES,
    PREVIEW_BYTES,
    RESULT_BYTES,
    as_json_text,
    cut_bytes,
    looks_like_sse,
    parse_args,
    sse_json,
    thinking_preview,
    tool_summary,
)

log = logging.getLogger("greyproxy.llm")

Extraction = dict[str, Any]


# ------------------------------------------------------------------ the transaction as dissectors see it


@dataclass
class Txn:
    """The stored fields a dissector reads (a row of http_transactions, headers decoded)."""

    id: int
    method: str
    url: str
    host: str
    port: int | None
    request_headers: dict[str, list[str]]
    response_headers: dict[str, list[str]]
    request_body: str | None
    response_body: str | None
    request_content_type: str | None
    response_content_type: str | None
    container_name: str = ""
    timestamp: float = 0.0
    duration_ms: float | None = None
    status_code: int | None = None
    host_mismatch: bool = False  # the Host header named another host than the one contacted

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Txn:
        def headers(value: Any) -> dict[str, list[str]]:
            if isinstance(value, (str, bytes)):
                try:
                    value = orjson.loads(value)
                except orjson.JSONDecodeError:
                    return {}
            if not isinstance(value, dict):
                return {}
            out: dict[str, list[str]] = {}
            for k, v in value.items():
                vals = v if isinstance(v, list) else [v]
                out[str(k).lower()] = [str(x) for x in vals]
            return out

        def body_text(row: dict[str, Any], side: str) -> str | None:
            stored = read_side(row, side)  # the one read of a stored body (greyproxy.bodies)
            return stored.lossy_text() if stored is not None else None

        def text(value: Any) -> str | None:
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return value if isinstance(value, str) else None

        port = row.get("destination_port")
        return cls(
            id=int(row.get("id") or 0),
            method=str(row.get("method") or "").upper(),
            url=str(row.get("url") or ""),
            host=str(row.get("destination_host") or "").lower(),
            port=port if isinstance(port, int) else None,
            request_headers=headers(row.get("request_headers")),
            response_headers=headers(row.get("response_headers")),
            request_body=body_text(row, "request"),
            response_body=body_text(row, "response"),
            request_content_type=text(row.get("request_content_type")),
            response_content_type=text(row.get("response_content_type")),
            container_name=str(row.get("container_name") or ""),
            timestamp=float(row.get("timestamp") or 0),
            duration_ms=row.get("duration_ms") if isinstance(row.get("duration_ms"), (int, float)) else None,
            status_code=row.get("status_code") if isinstance(row.get("status_code"), int) else None,
            host_mismatch=bool(row.get("host_mismatch")),  # a field of newer records: absent means no
        )

    def header(self, name: str) -> str | None:
        vals = self.request_headers.get(name.lower())
        if not vals:
            return None
        value = vals[0]
        return None if value == "[REDACTED]" else value

    @property
    def path(self) -> str:
        try:
            return urlsplit(self.url).path or "/"
        except ValueError:
            return "/"


# ------------------------------------------------------------------ blocks


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(name: Any, call_id: Any, arguments: Any) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "name": str(name or ""),
        "id": str(call_id or ""),
        "input": cut_bytes(as_json_text(arguments if arguments is not None else {}), INPUT_BYTES),
        "tool_summary": tool_summary(name, arguments),
    }


def tool_result_block(call_id: Any, content: Any, is_error: Any = False, name: str | None = None) -> dict[str, Any]:
    if isinstance(content, list):
        parts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        content = "\n".join(parts)
    elif not isinstance(content, str):
        content = as_json_text(content) if content is not None else ""
    block = {
        "type": "tool_result",
        "tool_use_id": str(call_id or ""),
        "content": cut_bytes(content, RESULT_BYTES),
        "is_error": bool(is_error),
    }
    if name is not None:
        block["name"] = name
    return block


def thinking_block(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": thinking_preview(text)}


def new_response() -> dict[str, Any]:
    return {"text": "", "thinking": "", "tool_calls": []}


def call_of(name: Any, call_id: Any, arguments: Any) -> dict[str, Any]:
    return {
        "tool": str(name or ""),
        "input_preview": cut_bytes(as_json_text(arguments if arguments is not None else ""), PREVIEW_BYTES),
        "tool_summary": tool_summary(name, arguments),
        "tool_use_id": str(call_id or ""),
    }


def finish_response(resp: dict[str, Any] | None) -> dict[str, Any] | None:
    if resp is None:
        return None
    if not resp["text"] and not resp["thinking"] and not resp["tool_calls"]:
        return None
    resp["thinking"] = thinking_preview(resp["thinking"]) if resp["thinking"] else ""
    return resp


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def base_extraction(provider: str, dissector: str) -> Extraction:
    """An empty extraction. `request_parsed` (not in SPEC §13.2's list: the assembler's own) is made
    False by a dissector whose request body is not a JSON object (cut by the capture cap, invalid,
    absent): its system text, tools and messages are then unknown, not empty, and assembly must
    not judge its thread by them (greyproxy/llm/assemble.py, `thread_of`)."""
    return {
        "provider": provider,
        "dissector": dissector,
        "session_key": None,
        "model": "unknown",
        "system": [],
        "tools": [],
        "messages": [],
        "message_count": 0,
        "response": None,
        "stop_reason": None,
        "usage": U.empty(),
        "client_hint": None,
        "request_parsed": True,
    }


def _tools(items: Any, fn_key: str | None = None) -> list[dict[str, Any]]:
    out = []
    for t in _list(items):
        t = _obj(t)
        if fn_key and isinstance(t.get(fn_key), dict):
            t = t[fn_key]
        name = _str(t.get("name"))
        if name:
            out.append({"name": name, "description": _str(t.get("description")) or ""})
    return out


def _system_blocks(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [text_block(value)] if value else []
    out = []
    for b in _list(value):
        if isinstance(b, str):
            out.append(text_block(b))
        elif isinstance(b, dict) and isinstance(b.get("text"), str):
            out.append(text_block(b["text"]))
    return out


# ------------------------------------------------------------------ anthropic

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_SESSION_IN_TEXT = re.compile(r"session_(" + _UUID + ")")
_SESSION_JSON = re.compile(r'"session_id"\s*:\s*"(' + _UUID + ')"')
_SESSION_ESCAPED = re.compile(r'\\"session_id\\"\s*:\s*\\"(' + _UUID + r')\\"')
_MODEL_RE = re.compile(r'"model"\s*:\s*"([^"\\]{1,200})"')


def _anthropic_session(body: Any, raw: str, txn: Txn) -> str | None:
    user_id = _obj(_obj(body).get("metadata")).get("user_id")
    if isinstance(user_id, str) and user_id:
        m = _SESSION_IN_TEXT.search(user_id)
        if m:
            return m.group(1)
        inner = _json(user_id)
        if isinstance(inner, dict) and isinstance(inner.get("session_id"), str) and inner["session_id"]:
            return inner["session_id"]
    elif isinstance(user_id, dict) and isinstance(user_id.get("session_id"), str) and user_id["session_id"]:
        return user_id["session_id"]
    for rx in (_SESSION_IN_TEXT, _SESSION_JSON, _SESSION_ESCAPED):
        m = rx.search(raw)
        if m:
            return m.group(1)
    return txn.header("x-claude-code-session-id")


def _anthropic_content(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [text_block(content)]
    out = []
    for b in _list(content):
        if isinstance(b, str):
            out.append(text_block(b))
            continue
        b = _obj(b)
        kind = _str(b.get("type")) or "unknown"
        if kind == "text":
            out.append(text_block(_str(b.get("text")) or ""))
        elif kind in ("tool_use", "server_tool_use"):
            out.append(tool_use_block(b.get("name"), b.get("id"), b.get("input")))
        elif kind == "tool_result":
            out.append(tool_result_block(b.get("tool_use_id"), b.get("content"), b.get("is_error")))
        elif kind == "thinking":
            out.append(thinking_block(_str(b.get("thinking")) or ""))
        else:
            out.append({"type": kind})
    return out


def dissect_anthropic(txn: Txn) -> Extraction | None:
    ex = base_extraction("anthropic", "anthropic")
    raw = txn.request_body or ""
    body = _json(raw)
    if isinstance(body, dict):
        ex["model"] = _str(body.get("model")) or "unknown"
        ex["system"] = _system_blocks(body.get("system"))
        ex["tools"] = _tools(body.get("tools"))
        for m in _list(body.get("messages")):
            m = _obj(m)
            role = "assistant" if m.get("role") == "assistant" else "user"
            ex["messages"].append({"role": role, "content": _anthropic_content(m.get("content"))})
        ex["message_count"] = len(ex["messages"])
    else:  # cut by the capture cap, or not JSON: the model (and session key) by regex, no messages
        ex["request_parsed"] = False
        m = _MODEL_RE.search(raw)
        if m:
            ex["model"] = m.group(1)
    ex["session_key"] = _anthropic_session(body, raw, txn)
    _anthropic_response(txn, ex)
    return ex


def _anthropic_response(txn: Txn, ex: Extraction) -> None:
    body = txn.response_body
    if not body:
        return
    resp = new_response()
    if looks_like_sse(body, txn.response_content_type):
        blocks: dict[int, dict[str, Any]] = {}
        raw_usage: dict[str, Any] = {}
        for _event, ev in sse_json(body):
            kind = ev.get("type")
            if kind == "message_start":
                msg = _obj(ev.get("message"))
                raw_usage.update(_obj(msg.get("usage")))
                if isinstance(msg.get("model"), str) and ex["model"] == "unknown":
                    ex["model"] = msg["model"]
            elif kind == "content_block_start":
                cb = _obj(ev.get("content_block"))
                idx = ev.get("index")
                if cb.get("type") in ("tool_use", "server_tool_use"):
                    blocks[idx if isinstance(idx, int) else len(blocks)] = {
                        "name": cb.get("name"),
                        "id": cb.get("id"),
                        "json": "",
                        "input": cb.get("input") if cb.get("input") else None,
                    }
                elif cb.get("type") == "text" and isinstance(cb.get("text"), str):
                    resp["text"] += cb["text"]
            elif kind == "content_block_delta":
                d = _obj(ev.get("delta"))
                dt = d.get("type")
                if dt == "text_delta" and isinstance(d.get("text"), str):
                    resp["text"] += d["text"]
                elif dt == "thinking_delta" and isinstance(d.get("thinking"), str):
                    resp["thinking"] += d["thinking"]
                elif dt == "input_json_delta" and isinstance(d.get("partial_json"), str):
                    idx = ev.get("index")
                    blk = blocks.get(idx) if isinstance(idx, int) else None
                    if blk is not None:
                        blk["json"] += d["partial_json"]
            elif kind == "message_delta":
                d = _obj(ev.get("delta"))
                if isinstance(d.get("stop_reason"), str):
                    ex["stop_reason"] = d["stop_reason"]
                for k, v in _obj(ev.get("usage")).items():
                    if v is not None:
                        raw_usage[k] = v
        for _idx, blk in sorted(blocks.items(), key=lambda kv: kv[0] if isinstance(kv[0], int) else 0):
            args = parse_args(blk["json"]) if blk["json"] else (blk["input"] if blk["input"] is not None else {})
            resp["tool_calls"].append(call_of(blk["name"], blk["id"], args))
        if raw_usage:
            ex["usage"] = U.anthropic(raw_usage)
    else:
        obj = _json(body)
        if not isinstance(obj, dict) or obj.get("type") == "error":
            return
        for b in _list(obj.get("content")):
            b = _obj(b)
            if b.get("type") == "text" and isinstance(b.get("text"), str):
                resp["text"] += b["text"]
            elif b.get("type") == "thinking" and isinstance(b.get("thinking"), str):
                resp["thinking"] += b["thinking"]
            elif b.get("type") in ("tool_use", "server_tool_use"):
                resp["tool_calls"].append(call_of(b.get("name"), b.get("id"), b.get("input")))
        if isinstance(obj.get("stop_reason"), str):
            ex["stop_reason"] = obj["stop_reason"]
        if isinstance(obj.get("usage"), dict):
            ex["usage"] = U.anthropic(obj["usage"])
    ex["response"] = finish_response(resp)


# ------------------------------------------------------------------ openai (Responses)


def _joined_text(content: Any, kinds: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for p in _list(content):
        p = _obj(p)
        if p.get("type") in kinds and isinstance(p.get("text"), str):
            parts.append(p["text"])
    return "\n".join(parts)


def _responses_request(body: dict[str, Any], ex: Extraction) -> None:
    ex["model"] = _str(body.get("model")) or "unknown"
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        ex["system"].append(text_block(body["instructions"]))
    ex["tools"] = [t for t in _tools(body.get("tools"))] or _tools(body.get("tools"), "function")
    msgs: list[dict[str, Any]] = ex["messages"]

    def assistant() -> list[dict[str, Any]]:
        if not msgs or msgs[-1]["role"] != "assistant":
            msgs.append({"role": "assistant", "content": []})
        return msgs[-1]["content"]

    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in _list(items):
        item = _obj(item)
        kind = item.get("type")
        role = item.get("role")
        if kind in ("function_call", "custom_tool_call", "local_shell_call"):
            args = item.get("arguments") if kind == "function_call" else item.get("input", item.get("action"))
            assistant().append(
                tool_use_block(
                    item.get("name") or ("shell" if kind == "local_shell_call" else ""),
                    item.get("call_id"),
                    parse_args(args),
                )
            )
        elif kind in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            block = tool_result_block(item.get("call_id"), item.get("output"))
            if msgs and msgs[-1]["role"] == "user" and all(b["type"] == "tool_result" for b in msgs[-1]["content"]):
                msgs[-1]["content"].append(block)
            else:
                msgs.append({"role": "user", "content": [block]})
        elif kind == "reasoning":
            continue
        elif role in ("developer", "system"):
            text = _joined_text(item.get("content"), ("input_text", "text"))
            if text:
                ex["system"].append(text_block(text))
        elif role == "user":
            msgs.append(
                {"role": "user", "content": [text_block(_joined_text(item.get("content"), ("input_text", "text")))]}
            )
        elif role == "assistant" or kind == "message":
            text = _joined_text(item.get("content"), ("output_text", "text", "input_text"))
            if text:
                assistant().append(text_block(text))
    ex["message_count"] = len(msgs)
    ex["session_key"] = _str(body.get("prompt_cache_key")) or None


def _responses_output(response: dict[str, Any], ex: Extraction, resp: dict[str, Any]) -> None:
    """A final Response object: its output items (when not streamed already), status and usage."""
    if not resp["text"] and not resp["tool_calls"]:
        for item in _list(response.get("output")):
            item = _obj(item)
            kind = item.get("type")
            if kind == "message":
                resp["text"] += _joined_text(item.get("content"), ("output_text",))
            elif kind in ("function_call", "custom_tool_call"):
                args = item.get("arguments") if kind == "function_call" else item.get("input")
                resp["tool_calls"].append(call_of(item.get("name"), item.get("call_id"), parse_args(args)))
            elif kind == "reasoning" and not resp["thinking"]:
                resp["thinking"] += "\n".join(_str(_obj(s).get("text")) or "" for s in _list(item.get("summary")))
    status = _str(response.get("status"))
    if status == "incomplete":
        reason = _obj(response.get("incomplete_details")).get("reason")
        ex["stop_reason"] = reason if isinstance(reason, str) else status
    elif status:
        ex["stop_reason"] = status
    if isinstance(response.get("usage"), dict):
        ex["usage"] = U.openai_responses(response["usage"])
    if isinstance(response.get("model"), str) and ex["model"] == "unknown":
        ex["model"] = response["model"]


def _responses_stream(events: list[dict[str, Any]], ex: Extraction) -> dict[str, Any]:
    resp = new_response()
    calls: list[dict[str, Any]] = []
    by_item: dict[str, dict[str, Any]] = {}
    by_index: dict[int, dict[str, Any]] = {}
    final: dict[str, Any] | None = None
    call: dict[str, Any] | None
    for ev in events:
        kind = ev.get("type")
        if kind == "response.output_text.delta" and isinstance(ev.get("delta"), str):
            resp["text"] += ev["delta"]
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta") and isinstance(
            ev.get("delta"), str
        ):
            resp["thinking"] += ev["delta"]
        elif kind == "response.output_item.added":
            item = _obj(ev.get("item"))
            if item.get("type") in ("function_call", "custom_tool_call"):
                call = {
                    "name": item.get("name"),
                    "call_id": item.get("call_id"),
                    "args": _str(item.get("arguments")) or _str(item.get("input")) or "",
                    "done": False,
                }
                calls.append(call)
                if isinstance(item.get("id"), str):
                    by_item[item["id"]] = call
                if isinstance(ev.get("output_index"), int):
                    by_index[ev["output_index"]] = call
        elif kind in (
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.custom_tool_call_input.delta",
            "response.custom_tool_call_input.done",
        ):
            call = by_item.get(ev["item_id"]) if isinstance(ev.get("item_id"), str) else None
            if call is None and isinstance(ev.get("output_index"), int):
                call = by_index.get(ev["output_index"])
            if call is None:
                continue
            if kind.endswith(".done"):
                full = ev.get("arguments", ev.get("input"))
                if isinstance(full, str):
                    call["args"], call["done"] = full, True
            elif not call["done"] and isinstance(ev.get("delta"), str):
                call["args"] += ev["delta"]
        elif kind in ("response.completed", "response.incomplete", "response.failed", "response.done"):
            final = _obj(ev.get("response"))
    for call in calls:
        resp["tool_calls"].append(call_of(call["name"], call["call_id"], parse_args(call["args"])))
    if final is not None:
        _responses_output(final, ex, resp)
    return resp


def dissect_openai(txn: Txn) -> Extraction | None:
    ex = base_extraction("openai", "openai")
    body = _json(txn.request_body)
    if isinstance(body, dict):
        _responses_request(body, ex)
    else:
        ex["request_parsed"] = False
        m = _MODEL_RE.search(txn.request_body or "")
        if m:
            ex["model"] = m.group(1)
    if not ex["session_key"]:
        ex["session_key"] = txn.header("session_id")
    text = txn.response_body
    if text:
        if looks_like_sse(text, txn.response_content_type):
            ex["response"] = finish_response(_responses_stream([e for _n, e in sse_json(text)], ex))
        else:
            obj = _json(text)
            if isinstance(obj, dict) and "output" in obj:
                resp = new_response()
                _responses_output(obj, ex, resp)
                ex["response"] = finish_response(resp)
    return ex


# ------------------------------------------------------------------ openai-ws (Codex)


def dissect_openai_ws(txn: Txn) -> Extraction | None:
    ex = base_extraction("openai", "openai-ws")
    if txn.method == "WS_REQ":
        payload = txn.request_body or ""
        if len(payload.encode("utf-8", "surrogatepass")) < 10:
            return None
        obj = _json(payload)
        if not isinstance(obj, dict) or obj.get("type") != "response.create":
            return None
        body = obj["response"] if isinstance(obj.get("response"), dict) else obj
        _responses_request(body, ex)
        meta = _obj(body.get("client_metadata")) or _obj(obj.get("client_metadata"))
        if "x-codex-turn-metadata" in meta:
            ex["client_hint"] = "codex"
        return ex
    if txn.method == "WS_RESP":
        payload = txn.response_body or ""
        if len(payload.encode("utf-8", "surrogatepass")) < 10:
            return None
        obj = _json(payload)
        if not isinstance(obj, dict) or obj.get("type") != "response.completed":
            return None
        response = _obj(obj.get("response"))
        resp = new_response()
        _responses_output(response, ex, resp)
        ex["response"] = finish_response(resp)
        return ex
    return None


# ------------------------------------------------------------------ openai-chat


def _chat_request(body: dict[str, Any], ex: Extraction) -> None:
    ex["model"] = _str(body.get("model")) or "unknown"
    ex["tools"] = _tools(body.get("tools"), "function")
    msgs: list[dict[str, Any]] = ex["messages"]
    for m in _list(body.get("messages")):
        m = _obj(m)
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            text = _joined_text(content, ("text",))
            if text:
                ex["system"].append(text_block(text))
        elif role == "tool":
            block = tool_result_block(m.get("tool_call_id"), content)
            if msgs and msgs[-1]["role"] == "user" and all(b["type"] == "tool_result" for b in msgs[-1]["content"]):
                msgs[-1]["content"].append(block)
            else:
                msgs.append({"role": "user", "content": [block]})
        elif role == "assistant":
            blocks = []
            for key in ("reasoning_content", "reasoning"):
                if isinstance(m.get(key), str) and m[key]:
                    blocks.append(thinking_block(m[key]))
                    break
            text = _joined_text(content, ("text",))
            if text:
                blocks.append(text_block(text))
            for tc in _list(m.get("tool_calls")):
                tc = _obj(tc)
                fn = _obj(tc.get("function"))
                blocks.append(tool_use_block(fn.get("name"), tc.get("id"), parse_args(fn.get("arguments"))))
            msgs.append({"role": "assistant", "content": blocks})
        else:
            if isinstance(content, list):
                blocks = []
                for p in content:
                    p = _obj(p)
                    if p.get("type") == "text" and isinstance(p.get("text"), str):
                        blocks.append(text_block(p["text"]))
                    elif isinstance(p.get("type"), str):
                        blocks.append({"type": p["type"]})
                msgs.append({"role": "user", "content": blocks})
            else:
                msgs.append({"role": "user", "content": [text_block(content if isinstance(content, str) else "")]})
    ex["message_count"] = len(msgs)
    ex["session_key"] = _str(body.get("prompt_cache_key")) or None


def _chat_stream(chunks: list[dict[str, Any]], ex: Extraction) -> dict[str, Any]:
    resp = new_response()
    calls: dict[int, dict[str, Any]] = {}
    for ch in chunks:
        if isinstance(ch.get("usage"), dict):
            ex["usage"] = U.openai_chat(ch["usage"])
        if isinstance(ch.get("model"), str) and ex["model"] == "unknown":
            ex["model"] = ch["model"]
        choices = _list(ch.get("choices"))
        if not choices:
            continue
        c0 = _obj(choices[0])
        d = _obj(c0.get("delta"))
        if isinstance(d.get("content"), str):
            resp["text"] += d["content"]
        for key in ("reasoning_content", "reasoning"):
            if isinstance(d.get(key), str):
                resp["thinking"] += d[key]
                break
        for tc in _list(d.get("tool_calls")):
            tc = _obj(tc)
            idx = tc["index"] if isinstance(tc.get("index"), int) else len(calls)
            call = calls.setdefault(idx, {"name": "", "id": "", "args": ""})
            fn = _obj(tc.get("function"))
            if isinstance(tc.get("id"), str) and tc["id"]:
                call["id"] = tc["id"]
            if isinstance(fn.get("name"), str) and fn["name"]:
                call["name"] = call["name"] or fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["args"] += fn["arguments"]
        if isinstance(c0.get("finish_reason"), str):
            ex["stop_reason"] = c0["finish_reason"]
    for _i, call in sorted(calls.items()):
        resp["tool_calls"].append(call_of(call["name"], call["id"], parse_args(call["args"])))
    return resp


def _chat_json(obj: dict[str, Any], ex: Extraction) -> dict[str, Any]:
    resp = new_response()
    choices = _list(obj.get("choices"))
    c0 = _obj(choices[0]) if choices else {}
    msg = _obj(c0.get("message"))
    resp["text"] = _joined_text(msg.get("content"), ("text",)) if msg.get("content") is not None else ""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(msg.get(key), str):
            resp["thinking"] = msg[key]
            break
    for tc in _list(msg.get("tool_calls")):
        tc = _obj(tc)
        fn = _obj(tc.get("function"))
        resp["tool_calls"].append(call_of(fn.get("name"), tc.get("id"), parse_args(fn.get("arguments"))))
    if isinstance(c0.get("finish_reason"), str):
        ex["stop_reason"] = c0["finish_reason"]
    if isinstance(obj.get("usage"), dict):
        ex["usage"] = U.openai_chat(obj["usage"])
    if isinstance(obj.get("model"), str) and ex["model"] == "unknown":
        ex["model"] = obj["model"]
    return resp


def dissect_openai_chat(txn: Txn) -> Extraction | None:
    ex = base_extraction("openai-chat", "openai-chat")
    body = _json(txn.request_body)
    stream = False
    if isinstance(body, dict):
        _chat_request(body, ex)
        stream = body.get("stream") is True
    else:
        ex["request_parsed"] = False
        m = _MODEL_RE.search(txn.request_body or "")
        if m:
            ex["model"] = m.group(1)
    text = txn.response_body
    if text:
        if stream or looks_like_sse(text, txn.response_content_type):
            ex["response"] = finish_response(_chat_stream([e for _n, e in sse_json(text)], ex))
        else:
            obj = _json(text)
            if isinstance(obj, dict) and "choices" in obj:
                ex["response"] = finish_response(_chat_json(obj, ex))
    return ex


# ------------------------------------------------------------------ google-ai

_GEMINI_MODEL = re.compile(r"/models/([^/:?]+)")


def _gemini_parts(parts: Any, role: str) -> list[dict[str, Any]]:
    out = []
    for p in _list(parts):
        p = _obj(p)
        if isinstance(p.get("functionCall"), dict):
            fc = p["functionCall"]
            out.append(tool_use_block(fc.get("name"), fc.get("id") or fc.get("name"), fc.get("args") or {}))
        elif isinstance(p.get("functionResponse"), dict):
            fr = p["functionResponse"]
            name = _str(fr.get("name")) or ""
            out.append(tool_result_block(fr.get("id") or name, fr.get("response"), False, name=name))
        elif isinstance(p.get("text"), str):
            out.append(thinking_block(p["text"]) if p.get("thought") is True else text_block(p["text"]))
        elif p.get("thoughtSignature"):
            out.append({"type": "thinking", "thinking": "[thinking: opaque signature]"})
        elif p:
            out.append({"type": next(iter(p))})
    return out


def _gemini_candidate(obj: dict[str, Any], ex: Extraction, resp: dict[str, Any]) -> None:
    cands = _list(obj.get("candidates"))
    if cands:
        c0 = _obj(cands[0])
        for p in _list(_obj(c0.get("content")).get("parts")):
            p = _obj(p)
            if isinstance(p.get("functionCall"), dict):
                fc = p["functionCall"]
                resp["tool_calls"].append(call_of(fc.get("name"), fc.get("id") or fc.get("name"), fc.get("args") or {}))
            elif isinstance(p.get("text"), str):
                if p.get("thought") is True:
                    resp["thinking"] += p["text"]
                else:
                    resp["text"] += p["text"]
        if isinstance(c0.get("finishReason"), str):
            ex["stop_reason"] = c0["finishReason"]
    if isinstance(obj.get("usageMetadata"), dict):
        ex["usage"] = U.google(obj["usageMetadata"])


def dissect_google(txn: Txn) -> Extraction | None:
    ex = base_extraction("google-ai", "google-ai")
    m = _GEMINI_MODEL.search(txn.path)
    if m:
        ex["model"] = m.group(1)
    body = _json(txn.request_body)
    if isinstance(body, dict):
        sysi = body.get("systemInstruction", body.get("system_instruction"))
        for p in _list(_obj(sysi).get("parts")):
            if isinstance(_obj(p).get("text"), str):
                ex["system"].append(text_block(p["text"]))
        for t in _list(body.get("tools")):
            ex["tools"].extend(_tools(_obj(t).get("functionDeclarations", _obj(t).get("function_declarations"))))
        for c in _list(body.get("contents")):
            c = _obj(c)
            role = "assistant" if c.get("role") == "model" else "user"
            ex["messages"].append({"role": role, "content": _gemini_parts(c.get("parts"), role)})
        ex["message_count"] = len(ex["messages"])
    else:
        ex["request_parsed"] = False
    text = txn.response_body
    if text:
        resp = new_response()
        try:
            alt_sse = "sse" in parse_qs(urlsplit(txn.url).query).get("alt", [])
        except ValueError:
            alt_sse = False
        if alt_sse or looks_like_sse(text, txn.response_content_type):
            for _n, chunk in sse_json(text):
                _gemini_candidate(chunk, ex, resp)
        else:
            obj = _json(text)
            for chunk in obj if isinstance(obj, list) else [obj]:  # streamGenerateContent without alt=sse: an array
                if isinstance(chunk, dict):
                    _gemini_candidate(chunk, ex, resp)
        ex["response"] = finish_response(resp)
    return ex


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Dissector:
    name: str
    description: str
    fn: Callable[[Txn], Extraction | None]
    matches: Callable[[Txn], bool]
    # What `matches` implies, for a cheap first look over many stored rows (the assembler's SQL):
    # a matching transaction's host is one of `hosts`, or its URL contains one of `url_has`.
    hosts: tuple[str, ...] = ()
    url_has: tuple[str, ...] = ()


def _url_is(txn: Txn, url: str) -> bool:
    return txn.method == "POST" and txn.url.split("?", 1)[0] == url


def _host_path(txn: Txn) -> tuple[str, str]:
    return txn.host, txn.path


DISSECTORS: tuple[Dissector, ...] = (
    Dissector(
        "anthropic",
        "Anthropic Messages API (/v1/messages)",
        dissect_anthropic,
        lambda t: _url_is(t, "https://api.anthropic.com/v1/messages"),
        url_has=("https://api.anthropic.com/v1/messages",),
    ),
    Dissector(
        "openai",
        "OpenAI Responses API (/v1/responses)",
        dissect_openai,
        lambda t: _url_is(t, "https://api.openai.com/v1/responses"),
        url_has=("https://api.openai.com/v1/responses",),
    ),
    Dissector(
        "google-ai",
        "Google Gemini API (/v1beta/models)",
        dissect_google,
        lambda t: t.method == "POST" and t.host == "generativelanguage.googleapis.com" and "/v1beta/models/" in t.path,
        hosts=("generativelanguage.googleapis.com",),
    ),
    Dissector(
        "openai-chat",
        "OpenAI Chat Completions API, also used by LiteLLM, Ollama, and other compatible endpoints",
        dissect_openai_chat,
        lambda t: (
            t.method == "POST"
            and t.host in ("api.openai.com", "openrouter.ai")
            and t.path.endswith("/chat/completions")
        ),
        hosts=("api.openai.com", "openrouter.ai"),
    ),
    Dissector(
        "openai-ws",
        "OpenAI Responses API over WebSocket (Codex)",
        dissect_openai_ws,
        lambda t: t.method in ("WS_REQ", "WS_RESP") and "api.openai.com" in t.url and "/v1/responses" in t.url,
        url_has=("api.openai.com",),
    ),
)
BY_NAME = {d.name: d for d in DISSECTORS}


def builtin_match(txn: Txn) -> str | None:
    for d in DISSECTORS:
        if d.matches(txn):
            return d.name
    return None


def run(name: str, txn: Txn) -> Extraction | None:
    """Run dissector `name`; any failure on garbage is "no extraction", logged, never raised."""
    d = BY_NAME.get(name)
    if d is None or txn.host_mismatch:
        return None  # unknown dissector, or a request whose Host header does not name the host contacted
    try:
        return d.fn(txn)
    except Exception:  # noqa: BLE001 - a dissector bug must not stop the assembler; the fuzz tests hunt these
        log.exception("dissector %s failed on transaction %s", name, txn.id)
        return None
