"""The record contract: journal kinds and payloads (bus/records.py) and each table's column list
(greyproxy/store/<table>.py) agree with the schema the migrations make and with the recorder."""

from __future__ import annotations

import sqlite3
import typing
from pathlib import Path

import pytest

from bus import records
from greyproxy.store import dns_cache, logs, open_database, pending, rules, settings, transactions
from services.recorder import transactions as recorder_transactions  # noqa: F401 - its kind's applier
from services.recorder.apply import APPLIERS, apply_records


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    db = open_database(tmp_path / "db")
    db.close()
    return tmp_path / "db"


@pytest.mark.parametrize(
    ("table", "module"),
    [
        ("logs", logs),
        ("pending", pending),
        ("rules", rules),
        ("dns_cache", dns_cache),
        ("http_transactions", transactions),
        ("settings", settings),
    ],
)
def test_column_lists_are_the_schema(db_path: Path, table: str, module: typing.Any) -> None:
    conn = sqlite3.connect(db_path)
    try:
        schema = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
    finally:
        conn.close()
    assert module.COLUMNS == schema


def test_every_kind_has_an_applier_and_a_documented_row() -> None:
    assert set(APPLIERS) == set(records.KINDS)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "events.md").read_text()
    for kind in records.KINDS:
        assert f"| `{kind}` |" in doc, kind


def test_payload_types_name_the_table_fields() -> None:
    log_keys = set(typing.get_type_hints(records.LogRecord))
    assert log_keys == {*logs.FIELDS, "rule_summary"}  # rule_summary rides along for log.new only
    assert set(typing.get_type_hints(records.DnsRecord)) == {"ip", "hostname", "ts"}


def test_log_record_builder() -> None:
    rec = records.log_record(
        "agent",
        "example.com",
        443,
        "CONNECT",
        records.BLOCKED,
        rule_id=7,
        rule_summary="* → example.com:*",
        response_time_ms=1.23456,
        reason="rule",
        timestamp=100.0,
    )
    assert set(rec) == set(typing.get_type_hints(records.LogRecord))
    assert rec["response_time_ms"] == 1.235 and rec["container_id"] == "" and rec["resolved_hostname"] is None
    assert rec["timestamp"] == 100.0
    with pytest.raises(ValueError, match="log result"):
        records.log_record("agent", "example.com", 443, "CONNECT", "maybe")


def test_built_records_apply(db_path: Path) -> None:
    """What the builders make is what the recorder stores (and announces)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        batch = [
            (
                "r1",
                records.LOG,
                records.log_record(
                    "agent",
                    "example.com",
                    443,
                    "CONNECT",
                    records.ALLOWED,
                    response_time_ms=2.0,
                    reason="rule",
                    rule_summary="s",
                ),
            ),
            ("r2", records.PENDING, records.pending_record("agent", "10.0.0.1", 443, "example.com", 2, ts=5.0)),
            ("r3", records.DNS, records.dns_record("10.0.0.1", "example.com", 6.0)),
            ("r4", records.RULE_HIT, records.rule_hit_record(1, 3.0, 7.0)),
        ]
        events = apply_records(conn, batch)
        row = conn.execute(
            "SELECT container_name, destination_host, result, reason, response_time_ms FROM logs"
            " ORDER BY id DESC LIMIT 1"
        ).fetchone()
        assert row == ("agent", "example.com", "allowed", "rule", 2.0)
        assert conn.execute("SELECT resolved_hostname, attempt_count FROM pending").fetchone() == ("example.com", 1)
        assert conn.execute("SELECT hostname FROM dns_cache WHERE ip = '10.0.0.1'").fetchone() == ("example.com",)
        assert conn.execute("SELECT hit_count FROM rules WHERE id = 1").fetchone() == (3,)
        topics = [t for t, _ in events]
        assert "log.new" in topics and "pending_request.created" in topics
        log_new = next(d for t, d in events if t == "log.new")
        assert log_new["rule_summary"] == "s"
    finally:
        conn.close()


def test_a_withdrawn_sighting_leaves_the_queue_as_the_rule_decided_it(db_path: Path) -> None:
    """SPEC §2.3, §6 (an outside run with proxy workers and the bus killed): a raw IP sighted before
    its name reached the worker stays in the queue after the name's rule released its connections.
    The proxy's `pending_named` record withdraws it, announced as that rule's decision; another
    container's entry and a decided one (nothing left to delete) are untouched."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO rules (id, container_pattern, destination_pattern, port_pattern, rule_type, action,"
            " created_at, created_by, source, hit_count) VALUES"
            " (50, '*', '**.hw.test', '*', 'glob', 'allow', 1, 'api', 'global', 0),"
            " (51, '*', 'bad.example', '*', 'glob', 'deny', 1, 'api', 'global', 0)"
        )
        apply_records(
            conn,
            [
                (f"p{i}", records.PENDING, records.pending_record(c, ip, 80, None, 1, ts=5.0))
                for i, (c, ip) in enumerate([("agent", "10.0.0.7"), ("other", "10.0.0.7"), ("agent", "10.0.0.8")])
            ],
        )
        ids = dict(conn.execute("SELECT container_name || ' ' || destination_host, id FROM pending").fetchall())
        events = apply_records(
            conn,
            [
                ("n1", records.PENDING_NAMED, records.pending_named_record("agent", "10.0.0.7", 80, "a.hw.test", 50)),
                ("n2", records.PENDING_NAMED, records.pending_named_record("agent", "10.0.0.8", 80, "bad.example", 51)),
                ("n3", records.PENDING_NAMED, records.pending_named_record("agent", "10.0.0.7", 80, "a.hw.test", 50)),
                ("n4", records.PENDING_NAMED, records.pending_named_record("agent", "10.0.0.9", 80, "x.hw.test", 99)),
                # no rule decides the name: the entry gets it (once: a name it has is kept)
                (
                    "n5",
                    records.PENDING_NAMED,
                    records.pending_named_record("other", "10.0.0.7", 80, "o.example", None, 2),
                ),
                ("n6", records.PENDING_NAMED, records.pending_named_record("other", "10.0.0.7", 80, "p.example", None)),
                # named otherwise by then (another worker's sighting): a rule for this name leaves it be
                ("n7", records.PENDING_NAMED, records.pending_named_record("other", "10.0.0.7", 80, "b.hw.test", 50)),
            ],
        )
        left = conn.execute("SELECT container_name, destination_host, resolved_hostname FROM pending").fetchall()
    finally:
        conn.close()
    assert left == [("other", "10.0.0.7", "o.example")]
    assert [(t, d["pending_id"], d["rule"]["id"], d["rule"]["action"]) for t, d in events[:2]] == [
        ("pending_request.allowed", ids["agent 10.0.0.7"], 50, "allow"),
        ("pending_request.dismissed", ids["agent 10.0.0.8"], 51, "deny"),
    ]
    assert events[0][1]["rule"]["destination_pattern"] == "**.hw.test"
    assert [(t, d["id"], d["resolved_hostname"], d["destination_host"], d["waiting"]) for t, d in events[2:]] == [
        ("pending_request.updated", ids["other 10.0.0.7"], "o.example", "10.0.0.7", 2)
    ]


def test_store_reads_through_peewee(db_path: Path) -> None:
    """The ordinary reads of the proxy and the API (rules snapshot, pending count, DNS names, settings)."""
    open_database(db_path)
    try:
        version, rows = rules.snapshot()
        assert version >= 1 and {r[2] for r in rows} >= {"localhost", "127.0.0.1", "::1"} and len(rows[0]) == 8
        assert pending.count() == 0
        assert dns_cache.names_since(0) == []
        from greyproxy.store import database

        for ip, name, at in (("10.0.0.1", "a.example", 100.0), ("10.0.0.2", "b.example", 200.0)):
            database.execute_sql(dns_cache.UPSERT, (ip, name, at))
        assert sorted(dns_cache.names_since(50)) == [("10.0.0.1", "a.example"), ("10.0.0.2", "b.example")]
        assert dns_cache.names_since(50, ["10.0.0.2", "10.0.0.9"]) == [("10.0.0.2", "b.example")]
        assert dns_cache.names_since(150, ["10.0.0.1"]) == []
        settings.write({"theme": "dark", "logDnsQueries": True}, now=1.0)
        settings.write({"theme": "light"})
        v, values = settings.read_with_version()
        assert values == {"theme": "light", "logDnsQueries": True} and v >= 2
    finally:
        from greyproxy.store import database

        database.close()


def test_transaction_shape_2_is_the_table_fields_in_order() -> None:
    # Never reordered (a journal written before an upgrade is read by the recorder after it).
    assert records.TRANSACTION_FIELDS == transactions.FIELDS
    assert set(records.TRANSACTION_JSON) == set(transactions.JSON_COLUMNS)


def test_both_transaction_shapes_store_the_same_row(db_path: Path) -> None:
    """Shape 2 (an array, JSON columns as text: what the proxy writes) and shape 1 (an object: a
    proxy of before, still in a journal at upgrade) store identical rows and events; a shorter
    array leaves the rest null; a longer one is dropped alone."""
    rec = {
        "timestamp": 1000.5,
        "container_name": "c",
        "destination_host": "h.example",
        "destination_port": 443,
        "method": "POST",
        "url": "https://h.example/x",
        "request_headers": {"Content-Type": ["application/json"], "X-Q": ['a "quoted" \\ value']},
        "request_body": None,
        "request_body_size": 3,
        "status_code": 201,
        "response_headers": {"Server": ["t"]},
        "response_body_size": 0,
        "duration_ms": 1.25,
        "rule_id": 4,
        "result": "allowed",
        "substituted_credentials": ["k"],
        "host_mismatch": True,
        "refused_credentials": [],
    }
    values = records.transaction_values(rec)
    assert all(isinstance(values[records.TRANSACTION_FIELDS.index(c)], str) for c in records.TRANSACTION_JSON)
    assert records.transaction_fields(values) == {**dict.fromkeys(records.TRANSACTION_FIELDS), **rec}
    short = values[: records.TRANSACTION_FIELDS.index("error")]  # a shape-2 writer from before `error`
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        events = apply_records(
            conn,
            [
                ("w-1", "transaction", rec),
                ("w-2", "transaction", values),
                ("w-3", "transaction", short),
                ("w-4", "transaction", [*values, "one too many"]),
            ],
        )
        rows = conn.execute(f"SELECT {', '.join(transactions.FIELDS)} FROM http_transactions ORDER BY id").fetchall()
    finally:
        conn.close()
    assert len(rows) == 3 and rows[0] == rows[1] == rows[2]
    stored = dict(zip(transactions.FIELDS, rows[0]))
    assert stored["request_headers"] == '{"Content-Type":["application/json"],"X-Q":["a \\"quoted\\" \\\\ value"]}'
    assert stored["host_mismatch"] == 1 and stored["substituted_credentials"] == '["k"]'
    payloads = [d for t, d in events if t == "transaction.new"]
    assert len(payloads) == 3
    assert [{k: v for k, v in p.items() if k != "id"} for p in payloads[1:]] == [
        {k: v for k, v in payloads[0].items() if k != "id"}
    ] * 2


def test_log_shape_2_is_the_table_fields_in_order_then_the_summary() -> None:
    # Never reordered (a journal written before an upgrade is read by the recorder after it).
    assert records.LOG_FIELDS == (*logs.FIELDS, "rule_summary")
    assert set(records.LOG_FIELDS) == set(typing.get_type_hints(records.LogRecord))


def test_log_values_are_the_log_record_in_order() -> None:
    kw: dict[str, typing.Any] = {
        "resolved_hostname": "h.example",
        "rule_id": 3,
        "rule_summary": "s",
        "response_time_ms": 1.23456,
        "reason": "rule",
        "mitm_skip_reason": "pinned",
        "container_id": "abc",
        "timestamp": 5.0,
    }
    values = records.log_values("agent", "10.0.0.1", 443, "CONNECT", records.BLOCKED, **kw)
    rec = records.log_record("agent", "10.0.0.1", 443, "CONNECT", records.BLOCKED, **kw)
    assert values == [rec[k] for k in records.LOG_FIELDS]  # type: ignore[literal-required]
    assert records.log_fields(values) == rec and records.log_fields(rec) is rec
    assert records.log_fields(values[:3])["rule_summary"] is None
    with pytest.raises(ValueError, match="log result"):
        records.log_values("agent", "example.com", 443, "CONNECT", "maybe")


def test_both_log_shapes_store_the_same_row_and_event(db_path: Path) -> None:
    """Shape 2 (an array: what the proxy writes) and shape 1 (an object: a proxy of before) store
    identical rows and `log.new` events, alone and in a run; a shorter array leaves the rest null, a
    longer one is dropped alone."""
    kw: dict[str, typing.Any] = {"rule_id": 4, "rule_summary": "* → h:*", "response_time_ms": 0.5, "reason": "rule"}
    rec = records.log_record("c", "h.example", 443, "CONNECT", records.ALLOWED, timestamp=1000.5, **kw)
    values = records.log_values("c", "h.example", 443, "CONNECT", records.ALLOWED, timestamp=1000.5, **kw)
    short = values[: records.LOG_FIELDS.index("mitm_skip_reason")]
    conn = sqlite3.connect(db_path, isolation_level=None)
    cols = ", ".join(logs.FIELDS)
    try:
        for batch in (
            [("w-1", "log", rec)],
            [("w-2", "log", values)],
            [("w-3", "log", rec), ("w-4", "log", values), ("w-5", "log", [*values, "one too many"])],
            [("w-6", "log", short), ("w-7", "log", [*values, "one too many"])],
        ):
            events = apply_records(conn, batch)
            assert [t for t, _ in events] == ["log.new"] * (len(batch) - (batch[-1][0] in ("w-5", "w-7")))
            for _t, payload in events:
                assert payload["rule_summary"] == ("* → h:*" if len(batch[0][2]) != len(short) else None)
        rows = conn.execute(f"SELECT {cols} FROM logs ORDER BY id").fetchall()
    finally:
        conn.close()
    assert len(rows) == 5 and len(set(rows)) == 1


def test_ms3_is_round_to_three_decimals_except_on_exact_ties() -> None:
    """Durations travel as milliseconds to three decimals (`records.ms3`, the hot path's round)."""
    import random

    rng = random.Random(7)
    values = [0.0, 0.0004, 0.0006, 1.0, 12.3456, 999.9999, 30000.0] + [rng.uniform(0, 60_000) for _ in range(20_000)]
    for v in values:
        got = records.ms3(v)
        assert abs(got - v) <= 0.0005 + 1e-9
        if abs(v * 1000 - round(v * 1000) - 0.5) > 1e-6 and abs(v * 1000 - round(v * 1000) + 0.5) > 1e-6:
            assert got == round(v, 3), v  # the same double, so the same JSON text
    assert records.log_values("c", "h", 1, "GET", records.ALLOWED, response_time_ms=1.23456)[9] == 1.235
