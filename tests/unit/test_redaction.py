"""Header redaction (greyproxy/redaction.py) and the capture helpers it travels with."""

from __future__ import annotations

import base64
import gzip
import random
import zlib

import brotli
import orjson
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from greyproxy.capture import BodyCapture, decode_body, is_text_like, stored_body, transaction_json
from greyproxy.redaction import REDACTED, Redactor, canonical_header_name, extra_patterns
from harness.fuzz import examples


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "PROXY-AUTHORIZATION",
        "Cookie",
        "set-cookie",
        "X-Api-Key",
        "x-goog-api-key",
        "Api-Key",
        "X-Auth-Token",
        "token",
        "X-Client-Secret",
        "SECRET",
    ],
)
def test_defaults_redact(name: str) -> None:
    assert Redactor().matches(name)


@pytest.mark.parametrize("name", ["Content-Type", "Accept", "X-Custom", "Cookies-Policy", "User-Agent", "Host"])
def test_defaults_keep(name: str) -> None:
    assert not Redactor().matches(name)


def test_extra_patterns_are_case_insensitive_globs() -> None:
    r = Redactor(["x-custom", "X-Internal-*", "x-?id"])
    assert r.matches("X-CUSTOM") and r.matches("x-internal-anything") and r.matches("X-Sid")
    assert not r.matches("X-Customer") and not r.matches("x-internal") and not r.matches("x-uuid")
    assert r.matches("Authorization")  # defaults always apply


def test_headers_map_redacts_values_and_keeps_others() -> None:
    pairs = [
        ("authorization", "Bearer sk-live"),
        ("X-Api-Key", "k"),
        ("content-type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("X-Custom", "v"),
    ]
    out = Redactor().headers(pairs)
    assert out == {
        "Authorization": [REDACTED],
        "X-Api-Key": [REDACTED],
        "Content-Type": ["application/json"],
        "Set-Cookie": [REDACTED, REDACTED],
        "X-Custom": ["v"],
    }
    assert "sk-live" not in repr(out)


def test_redact_map_reapplies_and_reports_changes() -> None:
    stored = {"X-Custom": ["secret-ish"], "Accept": ["*/*"], "Authorization": [REDACTED]}
    new, changed = Redactor(["x-custom"]).redact_map(stored)
    assert changed and new == {"X-Custom": [REDACTED], "Accept": ["*/*"], "Authorization": [REDACTED]}
    again, changed = Redactor(["x-custom"]).redact_map(new)
    assert not changed and again == new


# Issue 13 item 4: what an outside review found stored in clear.
@pytest.mark.parametrize(
    "name",
    [
        "X-Auth",
        "X-Password",
        "Api_Key",
        "X_API_KEY",
        "x-passwd",
        "X-Session-Id",
        "Session",
        "X-User-Password",
        "X_Auth_Token",
        "Client_Secret",
        "x_goog_api_key",
        "apikey",  # SPEC §7's *apikey*: the spelling without a separator
        "X-ApiKey",
        "X_APIKEY",
    ],
)
def test_new_defaults_and_underscores_redact(name: str) -> None:
    assert Redactor().matches(name)


@given(
    st.sampled_from(["api-key", "apikey", "auth", "password", "passwd", "secret", "session", "token"]),
    st.text(alphabet="abcxyz-_", max_size=6),
    st.text(alphabet="abcxyz-_", max_size=6),
    st.sampled_from([str.lower, str.upper, str.title]),
)
@settings(max_examples=examples(300), deadline=None)
def test_any_spelling_of_a_secret_name_is_redacted(core: str, before: str, after: str, case) -> None:
    # '_' and '-' alike, any case, any surrounding text: in a header name and as a query parameter.
    for variant in (core, core.replace("-", "_")):
        name = case(before + variant + after)
        r = Redactor()
        assert r.matches(name), name
        url = f"https://h.example/p?keep=1&{name}=s3cr3t&z=2"
        assert r.url(url) == f"https://h.example/p?keep=1&{name}={REDACTED}&z=2"


def test_user_patterns_treat_underscore_and_dash_alike() -> None:
    r = Redactor(["x-my_header"])
    assert r.matches("X-My-Header") and r.matches("x_my_header") and not r.matches("x-myheader")


@pytest.mark.parametrize(
    "url, want",
    [
        ("https://a.example/cb?access_token=abc", f"https://a.example/cb?access_token={REDACTED}"),
        (
            "https://a.example/cb?code=1&access_token=abc#frag",
            f"https://a.example/cb?code=1&access_token={REDACTED}#frag",
        ),
        (
            "https://a.example/cb?API_KEY=k&api%2Dkey=k2&x=1",
            f"https://a.example/cb?API_KEY={REDACTED}&api%2Dkey={REDACTED}&x=1",
        ),
        ("https://a.example/cb?password", "https://a.example/cb?password"),  # no value: nothing to hide
        ("https://a.example/cb?q=token", "https://a.example/cb?q=token"),  # a value is not a name
        ("https://a.example/token/path", "https://a.example/token/path"),
        ("https://a.example/?", "https://a.example/?"),
        ("https://a.example/?&&session=1&", f"https://a.example/?&&session={REDACTED}&"),
    ],
)
def test_query_values_are_redacted_by_name(url: str, want: str) -> None:
    assert Redactor().url(url) == want


def test_url_headers_get_query_redaction_and_stored_maps_too() -> None:
    pairs = [
        ("Location", "https://app.example/cb?access_token=s3&state=x"),
        ("Referer", "http://a/?password=p"),
        ("Content-Location", "/r?session_id=9"),
        ("Link", "</x?token=1>"),
    ]
    out = Redactor().headers(pairs)
    assert out["Location"] == [f"https://app.example/cb?access_token={REDACTED}&state=x"]
    assert out["Referer"] == [f"http://a/?password={REDACTED}"]
    assert out["Content-Location"] == [f"/r?session_id={REDACTED}"]
    assert out["Link"] == ["</x?token=1>"]  # only the URL-valued headers named in the issue
    stored = {"Location": ["https://app.example/cb?access_token=s3"], "X-Auth": ["v"], "Accept": ["*/*"]}
    new, changed = Redactor().redact_map(stored)
    assert changed and new == {
        "Location": [f"https://app.example/cb?access_token={REDACTED}"],
        "X-Auth": [REDACTED],
        "Accept": ["*/*"],
    }
    assert Redactor().redact_map(new) == (new, False)


@given(st.text(max_size=200))
@settings(max_examples=examples(300), deadline=None)
def test_url_redaction_never_fails_and_is_idempotent(url: str) -> None:
    r = Redactor(["x-*"])
    once = r.url(url)
    assert r.url(once) == once
    if "?" not in url:
        assert once == url


def test_canonical_name_and_extra_patterns() -> None:
    assert canonical_header_name("x-api-KEY") == "X-Api-Key"
    assert canonical_header_name("www-authenticate") == "Www-Authenticate"
    assert extra_patterns(["x-a", 3, " ", "x-b "]) == ["x-a", "x-b"]
    assert extra_patterns("x-a") == []


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789", min_size=1, max_size=40))
@settings(max_examples=examples(300), deadline=None)
def test_matching_is_case_insensitive(name: str) -> None:
    r = Redactor(["x-*-id"])
    assert r.matches(name) == r.matches(name.upper()) == r.matches(name.lower())
    assert r.matches(name) == Redactor(["x-*-id"]).matches(name)  # the per-instance cache changes nothing


# ---------------------------------------------------------------- capture


def test_text_like() -> None:
    for ct in (
        "text/plain",
        "text/event-stream; charset=utf-8",
        "application/json",
        "Application/JSON",
        "application/vnd.api+json",
        "application/atom+xml",
        "application/xml",
        "application/javascript",
        "application/x-www-form-urlencoded",
        "application/x-ndjson",
    ):
        assert is_text_like(ct), ct
    for ct in (None, "", "image/png", "application/octet-stream", "application/grpc", "multipart/form-data"):
        assert not is_text_like(ct), ct


def test_capture_keeps_a_capped_copy_and_the_true_size() -> None:
    c = BodyCapture(10)
    for part in (b"12345", memoryview(b"67890abc"), b"def"):
        c.add(part)
    assert bytes(c.data) == b"1234567890" and c.size == 16 and c.truncated


@pytest.mark.parametrize(
    "coding,encode",
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
        ("br", brotli.compress),
        ("zstd", zstandard.ZstdCompressor().compress),
        ("gzip, br", lambda b: brotli.compress(gzip.compress(b))),
    ],
)
def test_decode_body(coding: str, encode) -> None:  # noqa: ANN001
    text = b'{"hello": "world"}' * 100
    assert decode_body(encode(text), coding) == text


def test_decode_caps_output_and_survives_truncation() -> None:
    bomb = gzip.compress(b"\0" * (20 * 1024 * 1024))
    assert len(decode_body(bomb, "gzip", limit=1024 * 1024)) == 1024 * 1024
    text = b"line of text\n" * 50_000
    cut = brotli.compress(text)[:200]
    assert text.startswith(decode_body(cut, "br"))
    with pytest.raises(ValueError):
        decode_body(b"not gzip at all", "gzip")
    with pytest.raises(ValueError):
        decode_body(b"x", "compress")


def test_a_cut_brotli_body_decodes_as_far_as_its_bytes_go() -> None:
    """capture.maxBodyBytes cuts a br body: what its bytes hold is decoded, up to the cap. Before,
    decoding stopped at brotli's ring buffer: 32 752 bytes of a 64 KiB capture, whatever followed."""
    text = b"".join(b"line %d: %s\n" % (i, random.Random(i).randbytes(8).hex().encode()) for i in range(5000))
    whole = brotli.compress(text)
    got = decode_body(whole[: len(whole) - 10], "br")
    assert len(got) > len(text) - 1000 and text.startswith(got), len(got)
    capped = decode_body(whole[: len(whole) // 2], "br", limit=60_000)
    assert len(capped) == 60_000 and text.startswith(capped)
    assert decode_body(whole, "br") == text


@pytest.mark.parametrize(
    "coding,encode",
    [
        ("zstd", zstandard.ZstdCompressor().compress),  # content size in the frame header
        ("zstd", lambda b: zstandard.ZstdCompressor(write_content_size=False).compress(b)),
        ("br", lambda b: brotli.compress(b, quality=1)),
        ("gzip", gzip.compress),
    ],
)
def test_a_body_cut_before_the_first_output_keeps_its_raw_bytes(coding: str, encode) -> None:  # noqa: ANN001
    """SPEC §7 ("on failure the raw bytes are kept") and capture.maxBodyBytes: a compressed body
    captured only in part, cut before its decoder gives any output (a zstd block of incompressible
    text is up to 128 KiB), is stored as its raw bytes. Before, it was stored as an empty body:
    the API then showed "" for a body of 200 000 bytes."""
    text = base64.b64encode(random.Random(7).randbytes(225_000))  # 300 000 bytes of text, hardly compressible
    cut = encode(text)[: 3 if coding == "br" else 40]  # (brotli gives output from its first bytes on)
    with pytest.raises(ValueError, match="before its first output"):
        decode_body(cut, coding)
    from greyproxy.bodies import RAW, Packed

    assert stored_body(cut, "text/plain", coding) == Packed(cut, RAW, None)  # kept raw: not text
    assert decode_body(encode(b""), coding) == b""  # a whole empty body is still an empty body
    if coding == "zstd":
        big = encode(text)[:65_536]  # capture.maxBodyBytes 64 KiB: inside the first block
        assert stored_body(big, "text/plain", coding).blob == big  # type: ignore[union-attr]


def test_stored_body() -> None:
    from greyproxy.bodies import RAW, Packed

    assert stored_body(gzip.compress(b'{"a":1}'), "application/json", "gzip") == Packed(b'{"a":1}', RAW, "utf-8")
    assert stored_body(b"\x89PNG", "image/png", None) is None
    assert stored_body(b"plain", "text/plain", "gzip") == Packed(b"plain", RAW, "utf-8")  # decoding failed: raw kept
    assert stored_body(b"", "text/plain", None) is None


def test_transaction_json_shape() -> None:
    row = {
        "id": 3,
        "timestamp": 0.0,
        "request_headers": '{"A": ["b"]}',
        "response_headers": None,
        "substituted_credentials": "[]",
        "request_body": "x",
        "response_body": "y",
        "duration_ms": 1.23456,
    }
    item = transaction_json(row)
    assert item["timestamp"] == "1970-01-01T00:00:00Z" and item["request_headers"] == {"A": ["b"]}
    assert item["response_headers"] == {} and item["substituted_credentials"] == []
    assert (
        "request_body" not in item and item["duration_ms"] == 1 and item["duration_us"] == 1235
    )  # integers (issue 13 item 9)
    assert transaction_json(row, include_bodies=True)["response_body"] == "y"


_LINE_NAMES = st.sampled_from(
    ["Server", "content-type", "Set-Cookie", "X-Api-Key", "Location", "referer", "X-A", "x-a", "Vary", "ETag"]
)
_LINE_VALUES = st.sampled_from(
    ["", "nginx", " padded ", "\tt\t", "a:b", "/p?token=s&x=1", "https://h/?access_token=t", "sid=1; Path=/"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_LINE_NAMES, st.sampled_from([":", ": ", ":\t"]), _LINE_VALUES), max_size=8), st.integers(1, 3)
)
def test_header_lines_record_what_headers_records(fields: list[tuple[str, str, str]], rounds: int) -> None:
    """`header_lines` (a plain head's field lines, remembered line by line) gives what `headers` gives
    for the pairs the parser reads from those lines, every time (the remembered lines too), and keeps
    no line of a redacted field."""
    r = Redactor(["x-a"])
    lines = [k + sep + v for k, sep, v in fields]
    pairs = [(k, (sep[1:] + v).strip(" \t")) for k, sep, v in fields]
    for _ in range(rounds):
        assert r.header_lines(lines) == r.headers(pairs)
    assert not any(line.lower().startswith(("set-cookie", "x-api-key", "x-a")) for line in r._fields)


def test_header_lines_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from greyproxy import redaction

    monkeypatch.setattr(redaction, "_CACHE_LIMIT", 8)
    r = Redactor()
    for i in range(50):
        assert r.header_lines([f"Date: {i}"]) == {"Date": [str(i)]}
        assert len(r._fields) <= 8


_RECORDED_NAMES = st.sampled_from(
    ["Server", "content-type", "Content-Type", "Content-Encoding", "CONTENT-ENCODING", "Set-Cookie", "X-Api-Key"]
    + ["Location", "X-A", "x-a", "Vary", "ETag", "X-Request-Id"]
)
_RECORDED_VALUES = st.sampled_from(
    ["", "nginx", " padded ", "text/html", "gzip", 'a "q" \\ c', "caf\xe9", "\x1f\x7f", "/p?token=s&x=1", "sid=1"]
)


@settings(max_examples=400, deadline=None)
@given(
    fields=st.lists(st.tuples(_RECORDED_NAMES, st.sampled_from([":", ": ", ":\t"]), _RECORDED_VALUES), max_size=10),
    rounds=st.integers(1, 3),
    bits=st.sampled_from([62, 1, 0]),
)
def test_recorded_is_the_json_of_what_headers_records(
    fields: list[tuple[str, str, str]], rounds: int, bits: int
) -> None:
    """`recorded` (each field's JSON remembered, joined) gives, from a head's lines or from its pairs,
    every time, orjson's text of what `headers` records (a name met twice: its values one list), and
    the first Content-Type and Content-Encoding values unredacted, as a head's `header` reads them.
    With few bits (`_BITS`) names share them: still the same text. No redacted field is remembered."""
    import orjson

    from greyproxy import redaction

    kept, redaction._BITS = redaction._BITS, bits
    try:
        r = Redactor(["x-a", "content-encoding"])  # (a picked field redacted: its value is still picked)
        lines = [k + sep + v for k, sep, v in fields]
        pairs = [(k, (sep[1:] + v).strip(" \t")) for k, sep, v in fields]
        want = orjson.dumps(r.headers(pairs)).decode()
        ct = next((v for k, v in pairs if k.lower() == "content-type"), None)
        ce = next((v for k, v in pairs if k.lower() == "content-encoding"), None)
        for _ in range(rounds):
            assert r.recorded(lines) == (want, ct, ce)
            assert r.recorded(pairs) == (want, ct, ce)
    finally:
        redaction._BITS = kept
    for field in [*r._fields, *(f for f, _ in r._last_lines + r._last_pairs if f is not None)]:
        assert not r.matches(field[0] if isinstance(field, tuple) else field.partition(":")[0])


def test_recorded_names_met_twice_are_one_list() -> None:
    r = Redactor()
    lines = ["Vary: Accept", "Server: s", "vary: Origin", "Set-Cookie: a=1", "set-cookie: b=2"]
    text, ct, ce = r.recorded(lines)
    assert text == '{"Vary":["Accept","Origin"],"Server":["s"],"Set-Cookie":["[REDACTED]","[REDACTED]"]}'
    assert (ct, ce) == (None, None)
    assert r.recorded([]) == ("{}", None, None)


@settings(max_examples=examples(300), deadline=None)
@given(st.text(max_size=12))
def test_a_field_value_is_written_as_orjson_writes_it(value: str) -> None:
    """The recorded JSON text of a value (printable ASCII between quotes as it is, without orjson's
    call) is what orjson writes, for any value."""
    import orjson

    from greyproxy import redaction

    for v in (value, value.encode("latin-1", "replace").decode("latin-1"), f'{value}\x7f"\\\t/é'):
        assert redaction._json_string(v) == orjson.dumps(v).decode()
    r = Redactor()
    lines = [f"X-A:{value}", "Server: nginx"]
    assert orjson.loads(r.recorded(lines)[0]) == r.header_lines(lines)


def test_a_name_whose_values_keep_changing_is_not_remembered_past_a_few() -> None:
    """X-Request-Id's lines (a new value every answer) do not fill the fields' cache and push out the
    lines that come back (Server): those stay remembered; every record is still right."""
    import orjson

    from greyproxy import redaction

    r = Redactor()
    server = None
    for i in range(3 * redaction._VARYING):
        lines = ["Server: nginx", f"X-Request-Id: {i:08x}", "Content-Type: text/plain"]
        got = r.recorded(lines)
        assert orjson.loads(got[0]) == {
            "Server": ["nginx"],
            "X-Request-Id": [f"{i:08x}"],
            "Content-Type": ["text/plain"],
        }
        assert got[1] == "text/plain"
        if server is None:
            server = r._fields["Server: nginx"]
        assert r._fields["Server: nginx"] is server  # (remembered once, never made again)
    kept = [f for f in r._fields if isinstance(f, str) and f.startswith("X-Request-Id")]
    assert len(kept) == redaction._VARYING


@settings(max_examples=examples(300), deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(_RECORDED_NAMES, st.sampled_from([":", ": "]), _RECORDED_VALUES), max_size=6),
        min_size=2,
        max_size=6,
    )
)
def test_recorded_reads_each_head_as_a_new_redactor_would(heads: list[list[tuple[str, str, str]]]) -> None:
    """Heads one after another on one Redactor (each field compared with the one at its place in the
    head before, `_last_lines` / `_last_pairs`) are recorded as a Redactor of their own records them,
    as lines and as pairs; no redacted field is kept at its place."""
    r = Redactor(["x-a"])
    for fields in heads:
        lines = [k + sep + v for k, sep, v in fields]
        pairs = [(k, (sep[1:] + v).strip(" \t")) for k, sep, v in fields]
        assert r.recorded(lines) == Redactor(["x-a"]).recorded(lines)
        assert r.recorded(pairs) == Redactor(["x-a"]).recorded(pairs)
    for field, _got in r._last_lines + r._last_pairs:
        if field is not None:
            assert not r.matches(field[0] if isinstance(field, tuple) else field.partition(":")[0])


def test_an_llm_clients_session_id_is_kept_when_it_is_a_uuid() -> None:
    """SPEC §13.2 reads `X-Claude-Code-Session-Id` (Claude Code) and `session_id` (Codex) from stored
    rows when the body has no session key; `*session*` (§7) stored them as [REDACTED], so such a
    request landed in another conversation. A UUID there is an id, not a secret (the same id is in
    the body when the body has it): kept. Anything else under those names, and every other
    `*session*` name, stays redacted; a user's own pattern naming them redacts them again."""
    sid = "0b6f1c8e-4a2d-4f7b-9c3e-5d8a7b6c1e2f"
    r = Redactor()
    pairs = [
        ("X-Claude-Code-Session-Id", sid),
        ("session_id", sid.upper()),
        ("Session-Id", sid),  # (a web server's own session header: only Codex's `session_id` spelling is kept)
        ("X-Session-Id", sid),
        ("Session-Token", sid),
    ]
    want = {
        "X-Claude-Code-Session-Id": [sid],
        "Session_id": [sid.upper()],
        "Session-Id": [REDACTED],
        "X-Session-Id": [REDACTED],
        "Session-Token": [REDACTED],
    }
    assert r.headers(pairs) == want
    assert r.headers([("session_id", "not-a-uuid-" + sid)]) == {"Session_id": [REDACTED]}
    lines = [f"{k}: {v}" for k, v in pairs]
    for _ in range(2):  # (the second time from the remembered fields)
        assert r.header_lines(lines) == want
        text, _ct, _ce = r.recorded(lines)
        assert orjson.loads(text) == want
    stored = {"X-Claude-Code-Session-Id": [sid], "Session_id": ["s3cret"], "Session-Id": [sid]}
    assert r.redact_map(stored) == (
        {"X-Claude-Code-Session-Id": [sid], "Session_id": [REDACTED], "Session-Id": [REDACTED]},
        True,
    )
    for extra, claude, codex in (
        (["x-claude-code-session-id"], REDACTED, sid),
        (["*session-id"], REDACTED, REDACTED),
        (["SESSION_ID"], sid, REDACTED),
    ):
        got = Redactor(extra).headers([("X-Claude-Code-Session-Id", sid), ("session_id", sid)])
        assert got == {"X-Claude-Code-Session-Id": [claude], "Session_id": [codex]}, extra
