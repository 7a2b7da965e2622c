"""The `dns_cache` table (migration 1): ip → hostname as the DNS proxy saw it."""

from __future__ import annotations

COLUMNS = ("ip", "hostname", "updated_at")

# Inside the recorder's batch transaction (its raw sqlite3 cursor).
UPSERT = ("INSERT INTO dns_cache (ip, hostname, updated_at) VALUES (?, ?, ?)"
          " ON CONFLICT(ip) DO UPDATE SET hostname = excluded.hostname, updated_at = excluded.updated_at")
