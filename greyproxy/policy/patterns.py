"""The rule pattern dialect of SPEC §2.2: container globs, destination patterns, port lists.

Each distinct pattern text is parsed and compiled once (and cached across RuleSet
rebuilds); the per-connection path only uses the already-built objects.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from urllib.parse import urlsplit

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_GLOB_CHARS = frozenset("*?[")
_ASCII_DIGITS = re.compile(r"[0-9]+\Z")
_WHITESPACE = re.compile(r"\s")

MIN_PORT = 1
MAX_PORT = 65535

# Specificity weights of SPEC §2.3, named so ruleset ordering and tests agree.
CONTAINER_EXACT = 200
CONTAINER_GLOB = 100
DEST_EXACT = 20
DEST_WILDCARD = 10
PORT_SPECIFIC = 1


def has_glob(text: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(text)


# --------------------------------------------------------------------------- hosts

# Bidi controls (LRE..RLO, LRI..PDI, LRM, RLM, ALM): text that reads differently than it is.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def refuse_controls(text: str, what: str) -> None:
    """ValueError for control characters (NUL, CR, LF...), format characters and bidi overrides."""
    for ch in text:
        if ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cf"):
            raise ValueError(f"{what} must not contain control or bidi characters (found U+{ord(ch):04X})")


@lru_cache(maxsize=4096)
def ascii_host(name: str) -> str:
    """A host name (or host pattern) with every non-ASCII label in its IDNA form (punycode, IDNA
    2008 with UTS 46 mapping), lower-cased; ASCII input is only lower-cased. ValueError for a
    label IDNA refuses, and for a label mixing glob characters with non-ASCII ones."""
    if name.isascii():
        return name.lower()
    out = []
    for label in name.split("."):
        if label.isascii():
            out.append(label.lower())
            continue
        if has_glob(label):
            raise ValueError(f"label {label!r}: wildcards and non-ASCII characters cannot share a label")
        try:
            out.append(idna.encode(label, uts46=True).decode("ascii"))
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"{label!r} is not a valid internationalised name ({exc})") from None
    return ".".join(out)


_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def analyse_host(host: str) -> tuple[str, int, int]:
    """(normalised host, IP version or 0 for a name, the IP as an int or 0).

    Normalising lower-cases, drops one trailing dot, IPv6 brackets and zone id, and
    writes IPv6 literals in the RFC 5952 canonical form so they compare as text.
    """
    # socket.inet_pton/inet_ntop are C calls, several times faster than ipaddress here.
    h = host.strip().lower()
    if not h.isascii():
        try:
            h = ascii_host(h)  # rules hold the punycode form: judge a Unicode name as that
        except ValueError:
            pass  # no rule can name it: it matches only '*'-like patterns
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.endswith("."):
        h = h[:-1]
    if not h:
        return h, 0, 0
    if ":" in h:
        try:
            packed = socket.inet_pton(socket.AF_INET6, h.split("%", 1)[0])
        except (OSError, ValueError):
            return h, 0, 0
        if packed[:12] == _V4_MAPPED_PREFIX:
            # ::ffff:a.b.c.d connects to a.b.c.d: judge it as that IPv4 address, or IPv4 rules are bypassed.
            v4 = packed[12:]
            return socket.inet_ntop(socket.AF_INET, v4), 4, int.from_bytes(v4, "big")
        return socket.inet_ntop(socket.AF_INET6, packed), 6, int.from_bytes(packed, "big")
    # Cheap gate: most names do not start and end with a digit, so skip the parse for them.
    if h[0].isdigit() and h[-1].isdigit():
        try:
            packed = socket.inet_pton(socket.AF_INET, h)
        except (OSError, ValueError):
            return h, 0, 0
        return h, 4, int.from_bytes(packed, "big")
    return h, 0, 0


def normalise_host(host: str) -> str:
    """Lower-case, no trailing dot, no IPv6 brackets, IPv6 literals in canonical form."""
    return analyse_host(host)[0]


def parse_ip(host: str) -> IPAddress | None:
    """The IP a host denotes, or None for a name (same judgement as analyse_host)."""
    _, version, value = analyse_host(host)
    if version == 4:
        return ipaddress.IPv4Address(value)
    return ipaddress.IPv6Address(value) if version == 6 else None


# --------------------------------------------------------------------------- globs


def _class_end(pattern: str, start: int) -> int:
    """Index of the ']' closing the class opened at ``start`` (fnmatch rules), or -1."""
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1  # a ']' right after '[' or '[!' is a literal member
    return pattern.find("]", j)


def glob_to_regex(pattern: str, *, star: str, single: str) -> str:
    """Translate a shell-style glob to an anchored regex body whose match time is linear in the
    text, however many '*' the glob has.

    ``star``/``single`` are the regexes for ``*``/``?`` so one translator serves
    both dialects (container globs must not cross '/', host globs may cross '.').

    A plain translation (``a.*b.*c\\Z``) backtracks through every way of placing each '*' before
    it fails: a host glob with four '*' took 140 ms against a 250-character name a client may
    choose, on the proxy's event loop. Here the text between two '*' (fixed-length: literals, '?',
    classes) is taken at its first place after the previous one, inside an atomic group, and never
    tried elsewhere: the classic greedy glob match, which finds a match whenever one exists
    because a later place would only leave less room for the rest. A container glob's '*' stops at
    '/': that holds only while the text cannot match a '/' either; a class that can ('[!a]',
    '[/]') keeps the plain, backtracking form for the text around it.
    """
    parts: list[list[str]] = [[]]  # the regex of each run of text between '*'s
    slashy: list[bool] = [False]  # does that run hold a class that can match '/'?
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            # Collapse runs of '*' so '**' cannot cause quadratic backtracking.
            while i < n and pattern[i] == "*":
                i += 1
            parts.append([])
            slashy.append(False)
            continue
        if ch == "?":
            parts[-1].append(single)
        elif ch == "[":
            end = _class_end(pattern, i)
            if end < 0:
                parts[-1].append(re.escape(ch))  # an unclosed '[' is a literal, as in fnmatch
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("!")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\")
                # '[' and doubled '&~|' would read as nested sets / set operations to re.
                body = re.sub(r"([\[&~|])", r"\\\1", body)
                if body.startswith("^"):
                    body = "\\" + body
                cls = f"[{'^' if negate else ''}{body}]"
                slashy[-1] = slashy[-1] or re.fullmatch(cls, "/") is not None  # ('[+-0]' holds '/')
                parts[-1].append(cls)
                i = end
        else:
            parts[-1].append(re.escape(ch))
        i += 1
    return join_at_stars(["".join(p) for p in parts], star, [star != ".*" and k for k in slashy])


def join_at_stars(texts: Sequence[str], star: str, backtrack: Sequence[bool] = ()) -> str:
    """The anchored regex body of `texts` (regexes of fixed-length text) joined by '*'s (`star`:
    the regex of one), linear in time: each text between two '*' is taken at its first place after
    the previous one, in an atomic group, unless `backtrack[k]` asks for the plain form (see
    glob_to_regex). The last text is anchored at the end: one backward scan."""
    out = [texts[0]]
    last = len(texts) - 1
    for k in range(1, len(texts)):
        text = texts[k]
        if k == last or (k < len(backtrack) and backtrack[k]):
            out.append(star + text)
        elif text:
            out.append(f"(?>{star}?{text})")  # its first place, never revisited
    return "".join(out) + r"\Z"


def compile_container_glob(pattern: str) -> Callable[[str], re.Match[str] | None]:
    # '*' and '?' stay within one path segment: 'team/*' must not match 'team/a/b'.
    return re.compile(glob_to_regex(pattern, star="[^/]*", single="[^/]"), re.DOTALL).match


def compile_host_glob(pattern: str) -> Callable[[str], re.Match[str] | None]:
    # Hosts are already lower-cased, so the lower-cased pattern compares case-insensitively.
    return re.compile(glob_to_regex(pattern.lower(), star=".*", single="."), re.DOTALL).match


def glob_literal(pattern: str) -> str | None:
    """The one text a glob matches when none of its wildcards is live, else None.

    escape_glob quotes a literal name's '*', '?' and '[' as one-character classes ('w[*]x'), so
    the name an `exact` approval stores is a glob by its characters but matches only itself: it
    must rank and match as that exact name (SPEC §2.3), not as a glob a later glob rule ties with.
    An unclosed '[' is a literal too, as glob_to_regex reads it.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch in "*?":
            return None
        if ch == "[":
            end = _class_end(pattern, i)
            if end >= 0:
                body = pattern[i + 1 : end]
                if len(body) != 1:
                    return None  # a real class ('[ab]', '[!a]'): more than one text matches
                ch, i = body, end
        out.append(ch)
        i += 1
    return "".join(out)


def glob_literal_ends(pattern: str) -> tuple[str, str]:
    """Literal text every match must start and end with (the index keys for globs).

    The prefix stops at the first wildcard character; the suffix starts after the
    last '*', '?' or ']' — conservative when a ']' is literal, never wrong.
    """
    starts = [i for i in (pattern.find(c) for c in "*?[") if i >= 0]
    first = min(starts, default=len(pattern))
    last = max(pattern.rfind(c) for c in "*?]")
    return pattern[:first], (pattern[last + 1 :] if last >= first else "")


# --------------------------------------------------------------------------- containers


class ContainerKind(Enum):
    ANY = 0
    GLOB = 1
    EXACT = 2


@dataclass(frozen=True, slots=True)
class ContainerPattern:
    text: str  # the pattern; for EXACT the name it matches ('w*x' for the escaped 'w[*]x')
    kind: ContainerKind
    glob: Callable[[str], re.Match[str] | None] | None

    @classmethod
    def parse(cls, pattern: str) -> ContainerPattern:
        if pattern == "*":
            return cls(pattern, ContainerKind.ANY, None)
        if has_glob(pattern):
            literal = glob_literal(pattern)
            if literal is not None:  # every wildcard escaped: an exact name (SPEC §2.3: 200)
                return cls(literal, ContainerKind.EXACT, None)
            return cls(pattern, ContainerKind.GLOB, compile_container_glob(pattern))
        return cls(pattern, ContainerKind.EXACT, None)

    @property
    def specificity(self) -> int:
        if self.kind is ContainerKind.EXACT:
            return CONTAINER_EXACT
        return CONTAINER_GLOB if self.kind is ContainerKind.GLOB else 0

    def matches(self, container: str) -> bool:
        if self.kind is ContainerKind.ANY:
            return True
        if self.kind is ContainerKind.EXACT:
            return container == self.text
        assert self.glob is not None
        return self.glob(container) is not None


# --------------------------------------------------------------------------- destinations


class DestKind(Enum):
    ANY = "any"
    CIDR = "cidr"
    APEX_AND_SUBDOMAINS = "apex_and_subdomains"  # **.example.com
    SUBDOMAINS = "subdomains"  # *.example.com
    GLOB = "glob"
    EXACT = "exact"


@dataclass(frozen=True, slots=True)
class DestinationPattern:
    text: str
    kind: DestKind
    value: str  # normalised host (EXACT), the suffix (wildcards) or the lower-cased glob
    network: IPNetwork | None = None
    # GLOB only: the regex matcher, or None when the literal ends alone decide (see parse).
    glob: Callable[[str], re.Match[str] | None] | None = None
    prefix: str = ""  # GLOB only: literal text every match starts with
    suffix: str = ""  # GLOB only: literal text every match ends with

    @classmethod
    def parse(cls, pattern: str) -> DestinationPattern:
        """Classify in SPEC §2.2 order; ValueError for an empty pattern or a bad CIDR."""
        p = ascii_host(pattern.strip())  # a Unicode name matches as its punycode form
        if p.endswith(".") and p != ".":
            p = p[:-1]
        if not p:
            raise ValueError("destination_pattern must not be empty")
        if p == "*":
            return cls(pattern, DestKind.ANY, p)
        if "/" in p:
            try:
                net = ipaddress.ip_network(p, strict=False)
            except ValueError:
                if parse_ip(p.split("/", 1)[0]) is None:  # 'example.com/api', not a bad prefix length
                    raise ValueError(
                        f"destination_pattern {pattern!r}: only a CIDR range (like 10.0.0.0/8) may contain"
                        " '/'; a host name is given alone, without a path"
                    ) from None
                raise ValueError(f"destination_pattern {pattern!r} is not a valid CIDR") from None
            return cls(pattern, DestKind.CIDR, net.with_prefixlen, network=net)
        for prefix, kind in (("**.", DestKind.APEX_AND_SUBDOMAINS), ("*.", DestKind.SUBDOMAINS)):
            rest = p[len(prefix) :]
            if p.startswith(prefix) and rest and not has_glob(rest):
                return cls(pattern, kind, rest)
        if p.startswith("[") and p.endswith("]") and parse_ip(p[1:-1]) is not None:
            return cls(pattern, DestKind.EXACT, normalise_host(p))  # '[::1]' is a literal, not a class
        if has_glob(p):
            literal = glob_literal(p)
            if literal is not None:  # every wildcard escaped ('a[*]b.test'): exact, as for containers
                return cls(pattern, DestKind.EXACT, normalise_host(literal))
            prefix, suffix = glob_literal_ends(p)
            middle = p[len(prefix) : len(p) - len(suffix)]
            if (not prefix or not suffix) and middle.strip("*") == "":
                # 'api.*' / '*-cdn.net': startswith/endswith decides, so skip the regex entirely.
                return cls(pattern, DestKind.GLOB, p, prefix=prefix, suffix=suffix)
            glob = compile_host_glob(p)
            return cls(pattern, DestKind.GLOB, p, glob=glob, prefix=prefix, suffix=suffix)
        return cls(pattern, DestKind.EXACT, normalise_host(p))

    @property
    def specificity(self) -> int:
        if self.kind in (DestKind.EXACT, DestKind.CIDR):
            return DEST_EXACT
        return 0 if self.kind is DestKind.ANY else DEST_WILDCARD

    def matches(self, host: str, ip: IPAddress | None = None) -> bool:
        """``host`` must be normalise_host() output; ``ip`` its parse_ip() (or None for a name)."""
        kind = self.kind
        if kind is DestKind.ANY:
            return True
        if kind is DestKind.EXACT:
            return host == self.value
        if kind is DestKind.CIDR:
            # A CIDR never matches a hostname, only IPs of its own family inside it.
            net = self.network
            return ip is not None and net is not None and ip.version == net.version and ip in net
        if kind is DestKind.SUBDOMAINS:
            return host.endswith("." + self.value)
        if kind is DestKind.APEX_AND_SUBDOMAINS:
            return host == self.value or host.endswith("." + self.value)
        if self.glob is None:
            return host.startswith(self.prefix) and host.endswith(self.suffix)
        return self.glob(host) is not None


# --------------------------------------------------------------------------- ports


class PortRanges:
    """Membership over inclusive ranges, used when a pattern spans too many ports for a set."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self.ranges = ranges

    def __contains__(self, port: object) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ranges)  # type: ignore[operator]

    def __repr__(self) -> str:
        return f"PortRanges({self.ranges!r})"


_SET_LIMIT = 256  # up to this many ports a frozenset gives a single hash lookup per check


@dataclass(frozen=True, slots=True)
class PortPattern:
    text: str  # normalised: '*' or 'a,b-c'
    ports: frozenset[int] | PortRanges | None  # None = any port

    @classmethod
    def parse(cls, pattern: str | None) -> PortPattern:
        """ValueError naming the bad item for anything but '*', '' or a list of ports/ranges."""
        p = "" if pattern is None else str(pattern).strip()
        if p in ("", "*"):
            return cls("*", None)
        ranges: list[tuple[int, int]] = []
        for raw in p.split(","):
            item = raw.strip()
            lo_s, dash, hi_s = item.partition("-")
            lo_s, hi_s = lo_s.strip(), hi_s.strip()
            if not dash:
                hi_s = lo_s
            if not _ASCII_DIGITS.match(lo_s) or not _ASCII_DIGITS.match(hi_s):
                raise ValueError(f"port_pattern {pattern!r}: {item!r} is not a port or a range like 8000-8999")
            lo, hi = int(lo_s), int(hi_s)
            for value in (lo, hi):
                if not MIN_PORT <= value <= MAX_PORT:
                    raise ValueError(f"port_pattern {pattern!r}: port {value} is outside {MIN_PORT}..{MAX_PORT}")
            if lo > hi:
                raise ValueError(f"port_pattern {pattern!r}: range {item!r} runs backwards")
            ranges.append((lo, hi))
        # One text per set of ports (SPEC §2.4's twins): sorted, overlapping and adjacent ranges
        # merged ('443,80,80' is '80,443'; '80,81' and '80-90,85' are '80-81' and '80-90'). ('1-65535'
        # stays itself: '*' takes port 0 as well, and ranks lower, SPEC §2.3.)
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        ranges = merged
        text = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
        span = sum(hi - lo + 1 for lo, hi in ranges)
        if span <= _SET_LIMIT:
            return cls(text, frozenset(p for lo, hi in ranges for p in range(lo, hi + 1)))
        return cls(text, PortRanges(tuple(ranges)))

    @property
    def specificity(self) -> int:
        return 0 if self.ports is None else PORT_SPECIFIC

    def matches(self, port: int) -> bool:
        return self.ports is None or port in self.ports


# --------------------------------------------------------------------------- cached parsing

# Parsed patterns are immutable and depend only on their text, so every RuleSet rebuild
# (one per rule change) reuses them instead of recompiling tens of thousands of globs.
_CACHE_SIZE = 1 << 18


@lru_cache(maxsize=_CACHE_SIZE)
def container_pattern(text: str) -> ContainerPattern:
    return ContainerPattern.parse(text)


@lru_cache(maxsize=_CACHE_SIZE)
def destination_pattern(text: str) -> DestinationPattern:
    return DestinationPattern.parse(text)


@lru_cache(maxsize=_CACHE_SIZE)
def port_pattern(text: str | None) -> PortPattern:
    return PortPattern.parse(text)


# --------------------------------------------------------------------------- API validation


def validate_port_pattern(pattern: str | None) -> str:
    """The normalised port pattern ('*' for empty), or ValueError."""
    return PortPattern.parse(pattern).text


# 'host:443', '*.host:443', '[::1]:443': a port written into the destination (IPv6 literals are
# told apart by parse_ip before this is tried).
_WITH_PORT = re.compile(r"(\[[^\]]*\]|[^:]*):([0-9]+)\Z")


# A host the proxy takes (services/proxy/http1.canonical_host, explain, the rules' patterns): its
# labels, and a last label inet_aton would read as a number (then only a dotted-quad IPv4 will do).
HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def validate_destination_pattern(pattern: str) -> str:
    """The pattern as stored, in the form it matches in (SPEC §2.2: compared case-insensitively,
    trailing dot ignored), so that equal patterns are stored equal and the duplicate guard (§2.4)
    sees them: no surrounding whitespace, lower case, no trailing dot, non-ASCII labels in punycode
    (both forms are accepted on input), an IP literal in its canonical form ('[::1]' → '::1').
    ValueError naming the problem, also for a URL or a port written into the pattern (which would
    never match anything)."""
    if not isinstance(pattern, str):
        raise ValueError("destination_pattern must be a string")
    p = pattern.strip()
    if not p:
        raise ValueError("destination_pattern must not be empty")
    if _WHITESPACE.search(p):
        raise ValueError(f"destination_pattern {pattern!r} must not contain whitespace")
    refuse_controls(p, "destination_pattern")
    p = ascii_host(p)  # lower case; punycode for non-ASCII labels
    if p.endswith(".."):
        raise ValueError(f"destination_pattern {pattern!r} must not end with an empty label")
    if p.endswith(".") and p != ".":
        p = p[:-1]  # 'example.com.' is 'example.com'
    if "://" in p:
        try:
            host = urlsplit(p).hostname or "the host"
        except ValueError:  # 'http://[::1/': no host to name
            host = "the host"
        raise ValueError(
            f"destination_pattern {pattern!r} is a URL: give the host alone ({host!r}), without scheme or"
            " path, and its port in port_pattern"
        )
    with_port = _WITH_PORT.match(p) if parse_ip(p) is None else None
    if with_port is not None:
        host, port = with_port.groups()
        raise ValueError(
            f"destination_pattern {pattern!r} holds a port: give the host alone ({host!r}) and the port"
            f" in port_pattern ({port!r})"
        )
    parsed = DestinationPattern.parse(p)  # raises for a malformed CIDR
    if parsed.kind is DestKind.CIDR and parsed.network is not None:
        # one text per range: '10.0.0.1/8' and '10.0.0.0/08' are '10.0.0.0/8'; an IPv4-mapped range
        # is its IPv4 range (mapped hosts are judged as IPv4: stored mapped, it never matched); a
        # range of one address is that address
        net = parsed.network
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.scope_id:
            net = ipaddress.IPv6Network((net.network_address.packed, net.prefixlen))  # a zone matches nothing more
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
            mapped = net.network_address.ipv4_mapped
            assert mapped is not None
            net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
        return str(net.network_address) if net.prefixlen == net.max_prefixlen else net.with_prefixlen
    if parsed.kind is DestKind.EXACT:
        name = parsed.value  # (an escaped glob's one name: 'x.[1]' is 'x.1')
        if parse_ip(name) is not None:
            return name  # IPv6 literals compare in canonical form: store that form
        why = host_name_problem(name)
        if why is not None:
            raise ValueError(f"destination_pattern {pattern!r}: {why}")
    elif parsed.kind in (DestKind.SUBDOMAINS, DestKind.APEX_AND_SUBDOMAINS):
        suffix = p.split(".", 1)[1]  # ('*.x.test', '**.x.test': the names under x.test)
        why = host_name_problem(suffix) if not any(c in suffix for c in "*?[") else None
        if why is not None:
            raise ValueError(f"destination_pattern {pattern!r} can never match: after its wildcard, {why}")
    return p


def host_name_problem(name: str) -> str | None:
    """Why the proxy refuses `name` as a host (services/proxy/http1.canonical_host: "bad host"),
    so that a rule naming it never matches and explain must not judge it; None for a host name it
    takes. `name` is lower case, without a trailing dot, not an IP address."""
    labels = name.split(".")
    if "" in labels:
        return "a host name has no empty label"
    if NUMERIC_LABEL.fullmatch(labels[-1]):
        # '010.0.0.1', '1.2.3', '2130706433', '0x7f.0.0.1', '256.1.1.1': resolvers read such hosts
        # as addresses; the proxy takes only four decimal numbers 0-255 without leading zeros
        return (
            "a name ending in a number never matches; write an IPv4 address as four decimal numbers"
            " 0-255 without leading zeros, or a CIDR range"
        )
    if len(name) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        return "not a host name: labels of 1-63 letters, digits, '-' or '_' (253 characters in all)"
    return None


def validate_container_pattern(pattern: str) -> str:
    """The pattern without surrounding whitespace, or ValueError naming the problem."""
    if not isinstance(pattern, str):
        raise ValueError("container_pattern must be a string")
    p = pattern.strip()
    if not p:
        raise ValueError("container_pattern must not be empty")
    if _WHITESPACE.search(p):
        raise ValueError(f"container_pattern {pattern!r} must not contain whitespace")
    refuse_controls(p, "container_pattern")
    return p


def escape_glob(text: str) -> str:
    """Quote glob metacharacters so a literal name becomes a pattern matching only itself."""
    return "".join(f"[{c}]" if c in _GLOB_CHARS else c for c in text)
