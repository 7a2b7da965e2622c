"""HAR 1.2 export without a stack: row → entry, the document's framing, keyset pages of a real
SQLite database, all checked against the HAR 1.2 required fields (greyproxy.har.HAR_SCHEMA,
written from the specification) with jsonschema."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greyproxy import har
from greyproxy.capture import TRANSACTION_COLUMNS
from greyproxy.store import database, open_database
from services.api.export import HarRows
from services.api.transactions import TransactionFilter
from harness.fuzz import examples

VALIDATOR = jsonschema.Draft202012Validator(har.HAR_SCHEMA)


def _row(**over) -> dict:
    row = {c: None for c in TRANSACTION_COLUMNS}
    row.update(
        {
            "id": 1,
            "timestamp": 1_770_000_000.25,
            "container_name": "agent",
            "destination_host": "api.test",
            "destination_port": 443,
            "method": "GET",
            "url": "https://api.test/v1/x?a=1&b=&a=2",
            "request_headers": orjson.dumps({"Authorization": ["[REDACTED]"], "Cookie": ["s=1; t=2"]}).decode(),
            "request_body_size": 0,
            "status_code": 200,
            "response_headers": {"Content-Type": ["application/json"], "Location": ["/next"]},
            "response_body": '{"ok": true}',
            "response_body_size": 12,
            "response_content_type": "application/json",
            "duration_ms": 12.5,
            "result": "allowed",
            "substituted_credentials": '["__GREYPROXY_KEY__"]',
            "host_mismatch": 0,
        }
    )
    row.update(over)
    return row


def _doc(rows: list[dict]) -> dict:
    raw = har.document_head("test") + b",".join(har.entry_bytes(r) for r in rows) + har.DOCUMENT_TAIL
    return orjson.loads(raw)


def test_entry_fields() -> None:
    doc = _doc([_row()])
    VALIDATOR.validate(doc)
    assert doc["log"]["version"] == "1.2" and doc["log"]["creator"]["name"] == "greyproxy"
    e = doc["log"]["entries"][0]
    assert e["startedDateTime"] == "2026-02-02T02:40:00.250Z"
    assert {"name": "Authorization", "value": "[REDACTED]"} in e["request"]["headers"]
    assert e["request"]["queryString"] == [
        {"name": "a", "value": "1"},
        {"name": "b", "value": ""},
        {"name": "a", "value": "2"},
    ]
    assert e["request"]["cookies"] == [{"name": "s", "value": "1"}, {"name": "t", "value": "2"}]
    assert "postData" not in e["request"]
    assert e["response"]["content"] == {"size": 12, "mimeType": "application/json", "text": '{"ok": true}'}
    assert e["response"]["redirectURL"] == "/next" and e["response"]["statusText"] == "OK"
    assert e["time"] == 12.5 and e["timings"]["wait"] == 12.5
    assert e["_container"] == "agent" and e["_substitutedCredentials"] == ["__GREYPROXY_KEY__"]


def test_redacted_cookie_gives_no_cookies() -> None:
    e = har.entry(_row(request_headers={"Cookie": ["[REDACTED]"]}))
    assert e["request"]["cookies"] == [] and e["request"]["headers"] == [{"name": "Cookie", "value": "[REDACTED]"}]


def test_post_bodies_binary_truncated_and_websocket() -> None:
    rows = [
        _row(
            id=2, method="POST", request_body='{"q": 1}', request_body_size=8, request_content_type="application/json"
        ),
        _row(
            id=3,
            method="POST",
            request_body=None,
            request_body_size=500,
            request_content_type="image/png",
            response_body=None,
            response_body_size=70,
            response_content_type="image/png",
        ),
        _row(id=4, response_body="abc", response_body_size=10_000),
        _row(id=5, method="GET", url="https://ws.test/s", status_code=101, response_body=None, response_body_size=0),
        _row(
            id=6,
            method="WS_REQ",
            url="wss://ws.test/s",
            request_body="hi",
            request_body_size=2,
            status_code=None,
            response_body=None,
            response_body_size=0,
            duration_ms=None,
            response_headers={},
        ),
        _row(
            id=7,
            method="WS_RESP",
            url="wss://ws.test/s",
            request_body=None,
            status_code=None,
            response_body=None,
            response_body_size=9,
            duration_ms=None,
        ),
        _row(  # a text message longer than the capture kept
            id=8,
            method="WS_RESP",
            url="wss://ws.test/s",
            request_body=None,
            status_code=None,
            response_body="x" * 100,
            response_body_size=5_000,
            duration_ms=None,
            response_headers={},
        ),
        _row(  # a compressed one cut on the wire: its size is the wire's, its text decoded up to the cap
            id=9,
            method="WS_REQ",
            url="wss://ws.test/s",
            request_body="y" * 64,
            request_body_size=40,
            status_code=None,
            response_body=None,
            response_body_size=0,
            duration_ms=None,
            response_headers={},
        ),
    ]
    raw = har.document_head("test") + b",".join(har.entry_bytes(r, max_body=64) for r in rows[-1:]) + har.DOCUMENT_TAIL
    cut_compressed = orjson.loads(raw)["log"]["entries"][0]["_webSocketMessages"][0]
    assert cut_compressed["_truncated"] is True and cut_compressed["_size"] == 40
    doc = _doc(rows)
    VALIDATOR.validate(doc)
    e = {x["_id"]: x for x in doc["log"]["entries"]}
    assert e[2]["request"]["postData"] == {"mimeType": "application/json", "text": '{"q": 1}'}
    assert e[3]["request"]["postData"]["text"] == "" and "not stored" in e[3]["request"]["postData"]["comment"]
    assert "not stored" in e[3]["response"]["content"]["comment"]
    assert "truncated" in e[4]["response"]["content"]["comment"]
    assert e[5]["_resourceType"] == "websocket" and e[5]["response"]["statusText"] == "Switching Protocols"
    assert e[6]["_webSocketMessages"][0]["type"] == "send" and e[6]["_webSocketMessages"][0]["data"] == "hi"
    assert e[6]["response"]["status"] == 0 and e[6]["time"] == 0
    assert e[7]["_webSocketMessages"][0] == {
        "type": "receive",
        "time": 1_770_000_000.25,
        "opcode": 2,
        "data": "",
        "_size": 9,
    }
    assert e[8]["_webSocketMessages"][0]["data"] == "x" * 100
    assert e[8]["_webSocketMessages"][0]["_truncated"] is True and e[8]["_webSocketMessages"][0]["_size"] == 5_000
    assert "_truncated" not in e[6]["_webSocketMessages"][0] and "_size" not in e[6]["_webSocketMessages"][0]


def test_schema_rejects_missing_required_fields() -> None:
    """The checker itself can fail: drop each required field once."""
    doc = _doc([_row()])
    e = doc["log"]["entries"][0]
    for obj, field in (
        (doc["log"], "creator"),
        (e, "timings"),
        (e["request"], "headersSize"),
        (e["response"], "redirectURL"),
        (e["response"]["content"], "mimeType"),
        (e["timings"], "wait"),
    ):
        saved = obj.pop(field)
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(doc)
        obj[field] = saved
    VALIDATOR.validate(doc)


_text = st.one_of(st.none(), st.text(max_size=30))
_header_map = st.dictionaries(st.text(min_size=1, max_size=10), st.lists(st.text(max_size=10), max_size=3), max_size=4)


@settings(max_examples=examples(200), deadline=None)
@given(
    method=st.text(max_size=10),
    url=st.text(max_size=60),
    status=st.one_of(st.none(), st.integers(0, 999)),
    req_body=_text,
    resp_body=_text,
    req_size=st.one_of(st.none(), st.integers(-5, 10**9)),
    resp_size=st.one_of(st.none(), st.integers(-5, 10**9)),
    headers=_header_map,
    raw_headers=st.one_of(st.none(), st.text(max_size=20)),
    ts=st.one_of(st.none(), st.floats(0, 4e9)),
    dur=st.one_of(st.none(), st.floats(-10, 1e7, allow_nan=False)),
    ctype=_text,
)
def test_any_stored_row_gives_a_valid_entry(
    method, url, status, req_body, resp_body, req_size, resp_size, headers, raw_headers, ts, dur, ctype
) -> None:
    row = _row(
        method=method,
        url=url,
        status_code=status,
        request_body=req_body,
        response_body=resp_body,
        request_body_size=req_size,
        response_body_size=resp_size,
        request_headers=headers,
        response_headers=raw_headers,
        timestamp=ts,
        duration_ms=dur,
        request_content_type=ctype,
        response_content_type=ctype,
    )
    VALIDATOR.validate(_doc([row]))


@pytest.fixture
def db(tmp_path: Path):
    real = open_database(tmp_path / "t.db")
    yield real
    real.close()


def _insert(n: int, body: str | None = "x" * 100, ts0: float = 1000.0, same_ts: int = 1) -> None:
    cols = [c for c in TRANSACTION_COLUMNS if c != "id"]
    rows = []
    for i in range(n):
        r = _row(
            timestamp=ts0 + i // same_ts,
            request_body=body,
            response_body=body,
            container_name="agent" if i % 2 else "other",
        )
        rows.append([r[c] if not isinstance(r[c], (dict, list)) else orjson.dumps(r[c]).decode() for c in cols])
    marks = ",".join("?" * len(cols))
    with database.atomic():
        for r in rows:
            database.execute_sql(f"INSERT INTO http_transactions ({', '.join(cols)}) VALUES ({marks})", r)


def _all_pages(f: TransactionFilter, rows: int, batch_bytes: int = 8 << 20) -> list[dict]:
    out: list[dict] = []
    reading = HarRows(f, page_rows=rows, batch_bytes=batch_bytes)
    while True:
        entries = reading.next_chunk(max_bytes=700)  # a few entries a step: steps across page edges
        if not entries:
            return out
        out += [orjson.loads(e) for e in entries]


def test_keyset_pages_cover_every_row_once(db) -> None:
    _insert(257, same_ts=10)  # many rows share a timestamp: the id breaks ties across page edges
    entries = _all_pages(TransactionFilter(), rows=7, batch_bytes=1000)
    ids = [e["_id"] for e in entries]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 257
    assert all(e["response"]["content"]["text"] == "x" * 100 for e in entries)
    agent = _all_pages(TransactionFilter(container="agent"), rows=7)
    assert len(agent) == 128 and {e["_container"] for e in agent} == {"agent"}
    assert _all_pages(TransactionFilter(from_ts=1020, to_ts=1021), rows=3) == entries[200:220]


def test_compressed_bodies_give_the_decoded_size_and_a_true_truncation_note() -> None:
    """SPEC §14 (HAR export, HAR 1.2): `content.size` is the length of the returned content (decoded), `bodySize` the bytes
    received; `compression` what the coding saved. A compressed body read whole is not "truncated"
    (before, the stored decoded length was compared with the wire size: a whole gzip request body
    got the note, and a cut zstd response did not)."""
    gz = {"Content-Type": ["text/plain"], "Content-Encoding": ["gzip"]}
    whole = har.entry(_row(response_headers=gz, response_body="x" * 542, response_body_size=62))
    c = whole["response"]["content"]
    assert (c["size"], c["compression"], whole["response"]["bodySize"]) == (542, 480, 62) and "comment" not in c
    # the capture recorded the copy as cut (on the wire, or its decoding stopped at the cap): content.size
    # is the part kept (the whole decoded length is unknown), never the wire's below it
    cut = har.entry(
        _row(response_headers=gz, response_body="x" * 1000, response_body_size=5000, response_body_truncated=1)
    )
    c = cut["response"]["content"]
    assert c["comment"].startswith("body truncated to capture.maxBodyBytes") and c["size"] == 1000
    assert "compression" not in c
    bomb = har.entry(
        _row(response_headers=gz, response_body="x" * 4096, response_body_size=300, response_body_truncated=1)
    )
    assert bomb["response"]["content"]["comment"].startswith("body truncated to capture.maxBodyBytes")
    # a row from before that record: a decoded length at a plausible cap may have been cut
    old = har.entry(_row(response_headers=gz, response_body="x" * 4096, response_body_size=300), max_body=4096)
    assert old["response"]["content"]["comment"].startswith("body may be truncated")
    # a request body sent gzip-compressed, whole
    req = har.entry(
        _row(
            method="POST",
            request_headers={"Content-Encoding": ["gzip"], "Content-Type": ["application/json"]},
            request_body='{"gz":"yes"}',
            request_body_size=32,
            request_content_type="application/json",
        )
    )
    assert "comment" not in req["request"]["postData"] and req["request"]["bodySize"] == 32
    # no coding: the stored bytes are the wire's; a shorter copy was cut
    plain = har.entry(_row(response_body="abc", response_body_size=10_000))
    assert plain["response"]["content"]["comment"] == "body truncated to capture.maxBodyBytes"
    assert plain["response"]["content"]["size"] == 10_000


# ----------------------------------------------------------------------------- truncation as captured

GZ = {"Content-Type": ["application/json"], "Content-Encoding": ["gzip"]}


def test_truncation_is_what_the_capture_recorded_not_todays_cap() -> None:
    """A body cut at capture (`response_body_truncated` 1) stays cut whatever capture.maxBodyBytes
    says today, and a whole one stays whole: the note and content.size no longer follow the
    config (was: captured at 64 KiB and exported under 2 MiB, a cut body was shown complete; under
    a 1000-byte cap a whole 2182-byte body was marked truncated)."""
    cut = har.entry(
        _row(response_headers=GZ, response_body="x" * 65536, response_body_size=325, response_body_truncated=1),
        max_body=2 * 1024 * 1024,
    )
    c = cut["response"]["content"]
    assert "truncated" in c["comment"]
    assert c["size"] >= 65536 and c["size"] >= len(c["text"]) and "compression" not in c  # was 325
    whole = har.entry(
        _row(response_headers=GZ, response_body="y" * 2182, response_body_size=69, response_body_truncated=0),
        max_body=1000,
    )
    c = whole["response"]["content"]
    assert "comment" not in c and c["size"] == 2182 and c["compression"] == 2182 - 69
    # without a content-coding a cut body's size is the wire's (the decoded length is the wire's)
    plain = har.entry(_row(response_body="abc", response_body_size=10_000, response_body_truncated=1))
    c = plain["response"]["content"]
    assert "truncated" in c["comment"] and c["size"] == 10_000
    # a request body cut at capture
    req = har.entry(
        _row(
            method="POST",
            request_headers={"Content-Encoding": ["gzip"]},
            request_body="z" * 4096,
            request_body_size=100,
            request_content_type="application/json",
            request_body_truncated=1,
        ),
        max_body=2 * 1024 * 1024,
    )
    assert "truncated" in req["request"]["postData"]["comment"]


def test_rows_from_before_the_flag_never_claim_a_body_at_a_plausible_cap_complete() -> None:
    """Rows stored before the capture recorded truncation (flag NULL): a compressed body whose
    decoded length is a plausible cap (a multiple of 1 KiB or 1000 bytes, or today's cap) may have
    been cut: it says so; any other length is whole, whatever today's cap is."""
    for n, cap in ((65536, 2 * 1024 * 1024), (65536, 1000), (1000, 2 * 1024 * 1024), (4096, 4096)):
        e = har.entry(_row(response_headers=GZ, response_body="x" * n, response_body_size=300), max_body=cap)
        c = e["response"]["content"]
        assert "truncated" in c.get("comment", ""), (n, cap)
        assert c["size"] == n and "compression" not in c
    for cap in (1000, 2 * 1024 * 1024):
        e = har.entry(_row(response_headers=GZ, response_body="y" * 2182, response_body_size=69), max_body=cap)
        c = e["response"]["content"]
        assert "comment" not in c and c["size"] == 2182 and c["compression"] == 2113, cap


def test_compression_is_never_negative() -> None:
    for flag in (None, 0):
        e = har.entry(
            _row(response_headers=GZ, response_body="ab", response_body_size=22, response_body_truncated=flag)
        )
        c = e["response"]["content"]
        assert c["size"] == 2 and "compression" not in c


def test_error_and_block_reason_are_kept() -> None:
    e = har.entry(
        _row(status_code=502, response_body=None, response_body_size=0, error="connection refused", block_reason=None)
    )
    assert e["_error"] == "connection refused" and "_blockReason" not in e
    e = har.entry(_row(status_code=403, result="blocked", block_reason="rule", response_body=None))
    assert e["_blockReason"] == "rule" and "_error" not in e
    VALIDATOR.validate(_doc([_row(error="upstream reset", block_reason="credential_unknown")]))


def test_redacted_query_values_are_percent_encoded_in_the_url_only() -> None:
    e = har.entry(_row(url="https://api.test/v1?api_key=[REDACTED]&q=1#f[x]"))
    assert e["request"]["url"] == "https://api.test/v1?api_key=%5BREDACTED%5D&q=1#f%5Bx%5D"
    assert e["request"]["queryString"] == [{"name": "api_key", "value": "[REDACTED]"}, {"name": "q", "value": "1"}]
    # an IPv6 literal's brackets are the URI's own: kept
    e = har.entry(_row(url="http://[::1]:8080/p?token=[REDACTED]"))
    assert e["request"]["url"] == "http://[::1]:8080/p?token=%5BREDACTED%5D"


def test_a_body_that_cannot_be_read_gives_an_entry_with_a_note() -> None:
    """A stored body that does not decode (corrupt zstd, an unknown codec) is left out of its entry
    with a note saying so; the rest of the entry is there (was: the exception ended the export)."""
    e = har.entry(_row(response_body=b"\x28\xb5\x2f\xfd garbage", response_body_codec=1, response_body_size=9000))
    c = e["response"]["content"]
    assert "text" not in c and "could not be read" in c["comment"] and c["_error"]
    assert e["response"]["status"] == 200 and e["_id"] == 1
    e = har.entry(
        _row(
            method="POST",
            request_body=b"abc",
            request_body_codec=7,
            request_body_size=3,
            request_content_type="text/plain",
        )
    )
    post = e["request"]["postData"]
    assert post["text"] == "" and "could not be read" in post["comment"]
    VALIDATOR.validate(_doc([_row(response_body=b"\x28\xb5\x2f\xfd bad", response_body_codec=1)]))
