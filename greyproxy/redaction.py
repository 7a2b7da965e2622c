"""Header redaction (SPEC §7): names matching the default patterns or the `redactedHeaders` setting
get the value "[REDACTED]" in everything stored and published. The wire is never touched.

Patterns are case-insensitive globs (`*`, `?`, `[...]`) in which `_` and `-` are the same character
(`*api-key*` also covers `Api_Key`). The same patterns redact the values of matching query
parameters (`?access_token=…`) in a stored URL and in the URL-valued headers `Location`,
`Content-Location` and `Referer`. Bodies are stored as captured (not redacted).

The proxy applies a `Redactor` before a record leaves its process; the maintenance job
(`redact-headers`) re-applies the current one to stored rows (headers and URLs).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

import orjson

__all__ = [
    "DEFAULT_REDACTED_HEADERS",
    "REDACTED",
    "SESSION_ID_HEADERS",
    "URL_HEADERS",
    "Redactor",
    "canonical_header_name",
    "extra_patterns",
]

DEFAULT_REDACTED_HEADERS: tuple[str, ...] = (
    "Authorization",
    "Proxy-Authorization",
    "Cookie",
    "Set-Cookie",
    "*api-key*",
    "*apikey*",
    "*token*",
    "*secret*",
    "*auth*",
    "*password*",
    "*passwd*",
    "*session*",
)
REDACTED = "[REDACTED]"
# LLM clients' session ids (SPEC §13.2 reads them: Claude Code's `X-Claude-Code-Session-Id`, Codex's
# `session_id`): a UUID there names a conversation, not a secret (the same id is in the request body,
# which is stored as sent), so these names are kept when their value is a UUID and only the default
# `*session*` matches them. Exactly these spellings (any case): `session_id` with its underscore,
# which web servers' own session headers do not use (`Session-Id` stays redacted).
SESSION_ID_HEADERS = frozenset({"x-claude-code-session-id", "session_id"})  # (lower case, as sent)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
URL_HEADERS = frozenset({"location", "content-location", "referer"})  # their values are URLs: query redaction
_CACHE_LIMIT = 4096  # distinct header names remembered per Redactor (bounded: names come from peers)
# The fields whose first value `Redactor.recorded` also gives (1: Content-Type, 2: Content-Encoding), by
# lower-case name: what a record keeps of a response besides its fields.
_PICKED = {"content-type": 1, "content-encoding": 2}
_dumps = orjson.dumps  # (a module global: no attribute lookup on `orjson` per line)
_REDACTED_JSON = _dumps(REDACTED).decode() + "]"
_BITS = 62  # canonical names with a bit of their own in `Redactor.recorded`'s check (the 63rd shared)
_NOTHING = (None, None)  # `Redactor.recorded`'s place of a redacted field (equal to no field)


# The fields of one name `Redactor._field` remembers at most (until its cache starts over): a name whose
# value changes with every answer has more, one that repeats its values (Server, Content-Type) fewer.
_VARYING = 64


def _json_string(value: str) -> str:
    """`orjson.dumps(value).decode()`: a value of printable ASCII without `"` or `\\` (the usual field
    value) is written as it is between quotes, without the call (tests compare them)."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return _dumps(value).decode()


def canonical_header_name(name: str) -> str:
    """'x-api-key' → 'X-Api-Key' (Go's canonical MIME form, which the reference stores)."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def extra_patterns(value: Any) -> list[str]:
    """The user's extra patterns from a stored `redactedHeaders` value (anything malformed ignored)."""
    if not isinstance(value, list):
        return []
    return [p.strip() for p in value if isinstance(p, str) and p.strip()]


class Redactor:
    """Decides which header names are redacted; immutable once built (swap it when settings change)."""

    __slots__ = (
        "patterns",
        "_ids",
        "_exact",
        "_glob",
        "_seen",
        "_names",
        "_bits",
        "_fields",
        "_varying",
        "_last_lines",
        "_last_pairs",
    )  # (redaction.pxd, compiled)

    def __init__(self, extra: Iterable[str] = ()) -> None:
        patterns = [_fold(p) for p in (*DEFAULT_REDACTED_HEADERS, *extra)]
        self.patterns: tuple[str, ...] = tuple(dict.fromkeys(patterns))
        self._exact = frozenset(p for p in self.patterns if not any(c in p for c in "*?["))
        globs = [fnmatch.translate(p) for p in self.patterns if p not in self._exact]
        self._glob = re.compile("|".join(globs)) if globs else None
        # the session-id names kept for a UUID value: those no extra pattern of the user's names
        extra_folded = [_fold(p) for p in extra]
        self._ids = frozenset(
            n for n in SESSION_ID_HEADERS if not any(fnmatch.fnmatchcase(_fold(n), p) for p in extra_folded)
        )
        self._seen: dict[str, bool] = {}
        # raw name -> (canonical name, redacted: 0 no, 1 yes, 2 yes but a UUID (SESSION_ID_HEADERS), a URL header?, ...): `_name`
        self._names: dict[str, tuple[str, int, bool, int, str, int]] = {}
        self._bits: dict[str, int] = {}  # canonical name -> its bit (`_name`)
        # a field (a head's line, or a (name, value) pair) -> its recorded form (`_field`), for
        # `header_lines` and `recorded`
        self._fields: dict[str | tuple[str, str], tuple[str, str, str, tuple[int, str] | None, int]] = {}
        self._varying: dict[str, int] = {}  # raw name -> how many of its fields `_fields` holds (`_field`)
        # The fields `recorded` was last given at each place, as lines and as pairs, each with its
        # recorded form (`_field`'s; `_NOTHING` where that was a redacted field's, which is never
        # kept): most heads repeat the one before field for field (the same server, the same client),
        # and a comparison with the field there costs a fraction of the look-up in `_fields` (a
        # new line's hash, then the same comparison).
        self._last_lines: list[tuple[Any, Any]] = []
        self._last_pairs: list[tuple[Any, Any]] = []

    def matches(self, name: str) -> bool:
        lname = _fold(name)
        hit = self._seen.get(lname)
        if hit is None:
            hit = lname in self._exact or (self._glob is not None and self._glob.match(lname) is not None)
            if len(self._seen) < _CACHE_LIMIT:
                self._seen[lname] = hit
        return hit

    def _name(self, name: str) -> tuple[str, int, bool, int, str, int]:
        """(canonical name, redacted (0, 1, or 2: unless the value is a UUID), a URL header?, 1 for Content-Type / 2 for Content-Encoding / 0,
        the JSON text that starts the name's field in `recorded`: `"Name":[`, the name's bit in
        `recorded`'s check for a name met twice) of a raw header name, remembered."""
        key = canonical_header_name(name)
        bits = self._bits
        bit = bits.get(key)
        if bit is None:
            # The first _BITS canonical names each get their own bit; later ones all share the last
            # (two of them in one head read as a name met twice: recorded the slow way, still right).
            bit = 1 << min(len(bits), _BITS)
            if len(bits) < _CACHE_LIMIT:
                bits[key] = bit  # (never forgotten: a name's bit must stay what its `_names` entry says)
        redacted = self.matches(name)
        hit = (
            key,
            (2 if name.lower() in self._ids else 1) if redacted else 0,
            key.lower() in URL_HEADERS,
            _PICKED.get(name.lower(), 0),
            _dumps(key).decode() + ":[",
            bit,
        )
        if len(self._names) < _CACHE_LIMIT:
            self._names[name] = hit
        return hit

    def _field(self, field: str | tuple[str, str]) -> tuple[str, str, str, tuple[int, str] | None, int]:
        """A field, a head's line (`name:value`, the value taken without its surrounding blanks) or a
        (name, value) pair, as recorded: (canonical name, value as recorded, the JSON text of
        `"Name":["value"]` as orjson writes it, (1 or 2, its value) for a Content-Type or
        Content-Encoding field else None, the name's bit). Remembered, bounded, but for a redacted
        name (whose field holds a secret, and whose value is recorded as REDACTED anyway)."""
        if isinstance(field, str):
            line = field
            name, _, value = line.partition(":")
            value = value.strip(" \t")
        else:
            name, value = field
        hit = self._names.get(name)
        if hit is None:
            hit = self._name(name)
        role = hit[3]
        pick = (role, value) if role else None
        if hit[1] and (hit[1] == 1 or not _is_uuid(value)):
            return (hit[0], REDACTED, hit[4] + _REDACTED_JSON, pick, hit[5])
        if hit[2]:
            value = self.url(value)
        got = (hit[0], value, f"{hit[4]}{_json_string(value)}]", pick, hit[5])
        # A name whose fields keep changing (Date, X-Request-Id, ...) is not remembered past `_VARYING`
        # of them: its lines would only fill the bounded cache and push out the ones that come back.
        varying = self._varying
        count = varying.get(name, 0)
        if count >= _VARYING:
            return got
        seen = self._fields
        if len(seen) >= _CACHE_LIMIT:
            seen.clear()  # (fields come from peers: bounded, start over)
            varying.clear()
        varying[name] = count + 1
        seen[field] = got
        return got

    def header_lines(self, lines: Iterable[str] | Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        """`headers` of fields given as the lines of a head (`name:value`, the value taken without its
        surrounding blanks), or as pairs: what `headers` gives for the pairs read from them, without
        the pairs. Most lines of a server's answers come back word for word (Server, Content-Type,
        Vary, ...): each field's recorded form is remembered (`_field`)."""
        out: dict[str, list[str]] = {}
        seen = self._fields
        for field in lines:
            got = seen.get(field)
            if got is None:
                got = self._field(field)
            key = got[0]
            values = out.get(key)
            if values is None:
                out[key] = [got[1]]
            else:
                values.append(got[1])
        return out

    def recorded(self, fields: list[str] | list[tuple[str, str]]) -> tuple[str, str | None, str | None]:
        """What a record keeps of a head's fields, given as its lines or as (name, value) pairs:
        (`header_lines(fields)` as JSON text, as orjson writes it; the first Content-Type value; the
        first Content-Encoding value, as the heads' `header` reads them, unredacted). The JSON text is
        joined from each field's, remembered with the field (`_field`): no map of lists is built, nor
        dumped, but when a name comes back (`Vary` twice: its values are one list)."""
        parts: list[str] = []
        ct: str | None = None
        ce: str | None = None
        seen = self._fields
        mask = 0  # the bits of the names met so far
        twice = False
        last = self._last_lines if fields and type(fields[0]) is str else self._last_pairs
        n = len(last)
        i = 0
        for field in fields:
            got = None
            if i < n:
                prev = last[i]
                if prev[0] == field:
                    got = prev[1]
            if got is None:
                got = seen.get(field)
                if got is None:
                    got = self._field(field)
                entry = (field, got) if got[1] is not REDACTED else _NOTHING
                if i < n:
                    last[i] = entry
                else:
                    last.append(entry)
                    n += 1
            i += 1
            pick = got[3]
            if pick is not None:
                if pick[0] == 1:
                    if ct is None:
                        ct = pick[1]
                elif ce is None:
                    ce = pick[1]
            bit = got[4]
            if mask & bit:
                twice = True
            mask |= bit
            parts.append(got[2])
        if twice:  # a name more than once (or two names sharing a bit): its values are one list
            return _dumps(self.header_lines(fields)).decode(), ct, ce
        return f"{{{','.join(parts)}}}", ct, ce

    def headers(self, pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        """Header pairs → {canonical name: [values]} with matching values replaced."""
        out: dict[str, list[str]] = {}
        names = self._names
        for name, value in pairs:
            hit = names.get(name)  # once per record and header: the same few names come back every time
            if hit is None:
                hit = self._name(name)
            key = hit[0]
            if hit[1] and (hit[1] == 1 or not _is_uuid(value)):
                value = REDACTED
            elif hit[2]:
                value = self.url(value)
            values = out.get(key)
            if values is None:
                out[key] = [value]
            else:
                values.append(value)
        return out

    def url(self, url: str) -> str:
        """`url` with the values of query parameters whose names match replaced by [REDACTED]
        (everything else byte for byte as it was)."""
        if not isinstance(url, str) or "?" not in url:  # (most URLs: a containment test, no method call)
            return url
        q = url.find("?")
        h = url.find("#", q)
        query, tail = (url[q + 1 :], "") if h < 0 else (url[q + 1 : h], url[h:])
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, eq, value = part.partition("=")
            if eq and value != REDACTED and self.matches(unquote_plus(name)):
                parts[i] = f"{name}={REDACTED}"
                changed = True
        return f"{url[: q + 1]}{'&'.join(parts)}{tail}" if changed else url

    def redact_map(self, headers: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Re-apply to a stored {name: [values]} map; (new map, whether anything changed)."""
        out: dict[str, Any] = {}
        changed = False
        for name, values in headers.items():
            vals = values if isinstance(values, list) else [values]
            if self.matches(name):
                kept = name.lower() in self._ids
                new = [v if kept and isinstance(v, str) and _is_uuid(v) else REDACTED for v in vals]
            elif name.lower() in URL_HEADERS:
                new = [self.url(v) if isinstance(v, str) else v for v in vals]
            else:
                out[name] = values
                continue
            changed = changed or new != vals
            out[name] = new
        return out, changed


def _is_uuid(value: str) -> bool:
    return len(value) == 36 and _UUID.fullmatch(value) is not None


def _fold(name: str) -> str:
    """Lower case with '_' read as '-': header and parameter names compare in this form."""
    return name.lower().replace("_", "-")
