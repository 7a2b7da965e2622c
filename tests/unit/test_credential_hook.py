"""The credential substitution hook on a Flow, without sockets: the upstream head carries the
value, the client's head and the record's snapshot keep the placeholder, refusals say why, an
unknown placeholder is looked up once more (concurrent misses share one check), counters."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

import services.proxy.credentials as credentials_mod
from bus import records
from greyproxy.credentials.placeholders import mint
from greyproxy.credentials.substitute import Live
from services.proxy import http1
from services.proxy.credentials import KEY_OK, KEY_UNUSABLE, LiveCredentials, Snapshot
from services.proxy.pipeline import Recorder, Txn
from services.proxy.hooks import CredentialSubstitution, Flow, HookChain, Refusal, resolve

PH = mint("gw-1")
VALUE = "sk-unit-9f8e7d6c5b4a"


def head_of(raw: bytes, origin: tuple[str, str, int] | None = ("https", "api.example.com", 443)) -> http1.RequestHead:
    got = http1.parse_request_head(raw, 65536, 100, origin)
    assert got is not None
    return got[0]


class Loader:
    """Stands in for the database: what the next load returns, and how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.map: dict[str, Live] = {}
        self.key = KEY_OK
        self.version = 1

    def __call__(self, _path: Path) -> Snapshot:
        self.calls += 1
        return Snapshot(self.version, dict(self.map), self.key, {}, 0, [])


@pytest.fixture(autouse=True)
def version_of(monkeypatch: pytest.MonkeyPatch) -> None:
    """The version check reads the loader's version instead of the database."""
    monkeypatch.setattr(credentials_mod, "_read_version", lambda: LOADERS[-1].version)


LOADERS: list[Loader] = []


def make(loader: Loader) -> LiveCredentials:
    LOADERS.append(loader)
    return LiveCredentials("/nonexistent", None, None, loader=loader)  # type: ignore[arg-type]


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_substitution_leaves_the_client_head_alone() -> None:
    loader = Loader()
    loader.map = {PH: Live(PH, VALUE, "KEY", "gw-1", None, ("api.example.com",), 4e9)}
    basic = base64.b64encode(f"x:{PH}".encode()).decode()
    raw = (
        f"GET /v1?k={PH} HTTP/1.1\r\nHost: api.example.com\r\nX-Key: {PH}\r\nAuthorization: Basic {basic}\r\n\r\n"
    ).encode()

    async def go() -> None:
        live = make(loader)
        await live.reload(force=True)
        head = head_of(raw)
        flow = Flow("agent", "https", "127.0.0.1", 443, head, server_name="api.example.com")
        assert await resolve(HookChain([CredentialSubstitution(live)]).run(flow)) is None
        wire = flow.render("1.1").decode()
        assert PH not in wire and f"X-Key: {VALUE}" in wire and f"/v1?k={VALUE} " in wire
        assert base64.b64encode(f"x:{VALUE}".encode()).decode() in wire
        assert PH in head.path and (("X-Key", PH) in head.headers)  # the record's snapshot
        assert flow.substituted == ["KEY"] and flow.session_id == "gw-1" and flow.scrubber is not None
        assert live.uses == {("gw-1", None): 1} and live.substituted == 1

    run(go())


def test_refusals() -> None:
    loader = Loader()
    loader.map = {PH: Live(PH, VALUE, "KEY", "gw-1", None, ("api.example.com",), 4e9)}

    async def go() -> None:
        live = make(loader)
        await live.reload(force=True)
        hook = CredentialSubstitution(live)
        # bound elsewhere: the TLS name decides, and the Host header must match too
        flow = Flow(
            "agent",
            "https",
            "127.0.0.3",
            443,
            head_of(f"GET / HTTP/1.1\r\nHost: api.example.com\r\nX: {PH}\r\n\r\n".encode()),
            server_name="evil.example.org",
        )
        r = await resolve(hook(flow))
        assert isinstance(r, Refusal) and r.reason == "credential_host_mismatch" and not flow.changed
        assert b"X-Greyproxy-Reason: credential_host_mismatch" in r.render()
        assert "KEY" in r.body and "api.example.com" in r.body and VALUE not in r.body
        assert flow.refused_labels == ("KEY",)
        # plain http:// with a bound credential to its host: fine; expired: unknown after one recheck
        ok = Flow(
            "agent",
            "http",
            "api.example.com",
            80,
            head_of(f"GET http://api.example.com/ HTTP/1.1\r\nX: {PH}\r\n\r\n".encode(), None),
        )
        assert await resolve(hook(ok)) is None
        loader.map = {PH: Live(PH, VALUE, "KEY", "gw-1", None, (), 1.0)}
        await live.reload(force=True)
        calls = loader.calls
        gone = Flow("agent", "https", "h", 443, head_of(f"GET / HTTP/1.1\r\nHost: h\r\nX: {PH}\r\n\r\n".encode()))
        r = await resolve(hook(gone))
        assert isinstance(r, Refusal) and r.reason == "unknown_placeholder" and PH[-32:] not in r.body
        assert loader.calls == calls  # same version: checked, not reloaded
        assert live.refused["unknown_placeholder"] == 1

    run(go())


def test_a_session_created_a_moment_ago_is_found_with_one_shared_check() -> None:
    loader = Loader()

    async def go() -> None:
        live = make(loader)
        await live.reload(force=True)
        hook = CredentialSubstitution(live)
        loader.map = {PH: Live(PH, VALUE, "KEY", "gw-1", None, (), 4e9)}  # written, proxy not told yet
        loader.version = 2

        flows = [
            Flow("agent", "https", "h", 443, head_of(f"GET / HTTP/1.1\r\nHost: h\r\nX: {PH}\r\n\r\n".encode()))
            for _ in range(5)
        ]
        calls = loader.calls
        out = await asyncio.gather(*(resolve(hook(f)) for f in flows))
        assert out == [None] * 5 and all(VALUE in f.render("1.1").decode() for f in flows)
        assert loader.calls == calls + 1

    run(go())


def test_key_unusable_refuses_every_placeholder() -> None:
    loader = Loader()
    loader.key = KEY_UNUSABLE

    async def go() -> None:
        live = make(loader)
        await live.reload(force=True)
        flow = Flow("agent", "https", "h", 443, head_of(f"GET / HTTP/1.1\r\nHost: h\r\nX: {PH}\r\n\r\n".encode()))
        r = await resolve(CredentialSubstitution(live)(flow))
        assert isinstance(r, Refusal) and r.reason == "credentials_unavailable"
        plain = Flow("agent", "https", "h", 443, head_of(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
        assert CredentialSubstitution(live)(plain) is None
        assert live.stats()["key"] == "unusable"

    run(go())


# -- the record: what was substituted is scrubbed from the stored response (SPEC §12.7) --


class Journal:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def append(self, kind: str, data: object, record_id: str | None = None) -> str:
        data = orjson.loads(orjson.dumps(data))
        if kind == records.TRANSACTION:  # shape 2 (an array) read back by name
            data = records.transaction_fields(data)
        self.records.append((kind, data))
        return str(len(self.records))


def _resp(raw: bytes) -> http1.ResponseHead:
    got = http1.parse_response_head(raw, 65536, "GET")
    assert got is not None
    return got[0]


async def _substituted_txn(rec: Recorder) -> tuple[Txn, Flow]:
    loader = Loader()
    loader.map = {PH: Live(PH, VALUE, "KEY", "gw-1", None, (), 4e9)}
    live = make(loader)
    head = head_of(
        f"GET /ws HTTP/1.1\r\nHost: h\r\nX-Key: {PH}\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".encode()
    )
    flow = Flow("agent", "https", "h", 443, head)
    await live.reload(force=True)
    assert await resolve(CredentialSubstitution(live)(flow)) is None
    t = rec.txn("agent", "https://h", "h", 443, head)
    t.credentials_from(flow)
    return t, flow


def test_echoed_values_are_scrubbed_from_headers_compressed_bodies_and_websocket_messages() -> None:
    async def main() -> list[tuple[str, dict]]:
        journal = Journal()
        rec = Recorder(journal)  # type: ignore[arg-type]
        t, _flow = await _substituted_txn(rec)
        body = gzip.compress(f'{{"echo": "{VALUE}", "q": "{quote(VALUE, safe="")}"}}'.encode())
        resp = _resp(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"X-Echo: " + VALUE.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        t.resp_sink(resp)(body)
        t.finish(resp)
        # A WebSocket upgrade recorded by another transaction with the same substitution.
        t2, _ = await _substituted_txn(rec)
        up = _resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        _to_server, to_client = t2.websocket_observers(up)
        payload = f"hello {VALUE}".encode()
        to_client(bytes([0x81, len(payload)]) + payload)  # one unmasked text frame from the server
        for _ in range(200):
            if (
                any(
                    k == "transaction" and "response_body" in r and r.get("method") != "GET" for k, r in journal.records
                )
                and len(journal.records) >= 2
            ):
                break
            await asyncio.sleep(0.01)
        return journal.records

    records = asyncio.run(main())
    text = json.dumps(records)
    assert VALUE not in text and quote(VALUE, safe="") not in text, text
    (http,) = [r for _k, r in records if r["method"] == "GET"]
    assert http["response_headers"]["X-Echo"] == ["[REDACTED:KEY]"]
    assert _stored_text(http, "response").count("[REDACTED:KEY]") == 2
    assert http["substituted_credentials"] == ["KEY"] and http["session_id"] == "gw-1"
    (ws,) = [r for _k, r in records if r["method"] == "WS_RESP"]
    assert _stored_text(ws, "response") == "hello [REDACTED:KEY]" and ws["substituted_credentials"] == ["KEY"]


def _stored_text(rec: dict, side: str) -> str | None:
    """A journal record's body as it will be read back (packed bodies travel as base64)."""
    import base64

    from greyproxy.bodies import read_body

    body = read_body(base64.b64decode(rec[f"{side}_body"]), rec[f"{side}_body_codec"], rec[f"{side}_body_charset"])
    return None if body is None else body.text
