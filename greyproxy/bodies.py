"""Stored bodies (SPEC §15): the captured bytes kept as they were, compressed at rest, and the one
way to read them back.

A body is stored as three values (columns `<side>_body`, `<side>_body_codec`, `<side>_body_charset`
of http_transactions, migration 6):

- the bytes captured (after the content-coding was undone), as a BLOB, zstd-compressed when that
  makes them smaller (codec `ZSTD`) or as they are (codec `RAW`);
- the charset they decode under cleanly (from the Content-Type, UTF-8 by default), or NULL when
  they do not (the body is *binary*: kept byte for byte, never inflated by replacement characters).

Rows written before migration 6 hold the body as TEXT with NULL codec: read as that text.

Deltas (migration 9, `<side>_body_base`): the recorder stores a request body that repeats most of
an earlier body of its stream (an LLM request repeats the whole conversation each turn) as a zstd
frame compressed with that earlier body as a raw-content dictionary (codec `ZSTD_DELTA`, the base
row's id in `<side>_body_base`, same side; `DELTA_SIDES`). Reading one walks the chain back to a self-contained
body (at most `DELTA_CHAIN` frames): `Reader` does it, and every reader of stored rows (the API,
the HAR export, the assembler, the size cap and retention) goes through `Reader.inline` or
`read_side(..., reader)`. Dropping a body another one depends on first re-encodes that dependent
as self-contained (`detach`), so every body left reads back identically.

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

__all__ = [
    "RAW",
    "ZSTD",
    "ZSTD_DELTA",
    "Body",
    "DeltaEncoder",
    "Packed",
    "Reader",
    "api_value",
    "charset_of",
    "detach",
    "from_record",
    "pack",
    "read_body",
    "read_side",
    "readable_side",
    "to_record",
]

RAW, ZSTD, ZSTD_DELTA = 0, 1, 2
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
    """A body as stored: `blob` (compressed per `codec`), `charset` None when binary; `cut` when
    its decoding stopped at capture.maxBodyBytes (greyproxy.capture.stored_body)."""

    blob: bytes
    codec: int
    charset: str | None
    cut: bool = False


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


def read_body(value: Any, codec: int | None, charset: str | None, base: bytes | None = None) -> Body | None:
    """THE read of a stored body (API, HAR export, LLM dissectors, assembler): the three stored
    values → the body as captured; None when there is none (never captured, or dropped by the cap).
    A delta (`ZSTD_DELTA`) needs `base`, the content of the body it was compressed against."""
    if value is None:
        return None
    if isinstance(value, str):  # a row from before migration 6: the text as it was stored
        return Body(value.encode("utf-8", "surrogatepass"), value)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None  # not a stored body (a stored row never has that)
    data = bytes(value)
    if codec == ZSTD:
        data = _dctx().decompress(data)
    elif codec == ZSTD_DELTA:
        if base is None:
            raise ValueError("a delta body read without its base (use a bodies.Reader)")
        data = undelta(data, base)
    elif codec not in (RAW, None):
        raise ValueError(f"stored body with unknown codec {codec!r}")
    text = None
    if charset:
        try:
            text = data.decode(charset)
        except (LookupError, UnicodeDecodeError, ValueError):
            text = None
    return Body(data, text)


def read_side(row: dict[str, Any], side: str, reader: Reader | None = None) -> Body | None:
    """`read_body` of a row's `request` or `response` body (columns absent on old rows read as NULL);
    a delta's base comes from `reader` (the row's id names it)."""
    codec = row.get(f"{side}_body_codec")
    if codec == ZSTD_DELTA and row.get(f"{side}_body") is not None:
        if reader is None:
            raise ValueError("a delta body read without a bodies.Reader")
        data = reader.content(int(row["id"]), side)
        return None if data is None else read_body(data, RAW, row.get(f"{side}_body_charset"))
    return read_body(row.get(f"{side}_body"), codec, row.get(f"{side}_body_charset"))


# What reading a stored body raises when the stored bytes are not what their codec says (corrupt
# zstd, an unknown codec, a broken delta chain): the one body is unreadable, not the row.
READ_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, zstandard.ZstdError)


def readable_side(row: dict[str, Any], side: str, reader: Reader | None = None) -> tuple[Body | None, str | None]:
    """`read_side`, and instead of raising for a stored body that cannot be read, (None, why)."""
    try:
        return read_side(row, side, reader), None
    except READ_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}"


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
    if p.cut:  # (else the record keeps what the capture said: cut on the wire or not)
        rec[f"{side}_body_truncated"] = 1


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
    if codec not in (RAW, ZSTD) or not isinstance(value, str):  # deltas are made by the recorder only
        raise ValueError(f"transaction record: bad {col} (codec {codec!r})")
    try:
        row[col] = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"transaction record: {col} is not base64: {exc}") from None
    charset = row.get(charset_col)
    if charset is not None and not isinstance(charset, str):
        raise ValueError(f"transaction record: bad {col}_charset")


# --------------------------------------------------------------------------- deltas (migration 9)

DELTA_MIN = 2048  # smaller bodies are stored alone (and not remembered as bases)
DELTA_CHAIN = 32  # a chain holds a self-contained body and at most DELTA_CHAIN - 1 deltas after it
DELTA_PREFIX = 0.25  # a base must share this share of the new body as a common prefix, at least...
DELTA_PREFIX_MIN = 1024  # ...and this many bytes (an LLM request repeats its conversation's start)
DELTA_CANDIDATES = 4  # earlier bodies remembered per stream: the one sharing the longest prefix is the base
# Request bodies only: an LLM request repeats its conversation, an answer is new text; and plain
# traffic (GETs) has no request body, so it never pays for the look (bench/results.md).
DELTA_SIDES = ("request",)
DELTA_CACHE_BYTES = 32 * 1024 * 1024  # the recorder's memory for them (decoded bytes + stored blobs)
_BLOCK = 4096
_CHAIN_LIMIT = 4096  # frames a read follows at most, whatever DELTA_CHAIN was when the chain was written


def _dict(base: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def delta(data: bytes, base: bytes) -> bytes:
    """`data` as a zstd frame against `base` (a raw-content dictionary), with a content checksum:
    read against any other base it fails instead of giving wrong bytes."""
    return zstandard.ZstdCompressor(level=LEVEL, dict_data=_dict(base), write_checksum=True).compress(data)


def undelta(blob: bytes, base: bytes) -> bytes:
    return zstandard.ZstdDecompressor(dict_data=_dict(base)).decompress(blob)


def common_prefix(a: bytes, b: bytes) -> int:
    """The length of the common prefix of `a` and `b` (block by block, then by halves)."""
    n = min(len(a), len(b))
    i = 0
    while i + _BLOCK <= n and a[i : i + _BLOCK] == b[i : i + _BLOCK]:
        i += _BLOCK
    lo, hi = i, min(i + _BLOCK, n)  # a[:lo] == b[:lo]; the first difference is before hi (or none)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


_SIDES = ("request", "response")


class Reader:
    """Reads stored bodies through their delta chains: `execute(sql, params)` is a DB-API execute
    (a sqlite3 connection's, or peewee's `execute_sql`) on the database the rows came from. Keeps
    the last bodies it decoded (`cache_bytes`), so reading a chain's bodies one after the other
    decodes each frame once."""

    def __init__(self, execute: Any, cache_bytes: int = 16 * 1024 * 1024) -> None:
        self.execute = execute
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, str], bytes] = {}
        self._held = 0

    def _remember(self, key: tuple[int, str], data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        self._cache[key] = data
        self._held += len(data)
        while self._held > self.cache_bytes:
            old = next(iter(self._cache))
            self._held -= len(self._cache.pop(old))

    def content(self, tid: int, side: str) -> bytes | None:
        """The bytes of transaction `tid`'s `side` body as captured; None when it has none.
        Raises ValueError when a chain is broken (a base missing: a bug, never a state the store
        is left in)."""
        if side not in _SIDES:
            raise ValueError(f"no such body side: {side!r}")
        pending: list[tuple[int, bytes]] = []  # deltas to apply, newest first
        cur_id: int = tid
        data: bytes | None = None
        for _ in range(_CHAIN_LIMIT):  # chains are ≤ DELTA_CHAIN long (when written); a loop would be a bug
            key = (cur_id, side)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache[key] = self._cache.pop(key)  # most recently used last
                data = hit
                break
            row = self.execute(
                f"SELECT {side}_body, {side}_body_codec, {side}_body_base FROM http_transactions WHERE id = ?",
                (cur_id,),
            ).fetchone()
            if row is None or row[0] is None:
                if cur_id == tid:
                    return None
                raise ValueError(f"stored {side} body of transaction {tid}: its base {cur_id} is gone")
            value, codec, base = row
            if codec == ZSTD_DELTA:
                if base is None:
                    raise ValueError(f"stored {side} body of transaction {cur_id}: a delta without a base")
                pending.append((cur_id, bytes(value)))
                cur_id = int(base)
                continue
            body = read_body(value, codec, "utf-8")
            data = body.data if body is not None else None
            if data is None:
                return None
            self._remember(key, data)
            break
        else:
            raise ValueError(f"stored {side} body of transaction {tid}: its delta chain does not end")
        for rid, blob in reversed(pending):
            data = undelta(blob, data)
            self._remember((rid, side), data)
        return data

    def inline(self, rows: list[dict[str, Any]], keep_going: bool = False) -> list[dict[str, Any]]:
        """The rows with every delta body replaced by its content (codec RAW), in place: what leaves
        the store layer reads alone (`read_side` without a reader). `keep_going`: a body whose chain
        cannot be read is dropped (NULL) and why is put in `<side>_body_error`, instead of raising."""
        for row in rows:
            for side in _SIDES:
                if row.get(f"{side}_body_codec") == ZSTD_DELTA and row.get(f"{side}_body") is not None:
                    try:
                        row[f"{side}_body"] = self.content(int(row["id"]), side)
                    except READ_ERRORS as exc:
                        if not keep_going:
                            raise
                        row[f"{side}_body"] = None
                        row[f"{side}_body_error"] = f"{type(exc).__name__}: {exc}"
                    row[f"{side}_body_codec"] = RAW
                    if f"{side}_body_base" in row:
                        row[f"{side}_body_base"] = None
        return rows


def detach(execute: Any, ids: list[int], reader: Reader | None = None) -> int:
    """Before the bodies of `ids` are dropped (rows deleted or bodies set NULL): every body outside
    `ids` compressed against one of them is re-encoded as self-contained (same bytes). Run it in the
    same write transaction as the drop. Returns how many were re-encoded."""
    if not ids:
        return 0
    reader = reader or Reader(execute)
    marks = ",".join("?" * len(ids))
    n = 0
    for side in _SIDES:
        deps = execute(
            f"SELECT id FROM http_transactions WHERE {side}_body_base IN ({marks}) AND id NOT IN ({marks})",
            (*ids, *ids),
        ).fetchall()
        for (dep,) in deps:
            data = reader.content(int(dep), side)
            if data is None:
                continue
            z = _cctx().compress(data) if len(data) >= COMPRESS_MIN else data
            codec = ZSTD if z is not data and len(z) < len(data) else RAW
            execute(
                f"UPDATE http_transactions SET {side}_body = ?, {side}_body_codec = ?, {side}_body_base = NULL"
                " WHERE id = ?",
                (z if codec == ZSTD else data, codec, dep),
            )
            n += 1
    return n


class _Last:
    """A body the recorder stored, remembered as a possible base."""

    __slots__ = ("id", "data", "blob", "codec", "base", "depth")

    def __init__(self, tid: int, data: bytes, blob: bytes, codec: int, base: int | None, depth: int) -> None:
        self.id, self.data, self.blob, self.codec, self.base, self.depth = tid, data, blob, codec, base, depth

    def size(self) -> int:
        return len(self.data) + len(self.blob) + 100


class DeltaEncoder:
    """The recorder's half (one per recorder process): after a transaction row is inserted,
    `stored(cur, tid, container, method, url, request, response)` re-encodes each of its bodies (of
    `sides`) as a delta against the earlier body of the same stream (side, container, method, URL
    without its query) that shares the longest prefix with it, when that one is still stored as
    remembered and its chain is short enough; and remembers the body. Memory: at most `cache_bytes` of remembered bodies (least recently used
    streams forgotten first)."""

    def __init__(
        self,
        cache_bytes: int = DELTA_CACHE_BYTES,
        chain: int = DELTA_CHAIN,
        candidates: int = DELTA_CANDIDATES,
        sides: tuple[str, ...] = DELTA_SIDES,
    ) -> None:
        self.cache_bytes, self.chain, self.candidates, self.sides = cache_bytes, chain, candidates, sides
        self.streams: dict[tuple, list[_Last]] = {}
        self.held = 0
        self.counts = {"deltas": 0, "alone": 0, "saved_bytes": 0}

    def forget(self) -> None:
        self.streams.clear()
        self.held = 0

    def stored(
        self,
        cur: Any,
        tid: int,
        container: str | None,
        method: str | None,
        url: str | None,
        request: tuple[Any, Any],
        response: tuple[Any, Any],
    ) -> None:
        """Once after row `tid` is inserted, with `cur` in the same write transaction: the row's
        stream (container, method, url) and each side's stored (body, codec)."""
        path = (url or "").split("?", 1)[0]
        for side in self.sides:
            blob, codec = request if side == "request" else response
            if blob is None or type(blob) is not bytes:
                continue
            if codec == RAW:
                size = len(blob)
            elif codec == ZSTD:
                try:
                    size = zstandard.frame_content_size(blob)  # -1 when the frame does not say
                except zstandard.ZstdError:
                    continue
            else:
                continue
            if size < DELTA_MIN:
                continue
            self._side(cur, tid, (side, container, method, path), side, blob, codec)

    def _still_stored(self, cur: Any, side: str, last: _Last) -> bool:
        """Whether the row still holds exactly what was remembered (not dropped, re-encoded, nor a
        row of a batch that was rolled back)."""
        return (
            cur.execute(
                f"SELECT 1 FROM http_transactions WHERE id = ? AND {side}_body = ? AND {side}_body_codec = ?"
                f" AND {side}_body_base IS ?",
                (last.id, last.blob, last.codec, last.base),
            ).fetchone()
            is not None
        )

    def _side(self, cur: Any, tid: int, key: tuple, side: str, blob: bytes, codec: int) -> None:
        data = _dctx().decompress(blob) if codec == ZSTD else blob
        lasts = self.streams.pop(key, None) or []
        best: _Last | None = None
        best_len = max(DELTA_PREFIX_MIN, int(len(data) * DELTA_PREFIX)) - 1
        quick = best_len + 1  # bytes every base must share: compared first, in one go
        for last in lasts:
            if data[:quick] != last.data[:quick]:
                continue
            n = common_prefix(data, last.data)
            if n > best_len:
                best, best_len = last, n
        if best is not None and best.depth + 1 >= self.chain:
            best = None  # its chain is full: this body starts the next one (not a fork off an older one)
        entry = _Last(tid, data, blob, codec, None, 0)
        if best is not None and self._still_stored(cur, side, best):
            z = delta(data, best.data)
            if len(z) < len(blob):
                cur.execute(
                    f"UPDATE http_transactions SET {side}_body = ?, {side}_body_codec = ?, {side}_body_base = ?"
                    " WHERE id = ?",
                    (z, ZSTD_DELTA, best.id, tid),
                )
                self.counts["deltas"] += 1
                self.counts["saved_bytes"] += len(blob) - len(z)
                entry = _Last(tid, data, z, ZSTD_DELTA, best.id, best.depth + 1)
        elif best is not None:
            lasts.remove(best)
            self.held -= best.size()
        if entry.codec != ZSTD_DELTA:
            self.counts["alone"] += 1
        lasts.insert(0, entry)
        self.held += entry.size()
        while len(lasts) > self.candidates:
            self.held -= lasts.pop().size()
        self.streams[key] = lasts  # most recently used last
        while self.held > self.cache_bytes and self.streams:
            old = next(iter(self.streams))
            for last in self.streams.pop(old):
                self.held -= last.size()
