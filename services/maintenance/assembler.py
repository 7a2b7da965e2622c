"""The conversation assembler's storage side (SPEC §13.1, §13.5, §13.7).

`Assembler.run_pass()` dissects the transactions after the cursor (in id order, ≤ 500 rows read at
a time), stores one `llm_requests` row per claimed transaction, then re-assembles every affected
session whole, one short write transaction per unit of linked sessions. The rebuild job does the
same over every transaction, without events, and deletes at the end what it did not produce.
Incremental passes and a rebuild run the same code in the same order, and session resolution only
ever looks at lower ids: the outputs are equal (tests/unit/test_llm_assembler.py proves it).

One lock (`LOCK`) serialises passes and the rebuild.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import orjson

from bus import topics
from greyproxy.bodies import Reader
from greyproxy.llm import ASSEMBLER_VERSION
from greyproxy.llm import assemble as A
from greyproxy.llm import dissect as D
from greyproxy.llm import rules as R
from greyproxy.llm import stored

from .jobs import register, write_txn

log = logging.getLogger("greyproxy.maintenance.assembler")

LOCK = threading.Lock()
WINDOW = 2000  # ids whose hosts are judged, and whose candidates' metadata is read, at a time
EMPTY_RANGE = 50_000  # unclaimed ids after which the cursor moves even with nothing claimed
OUT_OF_ORDER = 8  # stored requests of one sessionless conversation that may come in out of their order (_resolve)
BODY_CHUNK = 25  # claimed transactions whose bodies are in memory at a time (each up to 2 x capture.maxBodyBytes)
_META_COLS = "id, timestamp, container_name, destination_host, destination_port, method, url, duration_ms"
_BODY_COLS = (
    "id, request_headers, response_headers, request_body, response_body, request_content_type,"
    " response_content_type, status_code, request_body_codec, request_body_charset,"
    " response_body_codec, response_body_charset"
)
Publish = Callable[[str, dict[str, Any]], None]
REBUILD_UNFINISHED = "conversations_rebuild_unfinished"  # meta key: 1 while the rebuild job runs


def meta_get(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _meta_set(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def enabled(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT value FROM settings WHERE key = 'conversationsEnabled'").fetchone()
    if row is None:
        return True
    try:
        value = orjson.loads(row[0])
    except orjson.JSONDecodeError:
        return True
    return value if isinstance(value, bool) else True


def load_rules(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(
        "SELECT id, host_pattern, path_pattern, method, decoder_name, priority, enabled, user_defined"
        " FROM endpoint_rules WHERE enabled = 1"
    )
    names = [d[0] for d in cur.description]
    return R.ordered([dict(zip(names, row)) for row in cur.fetchall()])


def _txn_meta(row: tuple) -> D.Txn:
    tid, ts, container, host, port, method, url, duration = row
    return D.Txn(
        id=tid,
        method=str(method).upper(),
        url=url,
        host=str(host).lower(),
        port=port,
        request_headers={},
        response_headers={},
        request_body=None,
        response_body=None,
        request_content_type=None,
        response_content_type=None,
        container_name=container,
        timestamp=float(ts),
        duration_ms=duration,
    )


class Candidates:
    """Which stored rows might be LLM calls, found in SQL: rows to a host some rule (or built-in)
    can claim, or whose URL holds a built-in's URL mark. Plain traffic is skipped without a
    Python object per row; `decoder_for` then decides exactly on the few candidates. Hosts are
    judged once per (host, port) while the rules stay the same."""

    def __init__(self, rules: list[dict[str, Any]]) -> None:
        self.rules = rules
        self.judged: dict[tuple[str, int | None], bool] = {}

    def rows(self, conn: sqlite3.Connection, lo: int, hi: int) -> list[tuple]:
        """The candidates' metadata among ids in (lo, hi]: one grouped scan judges the window's
        (host, port) pairs and says whether a URL holds a mark; a second read only if some can match."""
        marks = R.BUILTIN_URL_HAS
        has_mark = " OR ".join(["instr(url, ?) > 0"] * len(marks)) or "0"
        hosts: dict[str, None] = {}
        any_mark = False
        for host, port, marked in conn.execute(
            f"SELECT destination_host, destination_port, MAX({has_mark}) FROM http_transactions"
            " WHERE id > ? AND id <= ? GROUP BY destination_host, destination_port",
            (*marks, lo, hi),
        ):
            any_mark = any_mark or bool(marked)
            key = (host, port)
            ok = self.judged.get(key)
            if ok is None:
                ok = self.judged[key] = R.host_may_match(self.rules, host, port if isinstance(port, int) else None)
            if ok:
                hosts[host] = None
        if not hosts and not any_mark:
            return []
        where = [f"destination_host IN ({','.join('?' * len(hosts))})"] if hosts else []
        if any_mark:
            where.append(has_mark)
        return conn.execute(
            f"SELECT {_META_COLS} FROM http_transactions WHERE id > ? AND id <= ? AND ({' OR '.join(where)})"
            " ORDER BY id",
            (lo, hi, *hosts, *(marks if any_mark else ())),
        ).fetchall()


def _windows(conn: sqlite3.Connection, after: int, upto: int | None) -> Iterator[tuple[int, int]]:
    """(lo, hi] id windows of at most WINDOW ids over the stored rows after `after` (gaps skipped)."""
    top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM http_transactions").fetchone()[0]
    if upto is not None:
        top = min(top, upto)
    lo = after
    while lo < top:
        nxt = conn.execute("SELECT MIN(id) FROM http_transactions WHERE id > ?", (lo,)).fetchone()[0]
        if nxt is None or nxt > top:
            yield lo, top
            return
        lo = max(lo, nxt - 1)
        hi = min(lo + WINDOW, top)
        yield lo, hi
        lo = hi


def claimed_rows(
    conn: sqlite3.Connection, rules: list[dict[str, Any]], after: int, upto: int | None = None
) -> Iterator[tuple[int, list[tuple[D.Txn, str]]]]:
    """Consecutive id ranges after `after` as (last id of the range, [(transaction, dissector)]).

    Candidates' metadata is read a window of ≤ WINDOW ids at a time; bodies only for claimed
    rows, BODY_CHUNK at a time (a range ends at its last claimed row), so memory stays bounded by
    BODY_CHUNK bodies. Windows with nothing claimed are merged into the next range (the last
    range ends at the last id read)."""
    cand = Candidates(rules)
    told = seen = after  # the end of the last range yielded, of the last window read
    for lo, hi in _windows(conn, after, upto):
        seen = hi
        claimed: list[tuple[D.Txn, str]] = []
        for row in cand.rows(conn, lo, hi):
            txn = _txn_meta(row)
            name = R.decoder_for(rules, txn)
            if name is not None:
                claimed.append((txn, name))
        for i in range(0, len(claimed), BODY_CHUNK):
            chunk = claimed[i : i + BODY_CHUNK]
            last = chunk[-1][0].id if i + BODY_CHUNK < len(claimed) else hi
            yield last, _with_bodies(conn, chunk)
            told = last
        if hi - told >= EMPTY_RANGE:
            yield hi, []  # a long run of unclaimed rows: move the cursor now and then
            told = hi
    if seen > told:
        yield seen, []


def _with_bodies(conn: sqlite3.Connection, claimed: list[tuple[D.Txn, str]]) -> list[tuple[D.Txn, str]]:
    ids = [t.id for t, _n in claimed]
    bodies = {
        r[0]: r
        for r in conn.execute(
            f"SELECT {_BODY_COLS} FROM http_transactions WHERE id IN ({','.join('?' * len(ids))})", ids
        )
    }
    full = []
    reader = Reader(conn.execute)  # delta bodies (greyproxy.bodies)
    for txn, name in claimed:
        b = bodies.get(txn.id)
        if b is None:
            continue  # deleted meanwhile
        _id, rh, sh, rb, sb, rct, sct, status, rbc, rbs, sbc, sbs = b
        row = {
            "id": txn.id,
            "method": txn.method,
            "url": txn.url,
            "destination_host": txn.host,
            "destination_port": txn.port,
            "request_headers": rh,
            "response_headers": sh,
            "request_body": rb,
            "response_body": sb,
            "request_content_type": rct,
            "response_content_type": sct,
            "container_name": txn.container_name,
            "timestamp": txn.timestamp,
            "duration_ms": txn.duration_ms,
            "status_code": status,
            "request_body_codec": rbc,
            "request_body_charset": rbs,
            "response_body_codec": sbc,
            "response_body_charset": sbs,
        }
        t = D.Txn.from_row(reader.inline([row])[0])
        full.append((t, name))
    return full


def count_claimed(conn: sqlite3.Connection, rules: list[dict[str, Any]]) -> int:
    cand = Candidates(rules)
    return sum(
        1
        for lo, hi in _windows(conn, 0, None)
        for row in cand.rows(conn, lo, hi)
        if R.decoder_for(rules, _txn_meta(row)) is not None
    )


# ------------------------------------------------------------------ dissecting and resolving sessions


def _host_mismatch(conn: sqlite3.Connection) -> bool:
    cols = {r[1] for r in conn.execute("PRAGMA table_info(http_transactions)")}
    return "host_mismatch" in cols


def _dissected(batch: list[tuple[D.Txn, str]], flagged: set[int]) -> list[tuple[D.Txn, str, dict[str, Any]]]:
    out = []
    for txn, name in batch:
        if txn.id in flagged:
            continue  # the Host header named another host than the one contacted: not trusted
        ex = D.run(name, txn)
        if ex is not None:
            out.append((txn, name, ex))
    return out


def _resolve(
    conn: sqlite3.Connection, txn: D.Txn, name: str, ex: dict[str, Any], client: str, thread: str, fp: str
) -> tuple[str, str, str]:
    """(session, client, thread) from this request and lower-id rows only (§13.5.1)."""
    if name == "openai-ws" and txn.method == "WS_RESP":
        row = conn.execute(
            "SELECT session, client_name, thread FROM llm_requests WHERE container_name = ? AND url = ?"
            " AND method = 'WS_REQ' AND transaction_id < ? ORDER BY transaction_id DESC LIMIT 1",
            (txn.container_name, txn.url, txn.id),
        ).fetchone()
        if row is not None:
            return row[0], row[1], row[2]
    key = ex.get("session_key")
    if key:
        return str(key), client, thread
    if ex.get("request_parsed") is False:
        # A body that did not parse (cut by the capture cap, invalid) has no system text: its
        # fingerprint is no conversation's. It joins the latest lower-id request of its container
        # and dissector in the 5 minutes before it, keyed or not (§13.5.1's first rule): a cut
        # request of a sessionless client stays in its conversation. Looked up through the stored
        # transactions of those 5 minutes (an index on their timestamp), not every request of the
        # container (llm_requests' indexes on the container hold keyed or keyless rows, not both).
        row = conn.execute(
            "SELECT q.session FROM http_transactions t JOIN llm_requests q ON q.transaction_id = t.id"
            " WHERE t.container_name = ? AND t.timestamp >= ? AND t.timestamp <= ? AND t.id < ?"
            " AND q.dissector = ? ORDER BY t.id DESC LIMIT 1",
            (txn.container_name, txn.timestamp - A.GAP_SECONDS, txn.timestamp, txn.id, name),
        ).fetchone()
        if row is not None:
            return row[0], client, thread
    row = conn.execute(
        "SELECT session, timestamp FROM llm_requests WHERE container_name = ? AND dissector = ?"
        " AND session_key IS NOT NULL AND transaction_id < ? ORDER BY transaction_id DESC LIMIT 1",
        (txn.container_name, name, txn.id),
    ).fetchone()
    if row is not None and 0 <= txn.timestamp - float(row[1]) <= A.GAP_SECONDS:
        return row[0], client, thread
    # The previous request of a sessionless conversation: among the last few of its fingerprint (lower
    # ids only), the latest that began before this one. Ids follow the order records reach the
    # recorder, not the order requests were made: with several proxy workers a client's request can
    # be stored before the one it sent just earlier, and going by the id alone that earlier one then
    # looked like a new conversation (an outside run: 5 of 12 sessions split in two).
    rows = conn.execute(
        "SELECT session, timestamp, message_count FROM llm_requests WHERE container_name = ? AND dissector = ?"
        " AND fingerprint = ? AND session_key IS NULL AND transaction_id < ? ORDER BY transaction_id DESC LIMIT ?",
        (txn.container_name, name, fp, txn.id, OUT_OF_ORDER),
    ).fetchall()
    before = [r for r in rows if float(r[1]) <= txn.timestamp]
    row = max(before, key=lambda r: float(r[1])) if before else (rows[0] if rows else None)
    if (
        row is not None
        and txn.timestamp - float(row[1]) <= A.GAP_SECONDS
        and int(ex["message_count"]) >= int(row[2]) - 1
    ):
        return row[0], client, thread
    return f"inferred_{txn.id}", client, thread


_INSERT_REQ = (
    "INSERT INTO llm_requests (transaction_id, timestamp, duration_ms, container_name, dissector, provider,"
    " method, url, session_key, session, fingerprint, message_count, client_name, thread, model,"
    " stop_reason, system_len, prompt_count, has_response, usage, extraction, extraction_form)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def store_batch(
    conn: sqlite3.Connection, lo: int, hi: int, items: list[tuple[D.Txn, str, dict[str, Any]]], cursor_key: str | None
) -> set[str]:
    """Replace the llm_requests of ids in (lo, hi] by these; mark their sessions dirty; move the cursor.
    An incremental pass (`cursor_key`) keeps each extraction whole, as the assembly right after it
    reads the newest ones; the rebuild keeps them thin, and its assembly makes whole again those it
    reads (greyproxy/llm/stored.py): a rebuild never holds every session's history N times over."""
    keep = stored.full if cursor_key else stored.thin
    prepared = []
    for txn, name, ex in items:
        client = A.client_name(txn, ex)
        prepared.append(
            (
                txn,
                name,
                ex,
                client,
                A.thread_of(client, ex),
                A.fingerprint(ex),
                A.task_refs(txn.request_body) if ex["provider"] == "openai" else [],
                keep(ex),
            )
        )

    def write() -> set[str]:
        sessions: set[str] = set()
        old = conn.execute(
            "SELECT DISTINCT session FROM llm_requests WHERE transaction_id > ? AND transaction_id <= ?", (lo, hi)
        ).fetchall()
        sessions.update(r[0] for r in old)
        conn.execute("DELETE FROM llm_requests WHERE transaction_id > ? AND transaction_id <= ?", (lo, hi))
        conn.execute("DELETE FROM llm_refs WHERE transaction_id > ? AND transaction_id <= ?", (lo, hi))
        for txn, name, ex, client, thread, fp, refs, (value, form) in prepared:
            session, client, thread = _resolve(conn, txn, name, ex, client, thread, fp)
            conn.execute(
                _INSERT_REQ,
                (
                    txn.id,
                    txn.timestamp,
                    txn.duration_ms,
                    txn.container_name,
                    name,
                    ex["provider"],
                    txn.method,
                    txn.url,
                    ex.get("session_key") or None,
                    session,
                    fp,
                    int(ex["message_count"]),
                    client,
                    thread,
                    str(ex.get("model") or "unknown"),
                    ex.get("stop_reason"),
                    A.system_length(ex),
                    A.count_prompts(ex["messages"], client),
                    int(bool(ex.get("response"))),
                    orjson.dumps(ex["usage"]).decode(),
                    value,
                    form,
                ),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO llm_refs (child, transaction_id, session) VALUES (?, ?, ?)",
                [(c, txn.id, session) for c in refs if c != session],
            )
            sessions.add(session)
        conn.executemany("INSERT OR IGNORE INTO llm_dirty (session) VALUES (?)", [(s,) for s in sessions])
        if cursor_key:
            _meta_set(conn, cursor_key, hi)
        return sessions

    return write_txn(conn, write)


# ------------------------------------------------------------------ units of linked sessions


def parent_of(conn: sqlite3.Connection, session: str) -> str | None:
    """The OpenCode session whose tool results first named this one (one level: a parent that is
    itself a child keeps its children as separate units)."""
    row = conn.execute(
        "SELECT r.session FROM llm_refs r WHERE r.child = ? AND r.session != ?"
        " AND EXISTS (SELECT 1 FROM llm_requests q WHERE q.session = ?) ORDER BY r.transaction_id LIMIT 1",
        (session, session, session),
    ).fetchone()
    return row[0] if row else None


def unit_root(conn: sqlite3.Connection, session: str) -> str:
    p = parent_of(conn, session)
    if p is not None and parent_of(conn, p) is None:
        return p
    return session


def unit_children(conn: sqlite3.Connection, root: str) -> list[str]:
    if parent_of(conn, root) is not None:
        return []
    out: list[str] = []
    for (child,) in conn.execute("SELECT child FROM llm_refs WHERE session = ? ORDER BY transaction_id", (root,)):
        if child not in out and child != root and parent_of(conn, child) == root:
            out.append(child)
    return out


def _requests(conn: sqlite3.Connection, session: str) -> list[dict[str, Any]]:
    """A session's requests without their extractions: assembly loads the few it needs."""
    cur = conn.execute(
        "SELECT transaction_id, timestamp, duration_ms, container_name, dissector, provider, method, url, session,"
        " client_name, thread, model, message_count, stop_reason, system_len, prompt_count, has_response, usage,"
        " extraction_form AS _form"
        " FROM llm_requests WHERE session = ? ORDER BY transaction_id",
        (session,),
    )
    names = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        r = dict(zip(names, row))
        r["usage"] = orjson.loads(r["usage"])
        r["_load"] = partial(_load_into, conn, r)
        out.append(r)
    return out


def _load_into(conn: sqlite3.Connection, r: dict[str, Any]) -> dict[str, Any]:
    """Request `r`'s extraction, for assembly; notes in `r["_whole"]` whether it is whole."""
    ex, r["_whole"] = _extraction(conn, r["transaction_id"])
    return ex


def _extraction(conn: sqlite3.Connection, tid: int) -> tuple[dict[str, Any], bool]:
    """(extraction, whether whole): a thin one is dissected again from its stored transaction; when
    that is gone (or its body), the thin one is what there is (no messages)."""
    row = conn.execute(
        "SELECT extraction, extraction_form, dissector FROM llm_requests WHERE transaction_id = ?", (tid,)
    ).fetchone()
    if row is None:
        return {"messages": [], "system": []}, False
    value, form, name = row
    ex = stored.load(value, form)
    if form != stored.THIN:
        return ex, True
    meta = conn.execute(f"SELECT {_META_COLS} FROM http_transactions WHERE id = ?", (tid,)).fetchone()
    again = None
    if meta is not None:
        full = _with_bodies(conn, [(_txn_meta(meta), name)])
        again = D.run(name, full[0][0]) if full else None
    if again is None:
        return {"messages": [], "system": []} | ex, False
    return again, True


def _forms(sessions: dict[str, list[dict[str, Any]]]) -> list[tuple[Any, int, int, int]]:
    """After assembly: the requests whose extraction changes form, as (value, form, id, old form).
    Those assembly read stay (or are made again) whole; the others are made thin (their newer
    requests repeat their messages). Each row is made thin once: its whole extraction is read then."""
    out: list[tuple[Any, int, int, int]] = []
    for reqs in sessions.values():
        for r in reqs:
            if "extraction" in r:
                if r["_form"] == stored.THIN and r.get("_whole"):
                    out.append((*stored.full(r["extraction"]), r["transaction_id"], r["_form"]))
            elif r["_form"] != stored.THIN:
                ex = r["_load"]()
                out.append((*stored.thin(ex), r["transaction_id"], r["_form"]))
    return out


def _event(conv: dict[str, Any]) -> dict[str, Any]:
    return {
        "conversation_id": conv["id"],
        "parent_conversation_id": conv["parent_conversation_id"],
        "turn_count": conv["turn_count"],
        "ended_at": conv["ended_at"],
        "usage": conv["usage"],
    }


def assemble_and_store(
    conn: sqlite3.Connection,
    root: str,
    events: list[tuple[str, dict[str, Any]]] | None,
    produced: set[str] | None = None,
) -> None:
    """Re-assemble one unit whole and write it in one short transaction; events only when asked."""
    children = unit_children(conn, root)
    members = [root, *children]
    sessions = {s: _requests(conn, s) for s in members}
    convs = A.assemble_unit(root, sessions, children) if sessions[root] or children else []
    now = time.time()
    rows = []
    owner: dict[int, str] = {}
    for c in convs:
        for tid in c.pop("_transactions"):
            owner.setdefault(tid, c["id"])
        started, ended = c.pop("_started"), c.pop("_ended")
        data = stored.conversation(A.public(c, detail=True) | {"updated_at": None})
        rows.append((c, started, ended, data, stored.item(A.public(c) | {"updated_at": None})))
    txn_ids = [r["transaction_id"] for s in members for r in sessions[s]]
    forms = _forms(sessions)

    def write() -> None:
        ph = ",".join("?" * len(members))
        existing = {
            r[0]: (r[1], r[2], r[3])
            for r in conn.execute(f"SELECT id, data, unit, item FROM conversations WHERE unit IN ({ph})", members)
        }
        new_ids = {c["id"] for c, *_ in rows}
        for cid in existing.keys() - new_ids:
            conn.execute("DELETE FROM conversations WHERE id = ?", (cid,))
            conn.execute("UPDATE http_transactions SET conversation_id = NULL WHERE conversation_id = ?", (cid,))
            if events is not None:
                events.append((topics.CONVERSATION_DELETED, {"conversation_id": cid}))
        for c, started, ended, data, item in rows:
            old = existing.get(c["id"])
            if old is None:
                old = conn.execute("SELECT data, unit, item FROM conversations WHERE id = ?", (c["id"],)).fetchone()
            if produced is not None:
                produced.add(c["id"])
            if old is not None and old[0] == data and old[1] == root and old[2] is not None:
                continue
            conn.execute(
                "INSERT INTO conversations (id, unit, parent_conversation_id, container_name, provider, client_name,"
                " model, started_at, ended_at, updated_at, data, item) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET unit = excluded.unit,"
                " parent_conversation_id = excluded.parent_conversation_id, container_name = excluded.container_name,"
                " provider = excluded.provider, client_name = excluded.client_name, model = excluded.model,"
                " started_at = excluded.started_at, ended_at = excluded.ended_at, updated_at = excluded.updated_at,"
                " data = excluded.data, item = excluded.item",
                (
                    c["id"],
                    root,
                    c["parent_conversation_id"],
                    c["container_name"],
                    c["provider"],
                    c["client_name"],
                    c["model"],
                    started,
                    ended,
                    now,
                    data,
                    item,
                ),
            )
            if events is not None:
                events.append((topics.CONVERSATION_NEW if old is None else topics.CONVERSATION_UPDATED, _event(c)))
        for i in range(0, len(txn_ids), 500):
            chunk = txn_ids[i : i + 500]
            cur = conn.execute(
                f"SELECT id, conversation_id FROM http_transactions WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
            changes = [(owner.get(tid), tid) for tid, cid in cur.fetchall() if cid != owner.get(tid)]
            if changes:
                conn.executemany("UPDATE http_transactions SET conversation_id = ? WHERE id = ?", changes)
        conn.executemany(
            "UPDATE llm_requests SET extraction = ?, extraction_form = ? WHERE transaction_id = ? AND extraction_form = ?",
            forms,
        )
        conn.execute(f"DELETE FROM llm_dirty WHERE session IN ({ph})", members)

    write_txn(conn, write)


def _assemble_dirty(conn: sqlite3.Connection, events: list[tuple[str, dict[str, Any]]] | None) -> int:
    """Re-assemble the units of the dirty sessions (and of the sessions they name, whose unit may change)."""
    roots: dict[str, None] = {}
    for (s,) in conn.execute("SELECT session FROM llm_dirty ORDER BY session").fetchall():
        roots[unit_root(conn, s)] = None
        for (child,) in conn.execute("SELECT DISTINCT child FROM llm_refs WHERE session = ?", (s,)).fetchall():
            if conn.execute("SELECT 1 FROM llm_requests WHERE session = ? LIMIT 1", (child,)).fetchone():
                roots[unit_root(conn, child)] = None
    for root in roots:
        assemble_and_store(conn, root, events)
    write_txn(conn, lambda: conn.execute("DELETE FROM llm_dirty"))
    return len(roots)


# ------------------------------------------------------------------ passes and the rebuild


def run_pass(conn: sqlite3.Connection, publish: Publish | None = None, limit_batches: int | None = None) -> int:
    """One incremental pass over id > cursor (caller holds LOCK); returns transactions read."""
    rules = load_rules(conn)
    cursor = meta_get(conn, "conversations_cursor")
    flagged_col = _host_mismatch(conn)
    read = 0
    batches = 0
    for hi, batch in claimed_rows(conn, rules, cursor):
        flagged = _flagged(conn, [t.id for t, _ in batch]) if flagged_col and batch else set()
        store_batch(conn, cursor, hi, _dissected(batch, flagged), "conversations_cursor")
        read += hi - cursor
        cursor = hi
        batches += 1
        if limit_batches is not None and batches >= limit_batches:
            break
    events: list[tuple[str, dict[str, Any]]] = []
    _assemble_dirty(conn, events)
    if publish is not None:
        for topic, data in events:
            publish(topic, data)
    return read


def _flagged(conn: sqlite3.Connection, ids: list[int]) -> set[int]:
    return {
        r[0]
        for r in conn.execute(
            f"SELECT id FROM http_transactions WHERE host_mismatch AND id IN ({','.join('?' * len(ids))})", ids
        )
    }


def rebuild(conn: sqlite3.Connection, opts: dict[str, Any]) -> Iterator[tuple[int, int]]:
    """The rebuild-conversations job (§13.7): progress (processed, total) over claimed transactions."""
    with LOCK:
        # Set until it finishes: one stopped half-way (its process killed) is started again when
        # maintenance starts (service.py), and GET /api/maintenance/status says it is needed.
        write_txn(conn, lambda: _meta_set(conn, REBUILD_UNFINISHED, 1))
        rules = load_rules(conn)
        total = count_claimed(conn, rules)
        yield 0, total
        flagged_col = _host_mismatch(conn)
        processed, lo = 0, 0
        for hi, batch in claimed_rows(conn, rules, 0):
            flagged = _flagged(conn, [t.id for t, _ in batch]) if flagged_col and batch else set()
            store_batch(conn, lo, hi, _dissected(batch, flagged), None)
            processed += len(batch)
            lo = hi
            yield processed, max(total, processed)
        # Rows of transactions deleted (or unclaimed) above the last one read.
        write_txn(conn, lambda: conn.execute("DELETE FROM llm_requests WHERE transaction_id > ?", (lo,)))
        write_txn(conn, lambda: conn.execute("DELETE FROM llm_refs WHERE transaction_id > ?", (lo,)))
        produced: set[str] = set()
        roots: dict[str, None] = {}
        for (s,) in conn.execute("SELECT DISTINCT session FROM llm_requests ORDER BY session").fetchall():
            roots[unit_root(conn, s)] = None
        for root in roots:
            assemble_and_store(conn, root, None, produced)
        stale = [r[0] for r in conn.execute("SELECT id FROM conversations").fetchall() if r[0] not in produced]

        def finish() -> None:
            for cid in stale:
                conn.execute("DELETE FROM conversations WHERE id = ?", (cid,))
                conn.execute("UPDATE http_transactions SET conversation_id = NULL WHERE conversation_id = ?", (cid,))
            conn.execute("DELETE FROM llm_dirty")
            _meta_set(conn, "conversations_cursor", max(lo, meta_get(conn, "conversations_cursor")))
            _meta_set(conn, "assembler_version", ASSEMBLER_VERSION)
            _meta_set(conn, REBUILD_UNFINISHED, 0)

        write_txn(conn, finish)
        yield max(total, processed), max(total, processed)


register("rebuild-conversations", rebuild)
