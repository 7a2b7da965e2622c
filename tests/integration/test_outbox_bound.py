"""`proxy.journalOutboxMiB` reaches the proxy: with the recorder frozen, the records of proxied
requests pile up in the proxy's outbox only up to that many bytes; past it the oldest are dropped
and counted, and once the recorder is back what was kept is stored."""

from __future__ import annotations

import http.server
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bus.reqrep import call_sync
from conftest import Stack, wait_for
from greyproxy.config import load_config

pytestmark = pytest.mark.stack

MIB = 1024 * 1024
PAD = "p" * 8000  # a request header this long makes each transaction record ~8 KB


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_outbox_is_bounded_in_bytes_by_the_config(origin: int) -> None:
    with Stack({"proxy": {"journalOutboxMiB": 1}}) as s:
        cfg = load_config(s.cfg_path, env=s.env)
        recorder = wait_for(lambda: s.health()[1]["services"]["recorder"]["pid"], 10, message="recorder pid")

        def journal() -> dict[str, int]:
            return call_sync(cfg.bus["proxyControl"], "proxy", "stats", timeout=2, retries=3)["journal"]

        os.kill(recorder, signal.SIGSTOP)  # nothing is acknowledged any more
        try:
            with httpx.Client(proxy=s.http_proxy_url, trust_env=False, timeout=10) as client:
                for _ in range(300):  # ~2.4 MB of transaction records
                    r = client.get(f"http://127.0.0.1:{origin}/x", headers={"X-Pad": PAD})
                    assert r.status_code == 200
            stats = journal()
            assert stats["dropped"] > 0, stats
            assert stats["outbox_bytes"] <= MIB, stats
        finally:
            os.kill(recorder, signal.SIGCONT)
        # Back: what was kept arrives (the journal resends it), and the outbox empties.
        wait_for(lambda: journal()["outbox_bytes"] == 0, 60, interval=0.2, message="the outbox to drain")
        db = sqlite3.connect(s.db_path)
        try:
            stored = db.execute("SELECT COUNT(*) FROM http_transactions").fetchone()[0]
        finally:
            db.close()
        assert 0 < stored < 300
