"""The proxy's live credential map (SPEC §12.6): placeholder → (value, label, session id | null,
hosts, expires_at), decrypted by this process from the `sessions` / `global_credentials` tables
with `session.key`, in a worker thread, and swapped whole. A value leaves this process only inside
the upstream request.

Kept current like the rule set: `credentials.reload` (req/rep, from the API after each write), a
version check every 2 s, and one more check (shared by concurrent misses) before an unknown
placeholder is refused. Expiry is exact: `lookup` compares `expires_at` with the clock.

Also here: the per-request counters (`credential_use` journal records every 2 s) and the
heartbeat stats (`credentials: {live_sessions, live_globals, substituted, refused, key}`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import orjson

from bus import records
from bus.journal import JournalWriter
from greyproxy.credentials import crypto
from greyproxy.credentials.substitute import Live

log = logging.getLogger("greyproxy.proxy")

CHECK_EVERY = 2.0  # seconds between version checks (heals a missed reload call)
USE_FLUSH_EVERY = 2.0  # seconds between credential_use journal records

KEY_OK, KEY_MISSING, KEY_UNUSABLE = "ok", "missing", "unusable"


def _read_version() -> int:
    from greyproxy.store.models import meta_value

    return meta_value("credentials_version")


class Snapshot:
    """One decrypted load: the map, the version it matches, the key's state."""

    __slots__ = ("version", "map", "key", "sessions", "globals", "undecryptable", "owners")

    def __init__(
        self,
        version: int,
        mapping: dict[str, Live],
        key: str,
        sessions: dict[str, float],
        globals_: int,
        undecryptable: list[str],
        owners: dict[str, str] | None = None,
    ) -> None:
        self.version, self.map, self.key = version, mapping, key
        self.sessions, self.globals, self.undecryptable = sessions, globals_, undecryptable
        self.owners = owners or {}  # session id → its container_name


def load_snapshot(key_file: Path) -> Snapshot:
    """Read the tables and decrypt them (a worker thread: database and AES work off the loop)."""
    from greyproxy.store import database, global_credentials, sessions

    try:
        key = crypto.load_key(key_file)
        state = KEY_OK if key is not None else KEY_MISSING
    except crypto.KeyUnusable:
        key, state = None, KEY_UNUSABLE
    with database.atomic():  # one read transaction: the version matches the rows
        version = _read_version()
        srows = sessions.sealed_rows()
        grows = global_credentials.sealed_rows()
        owners = sessions.owners()
    mapping: dict[str, Live] = {}
    bad: list[str] = []
    if key is None:
        return Snapshot(version, mapping, state, {}, 0, [])
    live_sessions: dict[str, float] = {}
    for sid, blob, expires, creds, _globals in srows:
        try:
            values = orjson.loads(crypto.open_sealed(key, blob, crypto.aad_session(sid)))
        except (crypto.SealError, orjson.JSONDecodeError):
            bad.append(f"session {sid}")
            continue
        live_sessions[sid] = float(expires)
        for ph, label, hosts in creds:
            value = values.get(ph)
            if isinstance(value, str):
                mapping[ph] = Live(ph, value, label, sid, None, tuple(hosts), float(expires))
    for cid, label, ph, blob, hosts in grows:
        try:
            value = crypto.open_sealed(key, blob, crypto.aad_global(cid)).decode("utf-8")
        except (crypto.SealError, UnicodeDecodeError):
            bad.append(f"global {label}")
            continue
        mapping[ph] = Live(ph, value, label, None, cid, tuple(hosts), None)
    return Snapshot(
        version, mapping, state, live_sessions, len(grows) - sum(b.startswith("global ") for b in bad), bad, owners
    )


class LiveCredentials:
    def __init__(
        self,
        data_dir: str | Path,
        executor: Executor,
        journal: JournalWriter | None = None,
        loader: Callable[[Path], Snapshot] = load_snapshot,
        local: bool = True,
    ) -> None:
        self.key_file = crypto.key_path(data_dir)
        self.executor = executor
        self.journal = journal
        self.loader = loader
        self.local = local  # False: no database here (proxy.rulesFrom): nothing to load, every placeholder refused
        self.map: dict[str, Live] = {}
        self.version = -1
        self.key = KEY_MISSING
        self.sessions: dict[str, float] = {}  # session id → expires_at
        self.owners: dict[str, str] = {}  # session id → container_name (claimed-identity binding, SPEC §16)
        self.live_globals = 0
        self.substituted = 0
        self.refused: Counter[str] = Counter()
        self.uses: Counter[tuple[str | None, str | None]] = Counter()  # (session_id, credential_id) → requests
        self._lock = asyncio.Lock()
        self._check: asyncio.Future[bool] | None = None
        self._warned: set[str] = set()

    # -- the hot path --
    def lookup(self, placeholder: str) -> Live | None:
        live = self.map.get(placeholder)
        if live is None or (live.expires_at is not None and live.expires_at <= time.time()):
            return None
        return live

    @property
    def available(self) -> bool:
        return self.key == KEY_OK

    def used(self, credentials: list[Live]) -> None:
        """One substituted request: count it once per session and per global credential."""
        self.substituted += 1
        seen: set[tuple[str | None, str | None]] = set()
        for c in credentials:
            k = (c.session_id, None) if c.session_id is not None else (None, c.credential_id)
            if k not in seen:
                seen.add(k)
                self.uses[k] += 1

    def release(self, names: set[str]) -> int:
        """The claims on `names` went away (IdentityGuard.on_released): the sessions bound to them
        stop substituting now; how many. The API ended them in the database with the claim, in one
        transaction (store/identities.release), so the next load has them gone as well; this only
        closes the moment between loading the claims and loading the credentials (SPEC §16: a
        released name is anyone's, and its session substituted only for the claim's connections)."""
        ended = {sid for sid, owner in self.owners.items() if owner in names}
        if not ended:
            return 0
        self.map = {ph: c for ph, c in self.map.items() if c.session_id not in ended}
        for sid in ended:
            self.owners.pop(sid, None)
            self.sessions.pop(sid, None)
        log.info("credentials: %d session(s) bound to a released identity no longer substitute", len(ended))
        return len(ended)

    # -- loading --
    async def reload(self, force: bool = False) -> bool:
        """Load again when the version moved, the key was not usable, or `force`. True if swapped."""
        if not self.local:
            if self.version == -1:
                self.version = 0
                log.warning(
                    "credential substitution needs the database: this proxy refuses every placeholder "
                    "(credentials_unavailable)"
                )
            return False
        loop = asyncio.get_running_loop()
        async with self._lock:
            if not force and self.key == KEY_OK:
                if await loop.run_in_executor(self.executor, _read_version) == self.version:
                    return False
            snap = await loop.run_in_executor(self.executor, self.loader, self.key_file)
            changed = snap.version != self.version or snap.key != self.key or force
            if snap.key != self.key:
                level = logging.INFO if snap.key == KEY_OK else logging.ERROR
                log.log(level, "credential key %s: %s", self.key_file, snap.key)
            self.map, self.version, self.key = snap.map, snap.version, snap.key
            self.sessions, self.live_globals = snap.sessions, snap.globals
            self.owners = snap.owners
            for what in snap.undecryptable:
                if what not in self._warned:
                    self._warned.add(what)
                    log.warning(
                        "credentials: %s does not decrypt with %s; its placeholders are refused", what, self.key_file
                    )
            if changed:
                log.debug(
                    "credentials loaded: %d placeholders (version %d, key %s)", len(snap.map), snap.version, snap.key
                )
            return changed

    async def recheck(self) -> bool:
        """One version check for an unknown placeholder; concurrent misses share it."""
        if self._check is None or self._check.done():
            self._check = asyncio.ensure_future(self.reload())
        try:
            return await asyncio.shield(self._check)
        except Exception:
            log.exception("credential reload failed")
            return False

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                await self.reload()
            except Exception:
                log.exception("credential version check failed")
            self.flush_uses()

    def flush_uses(self) -> None:
        if not self.uses or self.journal is None:
            return
        uses, self.uses = self.uses, Counter()
        ts = time.time()
        for (sid, cid), n in uses.items():
            self.journal.append(records.CREDENTIAL_USE, records.credential_use_record(sid, cid, n, ts))

    def stats(self) -> dict[str, Any]:
        now = time.time()
        return {
            "live_sessions": sum(1 for e in self.sessions.values() if e > now),
            "live_globals": self.live_globals,
            "substituted": self.substituted,
            "refused": dict(self.refused),
            "key": self.key,
        }
