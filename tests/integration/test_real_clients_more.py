"""Real clients on the parts other than the plain-HTTP request path: held connections (HTTP proxy,
CONNECT, SOCKS5), interception, LLM traffic, credentials, DNS.

A defect hunt (wave 2, session 6, helper f). Most scenarios tried were fine and are covered
elsewhere (test_mitm.py, test_llm_conversations.py, test_credentials.py, test_dns.py,
test_policy_flow.py); the tests here are the ones that found something.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

import harness
from conftest import Stack, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

HELD_HOST = "127.0.0.6"  # no rule names it: every connection to it is held
HOLD = 20  # the stack's hold timeout, seconds
SEEN: list[str] = []  # request paths the origin got


class _Counting(harness.OriginHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        SEEN.append(self.path)
        self.reply(b"reached\n", "text/plain")

    do_POST = do_GET  # noqa: N815


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"proxy": {"holdTimeout": HOLD}}) as s:
        yield s


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with harness.plain_origin(_Counting, HELD_HOST) as port:
        yield port


def _pending(stack: Stack, container: str) -> list[dict]:
    items = stack.get("/api/pending", params={"container": container}).json()["items"]
    return [p for p in items if p["container_name"] == container]


def _logs(stack: Stack, container: str) -> list[dict]:
    items = stack.get("/api/logs", params={"container": container}).json()["items"]
    return [i for i in items if i["container_name"] == container]


@pytest.mark.parametrize("via", ["http", "connect", "socks5"])
def test_a_held_client_that_gives_up_is_let_go_and_its_request_never_leaves(
    stack: Stack, origin: int, via: str
) -> None:
    """curl --max-time on a held connection: curl closes its socket normally (a FIN, not a reset),
    as requests' and httpx's timeouts do. The hold went on to the hold timeout with `waiting: 1`
    for nobody, was logged `hold_timeout` — and, allowed meanwhile, the plain-HTTP request left
    for the origin after its client had gone. A FIN from a client that has had no answer yet now
    counts as gone (SPEC §3.1: client gone → blocked)."""
    user = f"quitter-{via}"
    url = f"http://{HELD_HOST}:{origin}/held-{via}"
    if via == "socks5":
        proxy = ["--socks5", f"{user}:x@127.0.0.1:{stack.ports['socks5-proxy']}"]
    else:
        proxy = ["-x", f"http://{user}:x@127.0.0.1:{stack.ports['http-proxy']}"]
        if via == "connect":
            proxy.append("-p")
    t0 = time.monotonic()
    curl = subprocess.Popen(
        ["curl", "-s", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}", *proxy, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    entry = wait_for(lambda: next(iter(_pending(stack, user)), None), 10, message="the pending entry")
    assert entry["waiting"] == 1, entry
    out, _ = curl.communicate(timeout=15)
    assert out == "000", out  # curl gave up

    def gone() -> dict | None:
        rows = _logs(stack, user)
        return rows[0] if rows else None

    log = wait_for(gone, 10, message="the log entry of the held connection")
    assert time.monotonic() - t0 < HOLD - 5, "the hold ran to its timeout"
    assert (log["result"], log["reason"]) == ("blocked", "client_gone"), log
    assert _pending(stack, user)[0]["waiting"] == 0
    # Allowing it now sends nothing: the connection it was for is gone.
    r = stack.request("POST", f"/api/pending/{entry['id']}/allow", json={"duration": "once"})
    assert r.status_code == 200, r.text
    time.sleep(1.0)
    assert f"/held-{via}" not in SEEN, SEEN


def test_a_client_that_stays_is_still_held_then_allowed(stack: Stack, origin: int) -> None:
    """The other side of the fix: a held client that keeps its connection open is still answered
    once allowed (nothing else counts as gone)."""
    user = "stayer"
    curl = subprocess.Popen(
        [
            "curl", "-s", "--max-time", "15", "-w", " %{http_code}",
            "-x", f"http://{user}:x@127.0.0.1:{stack.ports['http-proxy']}", f"http://{HELD_HOST}:{origin}/stayed",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    entry = wait_for(lambda: next(iter(_pending(stack, user)), None), 10, message="the pending entry")
    time.sleep(1.0)
    assert curl.poll() is None
    r = stack.request("POST", f"/api/pending/{entry['id']}/allow", json={"duration": "once"})
    assert r.status_code == 200, r.text
    out, _ = curl.communicate(timeout=15)
    assert out == "reached\n 200", out
    assert "/stayed" in SEEN
