"""A temp SQLite store holding fixture transactions, for assembler tests without the stack."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any


from greyproxy.capture import TRANSACTION_COLUMNS
from greyproxy.llm import stored
from greyproxy.store.db import open_database

_COLS = [c for c in TRANSACTION_COLUMNS if c != "id"]


def new_store(path: Path) -> sqlite3.Connection:
    db = open_database(path)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA synchronous = OFF")  # a throwaway test store: no fsync per commit
    db.close()
    return conn


def insert(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> list[int]:
    ids = []
    for r in rows:
        vals = []
        for c in _COLS:
            v = r.get(c)
            if c == "host_mismatch":
                v = 1 if v else 0
            if c in ("request_headers", "response_headers", "substituted_credentials"):
                v = json.dumps(v if v is not None else ({} if c != "substituted_credentials" else []))
            vals.append(v)
        cols = list(_COLS)
        if r.get("id"):
            cols, vals = ["id", *cols], [r["id"], *vals]
        cur = conn.execute(
            f"INSERT INTO http_transactions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals
        )
        ids.append(cur.lastrowid)
    return ids


def snapshot(conn: sqlite3.Connection) -> dict[str, Any]:
    """Conversations (without updated_at) and each transaction's conversation_id."""
    convs = {cid: stored.load_conversation(data) for cid, data in conn.execute("SELECT id, data FROM conversations")}
    links = dict(conn.execute("SELECT id, conversation_id FROM http_transactions WHERE conversation_id IS NOT NULL"))
    return {"conversations": convs, "links": links}


def conversation(conn: sqlite3.Connection, cid: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT data FROM conversations WHERE id = ?", (cid,)).fetchone()
    return stored.load_conversation(row[0]) if row else None
