"""/ws commands: one client message to its reply.

Commands (allow, deny, dismiss) go through the same functions as REST, so effects, events and
error messages are identical; a client's mistake is an `error` reply, never a closed socket.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import falcon
import orjson

from .. import pending
from ..errors import ApiError
from ..util import MAX_ID
from .hub import reply

if TYPE_CHECKING:
    from .resource import Connection

log = logging.getLogger("greyproxy.api.ws")

MAX_COMMAND_BYTES = 64 * 1024
CREATED_BY = "ws"

Command = Callable[["Connection", dict[str, Any]], Awaitable[dict[str, Any]]]


async def handle_text(conn: Connection, text: str) -> dict[str, Any]:
    """One client message to its reply (never raises for the client's mistakes)."""
    if len(text) > MAX_COMMAND_BYTES:
        return reply("error", error=f"message larger than {MAX_COMMAND_BYTES} bytes")
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        return reply("error", error="invalid JSON")
    if not isinstance(msg, dict):
        return reply("error", error="message must be a JSON object")
    command = msg.get("command")
    if command is None:
        return reply("error", error="missing command")
    handler = COMMANDS.get(command) if isinstance(command, str) else None
    if handler is None:
        return reply("error", error=f"unknown command: {command}")
    try:
        return await handler(conn, msg)
    except ApiError as exc:  # the same 400/404 messages REST gives
        return _command_error(str(command), msg, exc.message)
    except falcon.HTTPError as exc:
        return _command_error(str(command), msg, exc.description or exc.title or "error")
    except Exception:  # a failing command must not end the connection
        log.exception("ws %s: command %s failed", conn.peer, command)
        return _command_error(str(command), msg, "internal error")


def _command_error(command: str, msg: dict[str, Any], error: str) -> dict[str, Any]:
    extra = {"pending_id": msg.get("pending_id")} if "pending_id" in msg else {}
    return reply("error", error=error, command=command, **extra)


def pending_id(msg: dict[str, Any]) -> int:
    """The command's pending_id: 400 when it is not an integer, 404 when no row could have it."""
    pid = msg.get("pending_id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ApiError(400, "pending_id must be an integer")
    if not 1 <= pid <= MAX_ID:  # no row has it (and SQLite could not even look a bigger one up)
        raise ApiError(404, f"pending request {pid} not found")
    return pid


async def _cmd_ping(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    return reply("pong")


async def _cmd_subscribe(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    try:
        conn.filter.subscribe(msg.get("event_type"))
    except ValueError as exc:
        return reply("error", error=str(exc), command="subscribe")
    return reply("subscribed", event_type=msg["event_type"].strip())


async def _cmd_unsubscribe(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    try:
        conn.filter.unsubscribe(msg.get("event_type"))
    except ValueError as exc:
        return reply("error", error=str(exc), command="unsubscribe")
    return reply("unsubscribed", event_type=msg["event_type"].strip())


def _decision_command(action: str) -> Command:
    async def run(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
        pid = pending_id(msg)
        body = {k: v for k, v in msg.items() if k not in ("command", "pending_id")}  # unknown fields refused as REST
        result = await pending.decide(conn.hub.ctx, pid, action, body, created_by=CREATED_BY)
        return reply("command_success", command=action, pending_id=pid, rule_id=result["rule"]["id"])

    return run


async def _cmd_dismiss(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    pid = pending_id(msg)
    if not await pending.dismiss(conn.hub.ctx, pid):
        raise ApiError(404, f"pending request {pid} not found")  # → an `error` reply naming the command
    return reply("command_success", command="dismiss", pending_id=pid, removed=True)


async def _cmd_claim(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    return reply("notification_claimed", active_claims=conn.hub.claim(conn))


COMMANDS: dict[str, Command] = {
    "ping": _cmd_ping,
    "subscribe": _cmd_subscribe,
    "unsubscribe": _cmd_unsubscribe,
    "allow": _decision_command("allow"),
    "deny": _decision_command("deny"),
    "dismiss": _cmd_dismiss,
    "claim_notifications": _cmd_claim,
}
