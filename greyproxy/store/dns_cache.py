"""The `dns_cache` table (migration 1): ip → hostname as the DNS proxy saw it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

COLUMNS = ("ip", "hostname", "updated_at")

# Inside the recorder's batch transaction (its raw sqlite3 cursor).
UPSERT = (
    "INSERT INTO dns_cache (ip, hostname, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT(ip) DO UPDATE SET hostname = excluded.hostname, updated_at = excluded.updated_at"
)


def names_since(cutoff: float, ips: list[str] | None = None) -> list[tuple[str, str]]:
    """(ip, hostname) of the mappings updated after `cutoff` (the proxy reloads them at start);
    `ips`: of those addresses only (a proxy's held connections to unnamed addresses)."""
    from .models import DnsCache

    where = DnsCache.updated_at > cutoff
    if ips is not None:
        where &= DnsCache.ip.in_(ips)
    query = DnsCache.select(DnsCache.ip, DnsCache.hostname).where(where).tuples()
    return list(cast(Iterable[tuple[str, str]], query))  # .tuples(): peewee's types still say models


def name_of(ip: str, since: float) -> str | None:
    """The hostname `ip` was an answer for, if that was seen after `since` (GET /api/rules/explain)."""
    from .models import DnsCache

    row = DnsCache.get_or_none((DnsCache.ip == ip) & (DnsCache.updated_at > since))
    return None if row is None else str(row.hostname)
