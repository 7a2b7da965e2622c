"""Transaction capture shared by proxy, recorder and API (SPEC §7): the capped body copy, which
bodies are stored (text-like types, decoded from their content-coding), and the JSON shape.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import orjson

from .bodies import Packed, api_value, pack, read_side
from .shapes import micros, whole_ms
from .store import transactions as transactions_table
from .timeutil import rfc3339

__all__ = ["BodyCapture", "TRANSACTION_COLUMNS", "decode_body", "is_text_like", "stored_body", "transaction_json"]

DEFAULT_MAX_BODY = 2 * 1024 * 1024
_DECODE_STEP = 64 * 1024  # compressed bytes fed per step, so a bomb never expands past the cap by much

# Stored columns of http_transactions: defined with the table (greyproxy/store/transactions.py).
TRANSACTION_COLUMNS = transactions_table.COLUMNS
_JSON_COLUMNS = transactions_table.JSON_COLUMNS
_BODY_COLUMNS = transactions_table.BODY_COLUMNS
_BODY_META = transactions_table.BODY_META_COLUMNS  # how a body is stored: not part of the item


class BodyCapture:
    """Counts a body's true size and keeps its first `limit` bytes (the record's copy)."""

    __slots__ = ("limit", "size", "data")

    def __init__(self, limit: int = DEFAULT_MAX_BODY) -> None:
        self.limit = limit
        self.size = 0
        self.data = bytearray()

    def add(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk if n <= room else chunk[:room]
        self.size += n

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_text_like(content_type: str | None) -> bool:
    """text/*, JSON, XML, JavaScript, forms, NDJSON and the +json/+xml families."""
    mt = _media_type(content_type)
    if not mt:
        return False
    if mt.startswith("text/") or mt.endswith(("+json", "+xml")):
        return True
    return mt in {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "application/x-www-form-urlencoded",
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/json-seq",
        "application/graphql",
        "application/x-yaml",
        "application/yaml",
    }


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = bytearray()
    for pos in range(0, len(data), _DECODE_STEP):
        buf = data[pos : pos + _DECODE_STEP]
        while buf and len(out) < limit:
            out += d.decompress(buf, limit - len(out))
            buf = d.unconsumed_tail
        if len(out) >= limit or d.eof:
            break
    if not out and data and not d.eof:
        raise ValueError("the stream ends before its first output")  # (the raw bytes are kept)
    return bytes(out)


def _unbrotli(data: bytes, limit: int) -> bytes:
    import brotli

    d = brotli.Decompressor()
    out = bytearray()
    for pos in range(0, len(data), _DECODE_STEP):
        out += d.process(data[pos : pos + _DECODE_STEP], output_buffer_limit=limit - len(out) + 1)
        while len(out) <= limit and not d.can_accept_more_data():
            out += d.process(b"", output_buffer_limit=limit - len(out) + 1)
        if len(out) >= limit or d.is_finished():
            break
    # A stream cut short (by capture.maxBodyBytes) still holds decoded output: brotli gives it a
    # ring buffer (32 KiB here) per call, asking for more input all the while.
    while len(out) < limit and not d.is_finished():
        more = d.process(b"", output_buffer_limit=limit - len(out) + 1)
        if not more:
            break
        out += more
    if not out and data and not d.is_finished():
        raise ValueError("the stream ends before its first output")
    return bytes(out[:limit])


def _unzstd(data: bytes, limit: int) -> bytes:
    import io

    import zstandard

    out = bytearray()
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    try:
        while len(out) < limit:
            chunk = reader.read(min(_DECODE_STEP, limit - len(out)))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError:
        if not out:
            raise
    if not out and data:
        # nothing out of it: a whole empty body, or one cut (capture.maxBodyBytes) inside its first
        # block (up to 128 KiB); the reader gave nothing, so neither does this (no bomb)
        probe = zstandard.ZstdDecompressor().decompressobj()
        probe.decompress(data)
        if not probe.eof:
            raise ValueError("the stream ends before its first output")
    return bytes(out)


def decode_body(data: bytes, content_encoding: str | None, limit: int = DEFAULT_MAX_BODY) -> bytes:
    """Undo gzip / deflate / br / zstd (in reverse order of application); ValueError on failure.

    A capped (truncated) body decodes as far as it goes; output is capped at `limit` too. One cut
    before the decoder's first output (a zstd block is up to 128 KiB) is a failure: the caller keeps
    the raw bytes rather than an empty body.
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        try:
            if coding in ("gzip", "x-gzip"):
                data = _inflate(data, 16 + zlib.MAX_WBITS, limit)
            elif coding == "deflate":
                try:
                    data = _inflate(data, zlib.MAX_WBITS, limit)  # RFC 9110 says zlib-wrapped...
                except zlib.error:
                    data = _inflate(data, -zlib.MAX_WBITS, limit)  # ...but some servers send raw deflate
            elif coding == "br":
                data = _unbrotli(data, limit)
            elif coding == "zstd":
                data = _unzstd(data, limit)
            elif coding != "identity":
                raise ValueError(f"unknown content-coding {coding!r}")
        except ValueError:
            raise
        except Exception as exc:  # zlib.error, brotli.error, zstandard.ZstdError
            raise ValueError(f"{coding} decoding failed: {exc}") from None
    return data


def stored_body(
    data: bytes,
    content_type: str | None,
    content_encoding: str | None,
    limit: int = DEFAULT_MAX_BODY,
    scrub: Callable[[bytes], bytes] | None = None,
) -> Packed | None:
    """The stored form of a body (greyproxy.bodies.pack): None for non-text types; its content-coding
    undone first (the raw bytes kept when that fails), then `scrub` (credential values, SPEC §12.7).
    A decoding that had more than `limit` bytes to give is cut there, and the result says so (`cut`)."""
    if not data or not is_text_like(content_type):
        return None
    cut = False
    if content_encoding:
        try:
            decoded = decode_body(data, content_encoding, limit + 1)  # one byte more: was there more?
        except ValueError:
            pass
        else:
            cut = len(decoded) > limit
            data = decoded[:limit] if cut else decoded
    if scrub is not None:
        data = scrub(data)
    p = pack(data, content_type)
    return Packed(p.blob, p.codec, p.charset, True) if cut else p


def _json_field(value: Any, default: Any) -> Any:
    if value is None:
        return default
    if isinstance(value, (bytes, str)):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return default
    return value


def transaction_json(row: dict[str, Any], include_bodies: bool = False) -> dict[str, Any]:
    """A stored row (dict) → the SPEC §7 item; bodies only when asked for, as they were captured: a text
    body as its text, a binary one as base64 with `<side>_body_encoding: "base64"` (SPEC §15)."""
    out: dict[str, Any] = {}
    for col in TRANSACTION_COLUMNS:
        if col in _BODY_META or (col in _BODY_COLUMNS and not include_bodies):
            continue
        value = row.get(col)
        if col in _BODY_COLUMNS:
            side = col[:-5]  # request / response
            value, out[f"{side}_body_encoding"] = api_value(read_side(row, side))
        elif col in _JSON_COLUMNS:
            value = _json_field(value, [] if col.endswith("_credentials") else {})
        elif col == "timestamp":
            value = rfc3339(value)
        elif col == "duration_ms":
            out["duration_us"] = micros(value)
            value = whole_ms(value)
        elif col == "host_mismatch":
            value = bool(value)
        out[col] = value
    return out
