"""Errors rendered as {"error": "..."} with a proper status."""

from __future__ import annotations

import logging

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


async def handle_api_error(req, resp, ex, params):  # noqa: ANN001
    resp.status = ex.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": ex.message})


async def handle_http_error(req, resp, ex, params):  # noqa: ANN001
    resp.status = ex.status
    resp.content_type = falcon.MEDIA_JSON
    message = ex.description or ex.title or "error"
    if ex.status == falcon.HTTP_404 and not ex.description:
        message = "not found"
    resp.data = orjson.dumps({"error": message})
    for k, v in (ex.headers or {}).items():
        resp.set_header(k, v)


async def handle_unavailable(req, resp, ex, params):  # noqa: ANN001
    resp.status = falcon.HTTP_503
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": str(ex), "service": ex.service})


async def handle_remote(req, resp, ex, params):  # noqa: ANN001
    resp.status = falcon.code_to_http_status(ex.status if 400 <= ex.status < 600 else 502)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": str(ex)})


async def handle_unexpected(req, resp, ex, params):  # noqa: ANN001
    log.exception("unhandled error on %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": "internal error"})


def install(app: falcon.asgi.App) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(ApiError, handle_api_error)
    app.add_error_handler(ServiceUnavailable, handle_unavailable)
    app.add_error_handler(RemoteError, handle_remote)
