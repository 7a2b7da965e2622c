"""Stored transactions as HAR 1.2 (SPEC §14), without I/O: one row → one entry, and the
document's opening and closing bytes so an export can be streamed entry by entry.

What is exported is what was stored: headers as recorded (redacted ones stay `[redacted]`),
bodies as kept (text-like types only, up to `capture.maxBodyBytes`), substituted credentials
as their placeholder names. A WebSocket upgrade is an entry (status 101) and each recorded
message is one more entry (method `WS_REQ` client→server or `WS_RESP` server→client, URL
`ws(s)://`) carrying the message in Chromium's `_webSocketMessages` as well. Fields HAR has no
name for start with `_` (allowed by the spec): `_id`, `_container`, `_result`, `_ruleId`,
`_error` and `_blockReason` (why the exchange failed or was refused), ...

A body is marked truncated when the capture recorded that its stored copy is not all of it
(`<side>_body_truncated`, migration 14), whatever capture.maxBodyBytes says now; rows recorded
before that column are judged from what they hold (`_content_facts`). A stored body that cannot be
read (corrupt, unknown codec) is left out of its entry with a note (`comment`, `_error`); the rest
of the entry, and of the export, is there.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from . import __version__
from .bodies import Body, Reader, api_value, readable_side
from .capture import DEFAULT_MAX_BODY, _json_field
from .redaction import REDACTED

log = logging.getLogger("greyproxy.har")

__all__ = ["DOCUMENT_TAIL", "HAR_SCHEMA", "HAR_VERSION", "document_head", "entry", "entry_bytes"]

HAR_VERSION = "1.2"
DOCUMENT_TAIL = b"]}}\n"
HTTP_VERSION = "HTTP/1.1"  # what the proxy speaks to clients (ALPN offers http/1.1 only)
_WS_METHODS = {"WS_REQ": "send", "WS_RESP": "receive"}
_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    421: "Misdirected Request",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def document_head(comment: str = "") -> bytes:
    """`{"log": {... "entries": [` — entries follow, comma-separated, then DOCUMENT_TAIL."""
    log: dict[str, Any] = {
        "version": HAR_VERSION,
        "creator": {"name": "greyproxy", "version": __version__},
        "pages": [],
    }
    if comment:
        log["comment"] = comment
    head = orjson.dumps({"log": log})
    # {"log":{...,"pages":[]}} → keep everything but the final "}}" and open the entries array.
    return head[:-2] + b',"entries":['


def _iso(ts: float | None) -> str:
    t = dt.datetime.fromtimestamp(float(ts or 0.0), dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _headers(value: Any) -> list[dict[str, str]]:
    headers = _json_field(value, {})
    out: list[dict[str, str]] = []
    if isinstance(headers, dict):
        for name, values in headers.items():
            for v in values if isinstance(values, list) else [values]:
                out.append({"name": str(name), "value": "" if v is None else str(v)})
    return out


def _header(headers: list[dict[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((h["value"] for h in headers if h["name"].lower() == name), None)


def _coded(headers: list[dict[str, str]]) -> bool:
    """Whether the body had a content-coding (other than `identity`): its stored copy is decoded."""
    coding = _header(headers, "content-encoding")
    return coding is not None and coding.strip().lower() not in ("", "identity")


def _cookies(header: str | None, redacted: bool) -> list[dict[str, str]]:
    """`Cookie: a=1; b=2` → HAR cookies (none when the header was redacted)."""
    if not header or redacted:
        return []
    out = []
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out.append({"name": name, "value": value})
    return out


def _size(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and value >= 0 else 0


_TRUNCATED = "body truncated to capture.maxBodyBytes"
_TRUNCATED_PART = _TRUNCATED + " (content.size counts the part kept: the whole body was longer)"
_MAYBE_TRUNCATED = (
    "body may be truncated to capture.maxBodyBytes (recorded before greyproxy kept whether it was;"
    " its decoded length is a plausible cap)"
)
_NOT_STORED = "body not stored (binary content type, or dropped by retention.maxDatabaseMiB)"
_UNREADABLE = "body not exported: the stored body could not be read"


def _plausible_cap(n: int, max_body: int) -> bool:
    """Whether a decoded length could be where capture.maxBodyBytes stopped a decoding: today's cap,
    or a round number of bytes (a multiple of 1 KiB or of 1000), which is what caps are set to."""
    return n > 0 and (n == max_body or n == DEFAULT_MAX_BODY or n % 1024 == 0 or n % 1000 == 0)


def _content_facts(
    stored: Body | None, wire: int, encoded: bool, flag: Any, max_body: int
) -> tuple[str | None, int | None]:
    """(the truncation note, or None when the stored body is all of it; content.size: the decoded
    length when known, else that of the part kept) of a stored body; `wire` the bytes of the body
    as exchanged, `encoded` whether it had a content-coding, `flag` what the capture recorded
    (`<side>_body_truncated`: 1 cut, 0 whole, None for rows recorded before the column).

    Without a content-coding the stored bytes are the wire's: a cut one's whole length is the
    wire's. With one, the stored bytes are the decoded ones, and a cut body's decoded length is
    unknown (only the part kept is there). Rows without the flag: a copy shorter than an uncoded
    body was cut; a coded one was cut (on the wire or in its decoding) only where the decoding
    stopped at the cap, so a decoded length that is a plausible cap gets a note that it may be."""
    if stored is None:
        return None, None
    n = len(stored.data)
    if flag is not None:
        if not flag:
            return None, n
        if not encoded and wire >= n:
            return _TRUNCATED, wire
        return _TRUNCATED_PART, n
    if not encoded:
        return (_TRUNCATED, wire) if n < wire else (None, n)
    if _plausible_cap(n, max_body):
        return _MAYBE_TRUNCATED, n
    return None, n


def _body(row: dict[str, Any], side: str, reader: Reader | None) -> tuple[Body | None, str | None]:
    stored, error = readable_side(row, side, reader)
    if error is not None:
        log.warning("transaction %s: its stored %s body could not be read: %s", row.get("id"), side, error)
    return stored, error


def _uri(url: str) -> str:
    """The URL as a valid URI: `[` and `]` (redacted query values' `[REDACTED]`) percent-encoded
    after the authority, where RFC 3986 has no place for them (an IPv6 literal's stay)."""
    if "[" not in url and "]" not in url:
        return url
    start = url.find("//")
    start = 0 if start < 0 else start + 2
    cut = min((i for i in (url.find(c, start) for c in "/?#") if i >= 0), default=len(url))
    rest = url[cut:].replace("[", "%5B").replace("]", "%5D")
    return url[:cut] + rest


def entry(row: dict[str, Any], max_body: int = DEFAULT_MAX_BODY, reader: Reader | None = None) -> dict[str, Any]:
    """One stored transaction (a dict of its columns, JSON columns raw or decoded) → a HAR entry.
    `max_body`: capture.maxBodyBytes today (what judges rows recorded before truncation was);
    `reader`: reads delta bodies (greyproxy.bodies; else the row's must be inlined already)."""
    method = str(row.get("method") or "")
    url = str(row.get("url") or "")
    req_headers = _headers(row.get("request_headers"))
    resp_headers = _headers(row.get("response_headers"))
    req_size, resp_size = _size(row.get("request_body_size")), _size(row.get("response_body_size"))
    req_stored, req_error = _body(row, "request", reader)
    resp_stored, resp_error = _body(row, "response", reader)
    req_body, req_enc = api_value(req_stored)
    resp_body, resp_enc = api_value(resp_stored)
    cookie = _header(req_headers, "cookie")
    try:
        query = [{"name": k, "value": v} for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)]
    except ValueError:
        query = []
    request: dict[str, Any] = {
        "method": method,
        "url": _uri(url),
        "httpVersion": HTTP_VERSION,
        "cookies": _cookies(cookie, cookie == REDACTED),
        "headers": req_headers,
        "queryString": query,
        "headersSize": -1,
        "bodySize": req_size,
    }
    req_cut, _n = _content_facts(req_stored, req_size, _coded(req_headers), row.get("request_body_truncated"), max_body)
    if req_body is not None or req_size or req_error:
        post: dict[str, Any] = {"mimeType": row.get("request_content_type") or "", "text": req_body or ""}
        if req_error is not None:
            post["comment"] = _UNREADABLE
            post["_error"] = req_error
        elif req_stored is None:
            post["comment"] = _NOT_STORED
        elif req_cut:
            post["comment"] = req_cut
        if req_enc:
            post["_encoding"] = req_enc  # HAR 1.2 has no postData encoding: the content's, prefixed
        request["postData"] = post
    status = row.get("status_code")
    status = int(status) if isinstance(status, int) else 0
    resp_coded = _coded(resp_headers)
    resp_cut, decoded = _content_facts(resp_stored, resp_size, resp_coded, row.get("response_body_truncated"), max_body)
    content: dict[str, Any] = {"size": resp_size, "mimeType": row.get("response_content_type") or "x-unknown"}
    if resp_stored is not None:
        if decoded is not None:
            content["size"] = decoded
            if resp_coded and not resp_cut and 0 < resp_size < decoded:
                content["compression"] = decoded - resp_size  # bytes the content-coding saved
        content["text"] = resp_body
        if resp_enc:
            content["encoding"] = resp_enc
        if resp_cut:
            content["comment"] = resp_cut
    elif resp_error is not None:
        content["comment"] = _UNREADABLE
        content["_error"] = resp_error
    elif resp_size:
        content["comment"] = _NOT_STORED
    response: dict[str, Any] = {
        "status": status,
        "statusText": _REASONS.get(status, ""),
        "httpVersion": HTTP_VERSION,
        "cookies": [],
        "headers": resp_headers,
        "content": content,
        "redirectURL": _header(resp_headers, "location") or "",
        "headersSize": -1,
        "bodySize": resp_size,
    }
    duration = row.get("duration_ms")
    total = round(float(duration), 3) if isinstance(duration, (int, float)) and duration >= 0 else 0
    out: dict[str, Any] = {
        "startedDateTime": _iso(row.get("timestamp")),
        "time": total,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": 0, "wait": total, "receive": 0},
        "_id": row.get("id"),
        "_container": row.get("container_name"),
        "_result": row.get("result"),
        "_ruleId": row.get("rule_id"),
    }
    for col, key in (
        ("conversation_id", "_conversationId"),
        ("session_id", "_sessionId"),
        ("error", "_error"),  # why the exchange failed or was cut off (a 502's "connection refused")
        ("block_reason", "_blockReason"),  # why it was refused (`rule` or a credential reason)
    ):
        if row.get(col):
            out[key] = row[col]
    subst = _json_field(row.get("substituted_credentials"), [])
    if subst:
        out["_substitutedCredentials"] = subst  # placeholder names, never values
    if method in _WS_METHODS or status == 101:
        out["_resourceType"] = "websocket"
    if method in _WS_METHODS:
        text = req_body if method == "WS_REQ" else resp_body
        size = req_size if method == "WS_REQ" else resp_size
        msg: dict[str, Any] = {
            "type": _WS_METHODS[method],
            "time": float(row.get("timestamp") or 0),
            "opcode": 1 if text is not None else 2,
            "data": text or "",
        }
        stored = req_stored if method == "WS_REQ" else resp_stored
        flag = row.get("request_body_truncated" if method == "WS_REQ" else "response_body_truncated")
        # Cut by capture.maxBodyBytes: as the capture recorded; for rows recorded before, shorter
        # than the message, or for a compressed message (permessage-deflate) cut on the wire, its
        # size is the wire's and the text decoded up to the cap.
        n = len(stored.data) if stored is not None else 0
        if flag is not None:
            cut = stored is not None and bool(flag)
        else:
            cut = stored is not None and (n < size or (n >= max_body and n != size))
        if text is None or cut:
            msg["_size"] = size  # the message's length: not in `data` (binary, or cut by the capture)
        if cut:
            msg["_truncated"] = True  # `data` is its first capture.maxBodyBytes only
        out["_webSocketMessages"] = [msg]
    return out


def entry_bytes(row: dict[str, Any], max_body: int = DEFAULT_MAX_BODY, reader: Reader | None = None) -> bytes:
    return orjson.dumps(entry(row, max_body, reader))


# ---------------------------------------------------------------------------- HAR 1.2 as JSON Schema
# Written from the HAR 1.2 specification (W3C web performance draft, "HTTP Archive (HAR) format"):
# every object's required fields, their types, and the mutually exclusive postData text/params.
# Custom fields (starting with "_") and "comment" are allowed everywhere, as the spec allows.

_ISO_8601 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$"
_NV = {
    "type": "object",
    "required": ["name", "value"],
    "properties": {"name": {"type": "string"}, "value": {"type": "string"}, "comment": {"type": "string"}},
}
_TIMING = {"type": "number", "minimum": -1}

HAR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["log"],
    "properties": {
        "log": {
            "type": "object",
            "required": ["version", "creator", "entries"],
            "properties": {
                "version": {"type": "string"},
                "creator": {
                    "type": "object",
                    "required": ["name", "version"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                },
                "browser": {"type": "object", "required": ["name", "version"]},
                "pages": {
                    "type": "array",
                    "items": {"type": "object", "required": ["startedDateTime", "id", "title", "pageTimings"]},
                },
                "comment": {"type": "string"},
                "entries": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["startedDateTime", "time", "request", "response", "cache", "timings"],
                        "properties": {
                            "pageref": {"type": "string"},
                            "startedDateTime": {"type": "string", "pattern": _ISO_8601},
                            "time": {"type": "number", "minimum": 0},
                            "request": {
                                "type": "object",
                                "required": [
                                    "method",
                                    "url",
                                    "httpVersion",
                                    "cookies",
                                    "headers",
                                    "queryString",
                                    "headersSize",
                                    "bodySize",
                                ],
                                "properties": {
                                    "method": {"type": "string"},
                                    "url": {"type": "string"},
                                    "httpVersion": {"type": "string"},
                                    "cookies": {"type": "array", "items": _NV},
                                    "headers": {"type": "array", "items": _NV},
                                    "queryString": {"type": "array", "items": _NV},
                                    "postData": {
                                        "type": "object",
                                        "required": ["mimeType"],
                                        "properties": {
                                            "mimeType": {"type": "string"},
                                            "text": {"type": "string"},
                                            "params": {
                                                "type": "array",
                                                "items": {"type": "object", "required": ["name"]},
                                            },
                                        },
                                        "oneOf": [{"required": ["text"]}, {"required": ["params"]}],
                                    },
                                    "headersSize": {"type": "integer", "minimum": -1},
                                    "bodySize": {"type": "integer", "minimum": -1},
                                },
                            },
                            "response": {
                                "type": "object",
                                "required": [
                                    "status",
                                    "statusText",
                                    "httpVersion",
                                    "cookies",
                                    "headers",
                                    "content",
                                    "redirectURL",
                                    "headersSize",
                                    "bodySize",
                                ],
                                "properties": {
                                    "status": {"type": "integer"},
                                    "statusText": {"type": "string"},
                                    "httpVersion": {"type": "string"},
                                    "cookies": {"type": "array", "items": _NV},
                                    "headers": {"type": "array", "items": _NV},
                                    "content": {
                                        "type": "object",
                                        "required": ["size", "mimeType"],
                                        "properties": {
                                            "size": {"type": "integer"},
                                            "compression": {"type": "integer"},
                                            "mimeType": {"type": "string"},
                                            "text": {"type": "string"},
                                            "encoding": {"type": "string"},
                                        },
                                    },
                                    "redirectURL": {"type": "string"},
                                    "headersSize": {"type": "integer", "minimum": -1},
                                    "bodySize": {"type": "integer", "minimum": -1},
                                },
                            },
                            "cache": {"type": "object"},
                            "timings": {
                                "type": "object",
                                "required": ["send", "wait", "receive"],
                                "properties": {
                                    k: _TIMING for k in ("blocked", "dns", "connect", "ssl", "send", "wait", "receive")
                                },
                            },
                            "serverIPAddress": {"type": "string"},
                            "connection": {"type": "string"},
                            "comment": {"type": "string"},
                        },
                    },
                },
            },
        }
    },
}
