"""Numbered schema migrations. Append new ones; never edit one that has shipped.

Timestamps are stored as REAL epoch seconds (UTC); the API formats them as RFC 3339.
"""

from __future__ import annotations

import time

_NOW = time.time()

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "core tables", [
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
    ]),
    (2, "http transactions", [
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
    ]),
    (3, "log counts", [
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
    ]),
    (4, "transaction hosts and errors", [
        # SPEC §7 / issue 13: destination_host and url name the host actually contacted;
        # request_host is the request's own Host, host_mismatch (0/1) says it named another host.
        # error: why the exchange failed or was cut off (e.g. a malformed response: status 502).
        "ALTER TABLE http_transactions ADD COLUMN request_host TEXT",
        "ALTER TABLE http_transactions ADD COLUMN host_mismatch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE http_transactions ADD COLUMN error TEXT",
    ]),
]
