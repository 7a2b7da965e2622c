"""Claimed identities in the proxy (SPEC §16): who may use a claimed proxy user name.

`IdentityGuard.check(client, name, secret, ...)` is asked once per connection (again on a kept-alive
connection only when the name, the secret or the loaded claims changed). An unclaimed name passes
at once; a claimed one passes when its secret was verified before in this process (a dict lookup
and a constant-time comparison of a SHA-256 fingerprint); otherwise scrypt runs once in a worker
thread. A refusal is logged (`reason: "identity_refused"`) and evented (`identity.refused`).

Claims are loaded from the database in a worker thread: at start, on `identity.changed` bus events
(which carry names and versions only), on the periodic version check, and synchronously on the
`identities.reload` control call the API makes before answering a claim, rotation or deletion.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bus import records, topics
from bus.journal import JournalWriter
from bus.pubsub import Publisher
from greyproxy.identity import Claims, fingerprint, load_claims

if TYPE_CHECKING:
    from .gate import Gate

log = logging.getLogger("greyproxy.proxy")

REFUSED = "identity_refused"
USE_FLUSH_EVERY = 10.0  # seconds between last-use writes (through the journal)


class IdentityGuard:
    def __init__(
        self,
        executor: ThreadPoolExecutor,
        journal: JournalWriter,
        publisher: Publisher,
        gate: Gate | None = None,
        view: Any = None,
    ) -> None:
        self.claims = Claims()
        self.view = view  # where the claims are read (services/proxy/store_view.py); None: the database
        self.executor = executor
        self.journal = journal
        self.publisher = publisher
        self.gate = gate
        self.generation = 0  # bumped whenever the loaded claims change: connections re-check then
        # Called with the names whose claim went away (released, not rotated): the credential
        # sessions bound to them stop substituting now (LiveCredentials.release; service.py sets it).
        self.on_released: Callable[[set[str]], Any] | None = None
        self.refused = 0
        self._used: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def reload(self, force: bool = False) -> bool:
        loop = asyncio.get_running_loop()
        async with self._lock:
            claims, version = await loop.run_in_executor(self.executor, load_claims, self.view)
            if not force and version == self.claims.version:
                return False
            changed = self.claims.replace(claims, version)
            self.generation += 1
            if changed and self.gate is not None:
                self.gate.close_identities(set(changed))  # tunnels of a rotated/deleted claim end now
            released = {n for n in changed if n not in self.claims.by_name}
            if released and self.on_released is not None:
                self.on_released(released)
            log.info("identities loaded: %d claimed (version %d)", len(claims), version)
            return True

    def quick(self, name: str, secret: str | None) -> bool | None:
        """The answer without scrypt or a refusal record: True (unclaimed, or verified before), None
        (ask `check`). The hot path: one dict lookup for an unclaimed name."""
        claims = self.claims
        if name not in claims.by_name:
            return True
        if claims.judge(name, secret):
            self._used[name] = time.time()
            return True
        return None

    async def check(
        self,
        name: str,
        secret: str | None,
        *,
        src_ip: str,
        protocol: str,
        host: str = "",
        port: int = 0,
        method: str = "",
    ) -> bool:
        """Whether a connection may use `name`; a refusal is recorded here."""
        claims = self.claims
        ok = claims.judge(name, secret)
        if ok is None:
            assert secret is not None
            ok = await asyncio.get_running_loop().run_in_executor(self.executor, claims.verify, name, secret)
        if ok:
            if name in claims.by_name:
                self._used[name] = time.time()
            return True
        self.refused += 1
        now = time.time()
        log.info(
            "identity %r refused from %s (%s): %s",
            name,
            src_ip,
            protocol,
            "no secret" if not secret else "wrong secret",
        )
        self.journal.append(
            records.LOG,
            records.log_values(
                name,
                host,
                port,
                method or protocol,
                records.BLOCKED,
                response_time_ms=0.0,
                reason=REFUSED,
                timestamp=now,
            ),
        )
        self.publisher.publish(
            topics.IDENTITY_REFUSED,
            {
                "name": name,
                "protocol": protocol,
                "client_ip": src_ip,
                "destination_host": host or None,
                "destination_port": port or None,
                "secret_given": bool(secret),
                "ts": now,
            },
        )
        return False

    def token(self, name: str, secret: str | None) -> tuple[int, str, bytes | None]:
        """What a connection remembers of a passed check: re-check only when this changes (the
        secret counts for claimed names only: nothing is hashed for the others)."""
        return (self.generation, name, fingerprint(name, secret or "") if name in self.claims.by_name else None)

    def flush_use(self) -> None:
        used, self._used = self._used, {}
        for name, ts in used.items():
            self.journal.append(records.IDENTITY_USED, records.identity_used_record(name, ts))

    def stats(self) -> dict[str, int]:
        return {"claimed": len(self.claims.by_name), "version": self.claims.version, "refused": self.refused}
