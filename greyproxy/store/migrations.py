"""Numbered schema migrations. Append new ones; never edit one that has shipped.

Timestamps are stored as REAL epoch seconds (UTC); the API formats them as RFC 3339.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from collections.abc import Callable

# A step: an SQL statement, or a function given the connection (inside the migration's transaction)
# for what SQL alone cannot say.
Step = str | Callable[[sqlite3.Connection], None]

_NOW = time.time()

MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (
        1,
        "core tables",
        [
            """CREATE TABLE rules (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            container_pattern TEXT NOT NULL,
            destination_pattern TEXT NOT NULL,
            port_pattern TEXT NOT NULL DEFAULT '*',
            rule_type TEXT NOT NULL DEFAULT 'glob',
            action TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
            created_at REAL NOT NULL,
            expires_at REAL,
            last_used_at REAL,
            created_by TEXT NOT NULL DEFAULT 'api',
            notes TEXT,
            source TEXT NOT NULL DEFAULT 'global' CHECK (source IN ('global', 'session', 'builtin')),
            session_id TEXT,
            hit_count INTEGER NOT NULL DEFAULT 0
        )""",
            "CREATE INDEX rules_identity ON rules (container_pattern, destination_pattern, port_pattern, action)",
            "CREATE INDEX rules_expires ON rules (expires_at)",
            """CREATE TABLE pending (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            container_name TEXT NOT NULL,
            container_id TEXT NOT NULL DEFAULT '',
            destination_host TEXT NOT NULL,
            destination_port INTEGER NOT NULL,
            resolved_hostname TEXT,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            attempt_count INTEGER NOT NULL DEFAULT 1,
            UNIQUE (container_name, destination_host, destination_port)
        )""",
            "CREATE INDEX pending_last_seen ON pending (last_seen)",
            "CREATE INDEX pending_resolved ON pending (container_name, resolved_hostname, destination_port)",
            """CREATE TABLE logs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp REAL NOT NULL,
            container_name TEXT NOT NULL,
            container_id TEXT NOT NULL DEFAULT '',
            destination_host TEXT NOT NULL,
            destination_port INTEGER NOT NULL,
            resolved_hostname TEXT,
            method TEXT NOT NULL,
            result TEXT NOT NULL,
            rule_id INTEGER,
            response_time_ms REAL,
            reason TEXT,
            mitm_skip_reason TEXT
        )""",
            "CREATE INDEX logs_timestamp ON logs (timestamp)",
            "CREATE INDEX logs_container ON logs (container_name, timestamp)",
            "CREATE INDEX logs_result ON logs (result, timestamp)",
            """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
            """CREATE TABLE dns_cache (
            ip TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
            "CREATE INDEX dns_cache_updated ON dns_cache (updated_at)",
            # Idempotent journal: a record id is applied at most once.
            """CREATE TABLE journal_applied (
            record_id TEXT PRIMARY KEY,
            applied_at REAL NOT NULL
        ) WITHOUT ROWID""",
            "CREATE INDEX journal_applied_at ON journal_applied (applied_at)",
            # Version counters: a process that may have missed an event compares these.
            """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
            "INSERT INTO meta (key, value) VALUES ('rules_version', 1), ('settings_version', 1)",
            """CREATE TRIGGER rules_version_ins AFTER INSERT ON rules
           BEGIN UPDATE meta SET value = value + 1 WHERE key = 'rules_version'; END""",
            """CREATE TRIGGER rules_version_del AFTER DELETE ON rules
           BEGIN UPDATE meta SET value = value + 1 WHERE key = 'rules_version'; END""",
            """CREATE TRIGGER rules_version_upd AFTER UPDATE OF container_pattern, destination_pattern,
           port_pattern, action, expires_at, source, session_id ON rules
           BEGIN UPDATE meta SET value = value + 1 WHERE key = 'rules_version'; END""",
            """CREATE TRIGGER settings_version_ins AFTER INSERT ON settings
           BEGIN UPDATE meta SET value = value + 1 WHERE key = 'settings_version'; END""",
            """CREATE TRIGGER settings_version_upd AFTER UPDATE ON settings
           BEGIN UPDATE meta SET value = value + 1 WHERE key = 'settings_version'; END""",
            # Builtin loopback rules (SPEC §2.3): agents' local dev servers.
            *[
                "INSERT INTO rules (container_pattern, destination_pattern, port_pattern, rule_type, action,"
                f" created_at, created_by, source) VALUES ('*', '{host}', '*', 'glob', 'allow', {_NOW!r}, 'builtin', 'builtin')"
                for host in ("localhost", "127.0.0.1", "::1")
            ],
        ],
    ),
    (
        2,
        "http transactions",
        [
            # SPEC §7: one row per intercepted request (and per WebSocket data message). Headers are
            # JSON {name: [values]} already redacted by the proxy; bodies only for text-like types.
            """CREATE TABLE http_transactions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp REAL NOT NULL,
            container_name TEXT NOT NULL,
            destination_host TEXT NOT NULL,
            destination_port INTEGER NOT NULL,
            method TEXT NOT NULL,
            url TEXT NOT NULL,
            request_headers TEXT NOT NULL DEFAULT '{}',
            request_body TEXT,
            request_body_size INTEGER NOT NULL DEFAULT 0,
            request_content_type TEXT,
            status_code INTEGER,
            response_headers TEXT NOT NULL DEFAULT '{}',
            response_body TEXT,
            response_body_size INTEGER NOT NULL DEFAULT 0,
            response_content_type TEXT,
            duration_ms REAL,
            rule_id INTEGER,
            result TEXT NOT NULL DEFAULT 'allowed',
            conversation_id TEXT,
            substituted_credentials TEXT NOT NULL DEFAULT '[]',
            session_id TEXT
        )""",
            "CREATE INDEX http_transactions_timestamp ON http_transactions (timestamp)",
            "CREATE INDEX http_transactions_container ON http_transactions (container_name, timestamp)",
            "CREATE INDEX http_transactions_destination ON http_transactions (destination_host)",
            "CREATE INDEX http_transactions_session ON http_transactions (session_id) WHERE session_id IS NOT NULL",
            "CREATE INDEX http_transactions_conversation ON http_transactions (conversation_id)"
            " WHERE conversation_id IS NOT NULL",
        ],
    ),
    (
        3,
        "log counts",
        [
            # GET /api/logs reports an exact `total`; COUNT(*) over a million rows costs ~20 ms, so
            # the count per (container, result) is kept by triggers in the same transaction as the
            # rows (exact whoever writes or deletes them). Filters on these columns only sum rows here.
            """CREATE TABLE log_counts (
            container_name TEXT NOT NULL,
            result TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (container_name, result)
        ) WITHOUT ROWID""",
            "INSERT INTO log_counts (container_name, result, n)"
            " SELECT container_name, result, COUNT(*) FROM logs GROUP BY container_name, result",
            """CREATE TRIGGER log_counts_ins AFTER INSERT ON logs BEGIN
             INSERT INTO log_counts (container_name, result, n) VALUES (NEW.container_name, NEW.result, 1)
             ON CONFLICT (container_name, result) DO UPDATE SET n = n + 1;
           END""",
            """CREATE TRIGGER log_counts_del AFTER DELETE ON logs BEGIN
             UPDATE log_counts SET n = n - 1 WHERE container_name = OLD.container_name AND result = OLD.result;
           END""",
            """CREATE TRIGGER log_counts_upd AFTER UPDATE OF container_name, result ON logs BEGIN
             UPDATE log_counts SET n = n - 1 WHERE container_name = OLD.container_name AND result = OLD.result;
             INSERT INTO log_counts (container_name, result, n) VALUES (NEW.container_name, NEW.result, 1)
             ON CONFLICT (container_name, result) DO UPDATE SET n = n + 1;
           END""",
        ],
    ),
    (
        4,
        "transaction hosts and errors",
        [
            # SPEC §7 / issue 13: destination_host and url name the host actually contacted;
            # request_host is the request's own Host, host_mismatch (0/1) says it named another host.
            # error: why the exchange failed or was cut off (e.g. a malformed response: status 502).
            "ALTER TABLE http_transactions ADD COLUMN request_host TEXT",
            "ALTER TABLE http_transactions ADD COLUMN host_mismatch INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE http_transactions ADD COLUMN error TEXT",
        ],
    ),
]

# SPEC §13: LLM conversation tracking. Appended as its own migration (another branch may append
# one too: renumber on merge, never edit a shipped one).
MIGRATIONS.append(
    (
        5,
        "llm conversations",
        [
            # Endpoint rules (§13.4); the built-ins are seeded here, user_defined = 0.
            """CREATE TABLE endpoint_rules (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        host_pattern TEXT NOT NULL,
        path_pattern TEXT NOT NULL,
        method TEXT NOT NULL DEFAULT 'POST',
        decoder_name TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        enabled INTEGER NOT NULL DEFAULT 1,
        user_defined INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL
    )""",
            *[
                "INSERT INTO endpoint_rules (host_pattern, path_pattern, method, decoder_name, priority, enabled,"
                f" user_defined, created_at) VALUES ('{h}', '{p}', 'POST', '{d}', 0, 1, 0, {_NOW!r})"
                for h, p, d in (
                    ("api.anthropic.com", "/v1/messages", "anthropic"),
                    ("api.openai.com", "/v1/responses", "openai"),
                    ("api.openai.com", "/v1/chat/completions", "openai-chat"),
                    ("openrouter.ai", "/api/v1/chat/completions", "openai-chat"),
                    ("generativelanguage.googleapis.com", "/v1beta/models/*", "google-ai"),
                )
            ],
            # One row per dissected transaction: the extraction and where assembly put it. `session` is
            # the resolved session (the key, or inferred_<id>); lookups only ever look at lower ids.
            """CREATE TABLE llm_requests (
        transaction_id INTEGER PRIMARY KEY,
        timestamp REAL NOT NULL,
        duration_ms REAL,
        container_name TEXT NOT NULL,
        dissector TEXT NOT NULL,
        provider TEXT NOT NULL,
        method TEXT NOT NULL,
        url TEXT NOT NULL,
        session_key TEXT,
        session TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        message_count INTEGER NOT NULL,
        client_name TEXT NOT NULL,
        thread TEXT NOT NULL,
        model TEXT NOT NULL,
        stop_reason TEXT,
        system_len INTEGER NOT NULL,
        prompt_count INTEGER NOT NULL,
        has_response INTEGER NOT NULL,
        usage TEXT NOT NULL,
        extraction TEXT NOT NULL
    )""",
            "CREATE INDEX llm_requests_session ON llm_requests (session, transaction_id)",
            "CREATE INDEX llm_requests_keyed ON llm_requests (container_name, dissector, transaction_id)"
            " WHERE session_key IS NOT NULL",
            "CREATE INDEX llm_requests_fp ON llm_requests (container_name, dissector, fingerprint, transaction_id)"
            " WHERE session_key IS NULL",
            "CREATE INDEX llm_requests_ws ON llm_requests (container_name, url, transaction_id) WHERE method = 'WS_REQ'",
            # OpenCode child sessions named by a request (`task_id: ses_…`).
            """CREATE TABLE llm_refs (
        child TEXT NOT NULL,
        transaction_id INTEGER NOT NULL,
        session TEXT NOT NULL,
        PRIMARY KEY (child, transaction_id)
    ) WITHOUT ROWID""",
            "CREATE INDEX llm_refs_txn ON llm_refs (transaction_id)",
            "CREATE INDEX llm_refs_session ON llm_refs (session)",
            # Sessions whose conversations must be re-assembled (set with the cursor, cleared with the write).
            "CREATE TABLE llm_dirty (session TEXT PRIMARY KEY) WITHOUT ROWID",
            # Conversations (§13.6): filter columns plus the detail as JSON (without updated_at).
            """CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        unit TEXT NOT NULL,
        parent_conversation_id TEXT,
        container_name TEXT NOT NULL,
        provider TEXT NOT NULL,
        client_name TEXT NOT NULL,
        model TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        data TEXT NOT NULL
    )""",
            "CREATE INDEX conversations_ended ON conversations (ended_at)",
            "CREATE INDEX conversations_unit ON conversations (unit)",
            "CREATE INDEX conversations_parent ON conversations (parent_conversation_id)",
            # meta keys conversations_cursor and assembler_version are written by the assembler (absent = 0).
        ],
    )
)

# SPEC §12: credential substitution (appended after the LLM one; renumber on merge, never edit a shipped one).
MIGRATIONS.append(
    (
        6,
        "credentials",
        [
            # SPEC §12: sessions (placeholder → value maps sealed with session.key, per row) and global
            # credentials. In clear: labels, hosts, metadata, placeholders, previews; never a value.
            """CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        container_name TEXT NOT NULL,
        mappings_sealed BLOB NOT NULL,
        global_labels TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        ttl_seconds INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        last_heartbeat REAL NOT NULL,
        substitution_count INTEGER NOT NULL DEFAULT 0,
        last_used_at REAL
    )""",
            "CREATE INDEX sessions_expires ON sessions (expires_at)",
            # One row per placeholder of a session (its label and hosts): a placeholder belongs to one session.
            """CREATE TABLE session_credentials (
        placeholder TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        hosts TEXT NOT NULL DEFAULT '[]',
        position INTEGER NOT NULL
    )""",
            "CREATE INDEX session_credentials_session ON session_credentials (session_id)",
            """CREATE TABLE global_credentials (
        id TEXT PRIMARY KEY,
        label TEXT NOT NULL UNIQUE,
        placeholder TEXT NOT NULL UNIQUE,
        value_sealed BLOB NOT NULL,
        value_preview TEXT NOT NULL,
        hosts TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        substitution_count INTEGER NOT NULL DEFAULT 0,
        last_used_at REAL
    )""",
            # The proxy's live map follows this version (as rules_version); the counters do not move it.
            "INSERT INTO meta (key, value) VALUES ('credentials_version', 1)",
            *[
                f"""CREATE TRIGGER {table}_version_{op[:3].lower()} AFTER {op} ON {table}
         BEGIN UPDATE meta SET value = value + 1 WHERE key = 'credentials_version'; END"""
                for table, cols in (
                    ("sessions", "container_name, mappings_sealed, global_labels, ttl_seconds, created_at, expires_at"),
                    ("session_credentials", "session_id, label, hosts"),
                    ("global_credentials", "label, placeholder, value_sealed, hosts"),
                )
                for op in ("INSERT", "DELETE", f"UPDATE OF {cols}")
            ],
            # SPEC §12.7: why a request was refused, and the credential labels a refusal involved.
            "ALTER TABLE http_transactions ADD COLUMN block_reason TEXT",
            "ALTER TABLE http_transactions ADD COLUMN refused_credentials TEXT DEFAULT '[]'",  # null (older writers) reads as []
        ],
    )
)

# SPEC §16: claimed identities. Only an scrypt hash of each secret is stored (greyproxy/identity.py);
# `version` changes with every rotation, meta key identities_version with every change.
# (Another branch may append a migration too: renumber on merge, never edit a shipped one.)
MIGRATIONS.append(
    (
        7,
        "claimed identities",
        [
            """CREATE TABLE identities (
        name TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        notes TEXT,
        created_at REAL NOT NULL,
        rotated_at REAL,
        last_used_at REAL,
        version INTEGER NOT NULL DEFAULT 1
    ) WITHOUT ROWID""",
            # meta identities_version: absent (0) until the first claim, then bumped by every change.
            """CREATE TRIGGER identities_version_ins AFTER INSERT ON identities BEGIN
         INSERT INTO meta (key, value) VALUES ('identities_version', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1;
       END""",
            """CREATE TRIGGER identities_version_del AFTER DELETE ON identities BEGIN
         INSERT INTO meta (key, value) VALUES ('identities_version', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1;
       END""",
            """CREATE TRIGGER identities_version_upd AFTER UPDATE OF secret_hash, version ON identities BEGIN
         INSERT INTO meta (key, value) VALUES ('identities_version', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1;
       END""",
        ],
    )
)

# SPEC §15: bodies stored as the captured bytes (a BLOB, zstd-compressed or not) with the charset they
# decode under, NULL when binary (greyproxy.bodies). Rows from before keep their TEXT body, NULL codec.
MIGRATIONS.append(
    (
        8,
        "stored body codec and charset",
        [
            "ALTER TABLE http_transactions ADD COLUMN request_body_codec INTEGER",
            "ALTER TABLE http_transactions ADD COLUMN request_body_charset TEXT",
            "ALTER TABLE http_transactions ADD COLUMN response_body_codec INTEGER",
            "ALTER TABLE http_transactions ADD COLUMN response_body_charset TEXT",
        ],
    )
)

# Issue 18 item 4: a stored body may be a zstd delta against an
# earlier body of the same side (codec 2, greyproxy.bodies): the base row's id. The partial indexes
# find a base's dependents when it is dropped (retention, the size cap), for the delta rows only.
MIGRATIONS.append(
    (
        9,
        "stored body delta bases",
        [
            "ALTER TABLE http_transactions ADD COLUMN request_body_base INTEGER",
            "ALTER TABLE http_transactions ADD COLUMN response_body_base INTEGER",
            "CREATE INDEX http_transactions_request_body_base ON http_transactions (request_body_base)"
            " WHERE request_body_base IS NOT NULL",
            "CREATE INDEX http_transactions_response_body_base ON http_transactions (response_body_base)"
            " WHERE response_body_base IS NOT NULL",
        ],
    )
)

# Issue 18 item 1: what a proxied request costs the recorder (bench/record_cost.py). Never edit a shipped
# migration: append a new one.
MIGRATIONS.append(
    (
        10,
        "cheaper recording",
        [
            # Applied journal records as id ranges per writer (one row per batch, not one per record):
            # a record id is `<writer>-<hex sequence>` (bus/journal.py); any other id is its own writer
            # with sequence 0. Ranges of one writer never overlap. journal_applied stays for the ids
            # applied before this migration (a resend across the upgrade), pruned as before.
            """CREATE TABLE journal_ranges (
        writer TEXT NOT NULL,
        lo INTEGER NOT NULL,
        hi INTEGER NOT NULL,
        applied_at REAL NOT NULL
    )""",
            "CREATE UNIQUE INDEX journal_ranges_writer ON journal_ranges (writer, lo, hi)",
            "CREATE INDEX journal_ranges_at ON journal_ranges (applied_at)",
            # log_counts: the recorder (the one writer of logs) adds a batch's counts in the batch's
            # transaction, one upsert per (container, result) rather than a trigger per row, which
            # cost more than the row itself. Deletes and updates keep their triggers.
            "DROP TRIGGER log_counts_ins",
            # The listing's container/destination filters are substrings (LIKE '%…%'): no index can
            # seek them; their counts scan a covering index, which one index on both columns is.
            "DROP INDEX http_transactions_container",
            "DROP INDEX http_transactions_destination",
            "CREATE INDEX http_transactions_names ON http_transactions (container_name, destination_host)",
        ],
    )
)

# Issue 18 item 1: an index entry fewer per recorded transaction (bench/results.md, s10-a). The listing
# orders by (timestamp, id) and filters by substrings of the container and destination (LIKE '%…%',
# which no index can seek): one index in that order holding both names serves its pages in order (the
# LIKE tested on the index entries: no row read for one that fails), its counts (a scan of that
# covering index) and the time ranges (export, retention) as the two did.
MIGRATIONS.append(
    (
        11,
        "one transaction index for time and names",
        [
            "DROP INDEX http_transactions_timestamp",
            "DROP INDEX http_transactions_names",
            "CREATE INDEX http_transactions_time_names ON http_transactions"
            " (timestamp, id, container_name, destination_host)",
        ],
    )
)

# Issue 18 item 4 (storage that stays bounded): how each llm_requests row keeps its extraction
# (greyproxy/llm/stored.py): 0 JSON text (the rows before this), 1 zstd-compressed JSON, 2 thin (without
# the messages, system prompt and tools every later request of its session repeats). ADD COLUMN with a
# constant default rewrites no row.
MIGRATIONS.append(
    (
        12,
        "llm extraction forms",
        ["ALTER TABLE llm_requests ADD COLUMN extraction_form INTEGER NOT NULL DEFAULT 0"],
    )
)

# Issue 18 item 4: a conversation's list form (`conversations.item`, JSON of its ITEM_KEYS), written with
# `data` by the assembler, so GET /api/conversations reads ~1 KB per item rather than decompressing and
# parsing the whole detail (turns and messages: MBs for a long session). NULL for rows written before:
# the listing then reads `data` as it did.
MIGRATIONS.append((13, "conversation list form", ["ALTER TABLE conversations ADD COLUMN item BLOB"]))

# Whether a stored body is all of the body, as the capture knew it (bus/records.py TRANSACTION_FIELDS,
# docs/events.md): 1 cut at capture.maxBodyBytes (on the wire, or its decoding stopped there), 0 whole,
# NULL for rows recorded before (the HAR export then infers it, greyproxy/har.py). Nothing to rewrite.
MIGRATIONS.append(
    (
        14,
        "stored body truncation",
        [
            "ALTER TABLE http_transactions ADD COLUMN request_body_truncated INTEGER",
            "ALTER TABLE http_transactions ADD COLUMN response_body_truncated INTEGER",
        ],
    )
)


def _plain(dest: str, ports: str) -> bool:
    """Whether a rule's patterns are plainly in their stored form already (lower-case ASCII, no
    trailing dot, no range, one port or '*', an IP in canonical form): most are, and the rest are
    asked of the policy package. Every process opens the database, and the ones that never judge a
    rule should not load it (tests/integration/test_idle_imports.py)."""
    if ports != "*" and not (ports.isascii() and ports.isdigit() and not ports.startswith("0")):
        return False
    if not dest.isascii() or dest != dest.lower() or dest.endswith(".") or any(c in dest for c in "/[%"):
        return False
    if ":" in dest:
        try:
            addr = ipaddress.ip_address(dest)
        except ValueError:
            return False
        return addr.compressed == dest and not (addr.version == 6 and addr.ipv4_mapped is not None)
    return True


def _normalise_destinations(conn: sqlite3.Connection) -> None:
    """Rules' destinations and ports in the form they match in (`validate_destination_pattern`:
    lower case, no trailing dot, punycode, canonical IPs and CIDRs; ports sorted, each once), as the
    API now stores them, so that the duplicate
    guard (SPEC §2.4) finds a new rule equal to one stored before as `Example.COM.`. A pattern the
    API would now refuse (a port or URL written into it: it never matched) is left as it was.
    Rules that become twins stay separate rules (they decide alike); nothing is deleted."""
    rows = [
        r for r in conn.execute("SELECT id, destination_pattern, port_pattern FROM rules") if not _plain(r[1], r[2])
    ]
    if not rows:
        return  # (the usual database: nothing to ask the policy package, which loads the suffix list)
    from greyproxy.policy.patterns import validate_destination_pattern, validate_port_pattern  # (no cycle)

    changed = []
    for rule_id, pattern, ports in rows:
        try:
            normal = validate_destination_pattern(pattern)
        except ValueError:
            normal = pattern
        try:
            normal_ports = validate_port_pattern(ports)
        except ValueError:
            normal_ports = ports
        if (normal, normal_ports) != (pattern, ports):
            changed.append((normal, normal_ports, rule_id))
    conn.executemany("UPDATE rules SET destination_pattern = ?, port_pattern = ? WHERE id = ?", changed)


MIGRATIONS.append((15, "rule patterns as they match", [_normalise_destinations]))
# The same again, with what was added to the stored form since 15 first ran (a development database
# may have it): IPv4-mapped ranges as IPv4, one-address ranges as the address, port ranges merged.
# The step is idempotent: a database that ran 15 just now changes nothing here.
MIGRATIONS.append((16, "rule patterns as they match, ranges merged", [_normalise_destinations]))
