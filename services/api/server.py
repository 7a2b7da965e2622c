"""The API's HTTP/1.1 front door: uvicorn's httptools protocol with the request-line checks Falcon
never sees.

- More than one `Host` field → 400 (RFC 9112 §3.2: which one would the Host check judge?).
- An absolute-form target (`GET http://name:port/path`) → its authority replaces the Host field
  (RFC 9112 §3.2.2: the server uses the target's host), so the Host check judges the host the
  request actually names.
- A request line without a version (HTTP/0.9) or any version but 1.0/1.1 → 400; it never
  reaches the application (Falcon cannot serve it and used to answer 500 with a traceback).

Refusals go through uvicorn's own `400 Invalid HTTP request` path (one warning line, no trace).
"""

from __future__ import annotations

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

VERSIONS = ("1.0", "1.1")


class BadRequestLine(httptools.HttpParserError):
    """The request is malformed in a way the parser accepts; uvicorn answers it with a 400."""


def absolute_authority(target: bytes) -> bytes | None:
    """The host[:port] of an absolute-form request target, None for origin-form ('/path')."""
    if target.startswith(b"/") or b"://" not in target[:16]:
        return None
    url = httptools.parse_url(target)
    if not url.host:
        raise BadRequestLine("absolute-form request target without a host")
    host = url.host if b":" not in url.host else b"[" + url.host + b"]"
    return host + (b":%d" % url.port if url.port is not None else b"")


class StrictHttpProtocol(HttpToolsProtocol):
    def data_received(self, data: bytes) -> None:
        self._refusal: str | None = None
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's 400, as JSON `{"error": ...}` naming what was wrong (SPEC conventions)."""
        body = orjson.dumps({"error": getattr(self, "_refusal", None) or "invalid HTTP request"})
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    def on_headers_complete(self) -> None:
        try:
            self._check()
        except BadRequestLine as exc:
            self._refusal = str(exc)
            raise
        super().on_headers_complete()

    def _check(self) -> None:
        version = self.parser.get_http_version()
        if version not in VERSIONS:
            raise BadRequestLine(f"unsupported HTTP version {version!r}")
        hosts = [i for i, (name, _v) in enumerate(self.headers) if name == b"host"]
        if len(hosts) > 1:
            raise BadRequestLine("more than one Host header")
        authority = absolute_authority(self.url)
        if authority is not None:
            if hosts:
                self.headers[hosts[0]] = (b"host", authority)
            else:
                self.headers.append((b"host", authority))
