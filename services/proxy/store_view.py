"""What the proxy reads from the store: the rules, the settings, the pending count, DNS names.

Two sources with the same methods (all blocking: call them in a worker thread):

- LocalView reads the SQLite database (proxy.rulesFrom: database, the default);
- RecorderView asks the recorder over the bus (proxy.rulesFrom: recorder): a proxy on another
  host (SPEC §15), whose store stays on the recorder's host. The recorder answers `view.*`
  control calls with LocalView (services/recorder/service.py).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from bus.reqrep import ServiceUnavailable, call_sync

log = logging.getLogger("greyproxy.proxy")


class RecorderAway(ServiceUnavailable):
    """The central recorder does not answer. RecorderView says so once in the log, when it
    starts and when it ends; its callers skip the turn without a traceback of their own."""


def log_failure(logger: logging.Logger, what: str) -> None:
    """For a watcher's `except Exception:` block: the failure, with its traceback, unless it is
    RecorderAway (the view has said that once already; the watcher just skips its turn)."""
    if not isinstance(sys.exc_info()[1], RecorderAway):
        logger.exception(what)


class LocalView:
    """The local SQLite database, through greyproxy.store."""

    def rules_version(self) -> int:
        from greyproxy.store.models import meta_value

        return meta_value("rules_version")

    def rules(self) -> tuple[int, list[list[Any]]]:
        """(rules_version, rows) in one read transaction: the version matches the rows."""
        from greyproxy.store import rules

        version, rows = rules.snapshot()
        return version, [list(r) for r in rows]

    def settings_version(self) -> int:
        from greyproxy.store.models import meta_value

        return meta_value("settings_version")

    def settings(self) -> tuple[int, dict[str, Any]]:
        """(settings_version, {key: decoded value}) in one read transaction."""
        from greyproxy.store import settings

        return settings.read_with_version()

    def pending_count(self) -> int:
        from greyproxy.store import pending

        return pending.count()

    def pending_state(self, keys: list[tuple[str, str, int]]) -> tuple[int, list[bool]]:
        from greyproxy.store import pending

        return pending.count_and_has(keys)

    def dns_names(self, since: float, ips: list[str] | None = None) -> list[list[str]]:
        """[[ip, hostname]] seen since `since` (epoch seconds); of `ips` only, if given."""
        from greyproxy.store import dns_cache

        return [list(r) for r in dns_cache.names_since(since, ips)]

    def claims(self) -> tuple[list[list[Any]], int]:
        """([[name, secret_hash, version]], identities_version) of the claimed identities (SPEC §16)."""
        from greyproxy.store import identities

        rows, version = identities.claims()
        return [list(r) for r in rows], version


# The recorder's control ops for a RecorderView, each answered by the LocalView method named.
OPS = {
    "view.rules_version": "rules_version",
    "view.rules": "rules",
    "view.settings_version": "settings_version",
    "view.settings": "settings",
    "view.pending_count": "pending_count",
    "view.pending_state": "pending_state",
    "view.dns_names": "dns_names",
    "view.claims": "claims",  # scrypt hashes, point to point (CURVE on tcp://), never a secret
}


AWAY_RETRY = 1.0  # seconds between two questions to a recorder that did not answer (RecorderView)


class RecorderView:
    """LocalView's answers, from the recorder's database over its control endpoint."""

    def __init__(self, endpoint: str, timeout: float = 2.0, retries: int = 3) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self._lock = threading.Lock()  # the callers run in several threads
        self._away_since: float | None = None
        self._trying = False  # while away: one caller asks (once), the others are told at once
        self._next_try = 0.0

    def _ask(self, op: str, args: dict[str, Any] | None = None, retries: int | None = None) -> Any:
        """The recorder's answer to `op`. While it is away (it did not answer the last time), one
        caller at a time, at most once per AWAY_RETRY seconds, asks it once; every other call
        raises RecorderAway at once. Otherwise the proxy's few database threads would each wait
        `timeout` × `retries` per call (the watchers every 2 s, each new destination's queue look,
        each claimed identity's check) and every decision needing one would wait seconds."""
        with self._lock:
            away = self._away_since is not None
            if away:
                if self._trying or time.monotonic() < self._next_try:
                    raise RecorderAway("recorder", "it did not answer the last time it was asked")
                self._trying = True
        try:
            result = call_sync(
                self.endpoint,
                "recorder",
                op,
                args or {},
                timeout=self.timeout,
                retries=1 if away else (retries or self.retries),
            )
        except ServiceUnavailable as exc:
            with self._lock:
                first = self._away_since is None
                if first:
                    self._away_since = time.monotonic()
                self._next_try = time.monotonic() + AWAY_RETRY
            if first:
                log.warning(
                    "the recorder at %s does not answer (%s): this proxy goes on deciding with the rules,"
                    " settings and identities it has, and keeps asking",
                    self.endpoint,
                    exc,
                )
            raise RecorderAway("recorder", exc.detail) from None
        finally:
            if away:
                with self._lock:
                    self._trying = False
        with self._lock:
            since, self._away_since = self._away_since, None
        if since is not None:
            log.info("the recorder at %s answers again (after %.0f s)", self.endpoint, time.monotonic() - since)
        return result

    def probe(self) -> None:
        """One question, for the wait at start (services/proxy/service.py says why it fails)."""
        call_sync(self.endpoint, "recorder", "view.rules_version", {}, timeout=self.timeout, retries=self.retries)

    def rules_version(self) -> int:
        return int(self._ask("view.rules_version"))

    def rules(self) -> tuple[int, list[list[Any]]]:
        version, rows = self._ask("view.rules")
        return int(version), rows

    def settings_version(self) -> int:
        return int(self._ask("view.settings_version"))

    def settings(self) -> tuple[int, dict[str, Any]]:
        version, values = self._ask("view.settings")
        return int(version), values

    def pending_count(self) -> int:
        return int(self._ask("view.pending_count"))

    def pending_state(self, keys: list[tuple[str, str, int]]) -> tuple[int, list[bool]]:
        # One try: a new destination's client waits for it (and the next, behind it), and the proxy
        # goes by the last count without it.
        n, has = self._ask("view.pending_state", {"keys": [list(k) for k in keys]}, retries=1)
        return int(n), [bool(h) for h in has]

    def dns_names(self, since: float, ips: list[str] | None = None) -> list[list[str]]:
        return self._ask("view.dns_names", {"since": since} if ips is None else {"since": since, "ips": ips})

    def claims(self) -> tuple[list[list[Any]], int]:
        rows, version = self._ask("view.claims")
        return rows, int(version)


def view_for(cfg: Any) -> LocalView | RecorderView:
    if cfg.section("proxy")["rulesFrom"] == "recorder":
        return RecorderView(
            cfg.bus["recorderControl"], max(2.0, float(cfg.bus["requestTimeout"])), int(cfg.bus["requestRetries"])
        )
    return LocalView()
