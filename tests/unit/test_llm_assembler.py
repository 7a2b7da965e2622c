"""The assembler over a real SQLite store (no processes): sessions, turns, subagents, usage, and
incremental passes = a rebuild (SPEC §13.5, acceptance 6, 9, 10, 11, 13, 14's deletion)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llm_db
import llm_fixtures as F
from greyproxy.llm import rules as R
from greyproxy.llm import usage as U
from services.maintenance import assembler as AS
from harness.fuzz import examples

FIELDS = U.FIELDS


@pytest.fixture
def conn(tmp_path: Path):
    c = llm_db.new_store(tmp_path / "a.db")
    c.execute(
        "INSERT INTO endpoint_rules (host_pattern, path_pattern, method, decoder_name, priority, enabled,"
        " user_defined, created_at) VALUES ('litellm.local:4000', '/v1/chat/completions', 'POST', 'openai-chat',"
        " 0, 1, 1, 0)"
    )
    yield c
    c.close()


def feed(conn, rows: list[dict[str, Any]], events: list | None = None) -> list[int]:
    ids = llm_db.insert(conn, rows)
    AS.run_pass(conn, (lambda t, d: events.append((t, d))) if events is not None else None)
    return ids


def rebuild(conn) -> list[tuple[int, int]]:
    return list(AS.rebuild(conn, {}))


def usage_of(conn, tid: int) -> dict[str, Any]:
    return json.loads(conn.execute("SELECT usage FROM llm_requests WHERE transaction_id = ?", (tid,)).fetchone()[0])


def test_turns_from_real_prompts(conn) -> None:
    """Acceptance 6: the second request repeats the first prompt; two turns with those prompts."""
    h = {"user-agent": [F.CLAUDE_UA]}
    r1 = F.row(
        F.ANTHROPIC,
        F.claude_request([{"role": "user", "content": "hello"}], F.MAIN_SYSTEM),
        F.anthropic_sse(["Hi!"]),
        ts=F.T0,
        req_headers=h,
    )
    r2 = F.row(
        F.ANTHROPIC,
        F.claude_request(
            [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "what's your name"},
            ],
            F.MAIN_SYSTEM,
        ),
        F.anthropic_sse(["Claude."]),
        ts=F.T0 + 5,
        req_headers=h,
    )
    ids = feed(conn, [r1, r2])
    conv = llm_db.conversation(conn, f"session_{F.SID}")
    assert [t["user_prompt"] for t in conv["turns"]] == ["hello", "what's your name"]
    assert conv["turns"][0]["request_ids"] == [ids[0]] and conv["turns"][1]["request_ids"] == [ids[1]]
    assert conv["turns"][1]["steps"][-1]["text"] == "Claude."  # the newest response, recovered
    assert conv["turns"][0]["steps"][0]["text"] == "Hi!"
    assert conv["last_stop_reason"] == "end_turn" and conv["last_turn_has_response"] is True


def test_claude_code_subagent_utility_and_usage(conn) -> None:
    """Acceptance 9 and 10."""
    rows = F.claude_code_session()
    ids = feed(conn, rows)
    main_id = f"session_{F.SID}"
    sub_id = f"{main_id}/subagent_2000_1"
    main, sub = llm_db.conversation(conn, main_id), llm_db.conversation(conn, sub_id)
    assert sub["parent_conversation_id"] == main_id and main["parent_conversation_id"] is None
    assert [s["conversation_id"] for s in main["linked_subagents"]] == [sub_id]
    calls = [c for t in main["turns"] for s in t["steps"] for c in s.get("tool_calls", [])]
    agent = [c for c in calls if c["tool"] == "Agent"]
    assert agent and agent[0]["linked_conversation_id"] == sub_id
    assert agent[0]["result_preview"] == "Add is called from main.go:12"
    # The haiku utility request (ids[1]): attributed to main, counted in its usage, not in its turns.
    utility = ids[1]
    assert utility not in main["request_ids"] and main["metadata"]["utility_requests"] == 1
    link = dict(conn.execute("SELECT id, conversation_id FROM http_transactions"))
    assert link[utility] == main_id and link[ids[3]] == sub_id
    expected = U.total([usage_of(conn, t) for t in (ids[0], ids[1], ids[2], ids[5])])
    assert main["usage"] == expected and main["usage"]["requests"] == 4
    turns = U.add_totals(*[t["usage"] for t in main["turns"]], U.total([usage_of(conn, utility)]))
    assert {f: turns[f] for f in FIELDS} == {f: main["usage"][f] for f in FIELDS}
    assert main["usage_with_subagents"] == U.add_totals(main["usage"], sub["usage"])
    assert main["client_name"] == "claude-code" and main["system_prompt"].startswith("You are Claude Code")
    assert main["system_prompt_summary"].endswith("...") and len(main["system_prompt_summary"]) == 503


def test_codex_websocket_session(conn) -> None:
    """Acceptance 8 (assembly): 2 turns, step texts from the response frames, usage from both."""
    ids = feed(conn, F.codex_ws_session())
    conv = llm_db.conversation(conn, f"session_{F.CODEX_KEY}")
    assert conv["provider"] == "openai" and conv["client_name"] == "codex"
    assert [t["user_prompt"] for t in conv["turns"]] == ["hello", "what's your name"]
    assert [[s.get("text") for s in t["steps"]] for t in conv["turns"]] == [["Hello."], ["Codex."]]
    assert conv["usage"]["input_tokens"] == 6500 and conv["usage"]["output_tokens"] == 60
    assert conv["usage"]["requests_with_usage"] == 2
    assert conv["turns"][1]["usage"]["input_tokens"] == 3300
    assert ids[4] not in conv["request_ids"]  # the delta frame is no LLM request


def test_opencode_task_subagent(conn) -> None:
    feed(conn, F.opencode_session())
    parent = llm_db.conversation(conn, f"session_{F.OC_PARENT}")
    child_id = f"session_{F.OC_PARENT}/subagent_1"
    child = llm_db.conversation(conn, child_id)
    assert child["parent_conversation_id"] == parent["id"]
    assert llm_db.conversation(conn, f"session_{F.OC_CHILD}") is None
    task = [c for t in parent["turns"] for s in t["steps"] for c in s.get("tool_calls", []) if c["tool"] == "task"]
    assert task[0]["linked_conversation_id"] == child_id


def test_child_seen_before_parent_names_it_is_rekeyed(conn) -> None:
    rows = F.opencode_session()
    events: list = []
    feed(conn, rows[:3], events)  # the child's request arrives before the parent's tool result names it
    alone = [cid for cid in llm_db.snapshot(conn)["conversations"] if cid.startswith(f"session_{F.OC_CHILD}")]
    assert len(alone) == 1  # a subagent thread of its own session, no parent yet
    events.clear()
    feed(conn, rows[3:], events)
    assert llm_db.conversation(conn, alone[0]) is None
    assert ("conversation.deleted", {"conversation_id": alone[0]}) in events
    assert llm_db.conversation(conn, f"session_{F.OC_PARENT}/subagent_1") is not None


def test_sessionless_chat_per_container_and_gap(conn) -> None:
    """Acceptance 11."""
    a = F.local_chat_session(F.T0, container="alpha")
    b = F.local_chat_session(F.T0 + 1, container="beta")
    later = F.local_chat_session(F.T0 + 1000, container="alpha")
    ids = feed(conn, [a[0], b[0], a[1], b[1], *later])
    convs = llm_db.snapshot(conn)["conversations"]
    assert sorted(convs) == sorted(
        [f"session_inferred_{ids[0]}", f"session_inferred_{ids[1]}", f"session_inferred_{ids[4]}"]
    )
    assert convs[f"session_inferred_{ids[0]}"]["request_ids"] == [ids[0], ids[2]]
    assert convs[f"session_inferred_{ids[0]}"]["container_name"] == "alpha"


def test_sessionless_message_count_falling_by_more_than_one_starts_a_new_group(conn) -> None:
    """SPEC §13.5.1 (acceptance 11's grouping): within one (container, dissector, fingerprint) and
    5 minutes, a request whose message count is at most 1 below the previous one's stays in the
    group; a fall by more than 1 starts a new group, which later requests join."""
    ids = [i for r in F.shrinking_chat_session(container="shrink") for i in feed(conn, [r])]  # a pass each
    counts = dict(conn.execute("SELECT transaction_id, message_count FROM llm_requests").fetchall())
    assert [counts[i] for i in ids] == list(F.SHRINKING_COUNTS)  # 1, 3, 5, 4 (−1), 2 (−2), 3
    sessions = [
        conn.execute("SELECT session FROM llm_requests WHERE transaction_id = ?", (i,)).fetchone()[0] for i in ids
    ]
    assert sessions == [f"inferred_{ids[0]}"] * 4 + [f"inferred_{ids[4]}"] * 2
    convs = llm_db.snapshot(conn)["conversations"]
    assert sorted(convs) == sorted([f"session_inferred_{ids[0]}", f"session_inferred_{ids[4]}"])
    assert convs[f"session_inferred_{ids[0]}"]["request_ids"] == ids[:4]
    assert convs[f"session_inferred_{ids[4]}"]["request_ids"] == ids[4:]
    # A rebuild (one pass over all of them) groups them the same way.
    assert rebuild(conn)
    assert llm_db.snapshot(conn)["conversations"] == convs


def test_truncated_only_is_incomplete(conn) -> None:
    # A generic client's unparseable requests: no tools known, but that is no reason to call them
    # utility (they were, and made no conversation at all): main, one conversation, incomplete. So
    # with a container naming the client.
    for container, t in (("agent", F.T0), ("aider", F.T0 + 5000)):
        ids = feed(conn, [F.truncated(r, 50) for r in F.local_chat_session(t, container=container)])
        conv = llm_db.conversation(conn, f"session_inferred_{ids[0]}")
        assert conv["incomplete"] is True and conv["turns"] == [] and conv["container_name"] == container
        assert conv["incomplete_reason"] == "All request bodies truncated; cannot parse messages"
        assert conv["metadata"]["truncated_requests"] == 2 and conv["metadata"]["utility_requests"] == 0
    assert len(llm_db.snapshot(conn)["conversations"]) == 2


def test_events_new_then_updated(conn) -> None:
    """Acceptance 16 (payloads): first write of an id → new, later → updated; keys as SPEC §13.8."""
    rows = F.claude_code_session()
    events: list = []
    feed(conn, rows[:1], events)
    assert [t for t, _ in events] == ["conversation.new"]
    assert set(events[0][1]) == {"conversation_id", "parent_conversation_id", "turn_count", "ended_at", "usage"}
    events.clear()
    feed(conn, rows[1:3], events)
    assert [(t, d["conversation_id"]) for t, d in events] == [("conversation.updated", f"session_{F.SID}")]
    events.clear()
    AS.run_pass(conn, lambda t, d: events.append(t))
    assert events == []  # nothing changed: no event


def test_rebuild_removes_conversations_of_deleted_transactions(conn) -> None:
    """Acceptance 14 (store side): a conversation whose transactions were deleted is gone after."""
    ids = feed(conn, F.local_chat_session(container="alpha") + F.gemini_session(F.T0 + 50))
    assert f"session_inferred_{ids[0]}" in llm_db.snapshot(conn)["conversations"]
    conn.execute(f"DELETE FROM http_transactions WHERE id IN ({ids[0]}, {ids[1]})")
    steps = rebuild(conn)
    assert steps[-1][0] == steps[-1][1] and steps[0] == (0, 3)
    convs = llm_db.snapshot(conn)["conversations"]
    assert f"session_inferred_{ids[0]}" not in convs and f"session_inferred_{ids[2]}" in convs
    assert AS.meta_get(conn, "assembler_version") >= 1


def test_rule_change_applies_from_the_next_pass_history_by_rebuild(conn) -> None:
    rows = F.local_chat_session(container="alpha", url="http://vllm.lan:8000/v1/chat/completions")
    feed(conn, rows)
    assert llm_db.snapshot(conn)["conversations"] == {}
    conn.execute(
        "INSERT INTO endpoint_rules (host_pattern, path_pattern, method, decoder_name, priority, enabled,"
        " user_defined, created_at) VALUES ('vllm.lan:*', '/v1/*/completions', 'POST', 'openai-chat', 0, 1, 1, 0)"
    )
    AS.run_pass(conn)
    assert llm_db.snapshot(conn)["conversations"] == {}
    rebuild(conn)
    assert len(llm_db.snapshot(conn)["conversations"]) == 1


# ------------------------------------------------------------------ incremental = rebuild (acceptance 13)


def corpus() -> list[list[dict[str, Any]]]:
    """Sessions of a mixed corpus, each a list of rows in its own order."""
    gem2 = F.gemini_session(F.T0 + 30, container="gemini")
    return [
        F.claude_code_session(F.T0),
        F.opencode_session(F.T0 + 1),
        F.codex_ws_session(F.T0 + 2),
        F.gemini_session(F.T0 + 3, container="gemini"),
        gem2,
        F.local_chat_session(F.T0 + 4, container="alpha"),
        F.local_chat_session(F.T0 + 5, container="beta"),
        F.local_chat_session(F.T0 + 400, container="alpha"),
    ]


@settings(max_examples=examples(25), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_incremental_passes_equal_a_rebuild(tmp_path_factory, data) -> None:
    sessions = [list(s) for s in corpus()]
    order: list[dict[str, Any]] = []
    while any(sessions):
        live = [i for i, s in enumerate(sessions) if s]
        i = data.draw(st.sampled_from(live))
        order.append(sessions[i].pop(0))
    per_pass = data.draw(st.integers(1, 4))
    chunk, AS.BODY_CHUNK = AS.BODY_CHUNK, data.draw(st.sampled_from([1, 3, 25]))  # ranges split at any row
    conn = llm_db.new_store(tmp_path_factory.mktemp("p") / "p.db")
    try:
        for k in range(0, len(order), per_pass):
            llm_db.insert(conn, order[k : k + per_pass])
            AS.run_pass(conn)
        incremental = llm_db.snapshot(conn)
        rebuild(conn)
        rebuilt = llm_db.snapshot(conn)
        assert incremental["conversations"].keys() == rebuilt["conversations"].keys()
        for cid in incremental["conversations"]:
            assert incremental["conversations"][cid] == rebuilt["conversations"][cid], cid
        assert incremental["links"] == rebuilt["links"]
        assert len(rebuilt["conversations"]) >= 5  # sessionless ones may join, by the order they came in
    finally:
        AS.BODY_CHUNK = chunk
        conn.close()


def test_user_id_forms_make_one_conversation(conn) -> None:
    """Acceptance 5: legacy string, JSON string and object → the same conversation; "" / null → no key."""
    h = {"user-agent": [F.CLAUDE_UA]}
    msgs: list = []
    rows = []
    for i, kind in enumerate(("legacy", "json", "object")):
        msgs = msgs + [{"role": "user", "content": f"prompt {i}"}]
        rows.append(
            F.row(
                F.ANTHROPIC,
                F.claude_request(list(msgs), F.MAIN_SYSTEM, user_id=kind),
                F.anthropic_sse([f"answer {i}"]),
                ts=F.T0 + i,
                req_headers=h,
            )
        )
        msgs = msgs + [{"role": "assistant", "content": f"answer {i}"}]
    ids = feed(conn, rows)
    conv = llm_db.conversation(conn, "session_9d4a2584-4176-4653-be44-7d5f270feb21")
    assert conv["request_ids"] == ids and conv["turn_count"] == 3
    for value in ("", None):
        r = F.row(
            F.ANTHROPIC,
            F.claude_request([{"role": "user", "content": "x"}], F.MAIN_SYSTEM, user_id=value),
            None,
            ts=F.T0 + 1000,
            container=f"other-{value!r}",
            req_headers=h,
        )
        (tid,) = feed(conn, [r])
        key = conn.execute("SELECT session_key, session FROM llm_requests WHERE transaction_id = ?", (tid,)).fetchone()
        assert key == (None, f"inferred_{tid}")


# ------------------------------------------------------------------ the first look in SQL (issue 18)

_HOSTS = [
    "api.anthropic.com",
    "API.OpenAI.com",
    "api.openai.com",
    "openrouter.ai",
    "example.org",
    "generativelanguage.googleapis.com",
    "litellm.local",
    "vllm.lan",
    "10.0.0.7",
    "Example.ORG",
]
_PATHS = [
    "/v1/messages",
    "/v1/responses",
    "/v1/chat/completions",
    "/api/v1/chat/completions",
    "/v1beta/models/gemini:generateContent",
    "/",
    "/x?u=api.openai.com/v1/responses",
]


@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_candidates_in_sql_claim_exactly_what_decoder_for_claims(tmp_path_factory, data) -> None:
    """Whatever the rows (any host's case, ports, methods, URLs naming another host, deleted rows
    leaving gaps, windows of any size), the ranges claimed_rows yields cover every id once and
    claim exactly the rows decoder_for claims when run on every row."""
    n = data.draw(st.integers(1, 40))
    rows = []
    for _ in range(n):
        host = data.draw(st.sampled_from(_HOSTS))
        port = data.draw(st.sampled_from([443, 80, 4000, 8000]))
        scheme = data.draw(st.sampled_from(["https", "http", "wss"]))
        url_host = data.draw(st.sampled_from([host, host.lower(), "api.openai.com"]))
        url = f"{scheme}://{url_host}{'' if port in (443, 80) else f':{port}'}{data.draw(st.sampled_from(_PATHS))}"
        r = F.row(url, None, None, ts=F.T0, method=data.draw(st.sampled_from(["POST", "GET", "WS_REQ", "WS_RESP"])))
        r["destination_host"], r["destination_port"] = host, port
        rows.append(r)
    conn = llm_db.new_store(tmp_path_factory.mktemp("c") / "c.db")
    window = AS.WINDOW
    try:
        conn.execute(
            "INSERT INTO endpoint_rules (host_pattern, path_pattern, method, decoder_name, priority, enabled,"
            " user_defined, created_at) VALUES (?, '/v1/*', '*', 'openai-chat', 0, 1, 1, 0)",
            (data.draw(st.sampled_from(["litellm.local:4000", "VLLM.lan", "*.lan:8000", "10.0.0.*"])),),
        )
        ids = llm_db.insert(conn, rows)
        gone = data.draw(st.sets(st.sampled_from(ids), max_size=len(ids) // 2))
        conn.executemany("DELETE FROM http_transactions WHERE id = ?", [(i,) for i in gone])
        AS.WINDOW = data.draw(st.sampled_from([1, 2, 5, 2000]))
        after = data.draw(st.sampled_from([0, ids[0], ids[len(ids) // 2]]))
        rules = AS.load_rules(conn)
        every = conn.execute(f"SELECT {AS._META_COLS} FROM http_transactions WHERE id > ? ORDER BY id", (after,))
        expected = {
            row[0]: name for row in every.fetchall() if (name := R.decoder_for(rules, AS._txn_meta(row))) is not None
        }
        got: dict[int, str] = {}
        lo = after
        for hi, batch in AS.claimed_rows(conn, rules, after):
            assert hi > lo
            for txn, name in batch:
                assert lo < txn.id <= hi
                got[txn.id] = name
            lo = hi
        top = max(set(ids) - gone, default=0)
        assert lo == max(top, after) and got == expected
        assert AS.count_claimed(conn, rules) == len(
            [
                1
                for row in conn.execute(f"SELECT {AS._META_COLS} FROM http_transactions").fetchall()
                if R.decoder_for(rules, AS._txn_meta(row)) is not None
            ]
        )
    finally:
        AS.WINDOW = window
        conn.close()


def test_builtin_matches_imply_their_first_look() -> None:
    """Each built-in dissector's `matches` implies its declared hosts / URL marks (what the SQL uses)."""
    from greyproxy.llm import dissect as D

    for d in D.DISSECTORS:
        assert d.hosts or d.url_has, d.name
    for host in _HOSTS:
        for path in _PATHS:
            for method in ("POST", "WS_REQ", "WS_RESP"):
                for scheme in ("https", "wss"):
                    t = D.Txn(
                        0, method, f"{scheme}://{host.lower()}{path}", host.lower(), 443, {}, {}, None, None, None, None
                    )
                    for d in D.DISSECTORS:
                        if d.matches(t):
                            assert t.host in d.hosts or any(u in t.url for u in d.url_has), (d.name, t)


def test_a_sessionless_request_stored_before_the_one_sent_just_earlier_stays_in_its_conversation(conn) -> None:
    """Ids follow the order records reach the recorder. With several proxy workers a client's request
    can be stored before the one it sent just before (an outside run: a 156-message request got a
    lower id than the 154-message one sent 0.14 s earlier), and the earlier one, judged against the
    later by id, looked like a conversation of its own (5 of 12 sessions split in two)."""
    msgs: list[dict[str, Any]] = []
    rows = []
    for i in range(6):
        msgs = [*msgs, {"role": "user", "content": f"step {i}"}]
        rows.append(
            F.row(
                F.LOCAL,
                F.chat_request(msgs),
                F.chat_json(f"done {i}"),
                ts=F.T0 + 2 * i,
                container="ooo",
                resp_ct="application/json",
            )
        )
        msgs = [*msgs, {"role": "assistant", "content": f"done {i}"}]
    order = [rows[0], rows[1], rows[3], rows[2], rows[5], rows[4]]  # two pairs stored the other way round
    for r in order:
        feed(conn, [r])
    convs = llm_db.snapshot(conn)["conversations"]
    assert len(convs) == 1, sorted(convs)
    (conv,) = convs.values()
    assert [t["user_prompt"] for t in conv["turns"]] == [f"step {i}" for i in range(6)]
    assert rebuild(conn) and llm_db.snapshot(conn)["conversations"] == convs


def test_a_rebuild_stopped_half_way_is_started_again(conn) -> None:
    """A rebuild whose process was killed left no trace: maintenance did not start it again and
    GET /api/maintenance/status said none was needed (an outside run, kill -9 at 1 925 of 2 254)."""
    from types import SimpleNamespace

    from services.maintenance.service import ConversationLoop

    feed(conn, F.local_chat_session(F.T0, container="alpha"))
    loop = SimpleNamespace(db=SimpleNamespace(connection=lambda: conn))
    assert rebuild(conn)  # (a new store: built with no assembler version yet)
    assert ConversationLoop._needs_rebuild(loop) is None  # type: ignore[arg-type]
    job = AS.rebuild(conn, {})
    next(job)  # started, then its process dies: the generator is never resumed
    assert AS.meta_get(conn, AS.REBUILD_UNFINISHED) == 1
    assert "did not finish" in (ConversationLoop._needs_rebuild(loop) or "")  # type: ignore[arg-type]
    job.close()
    assert AS.LOCK.acquire(blocking=False)  # (its lock went with it)
    AS.LOCK.release()
    assert rebuild(conn)
    assert AS.meta_get(conn, AS.REBUILD_UNFINISHED) == 0
    assert ConversationLoop._needs_rebuild(loop) is None  # type: ignore[arg-type]


# ------------------------------------------------------------------ request bodies that do not parse (cut, invalid)

SCREENSHOT = "iVBORw0KGgoAAAANSUhEUgAA" + "A" * 2_600_000  # a pasted ~2.6 MB base64 PNG
STALE = "Newest request bodies truncated; messages are from an earlier request"
ALL_CUT = "All request bodies truncated; cannot parse messages"


def claude_code_ordered(messages: list[dict[str, Any]], system: Any = F.MAIN_SYSTEM, **kw: Any) -> dict[str, Any]:
    """F.claude_request with Claude Code's key order: `messages` first, then `system`, `tools` and
    `metadata` (the session key): a body cut inside its messages has lost all three."""
    body = F.claude_request(messages, system, **kw)
    return {k: body[k] for k in ("model", "messages", "system", "tools", "metadata", "max_tokens", "stream")}


def cut_at_capture_cap(r: dict[str, Any]) -> dict[str, Any]:
    """`r` as stored when its request body was over capture.maxBodyBytes: its first bytes only."""
    from greyproxy.capture import DEFAULT_MAX_BODY

    raw = r["request_body"].encode()
    assert len(raw) > DEFAULT_MAX_BODY
    return r | {"request_body": raw[:DEFAULT_MAX_BODY].decode("utf-8", "ignore"), "request_body_size": len(raw)}


def haiku_check(ts: float) -> dict[str, Any]:
    """Claude Code's utility request on haiku before a main request (tiny system prompt, no tools)."""
    return F.row(
        F.ANTHROPIC,
        F.claude_request(
            [{"role": "user", "content": "is this a new topic?"}],
            "Analyze if this message indicates a new conversation topic.",
            model="claude-haiku-4-5",
            tools=[],
        ),
        F.anthropic_json('{"isNewTopic": false}', usage={"input_tokens": 90, "output_tokens": 8}),
        ts=ts,
        req_headers={"user-agent": [F.CLAUDE_UA]},
        resp_ct="application/json",
    )


def screenshot_session(session_header: bool) -> list[dict[str, Any]]:
    """The outside tester's run: a Claude Code main thread; the user pastes a screenshot, so every
    later request is over capture.maxBodyBytes and stored cut (its session key after the cut point;
    Claude Code may also send it as a header). A haiku check runs before each main request."""
    h = {"user-agent": [F.CLAUDE_UA]} | ({"X-Claude-Code-Session-Id": [F.SID]} if session_header else {})
    u1 = {"role": "user", "content": "fix the layout"}
    a1 = {"role": "assistant", "content": "Let me look at the CSS."}
    u2 = {
        "role": "user",
        "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": SCREENSHOT}},
            {"type": "text", "text": "why is the button misplaced?"},
        ],
    }
    a2 = {"role": "assistant", "content": "It is absolutely positioned."}
    u3 = {"role": "user", "content": "fix it"}
    return [
        F.row(
            F.ANTHROPIC, claude_code_ordered([u1]), F.anthropic_sse(["Let me look at the CSS."]), ts=F.T0, req_headers=h
        ),
        haiku_check(F.T0 + 29),
        cut_at_capture_cap(
            F.row(
                F.ANTHROPIC,
                claude_code_ordered([u1, a1, u2]),
                F.anthropic_sse(["It is absolutely positioned."]),
                ts=F.T0 + 30,
                req_headers=h,
            )
        ),
        haiku_check(F.T0 + 59),
        cut_at_capture_cap(
            F.row(
                F.ANTHROPIC,
                claude_code_ordered([u1, a1, u2, a2, u3]),
                F.anthropic_sse(["Fixed: the button is in the flex row now."], stop="end_turn"),
                ts=F.T0 + 60,
                req_headers=h,
            )
        ),
    ]


@pytest.mark.parametrize("session_header", [False, True], ids=["key-after-the-cut", "key-in-header"])
def test_requests_cut_by_the_capture_cap_stay_in_their_thread_show_the_newest_answer_and_mark_the_conversation_incomplete(
    conn, session_header: bool
) -> None:
    """A request body over capture.maxBodyBytes is stored cut and cannot be parsed: no system text,
    no tools, no messages. It was judged a utility request by that missing system text and dropped
    out of its conversation (total_requests 1, utility_requests 4, the later answers never shown).
    Now it goes to the thread of its session's latest earlier main/subagent request (SPEC §13.5.3
    judges by what the body shows; a cut body shows nothing), counts in total_requests and
    truncated_requests, is not the best request, and its response is appended as the final step
    (§13.5.4). The conversation's messages are then those of an earlier request: it is marked
    `incomplete` with its own reason (the SPEC's reason is for "no request parsed" only), which is
    what a reader of the conversation needs to know."""
    ids = feed(conn, screenshot_session(session_header))
    main = llm_db.conversation(conn, f"session_{F.SID}")
    assert main["metadata"] == {
        "total_requests": 3,
        "truncated_requests": 2,
        "parseable_requests": 1,
        "messages_in_best_request": 1,
        "best_request_id": ids[0],
        "utility_requests": 2,
    }
    assert main["request_ids"] == [ids[0], ids[2], ids[4]]
    assert [t["user_prompt"] for t in main["turns"]] == ["fix the layout"]
    # The best request's messages hold no assistant message yet; the newest response is appended.
    steps = main["turns"][-1]["steps"]
    assert [s.get("text") for s in steps] == ["Fixed: the button is in the flex row now."]
    assert main["messages"][-1]["content"] == [{"type": "text", "text": "Fixed: the button is in the flex row now."}]
    assert main["last_turn_has_response"] is True and main["last_stop_reason"] == "end_turn"
    assert main["turns"][-1]["api_calls_in_turn"] == 3
    assert main["incomplete"] is True and main["incomplete_reason"] == STALE
    assert main["model"] == "claude-opus-4-6" and main["system_prompt"].startswith("You are Claude Code")
    assert main["usage"] == U.total([usage_of(conn, i) for i in ids]) and main["usage"]["requests"] == 5
    assert set(llm_db.snapshot(conn)["conversations"]) == {main["id"]}
    assert all(link == main["id"] for link in llm_db.snapshot(conn)["links"].values())
    threads = dict(conn.execute("SELECT transaction_id, session FROM llm_requests").fetchall())
    assert {threads[i] for i in ids} == {F.SID}
    assert rebuild(conn) and llm_db.conversation(conn, main["id"]) == main


def test_a_cut_subagent_request_stays_in_its_subagent_conversation(conn) -> None:
    """The latest earlier request of the session is the subagent's: the cut one (no key, no system
    text: a 2 000-byte one made it a subagent) joins that subagent conversation, not main and not
    the discarded utility requests."""
    rows = F.claude_code_session()
    rows[4] = F.truncated(rows[4], 200)
    ids = feed(conn, rows)
    main_id = f"session_{F.SID}"
    main, sub = llm_db.conversation(conn, main_id), llm_db.conversation(conn, f"{main_id}/subagent_2000_1")
    assert sub["metadata"]["total_requests"] == 2 and sub["metadata"]["truncated_requests"] == 1
    assert sub["request_ids"] == [ids[3], ids[4]]
    assert sub["turns"][-1]["steps"][-1]["text"] == "Add is called from main.go:12"  # the cut request's answer
    assert sub["incomplete"] is True and sub["incomplete_reason"] == STALE
    assert main["metadata"]["utility_requests"] == 1 and main["metadata"]["total_requests"] == 3
    assert main["incomplete"] is False and main["incomplete_reason"] is None


def test_a_cut_request_after_only_utility_requests_starts_the_main_conversation_all_truncated(conn) -> None:
    """No earlier main/subagent request in its session: the cut request is main (never utility)."""
    h = {"user-agent": [F.CLAUDE_UA], "X-Claude-Code-Session-Id": [F.SID]}
    big = F.row(
        F.ANTHROPIC,
        claude_code_ordered([{"role": "user", "content": [{"type": "text", "text": SCREENSHOT}]}]),
        F.anthropic_sse(["A screenshot of a login form."]),
        ts=F.T0 + 2,
        req_headers=h,
    )
    ids = feed(conn, [haiku_check(F.T0), cut_at_capture_cap(big)])
    (conv,) = llm_db.snapshot(conn)["conversations"].values()
    assert conv["id"] == f"session_{F.SID}" and conv["request_ids"] == []
    assert conv["incomplete"] is True and conv["incomplete_reason"] == ALL_CUT and conv["turns"] == []
    assert conv["metadata"]["total_requests"] == 1 and conv["metadata"]["truncated_requests"] == 1
    assert conv["metadata"]["utility_requests"] == 1 and conv["last_stop_reason"] == "end_turn"
    assert llm_db.snapshot(conn)["links"] == {ids[0]: conv["id"], ids[1]: conv["id"]}


def test_an_invalid_json_request_of_a_sessionless_client_stays_in_its_conversation(conn) -> None:
    """A generic client (judged by tools) without a session key: the invalid body has no system text
    to fingerprint, so it joins the latest request of its container and dissector in the 5 minutes
    before it (SPEC §13.5.1's first rule), goes to that request's thread, and its answer shows."""
    r1, r2 = F.local_chat_session(container="alpha")
    r2 = r2 | {"request_body": r2["request_body"][:-1] + ",}"}  # a trailing comma: not JSON
    other = F.local_chat_session(F.T0 + 1, container="beta")  # another container meanwhile
    ids = feed(conn, [r1, other[0], r2, other[1]])
    convs = llm_db.snapshot(conn)["conversations"]
    assert sorted(convs) == sorted([f"session_inferred_{ids[0]}", f"session_inferred_{ids[1]}"])
    conv = convs[f"session_inferred_{ids[0]}"]
    assert conv["request_ids"] == [ids[0], ids[2]] and conv["metadata"]["truncated_requests"] == 1
    assert conv["turns"][-1]["steps"][-1]["text"] == "The README has a title only."
    assert conv["incomplete"] is True and conv["incomplete_reason"] == STALE
    assert convs[f"session_inferred_{ids[1]}"]["incomplete"] is False


def truncated_corpus() -> list[list[dict[str, Any]]]:
    """Sessions with requests that do not parse, each a list of rows in its own order."""
    claude = F.claude_code_session(F.T0)
    claude[2] = F.truncated(claude[2], 300)  # a main request (after a main one), cut
    claude[4] = F.truncated(claude[4], 200)  # a subagent request (after a subagent one), cut
    other = F.claude_code_session(F.T0 + 2, sid="0e0f3a5c-3a7e-4c55-9d1b-5b1d4b6c7a80", container="claude2")
    other[2] = F.truncated(other[2], 100)
    chat = F.local_chat_session(F.T0 + 3, container="alpha")
    chat[1] = chat[1] | {"request_body": chat[1]["request_body"][:-1] + ",}"}
    cut_only = [F.truncated(r, 50) for r in F.local_chat_session(F.T0 + 4, container="beta")]
    return [claude, other, chat, cut_only, F.opencode_session(F.T0 + 5)]


@settings(max_examples=examples(25), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_incremental_passes_equal_a_rebuild_with_requests_that_do_not_parse(tmp_path_factory, data) -> None:
    """The invariant (SPEC §13.1) with cut and invalid bodies, whose session and thread come from
    earlier requests: any interleaving, any number of rows per pass."""
    sessions = [list(s) for s in truncated_corpus()]
    order: list[dict[str, Any]] = []
    while any(sessions):
        i = data.draw(st.sampled_from([i for i, s in enumerate(sessions) if s]))
        order.append(sessions[i].pop(0))
    per_pass = data.draw(st.integers(1, 4))
    conn = llm_db.new_store(tmp_path_factory.mktemp("t") / "t.db")
    try:
        conn.execute(
            "INSERT INTO endpoint_rules (host_pattern, path_pattern, method, decoder_name, priority, enabled,"
            " user_defined, created_at) VALUES ('litellm.local:4000', '/v1/chat/completions', 'POST', 'openai-chat',"
            " 0, 1, 1, 0)"
        )
        for k in range(0, len(order), per_pass):
            llm_db.insert(conn, order[k : k + per_pass])
            AS.run_pass(conn)
        incremental = llm_db.snapshot(conn)
        rebuild(conn)
        assert llm_db.snapshot(conn) == incremental
        main = incremental["conversations"][f"session_{F.SID}"]
        sub = incremental["conversations"][f"session_{F.SID}/subagent_2000_1"]
        assert main["metadata"]["truncated_requests"] == 1 and main["incomplete"] is False  # a newer one parsed
        assert sub["metadata"]["truncated_requests"] == 1 and sub["incomplete_reason"] == STALE
    finally:
        conn.close()


# ------------------------------------------------------------------ thinking previews


def test_a_steps_thinking_preview_is_cut_once(conn) -> None:
    """SPEC §13.2/§13.5.5: thinking is cut at 500 bytes (a UTF-8 boundary) + `...`, once. The step's
    preview cut the block's already-cut text again: 503 bytes ending in five dots."""
    long_thinking = "考" * 400
    r = F.row(
        F.ANTHROPIC,
        F.claude_request([{"role": "user", "content": "think"}], F.MAIN_SYSTEM),
        F.anthropic_sse(["Done."], thinking=long_thinking),
        ts=F.T0,
        req_headers={"user-agent": [F.CLAUDE_UA]},
    )
    two_blocks = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "first thought"},
            {"type": "thinking", "thinking": long_thinking},
            {"type": "text", "text": "Done."},
        ],
    }
    r2 = F.row(
        F.ANTHROPIC,
        F.claude_request(
            [{"role": "user", "content": "think"}, two_blocks, {"role": "user", "content": "again"}], F.MAIN_SYSTEM
        ),
        F.anthropic_sse(["Again done."], thinking="short"),
        ts=F.T0 + 5,
        req_headers={"user-agent": [F.CLAUDE_UA]},
    )
    feed(conn, [r])
    conv = llm_db.conversation(conn, f"session_{F.SID}")
    expected = "考" * 166 + "..."  # 498 bytes (a 167th character would pass 500) and the dots
    (block,) = [b for b in conv["messages"][-1]["content"] if b["type"] == "thinking"]
    assert block["thinking"] == expected
    assert conv["turns"][0]["steps"][-1]["thinking_preview"] == expected
    feed(conn, [r2])
    conv = llm_db.conversation(conn, f"session_{F.SID}")
    first, second = conv["turns"][0]["steps"][0], conv["turns"][1]["steps"][-1]
    joined = "first thought\n" + long_thinking  # the two blocks joined by a newline, then cut once
    cut = joined.encode()[:500].decode("utf-8", "ignore")
    assert first["thinking_preview"] == cut + "..." and len(cut.encode()) <= 500
    assert second["thinking_preview"] == "short"
