"""Stored bodies (SPEC §15, greyproxy.bodies): captured bytes kept exactly, compressed, read back by
one function; old TEXT rows still read."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greyproxy.bodies import RAW, ZSTD, Body, api_value, charset_of, from_record, pack, read_body, read_side, to_record
from greyproxy.capture import transaction_json
from harness.fuzz import examples

_LABELS = [
    "utf-8",
    "UTF-8",
    "latin-1",
    "iso-8859-1",
    "utf-16",
    "utf-16-be",
    "shift_jis",
    "cp1252",
    "ascii",
    "koi8-r",
    "gb18030",
    "utf-32",
    "no-such-charset",
    "",
    '"utf-8"',
]


def _roundtrip(data: bytes, content_type: str | None) -> Body | None:
    """Proxy → journal record (JSON) → recorder row → read, as the stack does it."""
    rec: dict[str, Any] = {}
    to_record(rec, "response", pack(data, content_type))
    row = dict(rec)
    from_record(row, "response")
    return read_side(row, "response")


@settings(max_examples=examples(400), deadline=None)
@given(
    data=st.binary(max_size=4096),
    label=st.sampled_from(_LABELS) | st.text(max_size=12),
    media=st.sampled_from(["text/plain", "application/json", "text/html"]),
)
def test_any_bytes_under_any_charset_label_round_trip_exactly(data: bytes, label: str, media: str) -> None:
    ct = f"{media}; charset={label}"
    body = _roundtrip(data, ct)
    assert body is not None and body.data == data
    value, encoding = api_value(body)
    if encoding == "base64":
        assert body.text is None and base64.b64decode(value or "") == data
    else:  # text: exactly the bytes under the charset the row keeps
        assert encoding is None and body.text == value
        assert (value or "").encode(pack(data, ct).charset or "") == data


@given(text=st.text(max_size=2000))
def test_text_stays_text(text: str) -> None:
    body = _roundtrip(text.encode(), "application/json")
    assert body is not None and body.text == text and api_value(body) == (text, None)


def test_random_bytes_labelled_text_are_binary_and_not_inflated() -> None:
    data = os.urandom(1024)
    p = pack(data, "text/plain")
    assert p.charset is None and len(p.blob) <= len(data)  # stored as they are: incompressible, never 3x
    assert api_value(read_body(p.blob, p.codec, p.charset))[1] == "base64"


def test_text_is_compressed_small_bodies_are_not() -> None:
    big = b'{"messages": [' + b'{"role": "user", "content": "hello there"},' * 200 + b"{}]}"
    p = pack(big, "application/json")
    assert p.codec == ZSTD and len(p.blob) * 10 < len(big) and p.charset == "utf-8"
    small = pack(b"{}", "application/json")
    assert small == type(small)(b"{}", RAW, "utf-8")


def test_charset_of() -> None:
    assert charset_of(None) == "utf-8" and charset_of("text/plain") == "utf-8"
    assert charset_of('text/plain; format=flowed; Charset="ISO-8859-1"') == "iso-8859-1"
    assert charset_of("text/plain; charset=") == "utf-8"


def test_latin1_text_reads_as_its_text() -> None:
    body = _roundtrip("café".encode("latin-1"), "text/plain; charset=iso-8859-1")
    assert body is not None and body.text == "café" and body.data == b"caf\xe9"


def test_rows_from_before_migration_6_read_as_their_text() -> None:
    row = {"id": 1, "timestamp": 0.0, "response_body": "caf\ufffd", "request_body": None}
    body = read_side(row, "response")
    assert body is not None and body.text == "caf\ufffd"
    item = transaction_json(row, include_bodies=True)
    assert item["response_body"] == "caf\ufffd" and item["response_body_encoding"] is None
    assert item["request_body"] is None and item["request_body_encoding"] is None
    assert "response_body_codec" not in item and "response_body_charset" not in item


def test_api_item_of_a_binary_body() -> None:
    data = bytes(range(256)) * 4
    rec: dict[str, Any] = {}
    to_record(rec, "response", pack(data, "text/plain"))
    from_record(rec, "response")
    item = transaction_json({"id": 1, "timestamp": 0.0, **rec}, include_bodies=True)
    assert item["response_body_encoding"] == "base64" and base64.b64decode(item["response_body"]) == data
    assert "response_body" not in transaction_json({"id": 1, "timestamp": 0.0, **rec})


def test_bad_records_are_refused() -> None:
    with pytest.raises(ValueError, match="not base64"):
        from_record({"response_body": "!!", "response_body_codec": RAW}, "response")
    with pytest.raises(ValueError, match="codec"):
        from_record({"response_body": "", "response_body_codec": 9}, "response")
    with pytest.raises(ValueError, match="must be text"):
        from_record({"response_body": 5}, "response")
    with pytest.raises(ValueError, match="unknown codec"):
        read_body(b"x", 7, None)
    legacy = {"response_body": "plain text"}  # an older producer: kept as text
    from_record(legacy, "response")
    assert legacy["response_body"] == "plain text" and read_side(legacy, "response") == Body(
        b"plain text", "plain text"
    )
