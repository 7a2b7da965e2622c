"""Assembly (SPEC §13.5), the pure part: classifying one request (client, thread, fingerprint),
and turning a session's requests into conversations. No I/O: the maintenance process feeds it
rows and stores what it returns.

A *request* here is a dict (one row of `llm_requests`, its JSON columns decoded):
`{transaction_id, timestamp, duration_ms, container_name, dissector, provider, method, url,
session, client_name, thread, model, message_count, stop_reason, system_len, prompt_count,
has_response, usage}` plus `extraction`, or `_load()` giving it when first needed.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from greyproxy.timeutil import rfc3339

from . import usage as U
from .dissect import Txn
from .text import PREVIEW_BYTES, cut_bytes, joined_thinking_preview

GAP_SECONDS = 300.0
MAIN, SUBAGENT, UTILITY = "main", "subagent", "utility"
# The stored thread of a request whose body did not parse (cut by capture.maxBodyBytes, invalid
# JSON): its thread is found at assembly (`_session_threads`), from the requests before it.
UNPARSED = "unparsed"
ALL_TRUNCATED = "All request bodies truncated; cannot parse messages"
NEWEST_TRUNCATED = "Newest request bodies truncated; messages are from an earlier request"

_CONTAINER_CLIENTS = {
    "claude": "claude-code",
    "codex": "codex",
    "opencode": "opencode",
    "aider": "aider",
    "gemini": "gemini-cli",
}
AGENT_TOOLS = ("Agent", "Task", "task", "spawn_agent", "wait_agent")


def system_text(extraction: dict[str, Any]) -> str:
    return "\n\n---\n\n".join(b.get("text", "") for b in extraction.get("system") or [])


def system_length(extraction: dict[str, Any]) -> int:
    """Bytes of system text (the blocks' texts, separators not counted)."""
    return sum(len(b.get("text", "").encode("utf-8", "surrogatepass")) for b in extraction.get("system") or [])


def fingerprint(extraction: dict[str, Any]) -> str:
    return hashlib.sha256(system_text(extraction)[:200].encode("utf-8", "surrogatepass")).hexdigest()[:16]


def client_name(txn: Txn, extraction: dict[str, Any]) -> str:
    """§13.5.2: container name, then headers, then the dissector's hint, then the provider."""
    c = _CONTAINER_CLIENTS.get(txn.container_name.lower())
    if c:
        return c
    originator = (txn.header("originator") or "").lower()
    if originator.startswith("codex"):
        return "codex"
    ua = txn.header("user-agent") or ""
    if ua.startswith(("claude-cli/", "Claude-Code/")) or "claude-cli/" in ua:
        return "claude-code"
    if "GeminiCLI/" in ua:
        return "gemini-cli"
    if ua.lower().startswith("opencode/"):
        return "opencode"
    title = (txn.header("x-title") or "").strip()
    referer = (txn.header("http-referer") or txn.header("referer") or "").strip()
    if title.lower() == "opencode" or referer.startswith("https://opencode.ai"):
        return "opencode"
    if referer.startswith("https://aider.chat") or title.lower() == "aider":
        return "aider"
    if extraction.get("client_hint"):
        return str(extraction["client_hint"])
    provider = extraction.get("provider")
    if provider == "anthropic":
        return "claude-code"
    if provider == "openai":
        return "opencode"
    return "generic"


def thread_of(client: str, extraction: dict[str, Any]) -> str:
    """§13.5.3: main, subagent or utility (discarded from turns, attributed to the main conversation).

    A request whose body did not parse (e.g. cut by the capture cap after a pasted screenshot) shows
    no system text and no tools: judged by them it was utility, and every later request of that
    conversation dropped out of it. Its thread is UNPARSED instead, resolved at assembly to the
    thread of its session's latest earlier request. Gemini CLI (by the model, known from the URL)
    and aider (always main) do not judge by the body: their rule stands."""
    if extraction.get("request_parsed") is False and client not in ("gemini-cli", "aider"):
        return UNPARSED
    tools = {t.get("name") for t in extraction.get("tools") or []}
    slen = system_length(extraction)
    if client == "claude-code":
        return MAIN if slen > 10_000 else SUBAGENT if slen > 1_000 else UTILITY
    if client == "opencode":
        return MAIN if tools & {"task", "question", "todowrite"} else SUBAGENT if tools else UTILITY
    if client == "codex":
        if tools & {"spawn_agent", "wait_agent", "resume_agent", "close_agent"}:
            return MAIN
        return SUBAGENT if tools else UTILITY
    if client == "gemini-cli":
        return UTILITY if "flash-lite" in str(extraction.get("model") or "") else MAIN
    if client == "aider":
        return MAIN
    if tools and slen > 5_000:
        return MAIN
    return SUBAGENT if tools else UTILITY


_TASK_REF = re.compile(r"task_id:\s*(ses_[A-Za-z0-9]+)")


def task_refs(raw_body: str | None) -> list[str]:
    """OpenCode child sessions named in a request (`task_id: ses_…` in a task tool's result)."""
    if not raw_body or "task_id" not in raw_body:
        return []
    seen: dict[str, None] = {}
    for m in _TASK_REF.finditer(raw_body):
        seen[m.group(1)] = None
    return list(seen)


# ------------------------------------------------------------------ real prompts

_SCAFFOLD_PREFIXES = {
    "claude-code": (
        "<system-reminder>",
        "<available-deferred-tools>",
        "<local-command-caveat>",
        "<command-name>",
        "<command-message>",
        "<command-args>",
        "<local-command-stdout>",
    ),
    "codex": ("<environment_context>", "<permissions>", "<user_instructions>"),
    "gemini-cli": (
        "<session_context>",
        "<extension_context>",
        "<loaded_context>",
        "extension_context",
        "loaded_context",
    ),
}
_SCAFFOLD_TEXTS = {"claude-code": ("Tool loaded.", "[Request interrupted by user]", "clear")}
# Scaffolding a client wraps in tags, removed before a user message is judged a prompt: the
# opening tag, and what reaches the first closing tag of the same name (none: nothing is removed).
_TAGS = {
    "claude-code": re.compile(
        r"<(command-name|command-message|command-args|local-command-stdout|system-reminder|local-command-caveat)>"
    ),
    "codex": re.compile(r"<(environment_context|permissions)>"),
    "gemini-cli": re.compile(r"<(session_context|extension_context|loaded_context)>"),
}


def _strip_tags(text: str, opening: re.Pattern[str]) -> str:
    """`text` without each `<tag>…</tag>` span `opening` starts, taken left to right with the
    first closing tag: what `re.sub(r"<(tags)>.*?</\\1>", "", text, flags=re.S)` gives, in linear
    time. That regex looks for a closing tag from every unclosed opening one: 16 000 unclosed
    `<system-reminder>` in a message took 26 s (the text is the agent's to choose)."""
    out: list[str] = []
    kept = at = 0  # text[kept:] not yet copied; `at`: where the next opening tag is looked for
    unclosed: set[str] = set()  # names with no closing tag after an opening one: none later either
    while (m := opening.search(text, at)) is not None:
        name = m.group(1)
        end = -1 if name in unclosed else text.find(f"</{name}>", m.end())
        if end < 0:
            unclosed.add(name)
            at = m.start() + 1
            continue
        out.append(text[kept : m.start()])
        kept = at = end + len(name) + 3
    out.append(text[kept:])
    return "".join(out)


def _real_text(text: str, client: str) -> str:
    rx = _TAGS.get(client)
    if rx is not None:
        text = _strip_tags(text, rx)
    t = text.strip()
    if not t:
        return ""
    if t.startswith(_SCAFFOLD_PREFIXES.get(client, ())):
        return ""
    if t in _SCAFFOLD_TEXTS.get(client, ()):
        return ""
    return t


def prompt_of(message: dict[str, Any], client: str) -> str | None:
    """The real prompt a user message carries, or None when it is only scaffolding/tool results."""
    if message.get("role") != "user":
        return None
    texts = []
    for b in message.get("content") or []:
        if b.get("type") == "text" and isinstance(b.get("text"), str):
            t = _real_text(b["text"], client)
            if t:
                texts.append(t)
    return "\n".join(texts) if texts else None


def count_prompts(messages: list[dict[str, Any]], client: str) -> int:
    return sum(1 for m in messages if prompt_of(m, client) is not None)


# ------------------------------------------------------------------ one conversation


def _response_message(response: dict[str, Any]) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    if response.get("thinking"):
        blocks.append({"type": "thinking", "thinking": response["thinking"]})
    if response.get("text"):
        blocks.append({"type": "text", "text": response["text"]})
    for c in response.get("tool_calls") or []:
        blocks.append(
            {
                "type": "tool_use",
                "name": c.get("tool", ""),
                "id": c.get("tool_use_id", ""),
                "input": c.get("input_preview", ""),
                "tool_summary": c.get("tool_summary", ""),
            }
        )
    return {"role": "assistant", "content": blocks}


def _step(message: dict[str, Any]) -> dict[str, Any]:
    step: dict[str, Any] = {"type": "assistant"}
    texts = [b["text"] for b in message["content"] if b.get("type") == "text" and b.get("text")]
    if texts:
        step["text"] = "\n".join(texts)
    thinking = [b["thinking"] for b in message["content"] if b.get("type") == "thinking" and b.get("thinking")]
    if thinking:  # the blocks' texts are previews already: cut once, not again
        step["thinking_preview"] = joined_thinking_preview(thinking)
    calls = [
        {
            "tool": b.get("name", ""),
            "input_preview": cut_bytes(b.get("input", ""), PREVIEW_BYTES),
            "tool_summary": b.get("tool_summary", ""),
            "tool_use_id": b.get("id", ""),
        }
        for b in message["content"]
        if b.get("type") == "tool_use"
    ]
    if calls:
        step["tool_calls"] = calls
    return step


def _ex(req: dict[str, Any]) -> dict[str, Any]:
    """A request's extraction, loaded on first use (only the best request's messages, the newest
    response and WebSocket frames are needed: a long session is not re-parsed whole)."""
    ex = req.get("extraction")
    if ex is None:
        ex = req["extraction"] = req["_load"]()
    return ex


def _order(req: dict[str, Any]) -> tuple[float, int]:
    return (float(req["timestamp"]), int(req["transaction_id"]))


def _iso(ts: float | None) -> str | None:
    return rfc3339(ts) if ts is not None else None


def build_conversation(
    cid: str, reqs: list[dict[str, Any]], utility: list[dict[str, Any]], parent: str | None
) -> dict[str, Any]:
    """One conversation (the detail form, without `updated_at`) from its requests (§13.5.4-6)."""
    reqs = sorted(reqs, key=_order)
    ws = any(str(r["url"]).startswith("wss://") for r in reqs)
    best = None
    for r in reqs:
        if int(r["message_count"] or 0) > 0:
            best = r
    client = (best or reqs[-1])["client_name"]
    model = (best or reqs[-1])["model"] or "unknown"
    provider = (best or reqs[0])["provider"]
    messages: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    req_turn: dict[int, int] = {}
    system_prompt = ""
    if best is not None:
        system_prompt = system_text(_ex(best))
        if ws:
            running = 0
            for r in reqs:
                ex = _ex(r)
                msgs = list(ex.get("messages") or [])
                running += int(r["prompt_count"])
                messages.extend(msgs)
                if ex.get("response"):
                    messages.append(_response_message(ex["response"]))
                if running:
                    req_turn[r["transaction_id"]] = running
        else:
            messages = [dict(m) for m in _ex(best).get("messages") or []]
            for r in reqs:
                n = int(r["prompt_count"])
                if n:
                    req_turn[r["transaction_id"]] = n
        # Turns at each real prompt; assistant messages are their steps; tool results merge into calls.
        calls: dict[str, dict[str, Any]] = {}
        for m in messages:
            prompt = prompt_of(m, client)
            if prompt is not None:
                turns.append({"turn_number": len(turns) + 1, "user_prompt": prompt, "steps": []})
                continue
            if m.get("role") == "assistant" and turns:
                step = _step(m)
                turns[-1]["steps"].append(step)
                for c in step.get("tool_calls", []):
                    if c["tool_use_id"]:
                        calls[c["tool_use_id"]] = c
            elif m.get("role") == "user":
                for b in m.get("content") or []:
                    if b.get("type") == "tool_result":
                        c = calls.get(b.get("tool_use_id", ""))
                        if c is not None:
                            c["result_preview"] = b.get("content", "")
                            c["is_error"] = bool(b.get("is_error"))
        if not ws and turns:
            newest = None
            for r in reqs:
                if r["has_response"]:
                    newest = r
            newest = _ex(newest).get("response") if newest is not None else None
            if newest:
                head = (newest.get("text") or "")[:200]
                dup = any((s.get("text") or "")[:200] == head for s in turns[-1]["steps"]) if head else False
                if not head:
                    ids = {c.get("tool_use_id") for c in newest.get("tool_calls") or []}
                    dup = any(c["tool_use_id"] in ids for s in turns[-1]["steps"] for c in s.get("tool_calls", []))
                if not dup:
                    msg = _response_message(newest)
                    messages.append(msg)
                    turns[-1]["steps"].append(_step(msg))
    # Requests → turns: by the real prompts in their own messages, else the nearest earlier known.
    by_turn: dict[int, list[dict[str, Any]]] = {}
    current = 1
    if turns:
        for r in reqs:
            known = req_turn.get(r["transaction_id"])
            if known:
                current = min(known, len(turns))
            by_turn.setdefault(current, []).append(r)
    for t in turns:
        rs = by_turn.get(t["turn_number"], [])
        t["api_calls_in_turn"] = len(rs)
        t["request_ids"] = [r["transaction_id"] for r in rs]
        t["timestamp"] = _iso(float(rs[0]["timestamp"])) if rs else None
        t["timestamp_end"] = _iso(float(rs[-1]["timestamp"])) if rs else None
        t["duration_ms"] = int(sum(float(r.get("duration_ms") or 0) for r in rs))
        t["model"] = rs[0]["model"] if rs else None
        t["usage"] = U.total([r["usage"] for r in rs])
    stop = None
    for r in reqs:
        if r.get("stop_reason"):
            stop = r["stop_reason"]
    truncated = sum(1 for r in reqs if int(r["message_count"] or 0) == 0 and r["method"] != "WS_RESP")
    # Incomplete: no request parsed (§13.5.4), or — not in the SPEC, what a reader needs to know —
    # requests newer than the best one did not parse (a body cut by the capture cap): the messages
    # and turns are then an earlier request's, only the newest response is appended (below the
    # stale last turn), so the conversation is marked incomplete with its own reason. A WebSocket
    # session's messages are every request's own, none is stale.
    stale = (
        best is not None
        and not ws
        and any(
            _order(r) > _order(best) and int(r["message_count"] or 0) == 0 and r["method"] != "WS_RESP" for r in reqs
        )
    )
    reason = ALL_TRUNCATED if best is None else NEWEST_TRUNCATED if stale else None
    usage_total = U.total([r["usage"] for r in reqs] + [r["usage"] for r in utility])
    first_prompt = turns[0]["user_prompt"] if turns else None
    summary = None
    if len(system_prompt.encode("utf-8", "surrogatepass")) > 100:
        cut = cut_bytes(system_prompt, 500)
        summary = cut + "..." if len(cut) < len(system_prompt) else cut
    last = turns[-1] if turns else None
    return {
        "id": cid,
        "model": model,
        "container_name": reqs[0]["container_name"],
        "provider": provider,
        "client_name": client,
        "started_at": _iso(float(reqs[0]["timestamp"])),
        "ended_at": _iso(max(float(r["timestamp"]) for r in reqs)),
        "turn_count": len(turns),
        "message_count": len(messages),
        "first_prompt": cut_bytes(first_prompt, 500) if first_prompt else None,
        "system_prompt_summary": summary,
        "parent_conversation_id": parent,
        "last_turn_has_response": bool(last and any(s.get("text") or s.get("tool_calls") for s in last["steps"])),
        "last_stop_reason": stop,
        "linked_subagents": [],
        "request_ids": [i for t in turns for i in t["request_ids"]],
        "incomplete": reason is not None,
        "incomplete_reason": reason,
        "metadata": {
            "total_requests": len(reqs),
            "truncated_requests": truncated,
            "parseable_requests": len(reqs) - truncated,
            "messages_in_best_request": int(best["message_count"]) if best else 0,
            "best_request_id": best["transaction_id"] if best else None,
            "utility_requests": len(utility),
        },
        "usage": usage_total,
        "usage_with_subagents": dict(usage_total),
        "system_prompt": system_prompt,
        "turns": turns,
        "messages": messages,
        # Internal (not in the API): sort keys and the transactions attributed to it.
        "_started": float(reqs[0]["timestamp"]),
        "_ended": max(float(r["timestamp"]) for r in reqs),
        "_transactions": [r["transaction_id"] for r in reqs] + [r["transaction_id"] for r in utility],
    }


# ------------------------------------------------------------------ a session, and a unit of linked sessions


def _session_threads(reqs: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Requests of one session, in (timestamp, id) order, grouped as (suffix, requests); suffix ''
    for main, 'subagent_…' for subagents, '#utility' for the discarded ones.

    A request whose body did not parse (UNPARSED) goes to the group of the latest earlier main or
    subagent request (a utility one is skipped: Claude Code's haiku checks run just before its main
    requests, and a utility request was what the cut ones were wrongly judged to be), or to main
    when there is none. It does not move the subagent split (its message count is unknown)."""
    main: list[dict[str, Any]] = []
    utility: list[dict[str, Any]] = []
    buckets: dict[int, list[list[dict[str, Any]]]] = {}
    last_count: dict[int, int] = {}
    latest = main  # the group of the latest main/subagent request so far
    for r in reqs:
        if r["thread"] == UNPARSED:
            latest.append(r)
        elif r["thread"] == MAIN:
            main.append(r)
            latest = main
        elif r["thread"] == SUBAGENT:
            slen = int(r["system_len"])
            groups = buckets.setdefault(slen, [[]])
            n = int(r["message_count"] or 0)
            if r["client_name"] == "claude-code" and groups[-1] and slen in last_count and n < last_count[slen] - 1:
                groups.append([])
            groups[-1].append(r)
            last_count[slen] = n
            latest = groups[-1]
        else:
            utility.append(r)
    out = [("", main)] if main else []
    for slen, groups in buckets.items():
        for i, g in enumerate(groups, 1):
            out.append((f"subagent_{slen}_{i}", g))
    out.append(("#utility", utility))
    return out


def _with_ws_inheritance(reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A WebSocket response frame belongs to the thread (and client) of the request frame before it."""
    out = []
    prev: dict[str, Any] | None = None
    for r in sorted(reqs, key=_order):
        if r["method"] == "WS_RESP" and prev is not None:
            r = {**r, "thread": prev["thread"], "client_name": prev["client_name"]}
        elif r["method"] == "WS_REQ":
            prev = r
        out.append(r)
    return out


def assemble_unit(root: str, sessions: dict[str, list[dict[str, Any]]], children: list[str]) -> list[dict[str, Any]]:
    """Conversations of one unit: the root session and the OpenCode sessions linked to it as
    children (in reference order). Returns the conversations (detail form), linked."""
    convs: list[dict[str, Any]] = []
    main_id = f"session_{root}"

    def session_convs(key: str, rekey: str | None, parent: str | None) -> None:
        reqs = _with_ws_inheritance(sessions.get(key, []))
        threads = _session_threads(reqs)
        utility = threads[-1][1]
        threads = threads[:-1]
        if rekey is not None:
            reqs_all = [r for _s, g in threads for r in g]
            if reqs_all or utility:
                convs.append(build_conversation(rekey, reqs_all or utility, utility if reqs_all else [], parent))
            return
        has_main = bool(threads) and threads[0][0] == ""
        for suffix, group in threads:
            if suffix == "":
                convs.append(build_conversation(main_id, group, utility, None))
            else:
                convs.append(build_conversation(f"{main_id}/{suffix}", group, [], main_id if has_main else None))

    session_convs(root, None, None)
    has_root_main = any(c["id"] == main_id for c in convs)
    for k, child in enumerate(children, 1):
        session_convs(child, f"{main_id}/subagent_{k}", main_id if has_root_main else None)
    link(convs)
    return convs


def link(convs: list[dict[str, Any]]) -> None:
    """Parents list their subagents by started_at; agent tool calls point at them in order;
    usage_with_subagents adds the children's usage."""
    by_id = {c["id"]: c for c in convs}
    kids: dict[str, list[dict[str, Any]]] = {}
    for c in convs:
        if c["parent_conversation_id"] in by_id:
            kids.setdefault(c["parent_conversation_id"], []).append(c)
    for pid, children in kids.items():
        parent = by_id[pid]
        children.sort(key=lambda c: (c["_started"], c["id"]))
        parent["linked_subagents"] = [
            {
                "conversation_id": c["id"],
                "turn_count": c["turn_count"],
                "started_at": c["started_at"],
                "ended_at": c["ended_at"],
                "first_prompt": c["first_prompt"],
            }
            for c in children
        ]
        i = 0
        for t in parent["turns"]:
            for s in t["steps"]:
                for call in s.get("tool_calls", []):
                    if call["tool"] in AGENT_TOOLS and i < len(children):
                        call["linked_conversation_id"] = children[i]["id"]
                        i += 1
        parent["usage_with_subagents"] = U.add_totals(parent["usage"], *[c["usage"] for c in children])
    for c in convs:
        if c["id"] not in kids:
            c["usage_with_subagents"] = U.add_totals(c["usage"])


ITEM_KEYS = (
    "id",
    "model",
    "container_name",
    "provider",
    "client_name",
    "started_at",
    "ended_at",
    "updated_at",
    "turn_count",
    "message_count",
    "first_prompt",
    "system_prompt_summary",
    "parent_conversation_id",
    "last_turn_has_response",
    "last_stop_reason",
    "linked_subagents",
    "request_ids",
    "incomplete",
    "incomplete_reason",
    "metadata",
    "usage",
    "usage_with_subagents",
)
DETAIL_KEYS = ITEM_KEYS + ("system_prompt", "turns", "messages")


def public(conv: dict[str, Any], detail: bool = False) -> dict[str, Any]:
    return {k: conv.get(k) for k in (DETAIL_KEYS if detail else ITEM_KEYS)}
