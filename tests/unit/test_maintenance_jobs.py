"""The prune job against a real migrated database: what is past retention goes, the rest stays."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from greyproxy.store import open_database
from services.maintenance.jobs import prune

DAY = 86400.0


def _db(tmp_path: Path) -> sqlite3.Connection:
    path = tmp_path / "g.db"
    open_database(path).close()
    conn = sqlite3.connect(str(path), isolation_level=None)
    return conn


def test_prune_removes_only_what_is_past_retention(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    now = time.time()
    old, fresh = now - 31 * DAY, now - 1 * DAY
    for i, ts in enumerate((old, old, fresh)):
        conn.execute(
            "INSERT INTO logs (timestamp, container_name, destination_host, destination_port, method, result)"
            " VALUES (?, 'a', ?, 443, 'CONNECT', 'allowed')",
            (ts, f"h{i}.test"),
        )
        conn.execute(
            "INSERT INTO http_transactions (timestamp, container_name, destination_host, destination_port,"
            " method, url) VALUES (?, 'a', ?, 443, 'GET', 'https://x.test/')",
            (ts, f"h{i}.test"),
        )
    conn.execute(
        "INSERT INTO dns_cache (ip, hostname, updated_at) VALUES ('10.0.0.1', 'old.test', ?),"
        " ('10.0.0.2', 'new.test', ?)",
        (now - 8 * DAY, fresh),
    )
    conn.execute(
        "INSERT INTO pending (container_name, destination_host, destination_port, first_seen, last_seen)"
        " VALUES ('a', 'stale.test', 443, ?, ?), ('a', 'live.test', 443, ?, ?)",
        (now - 9 * DAY, now - 8 * DAY, fresh, fresh),
    )
    conn.execute(
        "INSERT INTO rules (container_pattern, destination_pattern, action, created_at, expires_at)"
        " VALUES ('*', 'expired-long-ago.test', 'allow', ?, ?), ('*', 'expired-now.test', 'allow', ?, ?)",
        (old, now - 8 * DAY, old, now - 60),
    )

    progress = list(prune(conn, {"retention_days": 30, "pending_ttl_days": 7}))
    assert progress and progress[-1][0] == progress[-1][1]

    def col(sql: str) -> list:
        return [r[0] for r in conn.execute(sql)]

    assert col("SELECT destination_host FROM logs") == ["h2.test"]
    assert col("SELECT destination_host FROM http_transactions") == ["h2.test"]
    assert col("SELECT hostname FROM dns_cache") == ["new.test"]
    assert col("SELECT destination_host FROM pending") == ["live.test"]
    rules = col("SELECT destination_pattern FROM rules WHERE source != 'builtin'")
    assert rules == ["expired-now.test"]  # expired rules are kept 7 days (they show as expired)
    assert len(col("SELECT id FROM rules WHERE source = 'builtin'")) == 3
