"""Every journal record kind and its payload, listed once (as topics.py lists the bus topics).

The proxy writes these records (`JournalWriter.append(kind, data)`), the recorder applies them
(services/recorder/apply.py); docs/events.md ("The journal") documents each payload for outsiders.
A payload travels as JSON: the TypedDicts below say which fields each kind carries.
"""

from __future__ import annotations

import time
from typing import Any, Literal, NotRequired, TypedDict, cast

import orjson

_time = time.time  # (looked up once: compiled, a module attribute costs a lookup on every use)


def ms3(ms: float) -> float:
    """A non-negative duration in milliseconds to three decimals, as `round(ms, 3)` gives it but
    without its decimal conversion (a microsecond a request on the proxy's hot path): the nearest
    whole number of microseconds, divided back (a correctly rounded division, so the nearest double
    to k/1000, which is what round() returns too; they differ only on exact ties)."""
    k = int(ms * 1000.0 + 0.5)  # (compiled: a C cast to a long long, no int object; records.pxd)
    return k / 1000.0


LOG = "log"  # every connection decision (and DNS queries when logDnsQueries is on)
PENDING = "pending"  # a destination no rule covers: a sighting for the pending queue
RULE_HIT = "rule_hit"  # rule hit counts, flushed periodically
DNS = "dns"  # an A/AAAA answer through the DNS proxy: ip → hostname
TRANSACTION = "transaction"  # one HTTP request/response (or WebSocket message), headers redacted
CREDENTIAL_USE = "credential_use"  # requests a session / global credential was substituted in (SPEC §12.7)
IDENTITY_USED = "identity_used"  # last use of claimed identities (SPEC §16), flushed periodically
# a raw-IP sighting made with no name known, named since: withdrawn if a rule decides it by the name
PENDING_NAMED = "pending_named"

KINDS = (LOG, PENDING, RULE_HIT, DNS, TRANSACTION, CREDENTIAL_USE, IDENTITY_USED, PENDING_NAMED)

ALLOWED = "allowed"
BLOCKED = "blocked"
Result = Literal["allowed", "blocked"]


class LogRecord(TypedDict):
    """A `log` record: one row of `logs` (SPEC §5) without its id; `rule_summary` only rides along
    for the `log.new` event."""

    timestamp: float
    container_name: str
    container_id: str
    destination_host: str
    destination_port: int
    resolved_hostname: str | None
    method: str
    result: str
    rule_id: int | None
    rule_summary: str | None
    response_time_ms: float | None
    reason: str | None
    mitm_skip_reason: str | None


class PendingRecord(TypedDict):
    """A `pending` record: a sighting of a destination no rule covers; `waiting` held clients."""

    container_name: str
    destination_host: str
    destination_port: int
    resolved_hostname: str | None
    ts: float
    waiting: int
    container_id: NotRequired[str]


class PendingNamedRecord(TypedDict):
    """A `pending_named` record: a `pending` sighting of a raw IP was made with no name known for it,
    and the proxy has learned the name since (its connections still held, or gone within a few
    minutes). `rule_id`: the rule that decides the key by that name; the sighting is withdrawn, as a
    rule covering it from the start would have made none (SPEC §2.3, §6). Null: no rule decides it;
    the entry gets the name (`resolved_hostname`) for the person who will."""

    container_name: str
    destination_host: str
    destination_port: int
    resolved_hostname: str
    rule_id: int | None
    ts: float
    waiting: NotRequired[int]  # the connections this proxy still holds for the key (for the event)


class RuleHitRecord(TypedDict):
    """A `rule_hit` record: `count` decisions by the rule since the last flush, the last at `last_used_at`."""

    rule_id: int
    count: int
    last_used_at: float


class DnsRecord(TypedDict):
    """A `dns` record: `ip` was an answer for `hostname` at `ts`."""

    ip: str
    hostname: str
    ts: float


class CredentialUseRecord(TypedDict):
    """A `credential_use` record: `count` requests substituted with a credential of session
    `session_id`, or with the global credential `credential_id` (the other is null), by `ts`."""

    session_id: str | None
    credential_id: str | None
    count: int
    ts: float


class IdentityUsedRecord(TypedDict):
    """An `identity_used` record: the claimed identity `name` passed its check at `last_used_at`."""

    name: str
    last_used_at: float


# A `transaction` record: the columns of http_transactions but `id` (greyproxy.store.transactions.FIELDS),
# headers already redacted, bodies decoded, capped and packed (greyproxy.capture, greyproxy.bodies: base64 of
# the stored bytes with `<side>_body_codec` and `<side>_body_charset`; a text body without a codec is stored as text).
# Shape 2 (what the proxy writes): an array of the values in TRANSACTION_FIELDS order, the JSON columns
# (TRANSACTION_JSON) as JSON text, so the recorder stores them without decoding and encoding them again;
# a shorter array leaves the fields after it null. Shape 1 (proxies before shape 2, still accepted): an
# object with those fields as keys, the JSON columns as JSON values.
TransactionRecord = dict[str, Any]
TransactionValues = list[Any]

TRANSACTION_FIELDS = (  # shape 2's order: never reorder, only append
    "timestamp",
    "container_name",
    "destination_host",
    "destination_port",
    "method",
    "url",
    "request_headers",
    "request_body",
    "request_body_size",
    "request_content_type",
    "status_code",
    "response_headers",
    "response_body",
    "response_body_size",
    "response_content_type",
    "duration_ms",
    "rule_id",
    "result",
    "conversation_id",
    "substituted_credentials",
    "session_id",
    "request_host",
    "host_mismatch",
    "error",
    "block_reason",
    "refused_credentials",
    "request_body_codec",
    "request_body_charset",
    "response_body_codec",
    "response_body_charset",
    # 1 when the stored copy is not the whole body (cut at capture.maxBodyBytes on the wire, or its
    # decoding stopped there), 0 when it is, null without a stored body (and from older proxies)
    "request_body_truncated",
    "response_body_truncated",
)
TRANSACTION_JSON = ("request_headers", "response_headers", "substituted_credentials", "refused_credentials")
_JSON_DEFAULTS = {"request_headers": "{}", "response_headers": "{}"}
_JSON_AT = tuple((TRANSACTION_FIELDS.index(c), _JSON_DEFAULTS.get(c, "[]")) for c in TRANSACTION_JSON)


def transaction_fields(values: TransactionValues) -> TransactionRecord:
    """A shape-2 record read back as shape 1 (names, JSON columns decoded): for readers and tests."""
    rec = dict(zip(TRANSACTION_FIELDS, values))
    rec.update({c: None for c in TRANSACTION_FIELDS[len(values) :]})
    for col in TRANSACTION_JSON:
        if isinstance(rec[col], str):
            rec[col] = orjson.loads(rec[col])
    return rec


def json_fields_as_text(values: TransactionValues) -> TransactionValues:
    """Shape-2 values with the JSON fields still Python values → with them as JSON text (in place)."""
    for i, default in _JSON_AT:
        value = values[i]
        if type(value) is not str:
            values[i] = orjson.dumps(value).decode() if value else default
    return values


def transaction_values(rec: TransactionRecord) -> TransactionValues:
    """A transaction record (shape 1, as the proxy builds it) as it travels (shape 2)."""
    return json_fields_as_text(list(map(rec.get, TRANSACTION_FIELDS)))


def log_record(
    container: str,
    host: str,
    port: int,
    method: str,
    result: str,
    *,
    resolved_hostname: str | None = None,
    rule_id: int | None = None,
    rule_summary: str | None = None,
    response_time_ms: float | None = None,
    reason: str | None = None,
    mitm_skip_reason: str | None = None,
    container_id: str = "",
    timestamp: float | None = None,
) -> LogRecord:
    """A `log` record as an object (shape 1: what proxies before shape 2 sent; for readers and
    tests): `log_values`' record, the same checks and values, by field name."""
    return log_fields(
        log_values(
            container,
            host,
            port,
            method,
            result,
            resolved_hostname,
            rule_id,
            rule_summary,
            response_time_ms,
            reason,
            mitm_skip_reason,
            container_id,
            timestamp,
        )
    )


# A `log` record travels in one of two shapes too. Shape 2 (what the proxy writes): an array of the
# values in LOG_FIELDS order (the columns of `logs` but `id`, then `rule_summary` for `log.new`); a
# shorter array leaves the fields after it null. Shape 1 (proxies before shape 2, still accepted): an
# object with those fields as keys (`log_record`).
LogValues = list[Any]
LOG_FIELDS = (  # shape 2's order: never reorder, only append
    "timestamp",
    "container_name",
    "container_id",
    "destination_host",
    "destination_port",
    "resolved_hostname",
    "method",
    "result",
    "rule_id",
    "response_time_ms",
    "reason",
    "mitm_skip_reason",
    "rule_summary",
)


def log_values(
    container: str,
    host: str,
    port: int,
    method: str,
    result: str,
    resolved_hostname: str | None = None,
    rule_id: int | None = None,
    rule_summary: str | None = None,
    response_time_ms: float | None = None,
    reason: str | None = None,
    mitm_skip_reason: str | None = None,
    container_id: str = "",
    timestamp: float | None = None,
) -> LogValues:
    """The one way to build a `log` record (the gate's verdicts, the DNS proxy's queries), as it
    travels (shape 2): its values in LOG_FIELDS order."""
    if result not in (ALLOWED, BLOCKED):
        raise ValueError(f"log result must be {ALLOWED!r} or {BLOCKED!r}, not {result!r}")
    return [
        _time() if timestamp is None else timestamp,
        container,
        container_id,
        host,
        port,
        resolved_hostname,
        method,
        result,
        rule_id,
        None if response_time_ms is None else ms3(response_time_ms),
        reason,
        mitm_skip_reason,
        rule_summary,
    ]


def log_fields(data: LogValues | LogRecord) -> LogRecord:
    """A `log` record of either shape as shape 1 (an object): for readers and tests."""
    if isinstance(data, dict):
        return data
    rec = dict(zip(LOG_FIELDS, data))
    rec.update({c: None for c in LOG_FIELDS[len(data) :]})
    return cast(LogRecord, rec)


def pending_record(
    container: str, host: str, port: int, resolved_hostname: str | None, waiting: int, ts: float | None = None
) -> PendingRecord:
    return {
        "container_name": container,
        "destination_host": host,
        "destination_port": port,
        "resolved_hostname": resolved_hostname,
        "ts": time.time() if ts is None else ts,
        "waiting": waiting,
    }


def pending_named_record(
    container: str, host: str, port: int, name: str, rule_id: int | None, waiting: int = 0
) -> PendingNamedRecord:
    return {
        "container_name": container,
        "destination_host": host,
        "destination_port": port,
        "resolved_hostname": name,
        "rule_id": rule_id,
        "ts": time.time(),
        "waiting": waiting,
    }


def rule_hit_record(rule_id: int, count: float, last_used_at: float) -> RuleHitRecord:
    return {"rule_id": rule_id, "count": int(count), "last_used_at": last_used_at}


def dns_record(ip: str, hostname: str, ts: float) -> DnsRecord:
    return {"ip": ip, "hostname": hostname, "ts": ts}


def credential_use_record(
    session_id: str | None, credential_id: str | None, count: int, ts: float
) -> CredentialUseRecord:
    return {"session_id": session_id, "credential_id": credential_id, "count": int(count), "ts": ts}


def identity_used_record(name: str, last_used_at: float) -> IdentityUsedRecord:
    return {"name": name, "last_used_at": last_used_at}
