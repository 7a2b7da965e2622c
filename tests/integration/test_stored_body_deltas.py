"""Bodies stored as deltas (greyproxy.bodies, migration 9), through the real stack: an LLM-shaped
session whose request bodies repeat the whole conversation each turn is stored as chains of zstd
deltas, and the API (a transaction, the listing with bodies, the HAR export) gives every body back
byte for byte, text and binary; with `retention.maxDatabaseMiB` acting, every body left still reads
back identically.

Origin on 127.0.0.1 (the builtin loopback rule allows it); client httpx through the HTTP proxy.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from conftest import OriginHandler, Stack, plain_origin, wait_for

pytestmark = pytest.mark.stack

HOST = "127.0.0.1"
ANSWER = b'{"type":"message","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn"}'


class _Origin(OriginHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # Binary answers on /bin (random bytes labelled text: stored as bytes, read back as base64).
        if self.path.startswith("/bin"):
            self.reply(os.urandom(3000), "text/plain")
        else:
            self.reply(ANSWER, "application/json")


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(_Origin, HOST) as port:
        yield port


def conversation(turns: int, seed: int, system_size: int = 6000) -> list[bytes]:
    """Claude-Code-shaped request bodies: system prompt, tools, every earlier turn, a new one."""
    rnd = random.Random(seed)
    words = [f"w{rnd.randrange(10**6)}" for _ in range(4000)]

    def text(n: int) -> str:
        return " ".join(rnd.choice(words) for _ in range(n))

    system = [{"type": "text", "text": text(system_size // 8)}]
    tools = [{"name": f"Tool{i}", "description": text(40), "input_schema": {"type": "object"}} for i in range(6)]
    msgs: list[dict[str, Any]] = []
    out = []
    for _ in range(turns):
        msgs.append({"role": "user", "content": [{"type": "text", "text": text(rnd.randint(20, 150))}]})
        out.append(
            json.dumps(
                {"model": "claude", "system": system, "messages": msgs, "tools": tools, "stream": False}
            ).encode()
        )
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": text(rnd.randint(20, 150))}]})
    return out


def binary_conversation(turns: int, seed: int) -> list[bytes]:
    """Request bodies labelled JSON that are not UTF-8 (stored binary), each the last one plus more."""
    rnd = random.Random(seed)
    body = bytes(rnd.getrandbits(8) for _ in range(4000))
    out = []
    for _ in range(turns):
        body += bytes(rnd.getrandbits(8) for _ in range(rnd.randint(50, 500)))
        out.append(body)
    return out


def _send(client: httpx.Client, origin: int, path: str, bodies: list[bytes]) -> dict[str, bytes]:
    sent = {}
    for i, b in enumerate(bodies):
        url = f"http://{HOST}:{origin}{path}?turn={i}"
        r = client.post(url, content=b, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        sent[url] = b
    return sent


def _wait_recorded(stack: Stack, n: int) -> None:
    wait_for(
        lambda: stack.db_rows("SELECT COUNT(*) FROM http_transactions")[0][0] >= n, 30, message=f"{n} transactions"
    )


def _body_of(item: dict[str, Any], side: str) -> bytes | None:
    value = item.get(f"{side}_body")
    if value is None:
        return None
    return base64.b64decode(value) if item.get(f"{side}_body_encoding") == "base64" else value.encode()


def _check_api(stack: Stack, sent: dict[str, bytes], all_rows: bool = True) -> int:
    """Every transaction's request body through GET /api/transactions/:id, the listing with bodies and
    the HAR export equals what was sent (or is absent where the cap dropped it). Returns how many read."""
    items = stack.get("/api/transactions", params={"limit": 1000, "include_bodies": "true"}).json()["items"]
    if all_rows:
        assert len(items) == len(sent)
    har = stack.get("/api/transactions/export.har").json()["log"]["entries"]
    har_by_url = {e["request"]["url"]: e for e in har}
    read = 0
    for item in items:
        want = sent[item["url"]]
        detail = stack.get(f"/api/transactions/{item['id']}").json()
        got = _body_of(detail, "request")
        assert _body_of(item, "request") == got
        post = har_by_url[item["url"]]["request"].get("postData")
        if got is None:
            continue
        read += 1
        assert got == want, item["url"]
        har_text = post["text"]
        har_body = base64.b64decode(har_text) if post.get("_encoding") == "base64" else har_text.encode()
        assert har_body == want, item["url"]
    return read


def test_an_llm_session_is_stored_as_deltas_and_reads_back_identically(origin: int) -> None:
    with (
        Stack() as stack,
        stack.proxy_client("claude") as c,
    ):
        # The origin stands for an Anthropic endpoint: the assembler dissects what it is sent.
        rule = {"host_pattern": f"{HOST}:{origin}", "path_pattern": "/v1/messages", "decoder_name": "anthropic"}
        assert stack.request("POST", "/api/endpoint-rules", json=rule).status_code == 201
        main, sub = conversation(24, 1), conversation(12, 2)
        sent: dict[str, bytes] = {}
        for t in range(24):  # a main conversation and a subagent's, interleaved on one stream
            url = f"http://{HOST}:{origin}/v1/messages?turn={t}"
            assert c.post(url, content=main[t], headers={"Content-Type": "application/json"}).status_code == 200
            sent[url] = main[t]
            if t < 12:
                url = f"http://{HOST}:{origin}/v1/messages?sub={t}"
                assert c.post(url, content=sub[t], headers={"Content-Type": "application/json"}).status_code == 200
                sent[url] = sub[t]
        sent |= _send(c, origin, "/bin/upload", binary_conversation(12, 3))
        _wait_recorded(stack, len(sent))
        codecs = stack.db_rows(
            "SELECT request_body_codec, request_body_charset IS NULL, COUNT(*) FROM http_transactions"
            " GROUP BY 1, 2 ORDER BY 1, 2",
        )
        by = {(codec, binary): n for codec, binary, n in codecs}
        assert by.get((2, 0), 0) >= 30 and by.get((2, 1), 0) >= 10, codecs  # text and binary deltas
        stored = stack.db_rows("SELECT SUM(length(request_body)) FROM http_transactions")[0][0]
        raw = sum(len(b) for b in sent.values())
        assert stored * 8 < raw, (stored, raw)  # well past zstd alone (~4x on such text; binary: 1x)
        assert _check_api(stack, sent) == len(sent)

        # The assembler read them too (through the same reader): the session is a conversation.
        def turns() -> int:
            convs = stack.get("/api/conversations").json()["items"]
            return sum(c["turn_count"] for c in convs)

        wait_for(lambda: turns() >= 24, 30, message="the conversations assembled")


def test_the_size_cap_leaves_every_remaining_body_readable(origin: int) -> None:
    with (
        Stack({"retention": {"maxDatabaseMiB": 1}}) as stack,
        stack.proxy_client("agent") as c,
    ):
        sent: dict[str, bytes] = {}
        for k in range(40):
            # big system prompts of random words: ~50 KB alone per chain start, then small deltas
            sent |= _send(c, origin, f"/v1/messages/{k}", conversation(10, 100 + k, system_size=120000))
            if "dropped the oldest" in stack.logs(400):
                break
        _wait_recorded(stack, 1)
        wait_for(
            lambda: stack.db_rows("SELECT COUNT(*) FROM http_transactions WHERE url LIKE ?", (f"%/{k}?turn=9",))[0][0],
            30,
            message="the last request recorded",
        )
        wait_for(lambda: "dropped the oldest" in stack.logs(400), 60, message="the size cap acting")
        # recent transactions keep their bodies: the cap deletes the oldest rows, chains cut with them
        wait_for(
            lambda: stack.db_rows("SELECT MIN(id) FROM http_transactions")[0][0] > 1,
            30,
            message="the oldest transactions dropped",
        )
        kept = stack.db_rows("SELECT COUNT(*) FROM http_transactions WHERE request_body_codec = 2")[0][0]
        assert kept > 0, "no delta left to read"
        assert _check_api(stack, sent, all_rows=False) > 0
        assert orjson.loads(stack.get("/api/maintenance/status").content)["jobs"]["size-cap"]["error"] is None
