"""Releasing a claimed identity ends the credential sessions bound to it (SPEC §16: a session naming
a claimed identity substitutes only on that identity's connections; released, the name is
anyone's). In the database, with the claim, in one transaction (store/identities.release); in the
proxy, at once when it loads the claims without it (IdentityGuard.on_released →
LiveCredentials.release), before its next credentials load. A rotation ends nothing."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from greyproxy.credentials.substitute import Live
from greyproxy.store import identities, open_database, sessions
from services.proxy.credentials import KEY_OK, LiveCredentials, Snapshot
from services.proxy.hooks import CredentialSubstitution, Flow
from services.proxy.identities import IdentityGuard
from services.proxy import http1
from harness.fakes import Journal, Publisher


def _session(sid: str, container: str) -> None:
    cred = sessions.SessionCredential(f"greyproxy:credential:v1:{sid}:{'ab' * 16}", "KEY", ["127.0.0.1"])
    sessions.upsert(sid, container, b"sealed", [cred], [], {}, 600, 1000.0)


def test_release_ends_the_sessions_naming_the_claim_in_one_transaction(tmp_path: Path) -> None:
    db = open_database(tmp_path / "g.db")
    try:
        assert identities.create("agent", None, "scrypt$1$1$1$x$y") is not None
        _session("gw-a1", "agent")
        _session("gw-a2", "agent")
        _session("gw-b", "other")
        assert identities.release("nobody") is None  # not claimed: nothing changes
        assert identities.release("agent") == ["gw-a1", "gw-a2"]
        assert set(sessions.owners()) == {"gw-b"}
        assert identities.list_all() == []
        assert identities.release("agent") is None
    finally:
        db.close()


class _View:
    """The claims the proxy loads (stands in for the store view)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, int]] = []
        self.version = 0

    def claims(self) -> tuple[list[tuple[str, str, int]], int]:
        return list(self.rows), self.version


def _head(ph: str) -> http1.RequestHead:
    got = http1.parse_request_head(f"GET http://127.0.0.1/ HTTP/1.1\r\nX-Api-Key: {ph}\r\n\r\n".encode(), 65536, 100)
    assert got is not None
    return got[0]


def test_the_proxy_stops_substituting_a_released_claims_session_at_once() -> None:
    ph = f"greyproxy:credential:v1:gw-a:{'cd' * 16}"
    other = f"greyproxy:credential:v1:gw-b:{'ef' * 16}"
    snap = Snapshot(
        1,
        {
            ph: Live(ph, "REAL", "KEY", "gw-a", None, ("127.0.0.1",), 4e9),
            other: Live(other, "OTHER", "KEY2", "gw-b", None, ("127.0.0.1",), 4e9),
        },
        KEY_OK,
        {"gw-a": 4e9, "gw-b": 4e9},
        0,
        [],
        {"gw-a": "agent", "gw-b": "someone"},
    )

    async def main() -> None:
        with ThreadPoolExecutor(1) as ex:
            live = LiveCredentials("/nonexistent", ex, None, loader=lambda _p: snap)
            live.map, live.owners, live.sessions, live.key = (
                dict(snap.map),
                dict(snap.owners),
                dict(snap.sessions),
                KEY_OK,
            )
            view = _View()
            ids = IdentityGuard(ex, Journal(), Publisher(), None, view)
            ids.on_released = live.release
            view.rows, view.version = [("agent", "scrypt$1$1$1$x$y", 1)], 1
            await ids.reload()
            hook = CredentialSubstitution(live, ids.claims.claimed)
            lookup = hook._lookup(Flow("agent", "http", "127.0.0.1", 80, _head(ph), None, None, True))
            assert lookup(ph) is not None  # the claim's own connection
            view.rows, view.version = [("agent", "scrypt$2$1$1$x$y", 2)], 2  # rotated: nothing ends
            await ids.reload()
            assert live.lookup(ph) is not None
            view.rows, view.version = [], 3  # released
            await ids.reload()
            unproved = hook._lookup(Flow("agent", "http", "127.0.0.1", 80, _head(ph), None, None, False))
            assert unproved(ph) is None and live.lookup(ph) is None
            assert "gw-a" not in live.owners and "gw-a" not in live.sessions
            assert live.lookup(other) is not None  # another name's session goes on

    asyncio.run(main())
