"""How a dissected request's extraction is kept in `llm_requests.extraction` (SPEC §13, §15).

An LLM client sends the whole conversation with every request, so the extraction of request N
holds the messages of requests 1..N−1 again: kept whole for every request, a session of N turns
stores its history N times over (measured: ~63 KB per request of a 40-turn session, more than
the request itself, while its body is kept as a 54-byte delta). Assembly only ever reads the
extraction of each conversation's newest request (greyproxy/llm/assemble.py, `_ex`), so the
maintenance process keeps those whole and the others *thin* (`extraction_form`, migration 12):

- `FULL_TEXT` (0): the extraction as JSON text (rows written before migration 12);
- `FULL_ZSTD` (1): the extraction as zstd-compressed JSON;
- `THIN` (2): JSON text of the extraction without its repeated parts (`REPEATED`: the messages,
  the system prompt, the tools). The rest stays: the response, the usage, the model. A thin row
  that assembly needs again is dissected again from its stored transaction
  (services/maintenance/assembler.py, `_extraction`).

An assembled conversation (`conversations.data`, SPEC §13.6) is kept as zstd-compressed JSON
(`conversation`; its turns and messages repeat the same text): read with `load_conversation`,
which also reads the JSON text of rows written before. Its list form (`conversations.item`,
migration 13) is kept beside it as plain JSON (`item`: no turns or messages, about a kilobyte), so
a listing never decompresses the detail.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson
import zstandard

FULL_TEXT, FULL_ZSTD, THIN = 0, 1, 2
REPEATED = ("messages", "system", "tools")
LEVEL = 3


def full(ex: dict[str, Any]) -> tuple[bytes, int]:
    """(value, form) keeping the whole extraction."""
    return zstandard.ZstdCompressor(level=LEVEL).compress(orjson.dumps(ex)), FULL_ZSTD


def thin(ex: dict[str, Any]) -> tuple[str, int]:
    """(value, form) keeping the extraction without its repeated parts."""
    return orjson.dumps({k: v for k, v in ex.items() if k not in REPEATED}).decode(), THIN


def load(value: str | bytes, form: int) -> dict[str, Any]:
    """The stored extraction (a thin one lacks REPEATED)."""
    if form == FULL_ZSTD:
        return orjson.loads(zstandard.ZstdDecompressor().decompress(value))  # type: ignore[arg-type]
    return orjson.loads(value)


def conversation(detail: dict[str, Any]) -> bytes:
    """`conversations.data` for a conversation's detail form."""
    return zstandard.ZstdCompressor(level=LEVEL).compress(orjson.dumps(detail))


def item(listed: dict[str, Any]) -> bytes:
    """`conversations.item` for a conversation's list form."""
    return orjson.dumps(listed)


def load_conversation(value: str | bytes) -> dict[str, Any]:
    """A conversation's detail form from `conversations.data` (zstd, or JSON text written before)."""
    if isinstance(value, bytes) and value[:4] == b"\x28\xb5\x2f\xfd":  # a zstd frame
        return orjson.loads(zstandard.ZstdDecompressor().decompress(value))
    return orjson.loads(value)
