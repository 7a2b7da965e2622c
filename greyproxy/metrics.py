"""Figures for `GET /metrics` (SPEC §14).

The processes keep plain counters and `Histogram`s and send them in their heartbeats
(`stats.metrics`); the API turns the latest heartbeat of each process into the Prometheus text
format (`HeartbeatCollector`, with `prometheus_client`). A process's counters are its own since
it started. The API adds to them the last values of the earlier processes of the same name
(`counters_of`, services/api/health.py): a proxy worker restarted after a death does not take its
share out of the sum over the workers, which Prometheus would read as a reset of the whole sum.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["DECISION_BUCKETS", "BATCH_BUCKETS", "Histogram", "HeartbeatCollector", "counters_of", "sum_stats"]

# Seconds. A decision from the rules takes microseconds; one that waits for a person takes
# seconds, up to proxy.holdTimeout.
DECISION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Observations counted into fixed buckets (upper bounds, +Inf implied); cheap to observe."""

    __slots__ = ("bounds", "counts", "sum", "_first")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        # The first bound: most observations fall below it (a decision from the cache takes a few
        # µs), and they are counted without the bisection's call.
        self._first = self.bounds[0] if self.bounds else float("inf")

    def observe(self, value: float) -> None:
        if value <= self._first:
            self.counts[0] += 1
        else:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict[str, Any]:
        """JSON for a heartbeat: bucket bounds, cumulative counts per bound (then +Inf), sum."""
        cumulative, total = [], 0
        for n in self.counts:
            total += n
            cumulative.append(total)
        return {"le": list(self.bounds), "cumulative": cumulative, "sum": self.sum}


# ---------------------------------------------------------------------------- exposition


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _dig(stats: dict[str, Any], *path: str) -> Any:
    node: Any = stats
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _buckets(snap: Any) -> tuple[list[tuple[str, float]], float] | None:
    """A heartbeat histogram snapshot → prometheus_client buckets and sum (None if malformed)."""
    if not isinstance(snap, dict):
        return None
    le, cum, total = snap.get("le"), snap.get("cumulative"), _num(snap.get("sum"))
    if not isinstance(le, list) or not isinstance(cum, list) or len(cum) != len(le) + 1 or total is None:
        return None
    bounds = [b for b in map(_num, le) if b is not None]
    counts = [c for c in map(_num, cum) if c is not None]
    if len(bounds) != len(le) or len(counts) != len(cum):  # some bound or count is not a number
        return None
    if counts != sorted(counts):  # cumulative counts never decrease
        return None
    out = [(repr(b), c) for b, c in zip(bounds, counts[:-1])]
    out.append(("+Inf", counts[-1]))
    return out, total


# (metric name, kind, help, path in the service's stats, service)
_SIMPLE: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    (
        "greyproxy_proxy_active_connections",
        "gauge",
        "Open client connections (HTTP and SOCKS5)",
        ("active_connections",),
        "proxy",
    ),
    ("greyproxy_proxy_tunnels", "gauge", "Allowed connections being relayed", ("tunnels",), "proxy"),
    ("greyproxy_proxy_held_connections", "gauge", "Connections waiting for a decision", ("waiting",), "proxy"),
    ("greyproxy_pending", "gauge", "Pending destinations (the proxy's view)", ("pending_count",), "proxy"),
    ("greyproxy_rules", "gauge", "Active rules loaded in the proxy", ("rules",), "proxy"),
    (
        "greyproxy_journal_outbox_records",
        "gauge",
        "Records queued or in flight to the recorder",
        ("journal", "queued"),
        "proxy",
    ),
    (
        "greyproxy_journal_inflight_records",
        "gauge",
        "Records sent to the recorder and not yet acknowledged",
        ("journal", "inflight"),
        "proxy",
    ),
    (
        "greyproxy_journal_outbox_bytes",
        "gauge",
        "Serialised bytes held in the journal outbox",
        ("journal", "outbox_bytes"),
        "proxy",
    ),
    (
        "greyproxy_journal_dropped_records",
        "counter",
        "Records dropped because the outbox was full",
        ("journal", "dropped"),
        "proxy",
    ),
    ("greyproxy_journal_acked_records", "counter", "Records the recorder acknowledged", ("journal", "acked"), "proxy"),
    (
        "greyproxy_journal_resent_records",
        "counter",
        "Records sent again after no acknowledgement",
        ("journal", "resent"),
        "proxy",
    ),
    (
        "greyproxy_transactions_captured",
        "counter",
        "Transaction records made by the proxy",
        ("capture", "transactions"),
        "proxy",
    ),
    (
        "greyproxy_websocket_messages_captured",
        "counter",
        "WebSocket messages recorded",
        ("capture", "ws_messages"),
        "proxy",
    ),
    (
        "greyproxy_upstream_pool_idle_connections",
        "gauge",
        "Idle upstream connections kept for reuse",
        ("upstream_pool", "idle"),
        "proxy",
    ),
    (
        "greyproxy_upstream_pool_reused",
        "counter",
        "Requests sent on a reused upstream connection",
        ("upstream_pool", "reused"),
        "proxy",
    ),
    ("greyproxy_dns_queries", "counter", "Queries answered by the DNS proxy", ("dns", "queries"), "proxy"),
    ("greyproxy_dns_cache_hits", "counter", "DNS proxy answers from its cache", ("dns", "cache_hits"), "proxy"),
    ("greyproxy_recorder_records", "counter", "Journal records written by the recorder", ("records",), "recorder"),
    ("greyproxy_recorder_batches", "counter", "Journal batches committed by the recorder", ("batches",), "recorder"),
)


# The figures exposed as counters (histograms included), by their path in a heartbeat's stats.
COUNTER_PATHS: tuple[tuple[str, ...], ...] = (
    *(path for _name, kind, _help, path, _service in _SIMPLE if kind == "counter"),
    ("refused_connections",),
    ("metrics", "connections"),
    ("metrics", "bytes_received"),
    ("metrics", "decision_seconds"),
    ("metrics", "hold_seconds"),
    ("metrics", "batch_seconds"),
)


def counters_of(stats: Any) -> dict[str, Any]:
    """The counters in a process's heartbeat stats, in the same shape (the rest left out)."""
    out: dict[str, Any] = {}
    if not isinstance(stats, dict):
        return out
    for path in COUNTER_PATHS:
        value = _dig(stats, *path)
        if value is None:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


SAME_IN_EVERY_PROXY = ("pending_count", "rules", "rules_version", "le")  # not summed: the largest / the first


def sum_stats(parts: list[Any], key: str = "") -> Any:
    """Several processes' heartbeat figures as one (the proxy's workers; a process and the counters
    its predecessors left): numbers (and histogram counts) added up."""
    first = parts[0]
    if isinstance(first, bool) or key in SAME_IN_EVERY_PROXY:
        return (
            max(parts, key=lambda p: p if isinstance(p, (int, float)) and not isinstance(p, bool) else -1)
            if key != "le"
            else first
        )
    if isinstance(first, (int, float)):
        return sum(p for p in parts if isinstance(p, (int, float)) and not isinstance(p, bool))
    if isinstance(first, dict):
        keys = dict.fromkeys(k for p in parts if isinstance(p, dict) for k in p)
        return {k: sum_stats([p[k] for p in parts if isinstance(p, dict) and k in p], k) for k in keys}
    if (
        isinstance(first, list)
        and all(isinstance(p, list) and len(p) == len(first) for p in parts)
        and all(isinstance(x, (int, float)) for p in parts for x in p)
    ):
        return [sum(col) for col in zip(*parts)]
    return first


class HeartbeatCollector:
    """A prometheus_client collector over the latest heartbeat of each process.

    `snapshot()` returns {service: (up, stats)}; it is called on every scrape, so the figures are
    as fresh as the last heartbeat (bus.heartbeatInterval)."""

    def __init__(self, snapshot: Callable[[], dict[str, tuple[bool, dict[str, Any]]]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        seen = self.snapshot()
        up = GaugeMetricFamily("greyproxy_up", "1 when the process sends heartbeats and is ready", labels=["service"])
        for name, (alive, _stats) in sorted(seen.items()):
            up.add_metric([name], 1.0 if alive else 0.0)
        yield up

        def stats_of(service: str) -> dict[str, Any] | None:
            entry = seen.get(service)
            return entry[1] if entry is not None and isinstance(entry[1], dict) else None

        for name, kind, text, path, service in _SIMPLE:
            stats = stats_of(service)
            value = _num(_dig(stats, *path)) if stats is not None else None
            if value is None:
                continue
            if kind == "counter":
                yield CounterMetricFamily(name, text, value=value)
            else:
                yield GaugeMetricFamily(name, text, value=value)

        proxy = stats_of("proxy") or {}
        refused = proxy.get("refused_connections")
        if isinstance(refused, dict):
            fam = CounterMetricFamily(
                "greyproxy_proxy_refused_connections", "Connections refused by a connection cap", labels=["cap"]
            )
            for cap, n in sorted(refused.items()):
                if _num(n) is not None:
                    fam.add_metric([str(cap)], float(n))
            yield fam
        proxy_metrics = proxy.get("metrics")
        metrics: dict[str, Any] = proxy_metrics if isinstance(proxy_metrics, dict) else {}
        results = metrics.get("connections")
        if isinstance(results, dict):
            fam = CounterMetricFamily(
                "greyproxy_proxy_connections", "Connection decisions by result", labels=["result"]
            )
            for result, n in sorted(results.items()):
                if _num(n) is not None:
                    fam.add_metric([str(result)], float(n))
            yield fam
        received = metrics.get("bytes_received")
        if isinstance(received, dict):
            fam = CounterMetricFamily(
                "greyproxy_proxy_bytes_relayed", "Bytes received from clients and from upstreams", labels=["side"]
            )
            for side, n in sorted(received.items()):
                if _num(n) is not None:
                    fam.add_metric([str(side)], float(n))
            yield fam
        for key, name, text, stats in (
            (
                "decision_seconds",
                "greyproxy_proxy_decision_seconds",
                "Time from a connection's request to its allow/block decision, holds included",
                metrics,
            ),
            (
                "hold_seconds",
                "greyproxy_proxy_hold_seconds",
                "Time connections to unknown destinations waited for a decision",
                metrics,
            ),
            (
                "batch_seconds",
                "greyproxy_recorder_batch_seconds",
                "Time to write and commit one journal batch",
                (stats_of("recorder") or {}).get("metrics") or {},
            ),
        ):
            parsed = _buckets(stats.get(key)) if isinstance(stats, dict) else None
            if parsed is not None:
                hist = HistogramMetricFamily(name, text)
                hist.add_metric([], parsed[0], parsed[1])
                yield hist

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families depend on what the heartbeats carry
