"""/api/sessions and /api/credentials (SPEC §12.2, §12.3): credential sessions and global
credentials. This process owns the tables, creates `session.key`, seals every value before it is
stored and drops it; no answer, event or log line carries a value (errors name the field).

After each write the proxy is told (`credentials.reload`, up to 1 s), so when `POST
/api/sessions` returns its placeholders substitute and when `DELETE` returns they are refused.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon
import falcon.asgi
import orjson

from bus import topics
from greyproxy.credentials import crypto
from greyproxy.credentials.placeholders import GLOBAL_SCOPE, SCOPE_RE, default_label, is_placeholder, mint, scope_of
from greyproxy.credentials.values import validate_hosts, validate_label, validate_value, value_preview
from greyproxy.store import global_credentials, sessions
from greyproxy.timeutil import rfc3339

from .context import ApiContext
from .errors import ApiError, bad_request
from .util import json_response, read_json, refuse_unknown, soft_call

log = logging.getLogger("greyproxy.api")

DEFAULT_TTL = 900
MAX_TTL = 3600
MAX_CREDENTIALS = 100  # per session
MAX_METADATA = 50
MAX_METADATA_BYTES = 1024
MAX_CONTAINER = 256
RELOAD_TIMEOUT = 1.0
_CRED_ID = re.compile(r"cred_[0-9a-f]{16}")


class Keyring:
    """`session.key` as the API sees it: created at start when absent (and then rows sealed with a
    lost key are deleted, with one WARNING), never overwritten when it exists but is unusable."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = crypto.key_path(data_dir)
        self._key: bytes | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def key(self) -> bytes:
        """The key (worker thread); ApiError 503 when the file cannot be used."""
        with self._lock:
            if self._key is None:
                self._open()
            if self._key is None:
                raise ApiError(503, f"credential key {self.path} is unusable: {self._error}")
            return self._key

    def start(self) -> None:
        """At start (worker thread): create or load the key; an unusable one is logged, not replaced."""
        with self._lock:
            self._open()

    def _open(self) -> None:
        try:
            key, made = crypto.create_key(self.path)
        except crypto.KeyUnusable as exc:
            if self._error != str(exc):
                log.error(
                    "credential key %s is unusable: %s (it is left as it is; credential writes get 503 "
                    "and the proxy refuses every placeholder until it is fixed)",
                    self.path,
                    exc,
                )
            self._error = str(exc)
            return
        self._key, self._error = key, None
        if made:
            _drop_undecryptable(key)


def _drop_undecryptable(key: bytes) -> None:
    """A new key while sealed rows exist (the old key was lost): those rows can never be read again."""
    from greyproxy.store import database

    lost_sessions: list[str] = []
    lost_labels: list[str] = []
    rows = 0
    with database.atomic("IMMEDIATE"):
        for sid, blob, _exp, creds, _globals in sessions.sealed_rows():
            try:
                crypto.open_sealed(key, blob, crypto.aad_session(sid))
            except crypto.SealError:
                lost_sessions.append(sid)
                lost_labels += [label for _ph, label, _hosts in creds]
                sessions.delete(sid)
                rows += 1
        for cid, label, _ph, blob, _hosts in global_credentials.sealed_rows():
            try:
                crypto.open_sealed(key, blob, crypto.aad_global(cid))
            except crypto.SealError:
                lost_labels.append(label)
                global_credentials.delete(cid)
                rows += 1
    if rows:
        log.warning(
            "credential key was missing and a new one was made: %d sealed rows could not be decrypted "
            "and were deleted (sessions: %s; labels: %s)",
            rows,
            ", ".join(lost_sessions) or "-",
            ", ".join(lost_labels) or "-",
        )


# --------------------------------------------------------------------------- validation


def _dict(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{name} must be a JSON object")
    return value


def _ttl(body: dict[str, Any]) -> int:
    raw = body.get("ttl_seconds")
    if raw is None:
        return DEFAULT_TTL
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise bad_request("ttl_seconds must be an integer")
    if raw <= 0:
        return DEFAULT_TTL
    return min(raw, MAX_TTL)


def _require_hosts(ctx: ApiContext) -> bool:
    return bool(ctx.cfg.raw.get("credentials", {}).get("requireHosts", False))


SESSION_FIELDS = (
    "session_id",
    "container_name",
    "mappings",
    "labels",
    "hosts",
    "metadata",
    "ttl_seconds",
    "global_credentials",
)
CREDENTIAL_FIELDS = ("label", "value", "hosts")
# Names a client may send for ttl_seconds: refused with the right one (ignored, the session
# would get the default 900 s).
SESSION_HINTS = {
    name: "did you mean 'ttl_seconds'?"
    for name in ("ttl", "ttl_secs", "expires", "expires_in", "expires_in_seconds", "expires_at", "duration", "lifetime")
}


def parse_session(body: dict[str, Any], require_hosts: bool) -> dict[str, Any]:
    """The validated session (values still in clear: seal them and drop them)."""
    refuse_unknown(body, SESSION_FIELDS, SESSION_HINTS)  # `host` left out would send the value to any host
    sid = body.get("session_id")
    if not isinstance(sid, str) or not sid:
        raise bad_request("session_id is required")
    if not SCOPE_RE.fullmatch(sid) or sid == GLOBAL_SCOPE:
        raise bad_request("session_id must be 1-128 of A-Z a-z 0-9 . _ - and not 'global'")
    container = body.get("container_name")
    if not isinstance(container, str) or not container.strip():
        raise bad_request("container_name is required")
    if len(container) > MAX_CONTAINER:
        raise bad_request(f"container_name is longer than {MAX_CONTAINER} characters")
    mappings = _dict(body, "mappings")
    labels = _dict(body, "labels")
    hosts = _dict(body, "hosts")
    metadata = _dict(body, "metadata")
    globals_raw = body.get("global_credentials")
    if globals_raw is None:
        globals_raw = []
    if not isinstance(globals_raw, list) or not all(isinstance(g, str) for g in globals_raw):
        raise bad_request("global_credentials must be an array of labels")
    global_labels = list(dict.fromkeys(globals_raw))
    if not mappings and not global_labels:
        raise bad_request("at least one of mappings, global_credentials is required")
    if len(mappings) + len(global_labels) > MAX_CREDENTIALS:
        raise bad_request(f"a session has at most {MAX_CREDENTIALS} credentials")
    creds: list[sessions.SessionCredential] = []
    values: dict[str, str] = {}
    for i, (ph, value) in enumerate(mappings.items()):
        if not is_placeholder(ph):
            raise bad_request(f"mappings: key {i + 1} is not a placeholder greyproxy:credential:v1:<scope>:<32 hex>")
        if scope_of(ph) == GLOBAL_SCOPE:
            raise bad_request(f"mappings: key {i + 1} has scope 'global', which only global credentials use")
        label = labels.get(ph)
        if label is None or label == "":
            label = default_label(ph)
        else:
            try:
                label = validate_label(label, f"labels[{i + 1}]")
            except ValueError as exc:
                raise bad_request(str(exc)) from None
        try:
            values[ph] = validate_value(value, f"mappings: the value of {label}")
            bound = validate_hosts(hosts.get(ph), f"hosts of {label}")
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        if require_hosts and not bound:
            raise bad_request(f"hosts of {label}: required (credentials.requireHosts is on)")
        creds.append(sessions.SessionCredential(ph, label, bound))
    for ph in hosts:
        if ph not in mappings:
            raise bad_request("hosts: every key must be a placeholder of mappings")
    if len(metadata) > MAX_METADATA:
        raise bad_request(f"metadata has more than {MAX_METADATA} keys")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise bad_request(f"metadata[{k[:64]!r}] must be a string")
        if len(k.encode()) > MAX_METADATA_BYTES or len(v.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
            raise bad_request(f"metadata[{k[:64]!r}] is longer than {MAX_METADATA_BYTES} bytes")
    return {
        "session_id": sid,
        "container_name": container,
        "creds": creds,
        "values": values,
        "global_labels": global_labels,
        "metadata": metadata,
        "ttl": _ttl(body),
    }


# --------------------------------------------------------------------------- shapes


def session_json(row: dict[str, Any], globals_by_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    creds = [{"label": c["label"], "scope": "session", "hosts": c["hosts"]} for c in row.get("credentials", [])]
    creds += [
        {"label": g, "scope": "global", "hosts": globals_by_label[g]["hosts"]}
        for g in row["global_labels"]
        if g in globals_by_label
    ]
    return {
        "session_id": row["session_id"],
        "container_name": row["container_name"],
        "credential_count": len(creds),
        "credential_labels": [c["label"] for c in creds],
        "credentials": creds,
        "metadata": row["metadata"],
        "ttl_seconds": row["ttl_seconds"],
        "created_at": rfc3339(row["created_at"]),
        "expires_at": rfc3339(row["expires_at"]),
        "last_heartbeat": rfc3339(row["last_heartbeat"]),
        "substitution_count": row["substitution_count"],
    }


def credential_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "label": row["label"],
        "placeholder": row["placeholder"],
        "value_preview": row["value_preview"],
        "hosts": row["hosts"],
        "created_at": rfc3339(row["created_at"]),
        "substitution_count": row["substitution_count"],
        "last_used_at": rfc3339(row["last_used_at"]),
    }


# --------------------------------------------------------------------------- the database work (worker thread)


def _create_session(
    keyring: Keyring, s: dict[str, Any], now: float
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    key = keyring.key()
    values = s.pop("values")
    sealed = crypto.seal(key, orjson.dumps(values), crypto.aad_session(s["session_id"]))
    values.clear()  # the value is gone from this process once sealed
    found = global_credentials.placeholders_of(s["global_labels"])
    missing = [g for g in s["global_labels"] if g not in found]
    if missing:
        raise bad_request(f"unknown global credentials: {', '.join(missing)}")
    try:
        row, removed = sessions.upsert(
            s["session_id"], s["container_name"], sealed, s["creds"], s["global_labels"], s["metadata"], s["ttl"], now
        )
    except sessions.Conflict as exc:
        raise ApiError(409, str(exc)) from None
    return row, found, removed


def _list_sessions(now: float) -> list[dict[str, Any]]:
    rows = sessions.list_live(now)
    globals_by_label = {g["label"]: g for g in global_credentials.list_all()}
    return [session_json(r, globals_by_label) for r in rows]


def _create_credential(keyring: Keyring, label: str, value: str, hosts: list[str], now: float) -> dict[str, Any]:
    key = keyring.key()
    cred_id = f"cred_{secrets.token_hex(8)}"
    sealed = crypto.seal(key, value.encode("utf-8"), crypto.aad_global(cred_id))
    try:
        return global_credentials.insert(cred_id, label, mint(GLOBAL_SCOPE), sealed, value_preview(value), hosts, now)
    except global_credentials.LabelTaken:
        raise ApiError(409, f"a credential labelled {label} already exists") from None


# --------------------------------------------------------------------------- resources


async def proxy_reload(ctx: ApiContext) -> None:
    """Let the proxy load the change now (it answers anyway when the proxy is down: it loads at start)."""
    await soft_call(ctx.proxy, "credentials.reload", {}, timeout=RELOAD_TIMEOUT, retries=1)


class SessionsResource:
    def __init__(self, ctx: ApiContext, keyring: Keyring) -> None:
        self.ctx, self.keyring = ctx, keyring

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, await self.ctx.db(_list_sessions, time.time()))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ctx = self.ctx
        s = parse_session(await read_json(req), _require_hosts(ctx))
        row, found, removed = await ctx.db(_create_session, self.keyring, s, time.time())
        await proxy_reload(ctx)
        for sid in removed:
            ctx.publish(topics.SESSION_EXPIRED, sid)
        ctx.publish(topics.SESSION_CREATED, row["session_id"])
        json_response(
            resp,
            {
                "session_id": row["session_id"],
                "expires_at": rfc3339(row["expires_at"]),
                "ttl_seconds": row["ttl_seconds"],
                "credential_count": len(s["creds"]) + len(found),
                "global_credentials": found,
            },
        )


class SessionHeartbeatResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, session_id: str) -> None:
        expires = await self.ctx.db(sessions.heartbeat, session_id, time.time())
        if expires is None:
            raise ApiError(404, "session not found or expired")
        await proxy_reload(self.ctx)
        self.ctx.publish(topics.SESSION_HEARTBEAT, session_id)
        json_response(resp, {"session_id": session_id, "expires_at": rfc3339(expires)})


class SessionResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, session_id: str) -> None:
        deleted = await self.ctx.db(sessions.delete, session_id)
        if deleted:
            await proxy_reload(self.ctx)
            self.ctx.publish(topics.SESSION_DELETED, session_id)
        json_response(resp, {"session_id": session_id, "deleted": deleted})


class CredentialsResource:
    def __init__(self, ctx: ApiContext, keyring: Keyring) -> None:
        self.ctx, self.keyring = ctx, keyring

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rows = await self.ctx.db(global_credentials.list_all)
        json_response(resp, [credential_json(r) for r in rows])

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ctx = self.ctx
        body = await read_json(req)
        refuse_unknown(body, CREDENTIAL_FIELDS)
        try:
            label = validate_label(body.get("label"))
            value = validate_value(body.get("value"))
            hosts = validate_hosts(body.get("hosts"))
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        if _require_hosts(ctx) and not hosts:
            raise bad_request("hosts: required (credentials.requireHosts is on)")
        row = await ctx.db(_create_credential, self.keyring, label, value, hosts, time.time())
        del value, body
        await proxy_reload(ctx)
        item = credential_json(row)
        ctx.publish(topics.CREDENTIAL_CREATED, item)
        json_response(resp, item)


class CredentialResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, cred_id: str) -> None:
        row = await self.ctx.db(global_credentials.delete, cred_id) if _CRED_ID.fullmatch(cred_id) else None
        if row is None:
            raise ApiError(404, "credential not found")
        await proxy_reload(self.ctx)
        self.ctx.publish(topics.CREDENTIAL_DELETED, {"id": row["id"], "label": row["label"]})
        json_response(resp, {"id": row["id"], "deleted": True})


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    keyring = Keyring(ctx.cfg.data_dir)
    ctx.credentials_key = keyring
    app.add_route(route("/api/sessions"), SessionsResource(ctx, keyring))
    app.add_route(route("/api/sessions/{session_id}"), SessionResource(ctx))
    app.add_route(route("/api/sessions/{session_id}/heartbeat"), SessionHeartbeatResource(ctx))
    app.add_route(route("/api/credentials"), CredentialsResource(ctx, keyring))
    app.add_route(route("/api/credentials/{cred_id}"), CredentialResource(ctx))
