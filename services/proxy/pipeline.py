"""What every proxied HTTP request goes through, whichever way it came in (SPEC §7): the
transaction record built while the request streams, and the recording relay for WebSocket
upgrades (and other byte streams the proxy must watch). The request hooks are in `hooks.py`,
the request/response exchange itself in `exchange.py`.

Both the HTTP forward proxy (`http_proxy.py`, absolute-URI `http://` requests) and interception
(`mitm.py`, requests inside a CONNECT / SOCKS5 tunnel) use these, so a transaction record has one
shape and one code path. Hot-path rule: per body chunk only a capped append (or a size count for
bodies that are never stored); decoding and serialising of bodies happens off the event loop.

The record keeps what the client sent: its URL and (redacted) headers are taken when the request
is read (`Recorder.txn`), before any request hook runs, so nothing a hook puts into the upstream
request can reach the record, the journal, `/ws` or a log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from bus.journal import JournalWriter
from bus.records import TRANSACTION, TRANSACTION_FIELDS, json_fields_as_text, ms3, transaction_values
from greyproxy.bodies import pack, to_record
from greyproxy.capture import DEFAULT_MAX_BODY, BodyCapture, is_text_like, stored_body
from greyproxy.credentials.substitute import Scrubber
from greyproxy.policy.patterns import normalise_host
from greyproxy.redaction import Redactor, extra_patterns

from . import http1
from .conn import ConnClosed
from .hooks import Flow
from .wsframes import OP_TEXT, FrameParser, Message, MessageAssembler, WsProtocolError, deflate_negotiated

__all__ = ["INLINE_DECODE_MAX", "Recorder", "Stream", "Txn", "base_record", "origin_of", "relay"]

log = logging.getLogger("greyproxy.capture")

# Bodies up to this size with no content-coding are turned into text on the event loop (a UTF-8
# decode of a few KiB costs less than the hop to a worker thread); anything else goes to a worker.
INLINE_DECODE_MAX = 16 * 1024

# Pure functions of values that repeat (hosts, content types): cached, bounded.
_TEXT_LIKE: dict[str | None, bool] = {}  # Content-Type value -> is_text_like(it), for _text_like
_HOSTS: dict[str, str] = {}  # host as contacted -> as recorded (normalise_host), for _dest_host


def _remembered(known: dict[Any, Any], key: Any, compute: Callable[[Any], Any], bound: int) -> Any:
    """`compute(key)`, kept in `known` (values from clients and origins: at most `bound` kept, then
    started over). A dict look-up in C when compiled, where an lru_cache costs a Python call and
    its key's hashing on every use; these run for every record."""
    got = known.get(key)
    if got is None:
        got = compute(key)
        if len(known) >= bound:
            known.clear()
        known[key] = got
    return got


def _text_like(content_type: str | None) -> bool:
    """`is_text_like(content_type)`, remembered: whether a body of this type is stored."""
    return _remembered(_TEXT_LIKE, content_type, is_text_like, 1024)


def _dest_host(host: str) -> str:
    """`normalise_host(host)`, remembered: the destination host as records name it."""
    return _remembered(_HOSTS, host, normalise_host, 4096)


_wall, _clock = time.time, time.perf_counter  # (module globals: no attribute lookup on `time` per request)

Body = tuple[bytes, "str | None", "str | None"]  # (captured bytes, content type, content encoding)


class Stream(Protocol):
    """What the pipeline needs from a connection: a plain `Conn` or a `TlsStream`."""

    buf: bytearray
    eof: bool

    @property
    def closed(self) -> bool: ...
    async def read_more(self, timeout: float | None = None) -> bool: ...
    def take(self, n: int | None = None) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self, timeout: float | None = None) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def origin_of(scheme: str, host: str, port: int) -> str:
    """'scheme://authority' of a contacted host, the default port left out (the start of a record's url)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if _DEFAULT_PORTS.get(scheme) == port else f"{scheme}://{shown}:{port}"


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class Recorder:
    """Builds transaction records and hands them to the journal (`transaction`), headers redacted.

    One per proxy process, shared by the forward proxy and interception. `redactedHeaders` is
    followed through `settings_changed`.
    """

    __slots__ = (  # (pipeline.pxd: an extension type when compiled)
        "journal",
        "max_body",
        "redactor",
        "counts",
        "transactions",
    )

    def __init__(self, journal: JournalWriter, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.journal = journal
        self.max_body = max_body
        self.redactor = Redactor()
        self.counts: Counter[str] = Counter()
        self.transactions = 0  # records made (a plain count: the Counter costs ~1.7k instructions a request)

    def settings_changed(self, values: dict[str, Any]) -> None:
        self.redactor = Redactor(extra_patterns(values.get("redactedHeaders")))

    def stats(self) -> dict[str, int]:
        out = dict(self.counts)
        if self.transactions:
            out["transactions"] = self.transactions
        return out

    def head_facts(self, resp: http1.ResponseHead) -> HeadFacts:
        """What a record takes from a response head: (its fields as recorded, redacted, as JSON text;
        its Content-Type; whether a body of that type is stored; its Content-Encoding, for a stored
        type), read in one pass over its fields (`Redactor.recorded`)."""
        lines = resp.field_lines()  # (a plain head's fields are not split into pairs just for this)
        fields, ct, ce = self.redactor.recorded(resp.headers if lines is None else lines)
        stored = _text_like(ct)
        return (fields, ct, stored, ce if stored else None)

    def txn(
        self,
        container: str,
        origin: str,
        host: str,
        port: int,
        head: http1.RequestHead,
        rule_id: int | None = None,
        host_mismatch: bool = False,
    ) -> Txn:
        """The record of a request just read: `origin` ('scheme://authority') and `host`/`port` name
        what is contacted; `head` is the client's request, snapshotted now (see the module doc)."""
        t = Txn.__new__(Txn)  # (made only here; compiled, `_start` is a C call, not __init__'s Python arguments)
        t._start(self, container, origin, host, port, head, rule_id, host_mismatch)
        return t

    def submit(self, values: list[Any], req: Body | None, resp: Body | None, scrub: Scrubber | None = None) -> None:
        """Journal the record (shape 2: `values` in TRANSACTION_FIELDS order, the JSON fields as JSON
        text or still Python values); bodies are packed (greyproxy.bodies) inline when small and plain, else in a
        worker thread (which also serialises the record, so a 2 MiB body is never dumped on the event loop).
        `scrub`: an exchange with substituted credentials has their values scrubbed from the stored
        response body (after decoding, so a compressed echo is caught too)."""
        self.transactions += 1
        values[_URL] = self.redactor.url(values[_URL])  # secrets in the query (?access_token=...)
        limit = self.max_body
        if not (
            type(values[_REQ_HEADERS]) is str
            and type(values[_RESP_HEADERS]) is str
            and type(values[_SUBSTITUTED]) is str
            and type(values[_REFUSED]) is str
        ):
            json_fields_as_text(values)  # (Txn.finish gives them as text already)
        if req is None and resp is None:
            self.journal.append(TRANSACTION, values)
            return
        if (req is None or (len(req[0]) <= INLINE_DECODE_MAX and not req[2])) and (
            resp is None or (len(resp[0]) <= INLINE_DECODE_MAX and not resp[2])
        ):
            _put_bodies(values, req, resp, limit, scrub)
            self.journal.append(TRANSACTION, values)
            return
        self._submit_later(values, req, resp, limit, scrub)

    def _submit_later(
        self, values: list[Any], req: Body | None, resp: Body | None, limit: int, scrub: Scrubber | None
    ) -> None:
        """`submit`'s bodies that are decoded and serialised in a worker thread, the record journaled
        when that is done (its own method: `submit` makes no closures)."""

        def decode() -> orjson.Fragment:
            _put_bodies(values, req, resp, limit, scrub)
            return orjson.Fragment(orjson.dumps(values))

        fut = asyncio.get_running_loop().run_in_executor(None, decode)

        def done(f: asyncio.Future) -> None:
            try:
                self.journal.append(TRANSACTION, f.result())
            except Exception:
                log.exception("could not build a transaction record")

        fut.add_done_callback(done)

    # -- WebSocket --
    def websocket(self, t: Txn, resp: http1.ResponseHead) -> tuple[Callable[[bytes], None], Callable[[bytes], None]]:
        """Observers for `relay` (client→server, server→client) after the upgrade recorded by `t`: each
        data message is recorded as a WS_REQ / WS_RESP transaction. Broken framing stops the recording
        of that direction only."""
        deflate = deflate_negotiated(resp.header("sec-websocket-extensions"))
        url = self.redactor.url("ws" + t.url[4:])  # http:// → ws://, https:// → wss://
        container, dest, port, rule_id = t.container, t.host, t.port, t.rule_id
        extra = {
            "request_host": t.request_host,
            "host_mismatch": t.host_mismatch,
            "session_id": t.session_id,
            "substituted_credentials": t.substituted,
        }
        scrub = t.scrubber

        def observer(method: str) -> Callable[[bytes], None]:
            parser, asm = FrameParser(self.max_body), MessageAssembler(deflate, self.max_body)
            broken = False

            def see(data: bytes) -> None:
                nonlocal broken
                if broken:
                    return
                try:
                    for frame in parser.feed(data):
                        msg = asm.feed(frame)
                        if msg is not None:
                            self._record_ws(container, dest, port, method, url, rule_id, msg, extra, scrub)
                except WsProtocolError as exc:
                    broken = True  # stop recording this direction; relaying goes on
                    log.info("websocket %s: not recording %s any more: %s", url, method, exc)

            return see

        return observer("WS_REQ"), observer("WS_RESP")

    def _record_ws(
        self,
        container: str,
        host: str,
        port: int,
        method: str,
        url: str,
        rule_id: int | None,
        msg: Message,
        extra: dict[str, Any],
        scrub: Scrubber | None = None,
    ) -> None:
        size = len(msg.payload) if msg.compressed and not msg.truncated else msg.size  # the message's own size
        side = "request" if method == "WS_REQ" else "response"
        rec = base_record(container, host, port, method, url, rule_id)
        rec.update(extra)
        rec[f"{side}_body_size"] = size
        if msg.opcode == OP_TEXT and msg.payload:
            rec[f"{side}_body_truncated"] = 1 if msg.truncated else 0
            payload = msg.payload if scrub is None else scrub.message(msg.payload)
            to_record(rec, side, pack(payload, _WS_TEXT))
        self.counts["ws_messages"] += 1
        self.journal.append(TRANSACTION, transaction_values(rec))


_WS_TEXT = "text/plain; charset=utf-8"  # a WebSocket text message is UTF-8 (RFC 6455 §5.6)


_AT = {name: i for i, name in enumerate(TRANSACTION_FIELDS)}  # a field's place in a shape-2 record
_URL = _AT["url"]
_REQ_HEADERS, _RESP_HEADERS = _AT["request_headers"], _AT["response_headers"]
_SUBSTITUTED, _REFUSED = _AT["substituted_credentials"], _AT["refused_credentials"]

# (fields as recorded: JSON text, Content-Type, body stored?, Content-Encoding): Recorder.head_facts
HeadFacts = tuple[str, "str | None", bool, "str | None"]


_dumps = orjson.dumps  # (a module global: no attribute lookup on `orjson` per call)


def _fields_text(fields: dict[str, list[str]]) -> str:
    """Recorded header fields ({name: [values]}) as the JSON text a record carries (as json_fields_as_text)."""
    if not fields:
        return "{}"
    text = _dumps(fields)
    return text.decode()


def _labels_text(labels: list[str] | tuple[str, ...]) -> str:
    """Credential labels as the JSON text a record carries (as json_fields_as_text)."""
    if not labels:
        return "[]"
    text = _dumps(list(labels))
    return text.decode()


def _put_bodies(
    values: list[Any], req: Body | None, resp: Body | None, limit: int, scrub: Scrubber | None = None
) -> None:
    for side, body in (("request", req), ("response", resp)):
        if body is not None:
            packed = stored_body(
                *body, limit=limit, scrub=scrub.data if scrub is not None and side == "response" else None
            )
            if packed is not None:
                fields: dict[str, Any] = {}
                to_record(fields, side, packed)
                for name, value in fields.items():
                    values[_AT[name]] = value  # a field to_record sets must be one of TRANSACTION_FIELDS


class Txn:
    """The record of one request being built while it streams; `finish` sends it (once).

    Taken when the request is read: the URL (of the host contacted), the redacted request
    headers, the request's own Host (`request_host`) and whether it names another host than the
    one contacted (`host_mismatch`). Nothing done to the request afterwards (request hooks build
    the upstream head from a copy) changes them. Made by `Recorder.txn`."""

    __slots__ = (
        "recorder",
        "container",
        "host",
        "port",
        "method",
        "url",
        "request_headers",
        "request_host",
        "host_mismatch",
        "req_ct",
        "req_ce",
        "t0",
        "p0",
        "req",
        "resp",
        "resp_head",
        "resp_facts",
        "rule_id",
        "substituted",
        "done",
        "session_id",
        "scrubber",
        "refused",
    )

    def _start(
        self,
        recorder: Recorder,
        container: str,
        origin: str,
        host: str,
        port: int,
        head: http1.RequestHead,
        rule_id: int | None,
        host_mismatch: bool,
    ) -> None:
        """__init__'s work (Recorder.txn calls it on a Txn made without __init__)."""
        self.recorder, self.container = recorder, container
        self.host, self.port = _dest_host(host), port
        self.method = head.method
        self.url = origin + head.path
        # (the fields as recorded, JSON text; the first Content-Type and Content-Encoding)
        self.request_headers, ct, ce = recorder.redactor.recorded(head.headers)
        self.request_host = head.host or None
        self.host_mismatch = host_mismatch
        self.req_ct = ct
        self.req_ce = ce if ct is not None else None
        self.t0, self.p0 = _wall(), _clock()
        self.req: BodyCapture | None = None
        self.resp: BodyCapture | None = None
        self.resp_head: http1.ResponseHead | None = None  # the head resp_sink was given, and
        self.resp_facts: HeadFacts | None = None  # what the record takes from it (Recorder.head_facts)
        self.rule_id = rule_id
        self.substituted: list[str] | tuple[str, ...] = ()  # credential labels substituted (SPEC §12.7)
        self.session_id: str | None = None
        self.scrubber: Scrubber | None = None  # what was substituted, scrubbed from the recorded response
        self.refused: tuple[str, ...] = ()  # credential labels a refusal involved
        self.done = False

    def _capture(self, content_type: str | None) -> BodyCapture:
        # A body that will not be stored (binary) is only counted: no copy at all.
        return BodyCapture(self.recorder.max_body if _text_like(content_type) else 0)

    def req_sink(self) -> Callable[[bytes | memoryview], None]:
        """The `BodyReader` sink for the request body."""
        self.req = cap = self._capture(self.req_ct)
        return cap.add

    def resp_sink(self, resp: http1.ResponseHead) -> Callable[[bytes | memoryview], None]:
        """The `BodyReader` sink for the (final) response's body."""
        recorder = self.recorder
        facts = recorder.head_facts(resp)
        self.resp_head, self.resp_facts = resp, facts
        # A body that will not be stored (binary) is only counted: no copy at all.
        self.resp = cap = BodyCapture(recorder.max_body if facts[2] else 0)
        return cap.add

    def websocket_observers(self, resp: http1.ResponseHead) -> tuple[Callable[[bytes], None], Callable[[bytes], None]]:
        """`relay` observers recording each WebSocket message after this request's upgrade."""
        return self.recorder.websocket(self, resp)

    def credentials_from(self, flow: Any) -> None:
        """What the credential hook did to the request (`hooks.Flow`): labels, session, scrubber."""
        if type(flow) is Flow:  # (compiled: read as a C struct)
            f: Flow = flow
            self.substituted, self.session_id, self.scrubber = f.substituted, f.session_id, f.scrubber
            self.refused = f.refused_labels
            return
        self.substituted, self.session_id, self.scrubber = flow.substituted, flow.session_id, flow.scrubber
        self.refused = flow.refused_labels

    def finish(
        self,
        resp: http1.ResponseHead | None = None,
        status: int | None = None,
        result: str = "allowed",
        error: str | None = None,
        block_reason: str | None = None,
    ) -> None:
        """Send the record: `resp` is the final response relayed (if any), else `status` is what the
        client was answered; `error` says why the exchange failed or was cut off; `block_reason` why
        a request was refused (`rule` or a credential reason, SPEC §12.5)."""
        if self.done:
            return
        self.done = True
        req, rcap = self.req, self.resp
        req_ct = self.req_ct
        scrub = self.scrubber
        facts: HeadFacts | None = None
        if resp is None:
            resp_ct, resp_headers = None, "{}"
        else:  # (taken once: by resp_sink for this very head, when it was called)
            facts = self.resp_facts if self.resp_head is resp else None
            if facts is None:
                facts = self.recorder.head_facts(resp)
            resp_ct, resp_headers = facts[1], facts[0]
            if scrub is not None and resp_headers != "{}":
                redactor = self.recorder.redactor
                lines = resp.field_lines()
                fields = redactor.headers(resp.headers) if lines is None else redactor.header_lines(lines)
                resp_headers = _fields_text(scrub.headers(fields))
        # The record in TRANSACTION_FIELDS order (bus/records.py: shape 2).
        values = [
            self.t0,
            self.container,
            self.host,
            self.port,
            self.method,
            self.url,
            self.request_headers,
            None,
            req.size if req is not None else 0,
            req_ct,
            resp.status if resp is not None else status,
            resp_headers,
            None,
            rcap.size if rcap is not None else 0,
            resp_ct,
            ms3((_clock() - self.p0) * 1000),
            self.rule_id,
            result,
            None,  # conversation_id
            _labels_text(self.substituted) if result == "allowed" else "[]",
            self.session_id,
            self.request_host,
            self.host_mismatch,
            error,
            block_reason,
            _labels_text(self.refused),
            None,
            None,
            None,
            None,
            # the stored copy cut on the wire (its decoding cut too: greyproxy.bodies.to_record sets 1)
            (1 if req.size > len(req.data) else 0) if req is not None and req.data else None,
            (1 if rcap.size > len(rcap.data) else 0) if rcap is not None and rcap.data else None,
        ]
        req_body = (bytes(req.data), req_ct, self.req_ce) if req is not None and req.data else None
        resp_body = None
        if resp is not None and rcap is not None and rcap.data:
            assert facts is not None
            resp_body = (bytes(rcap.data), resp_ct, facts[3] if facts[2] else resp.header("content-encoding"))
        self.recorder.submit(values, req_body, resp_body, scrub)


def base_record(
    container: str, host: str, port: int, method: str, url: str, rule_id: int | None, ts: float | None = None
) -> dict[str, Any]:
    """A transaction record with every column, nothing exchanged yet."""
    return {
        "timestamp": ts if ts is not None else time.time(),
        "container_name": container,
        "destination_host": _dest_host(host),
        "destination_port": port,
        "method": method,
        "url": url,
        "request_headers": {},
        "request_body": None,
        "request_body_size": 0,
        "request_content_type": None,
        "status_code": None,
        "response_headers": {},
        "response_body": None,
        "response_body_size": 0,
        "response_content_type": None,
        "duration_ms": None,
        "rule_id": rule_id,
        "result": "allowed",
        "conversation_id": None,
        "substituted_credentials": [],
        "session_id": None,
        "request_host": None,
        "host_mismatch": False,
        "error": None,
        "block_reason": None,
        "refused_credentials": [],
    }


async def _pump(
    src: Stream, dst: Stream, see: Callable[[bytes], None] | None, last: list[float], loop: asyncio.AbstractEventLoop
) -> None:
    """One direction of `relay` (`last[0]`: when a byte last passed, either way). Not an inner function
    of `relay`: compiled, a coroutine's locals live in a scope its inner functions refer back to, a
    reference cycle that kept both connections until the collector ran."""
    while True:
        if src.buf:
            data = src.take()
            last[0] = loop.time()
            dst.write(data)
            if see is not None:
                see(data)
            await dst.drain()
        if not await src.read_more() and not src.buf:
            return


async def relay(
    a: Stream,
    b: Stream,
    idle: float,
    see_ab: Callable[[bytes], None] | None = None,
    see_ba: Callable[[bytes], None] | None = None,
) -> None:
    """Copy both ways until either side ends, or until nothing has passed in EITHER direction for
    `idle` seconds (a long one-way stream lives on); then both are closed. `see_*` get each chunk."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]  # when a byte last passed, either way
    tasks = [
        asyncio.ensure_future(_pump(a, b, see_ab, last, loop)),
        asyncio.ensure_future(_pump(b, a, see_ba, last, loop)),
    ]
    try:
        while True:
            remaining = last[0] + idle - loop.time()
            if remaining <= 0:
                log.info("closing a relay idle both ways for %.0f s", loop.time() - last[0])
                return
            done, _ = await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if done:
                return
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, ConnClosed, ConnectionError):
                pass
        a.close()
        b.close()
