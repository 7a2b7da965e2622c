"""Does recording through the proxy slow down while the conversation assembler runs? (SPEC §13.1)

The whole stack (tests/conftest.py's Stack) with an endpoint rule mapping a local plain-HTTP
origin that answers like a chat-completions server; C client threads send LLM-shaped requests
(a long system prompt, tools, a growing history: every request is a conversation update) through
the HTTP proxy for D seconds, first with `conversationsEnabled` off, then on. Prints requests/s
through the proxy, records stored per second, and how far the assembler lagged, and with
--results-md appends them to that file's assembler section.

    .venv/bin/python bench/llm_recording.py [--clients 8] [--duration 8] [--results-md bench/results.md]
"""

from __future__ import annotations

import argparse
import http.server
import json
import re
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import llm_fixtures as F  # noqa: E402
from conftest import Stack  # noqa: E402

ANSWER = F.chat_json("Done.").encode()
BEGIN, END = "<!-- llm-recording:begin -->", "<!-- llm-recording:end -->"


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, *args: object) -> None:
        pass


def load(stack: Stack, port: int, clients: int, duration: float, tag: str) -> int:
    done = [0] * clients
    stop = time.monotonic() + duration

    def client(i: int) -> None:
        proxy = f"http://{tag}-{i}@127.0.0.1:{stack.ports['http-proxy']}"
        msgs: list[dict] = []
        with httpx.Client(proxy=proxy, timeout=10, trust_env=False) as c:
            while time.monotonic() < stop:
                msgs = msgs[-40:] + [{"role": "user", "content": f"request {done[i]}"}]
                body = json.dumps(F.chat_request(msgs, stream=False))
                r = c.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                r.raise_for_status()
                msgs.append({"role": "assistant", "content": "Done."})
                done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def stored(stack: Stack) -> int:
    return stack.get("/api/transactions", params={"limit": 1}).json()["total"]


def phase(stack: Stack, port: int, clients: int, duration: float, enabled: bool) -> dict:
    stack.request("PUT", "/api/settings", json={"conversationsEnabled": enabled})
    time.sleep(1.0)
    before = stored(stack)
    t0 = time.monotonic()
    sent = load(stack, port, clients, duration, "on" if enabled else "off")
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while stored(stack) < before + sent and time.monotonic() < deadline:
        time.sleep(0.1)
    recorded_at = time.monotonic() - t0
    lag = None
    if enabled:
        while time.monotonic() < deadline:
            if stack.get("/api/maintenance/status").json()["conversations"]["backlog"] == 0:
                lag = time.monotonic() - t0 - elapsed
                break
            time.sleep(0.1)
    return {
        "sent": sent,
        "rps": sent / elapsed,
        "recorded": stored(stack) - before,
        "recorded_per_s": (stored(stack) - before) / recorded_at,
        "lag": lag,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--results-md", type=Path)
    args = ap.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    with Stack() as stack:  # started by the context manager
        r = stack.request(
            "POST",
            "/api/endpoint-rules",
            json={"host_pattern": "127.0.0.1:*", "path_pattern": "/v1/chat/completions", "decoder_name": "openai-chat"},
        )
        r.raise_for_status()
        off = phase(stack, port, args.clients, args.duration, False)
        on = phase(stack, port, args.clients, args.duration, True)
        convs = stack.get("/api/conversations", params={"limit": 1}).json()["total"]
    server.shutdown()
    lag = f"{on['lag']:.1f} s" if on["lag"] is not None else "> 30 s"
    lines = [
        BEGIN,
        f"Recording while the assembler runs (`bench/llm_recording.py --clients {args.clients} --duration "
        f"{args.duration:g}`, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}): LLM-shaped chat-completions "
        "requests (a 5.6 KB system prompt, tools, a growing history, JSON answers) through the HTTP proxy to a local "
        "origin mapped by an endpoint rule; every request updates a conversation.",
        "",
        "| conversationsEnabled | requests/s through the proxy | records stored/s | stored | assembler caught up |",
        "|---|---:|---:|---:|---|",
        f"| false | {off['rps']:.0f} | {off['recorded_per_s']:.0f} | {off['recorded']}/{off['sent']} | — |",
        f"| true | {on['rps']:.0f} | {on['recorded_per_s']:.0f} | {on['recorded']}/{on['sent']} | "
        f"{lag} after the load ({convs} conversations) |",
        END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.results_md:
        old = args.results_md.read_text() if args.results_md.exists() else ""
        if BEGIN in old:
            new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: text, old, flags=re.S)
        elif "<!-- llm-assembler:end -->" in old:
            new = old.replace("<!-- llm-assembler:end -->", "<!-- llm-assembler:end -->\n\n" + text, 1)
        else:
            new = old.rstrip("\n") + "\n\n" + text + "\n"
        args.results_md.write_text(new)


if __name__ == "__main__":
    main()
