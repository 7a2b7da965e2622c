"""Request helpers: JSON bodies and query parameters, validated with errors that name the field."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import falcon
import falcon.routing
import orjson

from bus.reqrep import ControlClient, RemoteError, ServiceUnavailable
from greyproxy.timeutil import TimestampOutOfRange, parse_time

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


class HeadAsGet:
    """Falcon middleware: `HEAD` is answered wherever `GET` is (RFC 9110 §9.3.2), as GET without
    the body, instead of a 405 from every resource that has no `on_head`.

    The request is routed as GET and told apart again before the answer is sent, when Falcon
    leaves out the body (and gives the GET's Content-Length) because the method is HEAD. A
    streamed body (its length unknown: none given) is closed unread, so the export on_get set
    up does not run for a HEAD."""

    async def process_request(self, req: Any, resp: Any) -> None:
        if req.method == "HEAD":
            req.method = "GET"
            req.context.head = True

    async def process_response(self, req: Any, resp: Any, resource: Any, req_succeeded: bool) -> None:
        if getattr(req.context, "head", False):
            req.method = "HEAD"
            stream = resp.stream
            if stream is not None:
                close = getattr(stream, "aclose", None) or getattr(stream, "close", None)
                if close is not None:
                    result = close()
                    if hasattr(result, "__await__"):
                        await result


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


def ascii_int(text: str, negative: bool = False) -> int | None:
    """`text` as an integer when it is ASCII digits only (after one leading minus, when
    `negative`); None otherwise. int() alone also takes Unicode digits ('５'), surrounding
    blanks (' 5 '), a '+' and '_' between digits, none of which a query parameter should be."""
    digits = text[1:] if negative and text.startswith("-") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def int_param(req: falcon.asgi.Request, name: str, default: int, lo: int = 0, hi: int = 10_000) -> int:
    """An integer query parameter (absent: `default`); a bad number → 400 (SPEC conventions),
    an empty one (`limit=`) included."""
    raw = req.get_param(name)
    if raw is None:
        return default
    value = ascii_int(raw, negative=True)  # (a negative one then gets the range's message)
    if value is None:
        raise bad_request(f"{name} must be an integer (ASCII digits), not {raw[:20]!r}")
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
    except TimestampOutOfRange:
        # a valid timestamp (0001-01-01T00:00:00+01:00) that falls outside what UTC can hold
        raise bad_request(f"{name} is out of range: from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z") from None
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


def refuse_unknown(body: dict[str, Any], known: tuple[str, ...], hints: dict[str, str] | None = None) -> None:
    """400 for a member that is not one of `known`, naming it and the accepted ones.

    For grants (pending allow/deny, bulk-allow, the WS commands, /api/allowall, sessions and
    global credentials): ignored, a field the client meant (`duraton`, or an expiry under another
    API's name, `expires_in_seconds`, `ttl`) would leave the default in force, and on a grant
    that default is the widest: a permanent rule, silent mode until restart, a session's 900 s,
    a credential bound to no host. `hints` (by lowercased name) says what a likely confusion
    means; otherwise a close spelling of a known field is suggested."""
    for name in body:
        if name in known:
            continue
        text = str(name)
        low = text.lower()
        hint = (hints or {}).get(low)
        if hint is None:
            close = [
                k
                for k in known
                if len(low) >= 4
                and (k.startswith(low) or k.endswith(low) or low.startswith(k) or sorted(low) == sorted(k))
            ]
            close = close or difflib.get_close_matches(low, known, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]!r}?" if close else ""
        shown = text if len(text) <= 64 else text[:64] + "…"
        raise bad_request(f"unknown field {shown!r}: {hint + ' ' if hint else ''}(accepted: {', '.join(known)})")


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
