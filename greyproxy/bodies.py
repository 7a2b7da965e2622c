"""Stored bodies (SPEC §15): the captured bytes kept as they were, compressed at rest, and the one
way to read them back.

A body is stored as three values (columns `<side>_body`, `<side>_body_codec`, `<side>_body_charset`
of http_transactions, migration 6):

- the bytes captured (after the content-coding was undone), as a BLOB, zstd-compressed when that
  makes them smaller (codec `ZSTD`) or as they are (codec `RAW`);
- the charset they decode under cleanly (from the Content-Type, UTF-8 by default), or NULL when
  they do not (the body is *binary*: kept byte for byte, never inflated by replacement characters).

Rows written before migration 6 hold the body as TEXT with NULL codec: read as that text.

In a journal record the BLOB travels as base64 (the journal is JSON); `from_record` turns it back.
The API shows a text body as its text and a binary one as base64 with `<side>_body_encoding:
"base64"` (`api_value`), which round-trips exactly.
"""

from __future__ import annotations

import base64
import binascii
import threading
from dataclasses import dataclass
from typing import Any

import zstandard

__all__ = ["RAW", "ZSTD", "Body", "Packed", "api_value", "charset_of", "from_record", "pack", "read_body", "to_record"]

RAW, ZSTD = 0, 1
LEVEL = 3  # bench/results.md: level 3 is as small as 9 on these bodies at a tenth of the time
COMPRESS_MIN = 64  # smaller bodies are kept as they are (a zstd frame's overhead is ~10 bytes)
DEFAULT_CHARSET = "utf-8"

_local = threading.local()  # zstd (de)compressors are not safe for concurrent use: one per thread


def _cctx() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=LEVEL)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def charset_of(content_type: str | None) -> str:
    """The `charset` parameter of a Content-Type (lower case, unquoted), else UTF-8."""
    if content_type:
        for param in content_type.split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                value = value.strip().strip('"').strip().lower()
                if value:
                    return value
    return DEFAULT_CHARSET


def _clean_text(data: bytes, charset: str) -> str | None:
    """`data` as text when it decodes under `charset` AND encodes back to the same bytes, else None."""
    try:
        text = data.decode(charset)
    except (LookupError, UnicodeDecodeError, ValueError):  # unknown label, bad bytes
        return None
    if charset in ("utf-8", "utf8", "ascii", "us-ascii"):
        return text  # a strict decode of these is exact both ways
    try:
        return text if text.encode(charset) == data else None  # e.g. utf-16 with a byte-swapped BOM
    except (LookupError, UnicodeEncodeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Packed:
    """A body as stored: `blob` (compressed per `codec`), `charset` None when binary."""

    blob: bytes
    codec: int
    charset: str | None


def pack(data: bytes, content_type: str | None) -> Packed:
    """The stored form of captured (decoded) bytes labelled `content_type`."""
    charset: str | None = charset_of(content_type)
    if _clean_text(data, charset) is None:  # type: ignore[arg-type]
        charset = None
    if len(data) >= COMPRESS_MIN:
        z = _cctx().compress(data)
        if len(z) < len(data):
            return Packed(z, ZSTD, charset)
    return Packed(data, RAW, charset)


@dataclass(frozen=True, slots=True)
class Body:
    """A stored body read back: its bytes, and its text when it is text (None when binary)."""

    data: bytes
    text: str | None

    def lossy_text(self) -> str:
        """Text for parsers that only look (the LLM dissectors): binary decoded as UTF-8 with U+FFFD."""
        return self.text if self.text is not None else self.data.decode("utf-8", "replace")


def read_body(value: Any, codec: int | None, charset: str | None) -> Body | None:
    """THE read of a stored body (API, HAR export, LLM dissectors, assembler): the three stored
    values → the body as captured; None when there is none (never captured, or dropped by the cap)."""
    if value is None:
        return None
    if isinstance(value, str):  # a row from before migration 6: the text as it was stored
        return Body(value.encode("utf-8", "surrogatepass"), value)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None  # not a stored body (a stored row never has that)
    data = bytes(value)
    if codec == ZSTD:
        data = _dctx().decompress(data)
    elif codec not in (RAW, None):
        raise ValueError(f"stored body with unknown codec {codec!r}")
    text = None
    if charset:
        try:
            text = data.decode(charset)
        except (LookupError, UnicodeDecodeError, ValueError):
            text = None
    return Body(data, text)


def read_side(row: dict[str, Any], side: str) -> Body | None:
    """`read_body` of a row's `request` or `response` body (columns absent on old rows read as NULL)."""
    return read_body(row.get(f"{side}_body"), row.get(f"{side}_body_codec"), row.get(f"{side}_body_charset"))


def api_value(body: Body | None) -> tuple[str | None, str | None]:
    """(value, encoding) for the API and HAR: text as is (encoding None), binary as base64 ("base64")."""
    if body is None:
        return None, None
    if body.text is not None:
        return body.text, None
    return base64.b64encode(body.data).decode("ascii"), "base64"


# --------------------------------------------------------------------------- journal records


def to_record(rec: dict[str, Any], side: str, p: Packed) -> None:
    """Put a packed body into a `transaction` record (base64: the journal is JSON)."""
    rec[f"{side}_body"] = base64.b64encode(p.blob).decode("ascii")
    rec[f"{side}_body_codec"] = p.codec
    rec[f"{side}_body_charset"] = p.charset


def _side_columns(side: str) -> tuple[str, str, str]:
    """A side's body columns: (body, codec, charset)."""
    return f"{side}_body", f"{side}_body_codec", f"{side}_body_charset"


_SIDE_COLUMNS = {side: _side_columns(side) for side in ("request", "response")}


def from_record(row: dict[str, Any], side: str) -> None:
    """The recorder's half of `to_record`: a base64 body with a codec → its BLOB. A record without a
    codec (an older producer) keeps its text body as it is (read back like a pre-migration-6 row)."""
    col, codec_col, charset_col = _SIDE_COLUMNS.get(side) or _side_columns(side)
    value, codec = row.get(col), row.get(codec_col)
    if codec is None:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"transaction record: {col} must be text")
        row[charset_col] = None
        return
    if codec not in (RAW, ZSTD) or not isinstance(value, str):
        raise ValueError(f"transaction record: bad {col} (codec {codec!r})")
    try:
        row[col] = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"transaction record: {col} is not base64: {exc}") from None
    charset = row.get(charset_col)
    if charset is not None and not isinstance(charset, str):
        raise ValueError(f"transaction record: bad {col}_charset")
