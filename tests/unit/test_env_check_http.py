"""SPEC §14 `greyproxy env --check`: python, node and curl fetch an http:// `--check-url` the way
they fetch one through HTTP_PROXY (an absolute-form GET, no CONNECT), and an answer the proxy gave
in the destination's place (a refusal, a 502) is a failure, not "works" (greyproxy/env_check.py).
The runtimes run for real against a stand-in proxy on loopback."""

from __future__ import annotations

import argparse
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from greyproxy.env_check import RUNTIMES, _answer_judge, proxy_answer, run_runtime

# path -> (status, extra headers, body) of the stand-in proxy's answer
ANSWERS: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {
    "/ok": (200, [], b"hello from the destination\n"),
    "/origin-error": (502, [], b"the destination's own bad gateway page\n"),  # (still its answer)
    "/unreachable": (502, [], b"Greyproxy: cannot connect to 127.0.0.5:46191: connection refused\n"),
    "/blocked": (403, [], b"Blocked by Greyproxy: this destination is not allowed\n"),
    "/hook": (403, [("X-Greyproxy-Reason", "rule")], b"Request denied by proxy"),
}


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A plain HTTP proxy: absolute-form GETs only (it refuses CONNECT, as an origin would
    for an http:// URL)."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, str]] = []

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append((self.command, self.path, self.headers.get("Proxy-Authorization", "")))
        path = "/" + self.path.split("://", 1)[-1].split("/", 1)[-1] if "://" in self.path else "?"
        self._answer(*ANSWERS.get(path, (400, [], b"not an absolute-form request\n")))

    def do_CONNECT(self) -> None:  # noqa: N802
        self.seen.append((self.command, self.path, self.headers.get("Proxy-Authorization", "")))
        self._answer(405, [], b"no CONNECT here\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def proxy() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://agent:x@127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _check(name: str, proxy: str, url: str, tmp: Path) -> tuple[bool, str]:
    rt = next(r for r in RUNTIMES if r.name == name)
    if shutil.which(rt.binary) is None:
        pytest.skip(f"{rt.binary} is not installed")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp)}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[var] = env[var.lower()] = proxy
    args = argparse.Namespace(check_url=url, check_git=None, check_timeout=10.0)
    res = run_runtime(rt, env, args, tmp)
    assert res.present
    return res.ok, res.detail


@pytest.mark.parametrize("name", ["python", "node", "curl"])
def test_an_http_url_is_fetched_through_http_proxy_without_connect(name: str, proxy: str, tmp_path: Path) -> None:
    _Proxy.seen.clear()
    ok, detail = _check(name, proxy, "http://127.0.0.5:46191/ok", tmp_path)
    assert ok, detail
    assert detail.split()[-2:] == ["200", "OK"] if name == "node" else detail == "200"
    assert [(m, p) for m, p, _ in _Proxy.seen] == [("GET", "http://127.0.0.5:46191/ok")]
    assert _Proxy.seen[0][2] == "Basic YWdlbnQ6eA=="  # the identity went with it (agent:x)


@pytest.mark.parametrize("name", ["python", "node", "curl"])
def test_the_destinations_own_error_still_counts_as_an_answer(name: str, proxy: str, tmp_path: Path) -> None:
    ok, detail = _check(name, proxy, "http://127.0.0.5:46191/origin-error", tmp_path)
    assert ok, detail
    assert "502" in detail


@pytest.mark.parametrize("name", ["python", "node", "curl"])
@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/unreachable", "502"),
        ("/blocked", "403"),
        ("/hook", "403"),
    ],
)
def test_an_answer_of_the_proxys_own_is_a_failure(name: str, path: str, said: str, proxy: str, tmp_path: Path) -> None:
    ok, detail = _check(name, proxy, f"http://127.0.0.5:46191{path}", tmp_path)
    assert not ok, detail
    assert said in detail and "from Greyproxy, not from the destination" in detail, detail
    body = ANSWERS[path][2].decode().strip()
    assert body in detail, detail


def test_judging_the_printed_answer() -> None:
    assert _answer_judge(0, "200\n\nhello", "") == (True, "200")
    assert _answer_judge(0, "HTTP/1.1 502 Bad Gateway\n\nGreyproxy: TLS handshake failed\n", "") == (
        False,
        "HTTP/1.1 502 Bad Gateway from Greyproxy, not from the destination: Greyproxy: TLS handshake failed",
    )
    assert _answer_judge(1, "", "Traceback\nURLError: Tunnel connection failed: 403\n") == (
        False,
        "URLError: Tunnel connection failed: 403",
    )
    assert proxy_answer("credentials_unavailable", "") == "X-Greyproxy-Reason: credentials_unavailable"
    assert proxy_answer("", "Greyproxy is a fine name for a page\n") is None
    # curl before 7.84 knows no %header{...}: it prints the variable as written, which is no reason
    old_curl = "200\n%header{x-greyproxy-reason}\n<html>hello</html>"
    assert _answer_judge(0, old_curl, "") == (True, "200")
    old_curl_refused = "403\n%header{x-greyproxy-reason}\nRequest denied by proxy\n"
    assert _answer_judge(0, old_curl_refused, "")[0] is False
