"""Substitution over one request head (SPEC §12.5) and scrubbing of what was substituted from the
record (§12.7). Pure: strings in, strings out; the live map is whatever `lookup` answers.

`plan()` checks everything first and substitutes only when nothing is refused (all or nothing):

- every occurrence of `greyproxy:credential:` in a header value (an `Authorization: Basic` token
  decoded first) and of it raw or with `%3A` anywhere in the target must begin a well-formed,
  live placeholder, else `unknown_placeholder` (or `credentials_unavailable` without a key);
- a live one in the path or in a query parameter name: `placeholder_in_path`;
- a credential with `hosts`: the destination contacted and the request's Host must both match
  one of them, else `credential_host_mismatch`; an unbound credential in a request that goes
  upstream in clear: `plaintext_credential`;
- then header values get the value (its UTF-8 bytes; Basic re-encoded) and query values its
  percent-encoding; nothing else of the target changes.

Header strings here are the wire's bytes as latin-1 (as `http1` parses them).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import orjson

from greyproxy.policy.patterns import DestinationPattern, analyse_host, destination_pattern, parse_ip

from .placeholders import PLACEHOLDER_RE, PREFIX
from .reasons import CREDENTIALS_UNAVAILABLE, HOST_MISMATCH, IN_PATH, PLAINTEXT, REASONS, UNKNOWN

__all__ = [
    "CREDENTIALS_UNAVAILABLE",
    "HOST_MISMATCH",
    "IN_PATH",
    "Live",
    "PLAINTEXT",
    "Plan",
    "REASONS",
    "Refused",
    "Scrubber",
    "UNKNOWN",
    "authority_host",
    "plan",
]

_SEEN_HOSTS = 256  # hosts remembered per credential by Live.allows

_BPREFIX = PREFIX.encode()
_T_COLON = r"(?::|%3[aA])"
_TARGET_PREFIX = re.compile(rf"greyproxy{_T_COLON}credential{_T_COLON}")
_TARGET_PLACEHOLDER = re.compile(
    rf"greyproxy{_T_COLON}credential{_T_COLON}v1{_T_COLON}([A-Za-z0-9._-]{{1,128}}){_T_COLON}([0-9a-f]{{32}})"
)


@dataclass(frozen=True, slots=True)
class Live:
    """One live credential as the proxy holds it. `expires_at` None: a global credential."""

    placeholder: str
    value: str
    label: str
    session_id: str | None = None
    credential_id: str | None = None
    hosts: tuple[str, ...] = ()
    expires_at: float | None = None
    patterns: tuple[DestinationPattern, ...] = field(default=(), compare=False, repr=False)
    wire: str = field(default="", compare=False, repr=False)  # the value's UTF-8 bytes as latin-1
    scrub: Scrubber | None = field(default=None, compare=False, repr=False)  # its own, built once (see Plan)
    seen_hosts: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)  # allows()' answers

    def __post_init__(self) -> None:
        if not self.patterns and self.hosts:
            object.__setattr__(self, "patterns", tuple(destination_pattern(h) for h in self.hosts))
        object.__setattr__(self, "wire", self.value.encode("utf-8").decode("latin-1"))

    def __repr__(self) -> str:  # never the value
        return f"Live(label={self.label!r}, session_id={self.session_id!r}, hosts={self.hosts!r})"

    def allows(self, host: str) -> bool:
        """Whether `host` (a name or an IP literal) matches one of the credential's hosts
        (remembered per host: the same few hosts come again and again)."""
        seen = self.seen_hosts
        ok = seen.get(host)
        if ok is None:
            h, _v, _n = analyse_host(host)
            ip = parse_ip(h)
            ok = any(p.matches(h, ip) for p in self.patterns)
            if len(seen) < _SEEN_HOSTS:
                seen[host] = ok
        return ok


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str
    body: str
    labels: tuple[str, ...] = ()
    session_id: str | None = None


@dataclass(slots=True)
class Plan:
    """What to send: `headers`/`target` are None when unchanged; `used` the credentials
    substituted (first-use order); `refused` instead when the request must not go."""

    refused: Refused | None = None
    headers: list[tuple[str, str]] | None = None
    target: str | None = None
    used: list[Live] = field(default_factory=list)
    basic_tokens: list[str] = field(default_factory=list)  # re-encoded Basic tokens (for the scrub)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(c.label for c in self.used))

    @property
    def session_id(self) -> str | None:
        return next((c.session_id for c in self.used if c.session_id is not None), None)

    def scrubber(self) -> Scrubber | None:
        used = self.used
        if not used:
            return None
        if len(used) == 1 and not self.basic_tokens:  # the usual case: built once per credential
            lv = used[0]
            if lv.scrub is None:
                object.__setattr__(lv, "scrub", Scrubber(used))
            return lv.scrub
        return Scrubber(used, self.basic_tokens)


Lookup = Callable[[str], "Live | None"]


class _Unknown(Exception):
    def __init__(self, where: str, scope: str | None) -> None:
        super().__init__(where)
        self.where, self.scope = where, scope


def _find(text: str, where: str, lookup: Lookup) -> list[tuple[int, int, Live]]:
    """The live placeholders in a header value (raw prefix), each (start, end, credential);
    `where` is the field's name ("header <where>" in a refusal)."""
    out: list[tuple[int, int, Live]] = []
    pos = text.find(PREFIX)
    while pos >= 0:
        m = PLACEHOLDER_RE.match(text, pos)
        if m is None:
            raise _Unknown(_header(where), None)
        live = lookup(m.group(0))
        if live is None:
            raise _Unknown(_header(where), m.group(1))
        out.append((pos, m.end(), live))
        pos = text.find(PREFIX, m.end())
    return out


def _find_target(text: str, where: str, lookup: Lookup) -> list[tuple[int, int, Live]]:
    """The live placeholders in a piece of the target, raw or with `:` as `%3A`."""
    out: list[tuple[int, int, Live]] = []
    for pm in _TARGET_PREFIX.finditer(text):
        if out and pm.start() < out[-1][1]:
            continue
        m = _TARGET_PLACEHOLDER.match(text, pm.start())
        if m is None:
            raise _Unknown(where, None)
        ph = f"greyproxy:credential:v1:{m.group(1)}:{m.group(2)}"
        live = lookup(ph)
        if live is None:
            raise _Unknown(where, m.group(1))
        out.append((m.start(), m.end(), live))
    return out


def _splice(text: str, found: list[tuple[int, int, Live]], form: Callable[[Live], str]) -> str:
    parts: list[str] = []
    last = 0
    for start, end, live in found:
        parts.append(text[last:start])
        parts.append(form(live))
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _basic(value: str) -> bytes | None:
    """The decoded credentials of an `Authorization: Basic` value, or None."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    token = token.strip()
    token += "=" * (-len(token) % 4)  # some clients leave the padding out; it decodes the same
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None


def authority_host(authority: str) -> str:
    """The host of a Host header / authority (`[::1]:8443` → `::1`, `a.example:443` → `a.example`)."""
    a = authority.strip()
    if a.startswith("["):
        end = a.find("]")
        return a[1:end] if end > 0 else a
    if a.count(":") == 1:
        return a.split(":", 1)[0]
    return a


def _header(name: str) -> str:
    """How a refusal names a header: `header X-Api-Key`."""
    if name.startswith("Authorization ("):
        return f"header {name}"
    return "header " + "-".join(p[:1].upper() + p[1:] for p in name.lower().split("-"))


def plan(
    headers: Sequence[tuple[str, str]],
    target: str,
    lookup: Lookup,
    *,
    destination: str,
    authority: str = "",
    plaintext: bool = False,
    available: bool = True,
) -> Plan:
    """Check and substitute one request: `headers` are the fields going upstream, `target` the
    origin-form target; `destination` the host the request is sent to (intercepted TLS: the name
    the certificate is verified against), `authority` the request's Host; `plaintext` when the
    upstream connection is not TLS; `available` False when no key is usable."""
    # -- find (cheap when there is nothing: one substring search per value and one over the target)
    hits: list[tuple[int, list[tuple[int, int, Live]], bytes | None]] = []  # (header index, found, basic)
    target_hits: list[tuple[int, int, Live]] = []
    path_lives: list[Live] = []
    try:
        for i, (k, v) in enumerate(headers):
            if PREFIX in v:
                if not available:
                    return _unavailable()
                hits.append((i, _find(v, k, lookup), None))
            elif len(v) > 6 and k.lower() == "authorization":
                raw = _basic(v)
                if raw is not None and _BPREFIX in raw:
                    if not available:
                        return _unavailable()
                    hits.append((i, _find(raw.decode("latin-1"), "Authorization (Basic credentials)", lookup), raw))
        if "greyproxy" in target and _TARGET_PREFIX.search(target):
            if not available:
                return _unavailable()
            path, q, query = target.partition("?")
            path_lives += [lv for _s, _e, lv in _find_target(path, "the request path", lookup)]
            if q:
                offset = len(path) + 1
                for param in query.split("&"):
                    pname, eq, pvalue = param.partition("=")
                    if _TARGET_PREFIX.search(pname):
                        path_lives += [lv for _s, _e, lv in _find_target(pname, "a query parameter name", lookup)]
                    if eq and _TARGET_PREFIX.search(pvalue):
                        at = offset + len(pname) + 1
                        where = f"query parameter {pname[:64]}"
                        target_hits += [(at + s, at + e, lv) for s, e, lv in _find_target(pvalue, where, lookup)]
                    offset += len(param) + 1
    except _Unknown as u:
        scope = f" ({'scope ' + u.scope if u.scope else 'malformed'})"
        return Plan(
            refused=Refused(
                UNKNOWN, f"Greyproxy: unknown or expired credential placeholder in {u.where}{scope}; it was not sent"
            )
        )
    if not hits and not target_hits and not path_lives:
        return Plan()
    if path_lives:
        labels = tuple(dict.fromkeys(lv.label for lv in path_lives))
        return Plan(
            refused=Refused(
                IN_PATH,
                f"Greyproxy: credential {', '.join(labels)} appears in the request "
                "path or a query parameter name; placeholders are only substituted "
                "in header and query values",
                labels,
                path_lives[0].session_id,
            )
        )
    used: list[Live] = []
    seen: set[str] = set()
    for _i, found, _raw in hits:
        for _s, _e, lv in found:
            if lv.placeholder not in seen:
                seen.add(lv.placeholder)
                used.append(lv)
    for _s, _e, lv in target_hits:
        if lv.placeholder not in seen:
            seen.add(lv.placeholder)
            used.append(lv)
    # -- where it may go
    req_host = authority_host(authority) if authority else ""
    for lv in used:
        if lv.patterns:
            bad = (
                destination
                if not lv.allows(destination)
                else (req_host if req_host and not lv.allows(req_host) else None)
            )
            if bad is not None:
                return Plan(
                    refused=Refused(
                        HOST_MISMATCH,
                        f"Greyproxy: credential {lv.label} may only be sent to {', '.join(lv.hosts)}, not {bad}",
                        (lv.label,),
                        lv.session_id,
                    )
                )
        elif plaintext:
            return Plan(
                refused=Refused(
                    PLAINTEXT,
                    f"Greyproxy: credential {lv.label} is bound to no host and "
                    f"may not be sent in clear (plain HTTP) to {destination}",
                    (lv.label,),
                    lv.session_id,
                )
            )
    # -- substitute
    out = Plan(used=used)
    if hits:
        new = list(headers)
        for i, found, raw in hits:
            k, v = new[i]
            if raw is None:
                new[i] = (k, _splice(v, found, lambda lv: lv.wire))
            else:
                decoded = _splice(raw.decode("latin-1"), found, lambda lv: lv.wire).encode("latin-1")
                token = base64.b64encode(decoded).decode("ascii")
                out.basic_tokens.append(token)
                new[i] = (k, f"{v.strip().partition(' ')[0]} {token}")
        out.headers = new
    if target_hits:
        out.target = _splice(target, target_hits, lambda lv: quote(lv.value, safe=""))
    return out


def _unavailable() -> Plan:
    return Plan(
        refused=Refused(
            CREDENTIALS_UNAVAILABLE,
            "Greyproxy: credential placeholders cannot be substituted "
            "because the credential key is unusable; it was not sent",
        )
    )


# A JSON string value and the key it belongs to (`"key": "value"`), as a stream of events carries
# them (SSE `data:` lines, NDJSON, one JSON document): the value's text, quotes excluded, is group 2;
# group 3 is its closing quote, empty for a value the text ends inside (a body cut there).
# Possessive: no backtracking, linear in the text whatever it holds.
_KEYED_STRING = re.compile(r'"((?:[^"\\\n]|\\.){1,64}+)"[ \t]*:[ \t]*"((?:[^"\\\n]|\\.)*+)("|\Z)')
TAIL_MIN = 4  # a body's last characters that begin a value are scrubbed from this many on
TAIL_VALUES = 16  # the keys of this many last string values of a body get the tail check


def _json_text(raw: str) -> str | None:
    """The text of a JSON string literal's inside (`raw`), or None; a literal cut inside an escape
    (a body cut there) loses that escape."""
    for cut in range(0, 6):
        try:
            return orjson.loads(f'"{raw[: len(raw) - cut]}"') if cut <= len(raw) else None
        except ValueError:  # (orjson's error; also lone surrogates: bytes that were not UTF-8)
            continue
    return None


class Scrubber:
    """Replaces what was substituted in an exchange — each value raw, percent-encoded (either hex
    case), JSON-escaped, as header bytes, in base64 (standard or URL-safe, padded or not), and each
    re-encoded Basic token — by `[REDACTED:<label>]` in recorded text (response headers and body,
    WebSocket messages). Longest first.

    In a body (`data`) also, over the JSON string values it holds (`"key": "value"`, escapes
    undone: `\\/`, `\\u00e4`):
    - a value split over the string values of one key (a streamed answer's deltas:
      `"text":"sk-ant-"` in one event, `"text":"…rest"` in the next), which a reader joining the
      deltas (the conversation assembler) would put back together: the first part becomes the
      marker, the other parts lose theirs (parts of two interleaved streams of one key, as
      `n=2` choices, are joined in body order: a value split across both is not seen);
    - a value written with escapes another form does not match;
    - the start of a value at the very end of the text, from `TAIL_MIN` characters on (a body cut by
      `capture.maxBodyBytes` mid-value), and at the end of the joined values of each key among the
      body's last `TAIL_VALUES` string values (a stream cut between two deltas, or inside one).
    `message` (a WebSocket message) is `text` and the end check only: each message is scrubbed on
    its own, on the event loop, in time linear in its length.
    """

    __slots__ = ("needles", "_re", "_labels")

    def __init__(self, used: Sequence[Live], basic_tokens: Sequence[str] = ()) -> None:
        label_of: dict[str, str] = {}
        for lv in used:
            v = lv.value
            pct = quote(v, safe="")
            forms = {
                v,
                lv.wire,
                pct,
                pct.lower(),
                re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), pct),
                orjson.dumps(v).decode()[1:-1],
                quote(v, safe="", encoding="utf-8").replace("%20", "+"),
            }
            # JSON as other writers escape it: ASCII-only (`\u00e4`, either hex case), `\/`, Go's `\u003c`
            ascii_json = json.dumps(v)[1:-1]
            plain_json = orjson.dumps(v).decode()[1:-1]
            go_json = plain_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            for j in (
                ascii_json,
                re.sub(r"\\u[0-9a-f]{4}", lambda m: m.group(0).upper().replace("\\U", "\\u"), ascii_json),
                go_json,
            ):
                forms |= {j, j.replace("/", "\\/")}
            forms.add(plain_json.replace("/", "\\/"))
            b64 = base64.b64encode(v.encode()).decode()  # its base64 alone (SPEC §12 acceptance 12)
            forms |= {b64, b64.rstrip("="), base64.urlsafe_b64encode(v.encode()).decode().rstrip("=")}
            for f in forms:
                if f:
                    label_of.setdefault(f, lv.label)
        labels = ", ".join(dict.fromkeys(lv.label for lv in used))
        for t in basic_tokens:
            label_of.setdefault(t, labels)
            label_of.setdefault(t.rstrip("="), labels)
        self.needles = sorted(label_of.items(), key=lambda kv: -len(kv[0]))
        self._labels = dict(self.needles)
        self._re = re.compile("|".join(re.escape(n) for n, _l in self.needles))

    def text(self, s: str | None) -> str | None:
        if not s:
            return s
        labels = self._labels
        return self._re.sub(lambda m: f"[REDACTED:{labels[m.group(0)]}]", s)

    def data(self, b: bytes) -> bytes:
        """`text` over stored bytes: UTF-8 with any other byte kept as it was (surrogateescape), so
        the bytes round-trip exactly but for what is scrubbed; then JSON string values (split,
        escaped, cut) and a cut end."""
        if not b:
            return b
        s = self.text(b.decode("utf-8", "surrogateescape")) or ""
        s = self._split(s)
        s = self._tail(s)
        return s.encode("utf-8", "surrogateescape")

    def message(self, b: bytes) -> bytes:
        """`data` for one WebSocket message: the forms and a cut end only."""
        if not b:
            return b
        s = self.text(b.decode("utf-8", "surrogateescape")) or ""
        return self._tail(s).encode("utf-8", "surrogateescape")

    def _tail_hit(self, s: str) -> tuple[int, str] | None:
        """(length, label) of the longest start of a needle that `s` ends with (TAIL_MIN or more);
        each needle costs a search of its length's end of `s`."""
        best: tuple[int, str] | None = None
        for needle, label in self.needles:
            n = len(needle)
            if n <= TAIL_MIN:
                continue
            window = s[-(n - 1) :]
            head = needle[:TAIL_MIN]
            i = window.find(head)
            while i >= 0:
                if needle.startswith(window[i:]):
                    k = len(window) - i
                    if best is None or k > best[0]:
                        best = (k, label)
                    break  # (the first such place is the longest for this needle)
                i = window.find(head, i + 1)
        return best

    def _tail(self, s: str) -> str:
        hit = self._tail_hit(s)
        return s if hit is None else f"{s[: len(s) - hit[0]]}[REDACTED:{hit[1]}]"

    def _split(self, s: str) -> str:
        """Scrub the JSON string values of `s` as the class doc says."""
        groups: dict[str, list[tuple[int, int, str, bool]]] = {}  # key -> (start, end, value, escaped)
        last: list[str] = []  # the keys of the last string values, in order
        for m in _KEYED_STRING.finditer(s):
            raw = m.group(2)
            key = m.group(1)
            last.append(key)
            if len(last) > TAIL_VALUES:
                del last[0]
            if not raw:
                continue
            escaped = "\\" in raw
            value = _json_text(raw) if escaped else raw
            if value is None:
                continue
            groups.setdefault(key, []).append((m.start(2), m.end(2), value, escaped))
        ends = set(last)
        edits: dict[int, tuple[int, str]] = {}  # part start -> (its end, its new text as written)
        for key, frags in groups.items():
            at_end = key in ends
            if len(frags) < 2 and not at_end and not frags[0][3]:
                continue  # one plain value: `text` saw it as it is
            joined = "".join(f[2] for f in frags)
            cuts: list[tuple[int, int, str]] = [
                (m.start(), m.end(), self._labels[m.group(0)]) for m in self._re.finditer(joined)
            ]
            if at_end:
                tail = self._tail_hit(joined)
                if tail is not None and (not cuts or cuts[-1][1] <= len(joined) - tail[0]):
                    cuts.append((len(joined) - tail[0], len(joined), tail[1]))
            if not cuts:
                continue
            starts = []
            pos = 0
            for f in frags:
                starts.append(pos)
                pos += len(f[2])
            new_values = {i: f[2] for i, f in enumerate(frags)}
            for a, z, label in reversed(cuts):  # (from the end: earlier offsets stay valid)
                for i in range(len(frags) - 1, -1, -1):
                    lo, hi = starts[i], starts[i] + len(frags[i][2])
                    if hi <= a or lo >= z:
                        continue
                    first = lo <= a  # the part the value starts in carries the marker
                    v = new_values[i]
                    la, lz = max(a, lo) - lo, min(z, hi) - lo
                    new_values[i] = v[:la] + (f"[REDACTED:{label}]" if first else "") + v[lz:]
            for i, f in enumerate(frags):
                v = new_values[i]
                if v != f[2]:
                    edits[f[0]] = (f[1], orjson.dumps(v).decode()[1:-1] if f[3] else v)
        if not edits:
            return s
        out = []
        pos = 0
        for start in sorted(edits):
            end, written = edits[start]
            out.append(s[pos:start])
            out.append(written)
            pos = end
        out.append(s[pos:])
        return "".join(out)

    def headers(self, h: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: [self.text(v) or "" for v in vs] for k, vs in h.items()}
