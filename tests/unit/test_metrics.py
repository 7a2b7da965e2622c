"""GET /metrics without a stack: the histogram, and the collector over heartbeats of any shape."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from greyproxy.metrics import HeartbeatCollector, Histogram
from harness.fuzz import examples


def _render(seen: dict[str, tuple[bool, dict[str, Any]]]) -> dict[str, Any]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HeartbeatCollector(lambda: seen))
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(fam: Any) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}


def test_histogram_buckets() -> None:
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.snapshot() == {"le": [0.1, 1.0], "cumulative": [2, 3, 4], "sum": pytest.approx(3.65)}
    assert h.count == 4
    with pytest.raises(ValueError):
        Histogram([1.0, 0.5])


@settings(max_examples=examples(200), deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=0, max_size=5, unique=True).map(sorted),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20),
)
def test_histogram_counts_each_value_in_its_bucket(bounds: list[float], values: list[float]) -> None:
    """The bucket of a value is the first bound it does not exceed (le), +Inf past them all; the
    first bound's own shortcut included (a value equal to it, below it, NaN, no bounds at all)."""
    import bisect

    h = Histogram(bounds)
    expected = [0] * (len(bounds) + 1)
    for v in [*values, *bounds]:
        h.observe(v)
        expected[bisect.bisect_left(bounds, v)] += 1
    assert h.counts == expected


def test_families_from_heartbeats() -> None:
    h = Histogram([0.001, 1.0])
    h.observe(0.0005)
    h.observe(2.0)
    seen = {
        "proxy": (
            True,
            {
                "active_connections": 3,
                "waiting": 1,
                "pending_count": 2,
                "journal": {"queued": 4, "inflight": 1, "dropped": 7, "acked": 9, "resent": 0, "outbox_bytes": 100},
                "refused_connections": {"maxConnections": 1, "maxConnectionsPerClient": 2},
                "metrics": {
                    "connections": {"allowed": 5, "blocked": 2},
                    "decision_seconds": h.snapshot(),
                    "hold_seconds": Histogram([1.0]).snapshot(),
                    "bytes_received": {"client": 10, "upstream": 20},
                },
            },
        ),
        "recorder": (True, {"records": 11, "batches": 3, "metrics": {"batch_seconds": h.snapshot()}}),
        "maintenance": (False, {}),
        "api": (True, {}),
    }
    fams = _render(seen)
    assert _samples(fams["greyproxy_up"]) == {
        ("greyproxy_up", (("service", "api"),)): 1.0,
        ("greyproxy_up", (("service", "maintenance"),)): 0.0,
        ("greyproxy_up", (("service", "proxy"),)): 1.0,
        ("greyproxy_up", (("service", "recorder"),)): 1.0,
    }
    conns = _samples(fams["greyproxy_proxy_connections"])
    assert conns[("greyproxy_proxy_connections_total", (("result", "allowed"),))] == 5
    assert fams["greyproxy_proxy_held_connections"].samples[0].value == 1
    assert fams["greyproxy_journal_dropped_records"].type == "counter"
    assert fams["greyproxy_journal_dropped_records"].samples[0].value == 7
    dec = _samples(fams["greyproxy_proxy_decision_seconds"])
    assert dec[("greyproxy_proxy_decision_seconds_bucket", (("le", "0.001"),))] == 1
    assert dec[("greyproxy_proxy_decision_seconds_bucket", (("le", "+Inf"),))] == 2
    assert dec[("greyproxy_proxy_decision_seconds_count", ())] == 2
    assert "greyproxy_recorder_batch_seconds" in fams
    assert (
        _samples(fams["greyproxy_proxy_bytes_relayed"])[
            ("greyproxy_proxy_bytes_relayed_total", (("side", "upstream"),))
        ]
        == 20
    )


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)
_keys = st.sampled_from(["active_connections", "journal", "metrics", "refused_connections", "records", "x"])
_metric_keys = st.sampled_from(["connections", "decision_seconds", "hold_seconds", "bytes_received", "batch_seconds"])
_stats = st.dictionaries(_keys, st.one_of(_json, st.dictionaries(_metric_keys, _json, max_size=4)), max_size=5)


@settings(max_examples=examples(300), deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["proxy", "recorder", "bus", "maintenance"]), st.tuples(st.booleans(), _stats), max_size=4
    )
)
def test_any_heartbeat_content_renders_parsable_text(seen) -> None:
    """Heartbeats come over the bus: whatever they hold, /metrics stays valid exposition text."""
    _render(seen)
