"""Clients of a running ``Stack`` for stack tests: curl through the HTTP proxy, a raw CONNECT,
and the API calls nearly every module makes."""

from __future__ import annotations

import base64
import socket
import subprocess
from typing import Any

from .stack import Stack
from .util import wait_for


def proxy_url(stack: Stack, user: str | None = None, password: str | None = None) -> str:
    """``http://[user[:password]@]127.0.0.1:<http-proxy port>``: the identity goes in the userinfo."""
    cred = "" if user is None else (user if password is None else f"{user}:{password}") + "@"
    return f"http://{cred}127.0.0.1:{stack.ports['http-proxy']}"


def curl_proxy(
    stack: Stack,
    url: str,
    user: str | None = None,
    password: str | None = None,
    *extra: str,
    max_time: float = 10,
    head: bool = False,
) -> tuple[str, str]:
    """curl ``url`` through the stack's HTTP proxy as ``user[:password]`` (``extra``: more curl
    options). Returns (the status code as curl prints it, ``000`` for no answer; the response
    head(s) when ``head``, else "")."""
    cmd = ["curl", "-s", *(["-D", "-"] if head else []), "-o", "/dev/null", "-w", "%{http_code}"]
    cmd += ["--max-time", f"{max_time:g}", *extra, "-x", proxy_url(stack, user, password), url]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=max_time + 5,
    )
    return done.stdout[-3:], done.stdout[:-3]


def curl(*args: str, timeout: int = 20) -> tuple[int, bytes, str]:
    """``curl -s -S --max-time timeout <args>``: (exit code, stdout bytes, stderr text)."""
    p = subprocess.run(
        ["curl", "-s", "-S", "--max-time", str(timeout), *args], capture_output=True, timeout=timeout + 5
    )
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


def proxy_connect(
    stack: Stack, user: str, target: str | bytes, password: str = "x", timeout: float = 10
) -> socket.socket:
    """A socket to the HTTP proxy that has sent ``CONNECT target`` as ``user:password`` (Basic);
    reading the answer (and closing) is the caller's."""
    t = target.encode() if isinstance(target, str) else target
    auth = base64.b64encode(f"{user}:{password}".encode())
    s = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=timeout)
    s.sendall(b"CONNECT " + t + b" HTTP/1.1\r\nHost: " + t + b"\r\nProxy-Authorization: Basic " + auth + b"\r\n\r\n")
    return s


def add_rule(stack: Stack, **body: Any) -> dict:
    """POST /api/rules with ``body``; asserts 201 and returns the rule."""
    r = stack.request("POST", "/api/rules", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def log_entries(stack: Stack, container: str, limit: int = 100) -> list[dict]:
    """GET /api/logs?container=...: the newest entries whose container name contains ``container``."""
    return stack.get("/api/logs", params={"container": container, "limit": limit}).json()["items"]


def wait_log_entry(stack: Stack, container: str, timeout: float = 10.0) -> dict:
    """The newest log entry of exactly ``container``, waiting up to ``timeout`` seconds for one."""

    def find() -> dict | None:
        return next((i for i in log_entries(stack, container) if i["container_name"] == container), None)

    return wait_for(find, timeout, message=f"log entry for {container}")
