"""Real clients on the parts other than the plain-HTTP request path: held connections (HTTP proxy,
CONNECT, SOCKS5), interception, LLM traffic, credentials, DNS.

A defect hunt (wave 2, session 6, helper f). Most scenarios tried were fine and are covered
elsewhere (test_mitm.py, test_llm_conversations.py, test_credentials.py, test_dns.py,
test_policy_flow.py); the tests here are the ones that found something.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import ssl
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import zstandard

import harness
from conftest import Stack, https_origin, intercepting_stack, wait_for

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


# ---------------------------------------------------------------- compressed LLM traffic

LLM_ORIGIN = "127.0.0.2"
SYSTEM = [{"type": "text", "text": "You are Claude Code. " + "Follow the rules. " * 700}]  # > 10 000 bytes: main


def _sse(events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


def _anthropic_stream(model: str, text: str) -> list[bytes]:
    """An Anthropic Messages stream as the API sends it (docs: streaming messages)."""
    return _sse(
        [
            ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": None, "usage": {"input_tokens": 30, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
            *[("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})
              for w in re.findall(r"\S+ ?", text)],
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
            ("message_stop", {"type": "message_stop"}),
        ]
    )  # fmt: skip


class _Anthropic(harness.OriginHandler):
    """/v1/messages: reads a gzip or zstd request body (as Claude Code and Codex may send one),
    answers JSON or an SSE stream, gzip-compressed when the client accepts it."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        coding = self.headers.get("Content-Encoding")
        if coding == "gzip":
            raw = gzip.decompress(raw)
        elif coding == "zstd":
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        req = json.loads(raw)
        text = f"answer {len(req['messages'])}"
        zipped = "gzip" in (self.headers.get("Accept-Encoding") or "")
        if not req.get("stream"):
            body = json.dumps({"id": "msg_0", "type": "message", "role": "assistant", "model": req["model"],
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 20, "output_tokens": 4}}).encode()  # fmt: skip
            if zipped:
                self.reply(gzip.compress(body), "application/json", Content_Encoding="gzip")
            else:
                self.reply(body, "application/json")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        if zipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        z = zlib.compressobj(6, zlib.DEFLATED, 31) if zipped else None
        for event in _anthropic_stream(req["model"], text + " streamed in pieces"):
            data = z.compress(event) + z.flush(zlib.Z_SYNC_FLUSH) if z is not None else event
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        if z is not None:
            tail = z.flush()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def llm_origin(origin_ca: trustme.CA) -> Iterator[int]:
    with https_origin(origin_ca, LLM_ORIGIN, _Anthropic) as port:
        yield port


@pytest.fixture(scope="module")
def istack(origin_ca_file: Path) -> Iterator[Stack]:
    with intercepting_stack(None, origin_ca_file, allow=(LLM_ORIGIN,)) as s:
        r = s.request(
            "POST",
            "/api/endpoint-rules",
            json={"host_pattern": f"{LLM_ORIGIN}:*", "path_pattern": "/v1/messages", "decoder_name": "anthropic"},
        )
        assert r.status_code == 201, r.text
        yield s


def test_compressed_request_bodies_and_answers_make_one_conversation(istack: Stack, llm_origin: int) -> None:
    """A Claude Code conversation whose request bodies are gzip and zstd compressed (Content-Encoding
    on the request: Codex sends zstd) and whose answers are gzip JSON and a gzip SSE stream: the
    client gets the bytes unchanged, the records hold the decoded bodies, and the conversation has
    both turns, the streamed answer and the usage of both requests."""
    container = "claude"
    proxy = f"http://{container}:x@127.0.0.1:{istack.ports['http-proxy']}"
    verify = ssl.create_default_context(cafile=str(istack.data_dir / "ca-cert.pem"))
    url = f"https://{LLM_ORIGIN}:{llm_origin}/v1/messages?beta=true"
    headers = {"anthropic-version": "2023-06-01", "content-type": "application/json", "accept-encoding": "gzip",
               "user-agent": "claude-cli/2.0.0 (external, cli)", "x-api-key": "sk-ant-not-a-secret"}  # fmt: skip
    messages: list[dict[str, Any]] = [{"role": "user", "content": "why does the build fail?"}]
    model = "claude-sonnet-4-5"
    with httpx.Client(proxy=proxy, verify=verify, timeout=15, trust_env=False) as client:
        body = json.dumps({"model": model, "max_tokens": 512, "system": SYSTEM, "messages": messages}).encode()
        r = client.post(url, content=gzip.compress(body), headers=headers | {"content-encoding": "gzip"})
        assert r.status_code == 200 and r.json()["content"][0]["text"] == "answer 1", r.text
        messages += [{"role": "assistant", "content": [{"type": "text", "text": "answer 1"}]},
                     {"role": "user", "content": "then fix it"}]  # fmt: skip
        body = json.dumps({"model": model, "max_tokens": 512, "system": SYSTEM, "messages": messages, "stream": True})
        zbody = zstandard.ZstdCompressor().compress(body.encode())
        with client.stream("POST", url, content=zbody, headers=headers | {"content-encoding": "zstd"}) as r:
            streamed = b"".join(r.iter_bytes())  # httpx undoes the gzip
        assert r.status_code == 200
        assert b"".join(_anthropic_stream(model, "answer 3 streamed in pieces")) == streamed

    def rows() -> list[dict[str, Any]] | None:
        items = istack.get("/api/transactions", params={"container": container, "limit": 10}).json()["items"]
        return items if len(items) == 2 and all(i["conversation_id"] for i in items) else None

    items = sorted(wait_for(rows, 15, message="both requests recorded and assembled"), key=lambda t: t["id"])
    first, second = (istack.get(f"/api/transactions/{t['id']}").json() for t in items)
    assert json.loads(first["request_body"])["messages"] == messages[:1]
    assert json.loads(second["request_body"])["stream"] is True
    assert json.loads(first["response_body"])["content"][0]["text"] == "answer 1"
    assert second["response_body"] == streamed.decode()
    assert first["llm"]["model"] == model and second["llm"]["stop_reason"] == "end_turn"
    conv = istack.get(f"/api/conversations/{items[0]['conversation_id']}").json()
    assert conv["client_name"] == "claude-code" and conv["turn_count"] == 2, conv
    assert conv["request_ids"] == [first["id"], second["id"]]
    assert [t["user_prompt"] for t in conv["turns"]] == ["why does the build fail?", "then fix it"]
    assert conv["turns"][1]["steps"][-1]["text"] == "answer 3 streamed in pieces"
    assert conv["usage"]["input_tokens"] == 50 and conv["usage"]["output_tokens"] == 13, conv["usage"]
