"""Request helpers: JSON bodies and query parameters, validated with errors that name the field."""

from __future__ import annotations

from typing import Any

import falcon
import orjson

from greyproxy.timeutil import parse_time

from .errors import bad_request

MAX_BODY = 4 * 1024 * 1024


async def read_json(req: falcon.asgi.Request, default: Any = ..., expect: type | tuple = dict) -> Any:
    """The request body as JSON; an empty body gives `default` when one is given."""
    length = req.content_length
    if length is not None and length > MAX_BODY:
        raise falcon.HTTPPayloadTooLarge(description=f"body larger than {MAX_BODY} bytes")
    raw = await req.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise falcon.HTTPPayloadTooLarge(description=f"body larger than {MAX_BODY} bytes")
    if not raw.strip():
        if default is not ...:
            return default
        raise bad_request("request body is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("invalid JSON") from None
    if not isinstance(body, expect):
        want = "a JSON object" if expect is dict else "a JSON array" if expect is list else "JSON"
        raise bad_request(f"request body must be {want}")
    return body


def int_param(req: falcon.asgi.Request, name: str, default: int, lo: int = 0, hi: int = 10_000) -> int:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None
    if value < lo or value > hi:
        raise bad_request(f"{name} must be between {lo} and {hi}")
    return value


def bool_param(req: falcon.asgi.Request, name: str, default: bool = False) -> bool:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise bad_request(f"{name} must be true or false")


def time_param(req: falcon.asgi.Request, name: str) -> float | None:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_time(raw)
    except ValueError:
        raise bad_request(f"{name} must be an RFC 3339 timestamp or YYYY-MM-DDTHH:MM") from None


def json_response(resp: falcon.asgi.Response, data: Any, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
