"""Request helpers: JSON bodies and query parameters, validated with errors that name the field."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import falcon
import falcon.routing
import orjson

from bus.reqrep import ControlClient, RemoteError, ServiceUnavailable
from greyproxy.timeutil import parse_time

from .errors import bad_request

MAX_BODY = 4 * 1024 * 1024
MAX_ID = 2**63 - 1  # SQLite's INTEGER range: a bigger number cannot even be looked up

log = logging.getLogger("greyproxy.api")


class InvalidId(str):
    """A path segment where a row id belongs that is not one; `IdCheck` answers 400 for it."""


class IdConverter(falcon.routing.BaseConverter):
    """Route converter `{name:id}`: a row id, decimal digits only, 1 to 2**63-1.

    Anything else ('abc', '0', '-1', '1e3', '+1', a number SQLite cannot hold) still routes, as an
    `InvalidId`, so that `IdCheck` answers `400 {"error": "invalid id"}` (SPEC conventions)
    instead of a 404 that reads like "no such row".
    """

    def convert(self, value: str) -> int | InvalidId:
        if not value.isascii() or not value.isdigit() or len(value) > 19 or not 1 <= int(value) <= MAX_ID:
            return InvalidId(value)  # ids start at 1: 0 is no id either
        return int(value)


class IdCheck:
    """Falcon middleware: a route whose `{...:id}` parameter is not a row id → 400 "invalid id"."""

    @staticmethod
    def _check(params: dict[str, Any]) -> None:
        if any(isinstance(v, InvalidId) for v in params.values()):
            raise bad_request("invalid id")

    async def process_resource(self, req: Any, resp: Any, resource: Any, params: dict[str, Any]) -> None:
        self._check(params)

    async def process_resource_ws(self, req: Any, ws: Any, resource: Any, params: dict[str, Any]) -> None:
        self._check(params)


BODY_COMPLETE = "greyproxy.body_complete"  # ASGI scope key set by `BodyEnd`


class BodyEnd:
    """ASGI wrapper (around the whole app, services/api/service.py): notes in the request's scope
    whether its body came to its end (`more_body` false) or the client left first (a disconnect),
    which a read of the body stream cannot tell apart, chunked or with a Content-Length."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[BODY_COMPLETE] = False

        async def received() -> dict[str, Any]:
            event = await receive()
            if event["type"] == "http.request" and not event.get("more_body", False):
                scope[BODY_COMPLETE] = True
            return event

        await self.app(scope, received, send)


async def read_json(req: falcon.asgi.Request, default: Any = ..., expect: type | tuple = dict) -> Any:
    """The request body as JSON; an empty body gives `default` when one is given."""
    length = req.content_length
    if length is not None and length > MAX_BODY:
        raise falcon.HTTPPayloadTooLarge(description=f"body larger than {MAX_BODY} bytes")
    raw = await req.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise falcon.HTTPPayloadTooLarge(description=f"body larger than {MAX_BODY} bytes")
    if (length is not None and len(raw) < length) or req.scope.get(BODY_COMPLETE) is False:
        # the client went away before its whole body came (the stream ends at the disconnect, a
        # chunked body without its last chunk too): never act on part of a request, even one that parses
        got = f" of its {length}" if length is not None else ""
        raise bad_request(f"the body ended after {len(raw)}{got} bytes: the client left before sending all of it")
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


def _kind(value: Any) -> str:
    return (
        "null"
        if value is None
        else {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
            type(value), type(value).__name__
        )
    )


def refuse_misspelt(body: dict[str, Any], known: tuple[str, ...]) -> None:
    """400 for a member that looks like a misspelling of a known one (`duraton`, or `duration`
    where `duration_seconds` is meant). Ignored, it would leave the default in force, and on a
    grant that default is the widest: a permanent rule, silent mode until restart. Members that
    resemble none are still ignored, so a client may send extras."""
    for name in body:
        if name in known or not isinstance(name, str):
            continue
        low = name.lower()
        close = [
            k
            for k in known
            if len(low) >= 4 and (k.startswith(low) or k.endswith(low) or low.startswith(k) or sorted(low) == sorted(k))
        ]
        close = close or difflib.get_close_matches(low, known, n=1, cutoff=0.8)
        if close:
            raise bad_request(f"unknown field {name!r}: did you mean {close[0]!r}? ({', '.join(known)} are known)")


def str_field(
    body: dict[str, Any],
    name: str,
    default: Any = None,
    *,
    required: bool = False,
    max_len: int = 10_000,
    where: str = "",
) -> Any:
    """A string member of a JSON body; null/absent gives `default` (or 400 when required)."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"{where}{name} is required")
        return default
    if not isinstance(value, str):
        raise bad_request(f"{where}{name} must be a string, not {_kind(value)}")
    if len(value) > max_len:
        raise bad_request(f"{where}{name} is longer than {max_len} characters")
    return value


def int_field(
    body: dict[str, Any],
    name: str,
    default: Any = None,
    *,
    lo: int | None = None,
    hi: int | None = None,
    where: str = "",
) -> Any:
    """An integer member of a JSON body (booleans refused); null/absent gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{where}{name} must be an integer, not {_kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_request(
            f"{where}{name} must be between {lo} and {hi}" if hi is not None else f"{where}{name} must be at least {lo}"
        )
    return value


def id_list_field(body: dict[str, Any], name: str, max_items: int = 10_000) -> list[int]:
    """A required JSON array of integer ids, duplicates dropped, order kept."""
    value = body.get(name)
    if not isinstance(value, list):
        raise bad_request(f"{name} must be an array of ids")
    if len(value) > max_items:
        raise bad_request(f"{name} has more than {max_items} ids")
    out: dict[int, None] = {}
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise bad_request(f"{name}[{i}] must be an integer id, not {_kind(item)}")
        if not 1 <= item <= MAX_ID:  # no row has it, and SQLite cannot even bind a bigger one
            raise bad_request(f"{name}[{i}] must be an id from 1 to {MAX_ID}, not {item}")
        out[item] = None
    return list(out)


async def soft_call(
    client: ControlClient,
    op: str,
    args: dict[str, Any] | None = None,
    timeout: float | None = None,
    retries: int = 1,
    default: Any = None,
) -> Any:
    """A control call whose failure must not fail the request: `default` when the peer is down or refuses."""
    try:
        return await client.call(op, args or {}, timeout=timeout, retries=retries)
    except ServiceUnavailable as exc:
        log.debug("%s %s skipped: %s", client.service, op, exc)
    except RemoteError as exc:
        log.warning("%s %s failed: %s", client.service, op, exc)
    return default
