"""The exact `transaction` journal records (shape 2, bus/records.py) the proxy makes for representative
exchanges, byte for byte as the journal serialises them (`JournalWriter.append`: one orjson dump of
the data), but for the clock fields (`timestamp`, `duration_ms`, set to 0 here).

These pin what is recorded, so that work done to make recording cheaper (the JSON fields made as
text, per line of a head) changes nothing that reaches the journal, the recorder's rows or the API.
Each exchange is recorded twice by the same Recorder: the second time from what its redactor
remembered of the first's lines."""

from __future__ import annotations

import base64

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from bus import records
from greyproxy.credentials.substitute import Live, Scrubber
from greyproxy.redaction import Redactor
from services.proxy import http1
from services.proxy.pipeline import Recorder

_TS, _DURATION = records.TRANSACTION_FIELDS.index("timestamp"), records.TRANSACTION_FIELDS.index("duration_ms")


class Journal:
    """What `JournalWriter.append` keeps of a record: its data as one orjson dump (clock fields zeroed)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def append(self, kind: str, data: Any, record_id: str | None = None) -> str:
        assert kind == records.TRANSACTION
        if isinstance(data, orjson.Fragment):  # serialised in a worker thread (Recorder.submit)
            data = orjson.loads(orjson.dumps(data))
        assert isinstance(data, list)
        assert data[_TS] > 0 and data[_DURATION] >= 0
        data = list(data)
        data[_TS] = data[_DURATION] = 0
        self.out.append(orjson.dumps(data))
        return str(len(self.out))


def request(raw: bytes) -> http1.RequestHead:
    head, _n = http1.parse_request_head(raw, 65536, 100)
    return head


def response(raw: bytes, method: str = "GET", split: bool = False) -> http1.ResponseHead:
    """A response head as the parser gives it; `split`: its fields already split into pairs (as
    when something has read `headers`), so the record reads the pairs instead of the head's lines."""
    resp, _n = http1.parse_response_head(raw, 65536, method)
    if split:
        assert resp.headers
    return resp


WRK_GET = b"GET http://127.0.0.1:8080/1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
NGINX_1K = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 10:47:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Sat, 05 Dec 2026 10:40:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6932b6c0-400"\r\nAccept-Ranges: bytes\r\n\r\n'
)
API_POST = (
    b"POST http://api.example/v1/chat?access_token=sk-q&x=1 HTTP/1.1\r\nHost: api.example\r\n"
    b"Content-Type: application/json\r\nAuthorization: Bearer sk-secret\r\nx-my-token: t\r\n"
    b"Accept: a\r\naccept: b\r\nUser-Agent: agent/1.0 \xc3\xa9\r\nContent-Length: 13\r\n\r\n"
)
API_JSON = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json; charset=utf-8\r\nSet-Cookie: s=1\r\n"
    b"set-cookie: t=2\r\nLocation: https://api.example/next?token=abc&page=2\r\nVary: Accept\r\n"
    b'vary: Origin\r\nX-Quote: a "b" \\ c\r\nContent-Length: 11\r\n\r\n'
)
PLAIN_TEXT = (
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Type: text/plain\r\nContent-Encoding: identity\r\n"
    b"Cache-Control: no-cache\r\nContent-Length: 5\r\n\r\n"
)
NOT_MODIFIED = b'HTTP/1.1 304 Not Modified\r\nServer: s\r\nETag: "x"\r\n\r\n'
NO_FIELDS = b"HTTP/1.1 204 No Content\r\n\r\n"


async def exchange(rec: Recorder, kind: str) -> None:
    """One exchange of `kind`, as the forward proxy and exchange.py drive a Txn."""
    if kind == "wrk":
        t = rec.txn("c1", "http://127.0.0.1:8080", "127.0.0.1", 8080, request(WRK_GET), 7)
        resp = response(NGINX_1K)
        t.resp_sink(resp)(bytes(1024))
        t.finish(resp)
    elif kind in ("api", "api-split"):
        t = rec.txn("agent", "http://api.example", "API.example.", 80, request(API_POST), 3, True)
        t.req_sink()(b'{"q": "hi"}\r\n')
        resp = response(API_JSON, "POST", split=kind == "api-split")
        t.resp_sink(resp)(b'{"ok":true}')
        t.finish(resp)
    elif kind == "text":
        t = rec.txn("c1", "https://h.example:8443", "h.example", 8443, request(WRK_GET))
        resp = response(PLAIN_TEXT)
        sink = t.resp_sink(resp)
        sink(b"he")
        sink(b"llo")
        t.finish(resp, error="cut off")
    elif kind == "304":
        t = rec.txn("c1", "http://127.0.0.1:8080", "127.0.0.1", 8080, request(WRK_GET))
        t.finish(response(NOT_MODIFIED))  # no body: resp_sink is never called
    elif kind == "204":
        t = rec.txn("c1", "http://127.0.0.1:8080", "127.0.0.1", 8080, request(WRK_GET))
        t.finish(response(NO_FIELDS))
    elif kind == "blocked":
        t = rec.txn("c1", "http://127.0.0.1:8080", "127.0.0.1", 8080, request(WRK_GET), 9)
        t.finish(status=403, result="blocked", block_reason="rule")
    elif kind == "refused":
        t = rec.txn("c1", "http://api.example", "api.example", 80, request(API_POST))
        t.credentials_from(
            SimpleNamespace(substituted=["k1"], session_id="gw-1", scrubber=None, refused_labels=("k1", "k2"))
        )
        t.finish(status=403, result="blocked", block_reason="credential_not_allowed")
    elif kind == "substituted":
        secret = "s3cr3t-value"
        scrub = Scrubber([Live("__GREYPROXY_K1__", secret, "k1", session_id="gw-1")])
        t = rec.txn("c1", "http://api.example", "api.example", 80, request(WRK_GET))
        t.credentials_from(SimpleNamespace(substituted=["k1"], session_id="gw-1", scrubber=scrub, refused_labels=()))
        raw = (
            f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Echo: key={secret}\r\nContent-Length: 20\r\n\r\n"
        ).encode()
        resp = response(raw)
        t.resp_sink(resp)(f"you sent {secret}".encode()[:20])
        t.finish(resp)
    else:  # pragma: no cover
        raise AssertionError(kind)


EXPECTED = {
    "204": (
        b'[0,"c1","127.0.0.1",8080,"GET","http://127.0.0.1:8080/1k","{\\"Host\\":[\\"127.0.0.'
        b'1:8080\\"]}",null,0,null,204,"{}",null,0,null,0,null,"allowed",null,"[]",null,"12'
        b'7.0.0.1",false,null,null,"[]",null,null,null,null,null,null]'
    ),
    "304": (
        b'[0,"c1","127.0.0.1",8080,"GET","http://127.0.0.1:8080/1k","{\\"Host\\":[\\"127.0.0.'
        b'1:8080\\"]}",null,0,null,304,"{\\"Server\\":[\\"s\\"],\\"Etag\\":[\\"\\\\\\"x\\\\\\"\\"]}",null'
        b',0,null,0,null,"allowed",null,"[]",null,"127.0.0.1",false,null,null,"[]",null,nu'
        b"ll,null,null,null,null]"
    ),
    "api": (
        b'[0,"agent","api.example",80,"POST","http://api.example/v1/chat?access_token=[RED'
        b'ACTED]&x=1","{\\"Host\\":[\\"api.example\\"],\\"Content-Type\\":[\\"application/json\\"]'
        b',\\"Authorization\\":[\\"[REDACTED]\\"],\\"X-My-Token\\":[\\"[REDACTED]\\"],\\"Accept\\":['
        b'\\"a\\",\\"b\\"],\\"User-Agent\\":[\\"agent/1.0 \xc3\x83\xc2\xa9\\"],\\"Content-Length\\":[\\'
        b'"13\\"]}","eyJxIjogImhpIn0NCg==",13,"application/json",201,"{\\"Content-Type\\":[\\"'
        b'application/json; charset=utf-8\\"],\\"Set-Cookie\\":[\\"[REDACTED]\\",\\"[REDACTED]\\"'
        b'],\\"Location\\":[\\"https://api.example/next?token=[REDACTED]&page=2\\"],\\"Vary\\":['
        b'\\"Accept\\",\\"Origin\\"],\\"X-Quote\\":[\\"a \\\\\\"b\\\\\\" \\\\\\\\ c\\"],\\"Content-Lengt'
        b'h\\":[\\"11\\"]}","eyJvayI6dHJ1ZX0=",11,"application/json; charset=utf-8",0,3,"allo'
        b'wed",null,"[]",null,"api.example",true,null,null,"[]",0,"utf-8",0,"utf-8",0,0]'
    ),
    "blocked": (
        b'[0,"c1","127.0.0.1",8080,"GET","http://127.0.0.1:8080/1k","{\\"Host\\":[\\"127.0.0.'
        b'1:8080\\"]}",null,0,null,403,"{}",null,0,null,0,9,"blocked",null,"[]",null,"127.0'
        b'.0.1",false,null,"rule","[]",null,null,null,null,null,null]'
    ),
    "refused": (
        b'[0,"c1","api.example",80,"POST","http://api.example/v1/chat?access_token=[REDACT'
        b'ED]&x=1","{\\"Host\\":[\\"api.example\\"],\\"Content-Type\\":[\\"application/json\\"],\\"'
        b'Authorization\\":[\\"[REDACTED]\\"],\\"X-My-Token\\":[\\"[REDACTED]\\"],\\"Accept\\":[\\"a'
        b'\\",\\"b\\"],\\"User-Agent\\":[\\"agent/1.0 \xc3\x83\xc2\xa9\\"],\\"Content-Length\\":[\\"13'
        b'\\"]}",null,0,"application/json",403,"{}",null,0,null,0,null,"blocked",null,"[]",'
        b'"gw-1","api.example",false,null,"credential_not_allowed","[\\"k1\\",\\"k2\\"]",null,'
        b"null,null,null,null,null]"
    ),
    "substituted": (
        b'[0,"c1","api.example",80,"GET","http://api.example/1k","{\\"Host\\":[\\"127.0.0.1:8'
        b'080\\"]}",null,0,null,200,"{\\"Content-Type\\":[\\"text/plain\\"],\\"X-Echo\\":[\\"key=['
        b'REDACTED:k1]\\"],\\"Content-Length\\":[\\"20\\"]}","eW91IHNlbnQgW1JFREFDVEVEOmsxXQ==",20,'
        b'"text/plain",0,null,"allowed",null,"[\\"k1\\"]","gw-1","127.0.0.1",false,null,null'
        b',"[]",null,null,0,"utf-8",null,0]'
    ),
    "text": (
        b'[0,"c1","h.example",8443,"GET","https://h.example:8443/1k","{\\"Host\\":[\\"127.0.0'
        b'.1:8080\\"]}",null,0,null,200,"{\\"Server\\":[\\"s\\"],\\"Content-Type\\":[\\"text/plain'
        b'\\"],\\"Content-Encoding\\":[\\"identity\\"],\\"Cache-Control\\":[\\"no-cache\\"],\\"Conte'
        b'nt-Length\\":[\\"5\\"]}","aGVsbG8=",5,"text/plain",0,null,"allowed",null,"[]",null,'
        b'"127.0.0.1",false,"cut off",null,"[]",null,null,0,"utf-8",null,0]'
    ),
    "wrk": (
        b'[0,"c1","127.0.0.1",8080,"GET","http://127.0.0.1:8080/1k","{\\"Host\\":[\\"127.0.0.'
        b'1:8080\\"]}",null,0,null,200,"{\\"Server\\":[\\"nginx/1.22.1\\"],\\"Date\\":[\\"Sat, 05 '
        b'Dec 2026 10:47:00 GMT\\"],\\"Content-Type\\":[\\"application/octet-stream\\"],\\"Conte'
        b'nt-Length\\":[\\"1024\\"],\\"Last-Modified\\":[\\"Sat, 05 Dec 2026 10:40:00 GMT\\"],\\"C'
        b'onnection\\":[\\"keep-alive\\"],\\"Etag\\":[\\"\\\\\\"6932b6c0-400\\\\\\"\\"],\\"Accept-Ranges'
        b'\\":[\\"bytes\\"]}",null,1024,"application/octet-stream",0,7,"allowed",null,"[]",nu'
        b'll,"127.0.0.1",false,null,null,"[]",null,null,null,null,null,null]'
    ),
}
# The same exchange with its fields split into pairs first: the same record, byte for byte.
EXPECTED["api-split"] = EXPECTED["api"]


def recorded(kind: str, times: int = 2) -> list[bytes]:
    async def main() -> list[bytes]:
        journal = Journal()
        rec = Recorder(journal)  # type: ignore[arg-type]
        for _ in range(times):
            await exchange(rec, kind)
        for _ in range(500):  # (a record with a coded or big body is finished in a worker thread)
            if len(journal.out) == times:
                break
            await asyncio.sleep(0.01)
        return journal.out

    return asyncio.run(main())


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_the_record_of_each_exchange_is_pinned_byte_for_byte(kind: str) -> None:
    first, again = recorded(kind)
    assert first == EXPECTED[kind]
    assert again == first  # the second, from what the redactor remembered of the first's lines


def test_the_pinned_records_read_back_with_secrets_redacted() -> None:
    """What the pins hold, read back by name: a reader's check that they pin the right thing."""
    api = records.transaction_fields(orjson.loads(EXPECTED["api"]))
    assert api["url"] == "http://api.example/v1/chat?access_token=[REDACTED]&x=1"
    assert api["request_headers"]["Authorization"] == ["[REDACTED]"]
    assert api["response_headers"]["Set-Cookie"] == ["[REDACTED]", "[REDACTED]"]
    assert api["response_headers"]["Location"] == ["https://api.example/next?token=[REDACTED]&page=2"]
    assert api["response_headers"]["Vary"] == ["Accept", "Origin"]
    sub = records.transaction_fields(orjson.loads(EXPECTED["substituted"]))
    assert sub["response_headers"]["X-Echo"] == ["key=[REDACTED:k1]"] and sub["substituted_credentials"] == ["k1"]
    assert b"s3cr3t" not in EXPECTED["substituted"] and b"sk-secret" not in EXPECTED["api"]
    # the echo cut at 20 bytes inside the value: the part kept is scrubbed too (it was stored)
    assert base64.b64decode(orjson.loads(EXPECTED["substituted"])[12]) == b"you sent [REDACTED:k1]"


def test_a_head_is_redacted_by_the_current_settings() -> None:
    """What one redactor remembered of a head's lines is not reused by another: after `redactedHeaders`
    changes (or the redactor is swapped), the same head is recorded with the new patterns."""

    async def main() -> list[dict[str, Any]]:
        journal = Journal()
        rec = Recorder(journal)  # type: ignore[arg-type]
        raw = b"HTTP/1.1 200 OK\r\nX-Custom: private\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
        for step in range(3):
            if step == 1:
                rec.settings_changed({"redactedHeaders": ["x-custom"]})
            elif step == 2:
                rec.redactor = Redactor()
            t = rec.txn("c1", "http://h", "h", 80, request(WRK_GET))
            t.finish(response(raw))
        return [records.transaction_fields(orjson.loads(r)) for r in journal.out]

    first, changed, back = asyncio.run(main())
    assert first["response_headers"]["X-Custom"] == ["private"]
    assert changed["response_headers"]["X-Custom"] == ["[REDACTED]"]
    assert back["response_headers"]["X-Custom"] == ["private"]
