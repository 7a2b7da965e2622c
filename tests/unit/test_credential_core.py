"""Credential substitution without sockets (SPEC §12.1, §12.4, §12.5, §12.7 scrub): placeholders,
value rules, encryption at rest and the key file, the substitution plan and its refusals, and the
scrubbing of echoed values; hypothesis fuzzes the plan and the scrubber."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from urllib.parse import quote, unquote

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from greyproxy.credentials import crypto
from greyproxy.credentials.placeholders import PLACEHOLDER_RE, PREFIX, default_label, is_placeholder, mint, scope_of
from greyproxy.credentials.substitute import (
    TAIL_MIN,
    CREDENTIALS_UNAVAILABLE,
    HOST_MISMATCH,
    IN_PATH,
    PLAINTEXT,
    UNKNOWN,
    Live,
    Scrubber,
    authority_host,
    plan,
)
from greyproxy.credentials.values import validate_hosts, validate_label, validate_value, value_preview
from harness.fuzz import examples

VALUE = "sk-test-Zq9:/+ é~v"
PH = mint("gw-7f3a")
GPH = mint("global")


def live(
    ph: str = PH, value: str = VALUE, label: str = "KEY", hosts: tuple[str, ...] = (), session: str | None = "gw-7f3a"
) -> Live:
    return Live(ph, value, label, session, None if session else "cred_0123456789abcdef", hosts, None)


def table(*lives: Live):
    m = {lv.placeholder: lv for lv in lives}
    return m.get


# -- placeholders and values --


def test_placeholder_format() -> None:
    assert PLACEHOLDER_RE.fullmatch(PH) and scope_of(PH) == "gw-7f3a" and scope_of(GPH) == "global"
    assert PH.startswith(PREFIX) and len(PH.rsplit(":", 1)[1]) == 32
    assert not is_placeholder("greyproxy:credential:v1:gw-7f3a:zz")
    assert not is_placeholder(PH.upper()) and not is_placeholder(PH + "0")
    assert default_label(PH) == "unlabeled-" + PH[-8:]
    with pytest.raises(ValueError):
        mint("a:b")


@pytest.mark.parametrize(
    "bad", ["", "a\r\nX-Injected: 1", "nul\x00", "del\x7f", "x" * 8193, "pre-" + PREFIX + "v1:a:" + "0" * 32, 42, None]
)
def test_bad_values_are_refused_without_echo(bad: object) -> None:
    with pytest.raises(ValueError) as e:
        validate_value(bad)
    if isinstance(bad, str) and bad:
        assert bad not in str(e.value) and "Injected" not in str(e.value)


def test_values_labels_hosts() -> None:
    assert validate_value("a\tb") == "a\tb"
    assert validate_value("é" * 4096) == "é" * 4096  # 8 KiB of UTF-8
    with pytest.raises(ValueError):
        validate_value("é" * 4097)
    assert validate_label("OPENAI_API_KEY") == "OPENAI_API_KEY"
    for bad in ("", "a b", "x" * 129, None, "ü"):
        with pytest.raises(ValueError):
            validate_label(bad)
    assert validate_hosts([" api.example.com ", "*.x.org", "10.0.0.0/8", "api.example.com"]) == [
        "api.example.com",
        "*.x.org",
        "10.0.0.0/8",
    ]
    for bad in (["10.0.0.0/99"], ["a b"], "api.example.com", [1], ["x"] * 51, [""]):
        with pytest.raises(ValueError):
            validate_hosts(bad)


def test_previews_show_at_most_a_quarter() -> None:
    v51 = "sk-ant" + "m" * 42 + "xyz"
    assert value_preview(v51) == "sk-ant***xyz"
    assert value_preview("abcdefghijklmnopqrst") == "abc***"
    assert value_preview("abcdefgh") == "***"
    assert value_preview("x" * 36) == "xxxxxx***xxx" and value_preview("x" * 35) == "xxx***"


@given(st.text(min_size=1, max_size=200))
def test_preview_never_more_than_a_quarter(v: str) -> None:
    shown = value_preview(v).replace("***", "")
    assert len(shown) <= len(v) / 4


# -- encryption at rest --


def test_seal_roundtrip_and_row_binding() -> None:
    key = os.urandom(32)
    blob = crypto.seal(key, b"secret", crypto.aad_session("s1"))
    assert len(blob) == 12 + 6 + 16 and b"secret" not in blob
    assert crypto.open_sealed(key, blob, crypto.aad_session("s1")) == b"secret"
    for aad in (crypto.aad_session("s2"), crypto.aad_global("s1")):
        with pytest.raises(crypto.SealError):
            crypto.open_sealed(key, blob, aad)
    with pytest.raises(crypto.SealError):
        crypto.open_sealed(os.urandom(32), blob, crypto.aad_session("s1"))
    tampered = bytearray(blob)
    tampered[14] ^= 1
    with pytest.raises(crypto.SealError):
        crypto.open_sealed(key, bytes(tampered), crypto.aad_session("s1"))
    with pytest.raises(crypto.SealError):
        crypto.open_sealed(key, b"short", b"")
    assert crypto.seal(key, b"x", b"") != crypto.seal(key, b"x", b"")  # a fresh nonce each time


def test_key_file(tmp_path) -> None:
    p = crypto.key_path(tmp_path)
    assert crypto.load_key(p) is None
    key, made = crypto.create_key(p)
    assert made and len(key) == 32 and p.read_bytes() == key
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert crypto.create_key(p) == (key, False)
    p.chmod(0o644)
    assert crypto.load_key(p) == key and stat.S_IMODE(p.stat().st_mode) == 0o600
    p.write_bytes(b"x" * 31)
    for call in (crypto.load_key, crypto.create_key):
        with pytest.raises(crypto.KeyUnusable, match="31 bytes"):
            call(p)
    assert p.read_bytes() == b"x" * 31  # never overwritten
    p.write_bytes(b"x" * 40)
    with pytest.raises(crypto.KeyUnusable, match="more than 32"):
        crypto.load_key(p)
    p.unlink()
    p.mkdir()
    with pytest.raises(crypto.KeyUnusable):
        crypto.load_key(p)


# -- the substitution plan --


def test_headers_query_and_basic_are_substituted() -> None:
    basic = "Basic " + base64.b64encode(f"x:{PH}".encode()).decode()
    headers = [
        ("Host", "api.example.com"),
        ("Authorization", "Bearer " + PH),
        ("X-Key", f"pre-{PH}-post"),
        ("X-Two", f"{PH},{PH}"),
        ("Proxy-Note", basic),
    ]
    headers[-1] = ("Authorization", basic)
    target = f"/v1/x?a=1&key={PH.replace(':', '%3A')}&raw={PH}&b=%7E&c"
    p = plan(headers, target, table(live()), destination="api.example.com", authority="api.example.com")
    assert p.refused is None and p.labels == ["KEY"] and p.session_id == "gw-7f3a"
    wire = VALUE.encode().decode("latin-1")
    assert p.headers is not None
    assert p.headers[0] == ("Host", "api.example.com")
    assert p.headers[1] == ("Authorization", "Bearer " + wire)
    assert p.headers[2] == ("X-Key", f"pre-{wire}-post")
    assert p.headers[3] == ("X-Two", f"{wire},{wire}")
    assert base64.b64decode(p.headers[4][1].split(" ")[1]) == b"x:" + VALUE.encode()
    enc = quote(VALUE, safe="")
    assert p.target == f"/v1/x?a=1&key={enc}&raw={enc}&b=%7E&c"
    # a Basic token without its `=` padding (some clients write it so) is read the same
    for user in ("x", "xy", "xyz"):
        token = base64.b64encode(f"{user}:{PH}".encode()).decode()
        unpadded = plan([("Authorization", "Basic " + token.rstrip("="))], "/", table(live()), destination="h")
        assert unpadded.refused is None and unpadded.headers is not None, token
        assert base64.b64decode(unpadded.headers[0][1].split(" ")[1]) == f"{user}:".encode() + VALUE.encode()
    assert unquote(p.target.split("key=")[1].split("&")[0]) == VALUE


def test_nothing_to_do_is_untouched() -> None:
    p = plan([("Host", "a"), ("X", "greyproxy:cred")], "/greyproxy?x=greyproxy", table(), destination="a")
    assert p.refused is None and p.headers is None and p.target is None and p.used == []


@pytest.mark.parametrize("where", ["header", "query", "basic"])
# Fixed ids: the minted placeholders are random, and pytest-xdist's workers must collect the same names.
@pytest.mark.parametrize(
    "ph",
    [mint("gw-7f3a"), "greyproxy:credential:v1:gw-7f3a:zz", PREFIX, GPH],
    ids=["unknown", "malformed", "prefix-alone", "unknown-global"],
)
def test_unknown_or_malformed_is_refused(where: str, ph: str) -> None:
    headers, target = [("Host", "a")], "/"
    if where == "header":
        headers.append(("X-Api-Key", ph))
    elif where == "query":
        target = "/p?key=" + ph.replace(":", "%3a")
    else:
        headers.append(("Authorization", "Basic " + base64.b64encode(f"x:{ph}".encode()).decode()))
    p = plan(headers, target, table(live()), destination="a")
    assert p.refused is not None and p.refused.reason == UNKNOWN
    assert ph[-32:] not in p.refused.body or len(ph) < 40  # never the full hex
    assert ("X-Api-Key" if where == "header" else "key" if where == "query" else "Basic") in p.refused.body
    assert "\n" not in p.refused.body


def test_unavailable_refuses_every_placeholder() -> None:
    p = plan([("X", PH)], "/", table(live()), destination="a", available=False)
    assert p.refused is not None and p.refused.reason == CREDENTIALS_UNAVAILABLE
    assert plan([("X", "nothing")], "/", table(), destination="a", available=False).refused is None


@pytest.mark.parametrize(
    "target",
    [f"/{PH}/x", f"/a%2F{PH.replace(':', '%3A')}", f"/p?{PH}=1", f"/p?a=1&{PH}"],
    ids=["path", "encoded-path", "query-name", "query-value"],
)
def test_live_placeholder_in_path_or_name(target: str) -> None:
    p = plan([("X", PH)], target, table(live()), destination="a")
    assert p.refused is not None and p.refused.reason == IN_PATH and p.refused.labels == ("KEY",)
    assert p.headers is None


def test_host_binding() -> None:
    lv = live(hosts=("127.0.0.2", "*.example.com"))
    get = table(lv)
    ok = plan([("X", PH)], "/", get, destination="127.0.0.2", authority="127.0.0.2:8443")
    assert ok.refused is None and ok.labels == ["KEY"]
    assert plan([("X", PH)], "/", get, destination="API.Example.com.", authority="api.example.com").refused is None
    for dest, auth in (
        ("127.0.0.3", "127.0.0.3"),
        ("127.0.0.3", "127.0.0.2"),
        ("127.0.0.2", "evil.example.org"),
        ("example.com", "example.com"),
    ):
        p = plan([("X", PH)], "/", get, destination=dest, authority=auth)
        assert p.refused is not None and p.refused.reason == HOST_MISMATCH, (dest, auth)
        assert "KEY" in p.refused.body and "127.0.0.2" in p.refused.body and p.headers is None
    assert "not 127.0.0.3" in plan([("X", PH)], "/", get, destination="127.0.0.3").refused.body  # type: ignore[union-attr]
    ipv6 = table(live(hosts=("::1",)))
    assert plan([("X", PH)], "/", ipv6, destination="::1", authority="[::1]:443").refused is None


def test_plaintext_needs_a_binding() -> None:
    p = plan([("X", PH)], "/", table(live()), destination="a.example", plaintext=True)
    assert p.refused is not None and p.refused.reason == PLAINTEXT
    bound = table(live(hosts=("a.example",)))
    assert plan([("X", PH)], "/", bound, destination="a.example", plaintext=True).refused is None


def test_all_or_nothing_and_labels_order() -> None:
    other = mint("gw-7f3a")
    second = live(other, "v2-value", "SECOND")
    glob = live(GPH, "gval-123456", "GLOBAL", session=None)
    get = table(live(), second, glob)
    p = plan([("A", GPH), ("B", other), ("C", PH), ("D", other)], f"/?k={PH}", get, destination="x")
    assert p.labels == ["GLOBAL", "SECOND", "KEY"] and p.session_id == "gw-7f3a"
    assert plan([("A", GPH)], "/", get, destination="x").session_id is None
    bad = plan([("A", PH), ("B", mint("gw-7f3a"))], f"/?k={PH}", get, destination="x")
    assert bad.refused is not None and bad.headers is None and bad.target is None and bad.used == []


def test_authority_host() -> None:
    assert authority_host("a.example:443") == "a.example"
    assert authority_host("[::1]:80") == "::1"
    assert authority_host("a.example") == "a.example"


# -- scrubbing --


def test_scrubber_forms() -> None:
    lv = live()
    token = base64.b64encode(f"x:{VALUE}".encode()).decode()
    s = Scrubber([lv], [token])
    text = (
        f'{{"h": "{VALUE}", "q": "{quote(VALUE, safe="")}", "l": "{quote(VALUE, safe="").lower()}", '
        f'"b": "Basic {token}", "w": "{lv.wire}"}}'
    )
    out = s.text(text)
    assert out is not None and VALUE not in out and token not in out and lv.wire not in out
    assert quote(VALUE, safe="") not in out and out.count("[REDACTED:KEY]") == 5
    assert s.headers({"X-Echo": [VALUE, "ok"]}) == {"X-Echo": ["[REDACTED:KEY]", "ok"]}
    assert s.text(None) is None and s.text("") == ""
    raw = VALUE.encode()
    for b64 in (base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")):  # its base64 alone
        assert s.text(f"echo {b64.decode()}.") == "echo [REDACTED:KEY]."


# -- fuzz --

latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)
names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True)
values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs",)), min_size=1, max_size=40
).filter(lambda v: PREFIX not in v)


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(names, latin1), max_size=6), latin1, st.booleans())
def test_plan_never_raises(headers: list[tuple[str, str]], target: str, plaintext: bool) -> None:
    p = plan(headers, "/" + target, table(live()), destination="h", plaintext=plaintext)
    if p.refused is None and PREFIX not in "".join(v for _k, v in headers) and "greyproxy" not in target:
        assert p.headers is None and p.target is None


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(names, latin1, latin1), min_size=1, max_size=5),
    latin1,
    latin1,
    values,
    st.sampled_from([":", "%3A", "%3a"]),
)
@example([("a", "", "")], "", "", "greyproxy", ":")  # a value that spells the prefix's word (found by hypothesis)
def test_substituted_heads_keep_no_placeholder(
    parts: list[tuple[str, str, str]], pre: str, post: str, value: str, colon: str
) -> None:
    lv = live(value=value)
    headers = [(k, f"{a}{PH}{b}") for k, a, b in parts]
    qsafe = lambda s: quote(s, safe="")  # noqa: E731
    target = f"/p?x={qsafe(pre)}&key={qsafe(pre)}{PH.replace(':', colon)}{qsafe(post)}&y={qsafe(post)}"
    p = plan(headers, target, table(lv), destination="h")
    if any(PREFIX in a or PREFIX in b for _k, a, b in parts):
        return  # a stray prefix of the fuzzed text: refused or not, covered by test_plan_never_raises
    assert p.refused is None and p.labels == ["KEY"]
    assert p.headers is not None and p.target is not None
    assert all(PREFIX not in v and lv.wire in v for _k, v in p.headers)
    # (nothing of the placeholder is left; the value itself may spell "greyproxy")
    assert "greyproxy" not in p.target.replace(qsafe(pre), "").replace(qsafe(post), "").replace(qsafe(value), "")
    assert p.target.startswith(f"/p?x={qsafe(pre)}&key=") and p.target.endswith(f"&y={qsafe(post)}")
    assert unquote(p.target.split("&key=")[1].split("&y=")[0]) == pre + value + post


@settings(max_examples=examples(200))
@given(st.text(max_size=60), st.text(max_size=60), st.from_regex(r"[A-Za-z0-9_.~+/=-]{8,40}", fullmatch=True))
def test_scrubber_leaves_no_value(a: str, b: str, value: str) -> None:
    lv = live(value=value)
    s = Scrubber([lv])
    for form in (value, quote(value, safe="")):
        out = s.text(a + form + b + form)
        assert out is not None and value not in out.replace("[REDACTED:KEY]", "\x00") or value in (a + b)


def _sse(texts: list[str]) -> bytes:
    """An Anthropic-style stream whose text deltas are `texts`."""
    events = [
        "event: content_block_delta\ndata: "
        + orjson.dumps({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}).decode()
        + "\n\n"
        for t in texts
    ]
    return "".join(events).encode()


def _deltas(body: bytes) -> str:
    """What a reader joining the stream's deltas (the conversation assembler) reads."""
    return "".join(
        orjson.loads(line[6:])["delta"]["text"] for line in body.decode().split("\n") if line.startswith("data: ")
    )


def test_a_value_split_over_streamed_deltas_is_scrubbed_from_every_part() -> None:
    """SPEC §12.7 scrub, for an echo the origin streams: token deltas cut the value into parts that
    are not the value, but a reader joining them (the assembler's `extraction`) gets it whole. The
    first part becomes the marker, the others lose theirs; the rest of the stream is untouched."""
    value = "sk-ant-REPROTWOvalue1122334455667788QQ"
    s = Scrubber([live(value=value)])
    body = _sse(["your key is ", value[:7], value[7:20], value[20:], " ok"])
    out = s.data(body)
    assert _deltas(out) == "your key is [REDACTED:KEY] ok"
    for part in (value[:7], value[7:20], value[20:]):
        assert part.encode() not in out
    assert out.count(b"event: content_block_delta") == 5  # every event kept, each still valid JSON
    untouched = _sse(["no secret here ", "at all"])
    assert s.data(untouched) == untouched


def test_the_start_of_a_value_at_the_end_of_a_cut_body_is_scrubbed() -> None:
    """A body cut by capture.maxBodyBytes inside an echoed value: the part kept is scrubbed too
    (from TAIL_MIN characters on), as is the tail of a streamed answer cut there."""
    s = Scrubber([live()])
    for n in range(TAIL_MIN, len(VALUE)):
        out = s.data(b"x" * 50 + VALUE[:n].encode())
        assert out == b"x" * 50 + b"[REDACTED:KEY]", (n, out)
    assert s.data(b"ends with " + VALUE[: TAIL_MIN - 1].encode()).endswith(VALUE[: TAIL_MIN - 1].encode())
    cut = _sse(["key: ", VALUE[:5], VALUE[5:9]])  # (with a character JSON may escape: é)
    assert _deltas(s.data(cut)) == "key: [REDACTED:KEY]"


@settings(max_examples=examples(200), deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9_.~+/=-]{8,40}", fullmatch=True),
    st.lists(st.integers(min_value=1, max_value=39), max_size=6),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters='"\\'), max_size=20),
)
def test_no_part_of_a_split_value_survives_wherever_the_stream_cuts_it(value: str, cuts: list[int], pre: str) -> None:
    s = Scrubber([live(value=value)])
    points = sorted({c for c in cuts if c < len(value)})
    parts = [value[a:b] for a, b in zip([0, *points], [*points, len(value)], strict=True)]
    out = s.data(_sse([pre, *parts, " end"]))
    joined = _deltas(out)
    assert value not in joined and joined.endswith(" end") and "[REDACTED:KEY]" in joined


def test_a_stream_cut_inside_or_after_the_delta_holding_a_value_keeps_no_part_of_it() -> None:
    """A stream cut by capture.maxBodyBytes: inside the delta that holds the rest of a value (its
    string never closes), or right after a delta that holds only its start."""
    value = "sk-ant-api03-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefgh"
    s = Scrubber([live(value=value)])
    whole = _sse(["your key is ", value[:7], value[7:] + ", keep it safe"]).decode()
    cut = whole[: whole.index(", keep") + 6]  # (ends inside the last delta's string)
    out = s.data(cut.encode())
    assert b"api03-ABCDEF" not in out and b"sk-ant-" not in out, out
    assert out.endswith(b", keep"), out
    ends_with_start = _sse(["your key is ", value[:20]])  # every event whole; the rest never came
    out = s.data(ends_with_start)
    assert value[7:20].encode() not in out and _deltas(out) == "your key is [REDACTED:KEY]"


def test_a_value_written_with_any_json_escapes_is_scrubbed() -> None:
    """`\\/` (PHP, Java), ASCII-only escapes in either hex case (Python's json, Java), Go's HTML-safe
    `\\u003c`: each a form of the value a JSON-writing origin may echo."""
    for value in ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "pässwörd-ß-12345678", "tok<en>&x-12345678"):
        s = Scrubber([live(value=value)])
        plain = orjson.dumps(value).decode()
        ascii_only = json.dumps(value)
        upper_hex = re.sub(r"\\u[0-9a-f]{4}", lambda m: "\\u" + m.group(0)[2:].upper(), ascii_only)
        go = plain.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        for written in (plain, plain.replace("/", "\\/"), ascii_only, upper_hex, go):
            body = f'{{"echo": {written}, "n": 1}}'.encode()
            out = s.data(body)
            assert b"[REDACTED:KEY]" in out and json.loads(out)["echo"] == "[REDACTED:KEY]", (written, out)


def test_a_websocket_message_is_scrubbed_in_one_pass() -> None:
    s = Scrubber([live()])
    assert s.message(f"echo {VALUE}!".encode()) == b"echo [REDACTED:KEY]!"
    assert s.message(b"cut here: " + VALUE[:6].encode()) == b"cut here: [REDACTED:KEY]"
    assert s.message(b"") == b""
