"""The credential tables without the API (SPEC §12.2-§12.6): upsert keeps or resets created_at and
the counter, a placeholder belongs to one live session, the live-session cap, heartbeats cannot
revive, the sweep, the version the proxy follows (moved by writes, not by counters), and no value
in clear in the database file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from greyproxy.credentials import crypto
from greyproxy.credentials.placeholders import mint
from greyproxy.store import global_credentials, open_database, sessions
from greyproxy.store.models import meta_value

SC = sessions.SessionCredential


@pytest.fixture()
def db(tmp_path: Path):  # noqa: ANN201
    d = open_database(tmp_path / "g.db")
    yield d
    d.close()


def test_upsert_conflicts_and_expiry(db, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    a, b = mint("s1"), mint("s1")
    row, removed = sessions.upsert("s1", "c", b"x", [SC(a, "A", ["h"]), SC(b, "B", [])], ["G"], {"k": "v"}, 60, 1000.0)
    assert removed == [] and row["created_at"] == 1000.0 and row["expires_at"] == 1060.0
    db.execute_sql("UPDATE sessions SET substitution_count = 5 WHERE session_id = 's1'")
    v = meta_value("credentials_version")
    db.execute_sql(sessions.ADD_USE, (1, 1001.0, "s1"))
    assert meta_value("credentials_version") == v  # counters do not move the version
    # Upsert of a live session: created_at and the counter kept; the old placeholder b is gone.
    row, _ = sessions.upsert("s1", "c2", b"y", [SC(a, "A", [])], [], {}, 30, 1010.0)
    assert (row["created_at"], row["substitution_count"], row["expires_at"]) == (1000.0, 6, 1040.0)
    assert meta_value("credentials_version") > v
    assert [c["label"] for c in sessions.list_live(1020.0)[0]["credentials"]] == ["A"]
    # Another live session may not take a placeholder; once s1 expired it may (s1 is removed).
    with pytest.raises(sessions.Conflict, match="live session s1"):
        sessions.upsert("s2", "c", b"z", [SC(a, "A2", [])], [], {}, 60, 1020.0)
    row, removed = sessions.upsert("s2", "c", b"z", [SC(a, "A2", [])], [], {}, 60, 1050.0)
    assert removed == ["s1"] and sessions.get("s1") is None
    # An expired session's own upsert resets created_at and the counter.
    db.execute_sql("UPDATE sessions SET substitution_count = 3 WHERE session_id = 's2'")
    row, removed = sessions.upsert("s2", "c", b"z", [SC(a, "A2", [])], [], {}, 60, 2000.0)
    assert (row["created_at"], row["substitution_count"], removed) == (2000.0, 0, ["s2"])
    # Heartbeat: moves a live one, never revives; the sweep.
    assert sessions.heartbeat("s2", 2030.0) == 2090.0
    assert sessions.heartbeat("s2", 2091.0) is None and sessions.heartbeat("nope", 0.0) is None
    assert sessions.remove_expired(2091.0) == ["s2"] and sessions.list_live(0.0) == []
    assert db.execute_sql("SELECT COUNT(*) FROM session_credentials").fetchone()[0] == 0  # cascaded


def test_live_session_cap(db, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(sessions, "MAX_LIVE", 3)
    for i in range(3):
        sessions.upsert(f"s{i}", "c", b"x", [SC(mint(f"s{i}"), "L", [])], [], {}, 60, 100.0)
    with pytest.raises(sessions.Conflict, match="more than 3 live sessions"):
        sessions.upsert("s9", "c", b"x", [], ["G"], {}, 60, 100.0)
    sessions.upsert("s0", "c", b"x", [], ["G"], {}, 60, 100.0)  # an upsert of a live one is fine
    sessions.upsert("s9", "c", b"x", [], ["G"], {}, 60, 200.0)  # the others expired


def test_globals_and_nothing_in_clear(db, tmp_path: Path) -> None:  # noqa: ANN001
    key, _ = crypto.create_key(tmp_path / "session.key")
    value = "gv-" + os.urandom(8).hex()
    ph = mint("global")
    row = global_credentials.insert(
        "cred_0123456789abcdef",
        "G",
        ph,
        crypto.seal(key, value.encode(), crypto.aad_global("cred_0123456789abcdef")),
        "***",
        ["h"],
        5.0,
    )
    assert row["hosts"] == ["h"] and row["placeholder"] == ph and "value_sealed" not in row
    with pytest.raises(global_credentials.LabelTaken):
        global_credentials.insert("cred_1123456789abcdef", "G", mint("global"), b"x", "***", [], 6.0)
    assert global_credentials.placeholders_of(["G", "H"]) == {"G": ph}
    ((cid, label, got_ph, blob, hosts),) = global_credentials.sealed_rows()
    assert crypto.open_sealed(key, blob, crypto.aad_global(cid)).decode() == value
    db.execute_sql("PRAGMA wal_checkpoint(FULL)")
    for suffix in ("", "-wal"):
        f = Path(f"{tmp_path / 'g.db'}{suffix}")
        assert not f.exists() or value.encode() not in f.read_bytes()
    assert global_credentials.delete(cid)["label"] == "G" and global_credentials.delete(cid) is None
