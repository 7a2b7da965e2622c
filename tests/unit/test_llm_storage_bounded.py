"""What LLM traffic costs in the database (SPEC §13, §15 "storage that stays bounded").

An LLM client sends the whole conversation with each request. The extraction of each request
used to be kept whole, as JSON: a 40-turn session stored its history 40 times over (an outside
run measured ~63 KB per request, more than was sent). Now only what assembly reads is kept
whole (zstd); the other requests keep a thin extraction, and a thin one needed again is dissected
again from its transaction (greyproxy/llm/stored.py). And the size cap drops the LLM tables too:
before, it measured them but dropped only transactions and logs, so with decoded LLM traffic it
could never get under the cap and deleted every transaction and log as it arrived.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

import llm_db
import llm_fixtures as F
from greyproxy.llm import stored
from services.maintenance import assembler as AS
from services.maintenance.jobs import CAP_LOW_WATER, MIB, size_cap, used_bytes

TURNS = 40


def _session(turns: int = TURNS, t0: float = F.T0, sid: str = F.SID, container: str = "claude") -> list[dict[str, Any]]:
    """A Claude Code session whose requests repeat the conversation so far, ~1.5 KB more each turn."""
    h = {"user-agent": [F.CLAUDE_UA]}
    messages: list[dict[str, Any]] = []
    rows = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"prompt {i}: " + os.urandom(400).hex()})
        rows.append(
            F.row(
                F.ANTHROPIC,
                F.claude_request(list(messages), F.MAIN_SYSTEM, sid=sid),
                F.anthropic_sse([f"answer {i}: " + os.urandom(300).hex()]),
                ts=t0 + 5 * i,
                req_headers=h,
                container=container,
            )
        )
        messages.append({"role": "assistant", "content": f"answer {i}"})
    return rows


def _forms(conn: sqlite3.Connection) -> dict[int, int]:
    return dict(conn.execute("SELECT transaction_id, extraction_form FROM llm_requests"))


def _stored_bytes(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT SUM(length(extraction)) FROM llm_requests").fetchone()[0]


def _turns(conn: sqlite3.Connection, sid: str = F.SID) -> list[str]:
    conv = llm_db.conversation(conn, f"session_{sid}")
    assert conv is not None
    return [t["user_prompt"] for t in conv["turns"]]


def _cap(conn: sqlite3.Connection, mib: float) -> dict[str, int]:
    """One size-cap run to its end (its bodies' age judged at F.T0); what it says it dropped."""
    job = size_cap(conn, {"max_database_mib": mib, "now": F.T0})
    while True:
        try:
            next(job)
        except StopIteration as end:
            return end.value


@pytest.fixture
def conn(tmp_path: Path):
    c = llm_db.new_store(tmp_path / "a.db")
    yield c
    c.close()


def test_only_the_newest_request_keeps_its_whole_extraction(conn) -> None:
    rows = _session()
    whole = 0
    ids = []
    for r in rows:  # one request per pass, as a live session comes in
        ids += llm_db.insert(conn, [r])
        AS.run_pass(conn)
        whole += len(orjson.dumps(json.loads(r["request_body"])))
    forms = _forms(conn)
    assert forms[ids[-1]] == stored.FULL_ZSTD
    assert all(forms[i] == stored.THIN for i in ids[:-1])
    # Before: every extraction whole, about the request bodies again. Now a few KB per request.
    assert _stored_bytes(conn) < whole / 20, (_stored_bytes(conn), whole)
    assert len(_turns(conn)) == TURNS
    # The transaction detail's `llm.response` is in the thin form too.
    value, form = conn.execute(
        "SELECT extraction, extraction_form FROM llm_requests WHERE transaction_id = ?", (ids[3],)
    ).fetchone()
    assert stored.load(value, form)["response"]["text"].startswith("answer 3: ")


def test_the_same_conversations_as_with_whole_extractions(conn, tmp_path: Path) -> None:
    """The thin forms change what is stored, not what is assembled: a rebuild (which keeps every
    extraction thin, then makes whole those assembly reads) gives the same conversation."""
    rows = _session(12)
    for r in rows:
        llm_db.insert(conn, [r])
        AS.run_pass(conn)
    before = llm_db.snapshot(conn)
    list(AS.rebuild(conn, {}))
    assert llm_db.snapshot(conn) == before
    forms = _forms(conn)
    assert sorted(forms.values()) == [stored.FULL_ZSTD] + [stored.THIN] * 11


def test_a_thin_extraction_needed_again_is_dissected_again_from_its_transaction(conn) -> None:
    rows = _session(6)
    ids = []
    for r in rows:
        ids += llm_db.insert(conn, [r])
        AS.run_pass(conn)
    assert _forms(conn)[ids[4]] == stored.THIN
    # The newest request goes (as the retention or the size cap would take it): request 5 is the
    # conversation's newest again, and its messages come from its stored body.
    conn.execute("DELETE FROM llm_requests WHERE transaction_id = ?", (ids[5],))
    conn.execute("DELETE FROM http_transactions WHERE id = ?", (ids[5],))
    conn.execute("INSERT INTO llm_dirty (session) VALUES (?)", (F.SID,))
    AS.run_pass(conn)
    assert len(_turns(conn)) == 5
    assert _forms(conn)[ids[4]] == stored.FULL_ZSTD  # read, so whole again
    # With its body gone too, what is left is the thin form: no messages, no failure.
    conn.execute("DELETE FROM llm_requests WHERE transaction_id = ?", (ids[4],))
    conn.execute("UPDATE http_transactions SET request_body = NULL WHERE id = ?", (ids[3],))
    conn.execute("INSERT INTO llm_dirty (session) VALUES (?)", (F.SID,))
    AS.run_pass(conn)
    conv = llm_db.conversation(conn, f"session_{F.SID}")
    assert conv is not None and conv["turns"] == []


def test_rows_stored_before_the_forms_are_read_and_made_thin(conn) -> None:
    rows = _session(4)
    ids = llm_db.insert(conn, rows[:3])
    AS.run_pass(conn)
    # As migration 12 found the rows: every extraction whole, as JSON text (form 0).
    legacy = [(orjson.dumps(AS._extraction(conn, tid)[0]).decode(), tid) for tid in ids]
    conn.executemany("UPDATE llm_requests SET extraction = ?, extraction_form = 0 WHERE transaction_id = ?", legacy)
    assert set(_forms(conn).values()) == {stored.FULL_TEXT}
    ids += llm_db.insert(conn, rows[3:])
    AS.run_pass(conn)
    forms = _forms(conn)
    assert [forms[i] for i in ids] == [stored.THIN] * 3 + [stored.FULL_ZSTD]
    assert len(_turns(conn)) == 4


# ----------------------------------------------------------------------------- the size cap


def test_the_size_cap_drops_llm_rows_and_conversations_and_keeps_the_newest(tmp_path: Path) -> None:
    conn = llm_db.new_store(tmp_path / "g.db")
    sessions = 12
    for k in range(sessions):  # sessions one after another, each a different conversation
        sid = f"00000000-0000-4000-8000-{k:012d}"
        for r in _session(10, t0=F.T0 + 1000 * k, sid=sid):
            llm_db.insert(conn, [r])
        AS.run_pass(conn)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    total = used_bytes(conn)
    cap = total / MIB / 2  # half of what is there
    dropped = _cap(conn, cap)
    assert dropped["exhausted"] == 0, dropped
    assert dropped["transactions"] > 0 and dropped["conversations"] > 0
    assert used_bytes(conn) <= CAP_LOW_WATER * cap * MIB + 4 * MIB
    left = conn.execute("SELECT MIN(id), COUNT(*) FROM http_transactions").fetchone()
    assert 0 < left[1] < sessions * 10  # the newest kept: not everything gone
    # Nothing of a dropped conversation is left, and the newest conversations are there.
    assert (
        conn.execute(
            "SELECT COUNT(*) FROM llm_requests WHERE session NOT IN (SELECT unit FROM conversations)"
        ).fetchone()[0]
        == 0
    )
    newest = f"session_00000000-0000-4000-8000-{sessions - 1:012d}"
    assert llm_db.conversation(conn, newest) is not None
    oldest = "session_00000000-0000-4000-8000-000000000000"
    assert llm_db.conversation(conn, oldest) is None
    conn.close()


def test_the_assembled_conversation_is_kept_compressed_and_old_rows_still_read(conn) -> None:
    """Its turns and messages repeat the same text: 152 KB of JSON for a 40-turn session of
    bench/body_storage.py, ~23 KB compressed."""
    for r in _session(8):
        llm_db.insert(conn, [r])
        AS.run_pass(conn)
    cid = f"session_{F.SID}"
    kind, value = conn.execute("SELECT typeof(data), data FROM conversations WHERE id = ?", (cid,)).fetchone()
    assert kind == "blob" and len(value) < len(orjson.dumps(stored.load_conversation(value))) / 2
    conv = stored.load_conversation(value)
    assert len(conv["turns"]) == 8
    # A row written before (JSON text) reads the same, and the next pass that changes it rewrites it.
    conn.execute("UPDATE conversations SET data = ? WHERE id = ?", (orjson.dumps(conv).decode(), cid))
    assert llm_db.conversation(conn, cid) == conv


def test_the_size_cap_drops_a_unit_whole_and_a_kept_one_assembles_the_same(tmp_path: Path) -> None:
    """An outside run: with the cap dropping the llm_requests rows of an active session's early
    transactions, its next assembly numbered the subagents anew and linked the parent's Agent calls
    to the wrong ones, and subagent conversations (which end before their parent) were dropped
    while the parent still linked them. Now a unit of linked sessions goes whole, by its last end;
    one that is kept keeps what it is assembled from."""
    conn = llm_db.new_store(tmp_path / "g.db")
    rows = F.claude_code_session(F.T0)  # a main thread, a subagent, a utility request
    llm_db.insert(conn, rows[:-1])
    AS.run_pass(conn)
    filler = (
        "INSERT INTO http_transactions (timestamp, container_name, destination_host, destination_port, method,"
        " url, response_body, response_body_codec, response_body_size) VALUES (?, 'c', 'h', 80, 'GET', ?, ?, 0, ?)"
    )
    for i in range(300):  # plain traffic after the session's start: ~2.5 MiB
        conn.execute(filler, (F.T0 + 10 + i, f"http://h/{i}", os.urandom(8192), 8192))
    last = dict(rows[-1], timestamp=F.T0 + 400)  # the session goes on after it
    llm_db.insert(conn, [last])
    AS.run_pass(conn)
    main_id, sub_id = f"session_{F.SID}", f"session_{F.SID}/subagent_2000_1"
    before = llm_db.snapshot(conn)["conversations"]
    assert before[main_id]["linked_subagents"][0]["conversation_id"] == sub_id
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    dropped = _cap(conn, used_bytes(conn) / MIB / 2)
    assert dropped["transactions"] > 0 and dropped["conversations"] == 0, dropped
    oldest = conn.execute("SELECT MIN(timestamp) FROM http_transactions").fetchone()[0]
    assert oldest > F.T0 + 8  # the session's early transactions are gone...
    assert llm_db.snapshot(conn)["conversations"] == before  # ...its conversations are not
    conn.execute("INSERT INTO llm_dirty (session) VALUES (?)", (F.SID,))
    AS.run_pass(conn)  # and assembled again they are the same: the same subagent, linked the same
    assert llm_db.snapshot(conn)["conversations"] == before
    # Once the session's last request is older than the data kept, the unit goes whole.
    conn.execute("DELETE FROM http_transactions")
    for i in range(300):
        conn.execute(filler, (F.T0 + 1000 + i, f"http://h/{i}", os.urandom(8192), 8192))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _cap(conn, used_bytes(conn) / MIB / 2)
    assert llm_db.snapshot(conn)["conversations"] == {}
    assert conn.execute("SELECT COUNT(*) FROM llm_requests").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM llm_refs").fetchone()[0] == 0
    conn.close()


def test_the_listing_reads_the_list_form_and_rows_written_before_it_list_the_same(tmp_path: Path) -> None:
    """SPEC §13.6 (the conversation list), §15 (bounded storage). GET /api/conversations used to decompress and parse each item's whole detail (turns and
    messages: MBs for a long session) to drop most of it; the assembler now writes the list form
    beside it (`conversations.item`, migration 13). Both give the same items, subagents included."""
    from greyproxy.store.db import open_database
    from services.api import llm as api

    conn = llm_db.new_store(tmp_path / "a.db")
    llm_db.insert(conn, F.claude_code_session())
    AS.run_pass(conn)
    db = open_database(tmp_path / "a.db")
    try:
        assert conn.execute("SELECT COUNT(*) FROM conversations WHERE item IS NULL").fetchone()[0] == 0
        items, total = api.list_conversations({}, 50, 0)
        parent = items[0]["id"]
        subs, n = api.list_subagents(parent)
        assert total == 1 and n >= 1
        detail = api.get_conversation(parent)
        assert detail is not None and detail["turns"]
        assert items[0] == {k: v for k, v in detail.items() if k not in ("system_prompt", "turns", "messages")}
        assert list(items[0]) == [k for k in detail if k not in ("system_prompt", "turns", "messages")]
        conn.execute("UPDATE conversations SET item = NULL")  # rows written before migration 13
        assert api.list_conversations({}, 50, 0) == (items, total)
        assert api.list_subagents(parent) == (subs, n)
    finally:
        db.close()
        conn.close()
