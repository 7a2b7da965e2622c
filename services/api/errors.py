"""Errors rendered as {"error": "..."} with a proper status.

On a WebSocket route Falcon calls these handlers with `resp=None` and the socket as `ws`:
there is no body to render, so the socket is closed with 3000 + the HTTP status (Falcon's
convention; before the upgrade is accepted the server answers that with an HTTP 403).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import falcon
import orjson

from bus.reqrep import RemoteError, ServiceUnavailable

log = logging.getLogger("greyproxy.api")


class ApiError(falcon.HTTPError):
    def __init__(self, status: int | str, message: str) -> None:
        super().__init__(falcon.code_to_http_status(status) if isinstance(status, int) else status)
        self.message = message

    def to_dict(self, obj_type=dict):  # noqa: ANN001 - Falcon's signature
        return {"error": self.message}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str = "not found") -> ApiError:
    return ApiError(404, message)


WS_INTERNAL_ERROR = 1011


def http_status_to_ws_code(status: int) -> int:
    return 3000 + status  # Falcon's convention for an HTTP error on a socket


DENIAL_EXTENSION = "websocket.http.response"


async def _close_ws(ws: Any, code: int, req: Any = None, message: str | None = None) -> None:
    """End a WebSocket route on an error. Before the upgrade is accepted, and when the server
    offers the ASGI denial-response extension (uvicorn does), the client gets the real HTTP
    status with the `{"error": ...}` body (a 404 for an unknown path, a 421 for a foreign Host);
    otherwise the socket is closed with `code` (which a server answers with HTTP 403 before accept)."""
    if ws is None:
        return
    with contextlib.suppress(Exception):  # the peer may already be gone: nothing more to tell it
        if (
            req is not None
            and ws.unaccepted
            and 3100 <= code < 3600
            and DENIAL_EXTENSION in (req.scope.get("extensions") or {})
        ):
            body = orjson.dumps({"error": message or "refused"})
            await ws._asgi_send(
                {
                    "type": "websocket.http.response.start",
                    "status": code - 3000,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await ws._asgi_send({"type": "websocket.http.response.body", "body": body})
            return
        await ws.close(code)


async def handle_api_error(req, resp, ex, params, ws=None):  # noqa: ANN001
    if resp is None:
        return await _close_ws(ws, http_status_to_ws_code(ex.status_code), req, ex.message)
    resp.status = ex.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": ex.message})


async def handle_http_error(req, resp, ex, params, ws=None):  # noqa: ANN001
    message = ex.description or ex.title or "error"
    if ex.status_code == 404 and not ex.description:
        message = "not found"
    if resp is None:
        return await _close_ws(ws, http_status_to_ws_code(ex.status_code), req, message)
    resp.status = ex.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": message})
    for k, v in (ex.headers or {}).items():
        resp.set_header(k, v)


async def handle_unavailable(req, resp, ex, params, ws=None):  # noqa: ANN001
    if resp is None:
        return await _close_ws(ws, http_status_to_ws_code(503))
    resp.status = falcon.HTTP_503
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": str(ex), "service": ex.service})


async def handle_remote(req, resp, ex, params, ws=None):  # noqa: ANN001
    status = ex.status if 400 <= ex.status < 600 else 502
    if resp is None:
        return await _close_ws(ws, http_status_to_ws_code(status))
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": str(ex)})


async def handle_unexpected(req, resp, ex, params, ws=None):  # noqa: ANN001
    log.error(
        "unhandled error on %s %s",
        "WEBSOCKET" if resp is None else req.method,
        req.path,
        exc_info=(type(ex), ex, ex.__traceback__),
    )
    if resp is None:
        return await _close_ws(ws, WS_INTERNAL_ERROR)
    resp.status = falcon.HTTP_500
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": "internal error"})


def install(app: falcon.asgi.App) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(ApiError, handle_api_error)
    app.add_error_handler(ServiceUnavailable, handle_unavailable)
    app.add_error_handler(RemoteError, handle_remote)
