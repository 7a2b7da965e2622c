"""Small pure helpers of the dissectors (SPEC §13.2): byte truncation, tool summaries, SSE."""

from __future__ import annotations

import re
from typing import Any

import orjson

INPUT_BYTES = 300
RESULT_BYTES = 500
PREVIEW_BYTES = 200
THINKING_BYTES = 500
SUMMARY_CHARS = 80


def cut_bytes(text: str, limit: int) -> str:
    """The longest prefix of `text` of at most `limit` UTF-8 bytes (never half a character)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def thinking_preview(text: str) -> str:
    cut = cut_bytes(text, THINKING_BYTES)
    return cut + "..." if len(cut) < len(text) else cut


def joined_thinking_preview(previews: list[str]) -> str:
    """The preview of thinking texts joined by `\n`, made from their previews (each already
    `thinking_preview`): cut once. Previewing the joined previews again cut a cut one a second
    time (400 x "考": 503 bytes ending in five dots). A preview of at least THINKING_BYTES bytes
    ending in `...` was cut (a cut one is 497-500 bytes of text and the dots; an uncut one at most
    500 bytes): what followed it is unknown, so the text ends there, and the dots are put back."""
    parts: list[str] = []
    cut = False
    for p in previews:
        if p.endswith("...") and len(p.encode("utf-8", "surrogatepass")) >= THINKING_BYTES:
            parts.append(p[:-3])
            cut = True
            break
        parts.append(p)
    text = "\n".join(parts)
    short = cut_bytes(text, THINKING_BYTES)
    return short + "..." if cut or len(short) < len(text) else short


def as_json_text(value: Any) -> str:
    """Arguments as the text the model produced: strings as they are, others as compact JSON."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def parse_args(value: Any) -> Any:
    """Tool arguments: a JSON text parsed when it parses, an object kept as it is."""
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _tail(path: str) -> str:
    """`parent/basename` of a path."""
    parts = [p for p in re.split(r"[\\/]+", path.strip()) if p]
    return "/".join(parts[-2:]) if parts else path


def _base(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path.strip()) if p]
    return parts[-1] if parts else path


def _first_str(args: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = args.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return " ".join(value)
    return None


# The name to the line's end (trailing blanks stripped after: '(.+?)\s*$' was quadratic in them)
_PATCH_FILE = re.compile(r"^\*\*\* (?:Add|Update|Delete) File: (.+)$", re.M)


def tool_summary(name: Any, arguments: Any) -> str:
    """A one-line summary of a call, from its full arguments, by tool name (SPEC §13.2)."""
    tool = str(name or "").lower()
    args = parse_args(arguments)
    out: str | None = None
    if tool == "apply_patch":
        text = args if isinstance(args, str) else _first_str(args, "input", "patch") if isinstance(args, dict) else None
        if text:
            m = _PATCH_FILE.search(text)
            out = _base(m.group(1).rstrip()) if m else None
    elif isinstance(args, dict):
        if tool in ("read", "edit", "write", "read_file", "edit_file", "write_file", "replace", "multiedit"):
            path = _first_str(args, "file_path", "filePath", "absolute_path", "path")
            out = _tail(path) if path else None
        elif tool in ("bash", "exec_command", "run_shell_command", "shell"):
            out = _first_str(args, "description") or _first_str(args, "command", "cmd")
        elif tool in ("grep", "grep_search"):
            pattern = _first_str(args, "pattern")
            if pattern is not None:
                path = _first_str(args, "path", "dir_path")
                out = f"pattern: {pattern}" + (f" in {_base(path)}" if path else "")
        elif tool == "glob":
            out = _first_str(args, "pattern")
        elif tool in ("agent", "task", "spawn_agent"):
            out = _first_str(args, "description") or _first_str(args, "prompt", "message")
        elif tool in ("websearch", "toolsearch", "web_search", "google_web_search"):
            out = _first_str(args, "query")
        elif tool in ("webfetch", "web_fetch"):
            out = _first_str(args, "url")
        elif tool == "skill":
            out = _first_str(args, "name", "skill")
        if out is None:
            pairs = [
                f"{k}={v}"
                for k, v in sorted(args.items(), key=lambda kv: str(kv[0]))
                if isinstance(v, str) and len(v) <= 40
            ]
            out = ", ".join(pairs)
    if out is None:
        out = ""
    out = " ".join(out.split()) if "\n" in out else out
    return out[:SUMMARY_CHARS] + "..." if len(out) > SUMMARY_CHARS else out


def sse_events(body: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body; a cut body parses as far as it goes.

    Lines split on `\\n` (a trailing `\\r` dropped), `field:` with or without one space, an
    event's `data:` lines joined by `\\n`, a blank line ends an event, `[DONE]` ignored.
    """
    out: list[tuple[str, str]] = []
    event = ""
    data: list[str] = []

    def flush() -> None:
        nonlocal event, data
        if data:
            text = "\n".join(data)
            if text.strip() != "[DONE]":
                out.append((event, text))
        event, data = "", []

    for line in body.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            flush()
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    flush()
    return out


def sse_json(body: str) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events whose data is a JSON object."""
    out = []
    for event, data in sse_events(body):
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append((event, obj))
    return out


def looks_like_sse(body: str | None, content_type: str | None) -> bool:
    if content_type and "event-stream" in content_type.lower():
        return True
    if not body:
        return False
    head = body.lstrip()[:20]
    return head.startswith(("event:", "data:"))
