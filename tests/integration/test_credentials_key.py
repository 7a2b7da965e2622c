"""session.key (SPEC §12.4, acceptance 10): made by the API 32 bytes 0600, a looser mode tightened
at start, a key file that exists but cannot be used never overwritten (credential writes 503,
placeholders refused with credentials_unavailable, reads still served), and a lost key replaced
with the rows it sealed deleted and named in one WARNING."""

from __future__ import annotations

import http.server
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from conftest import Stack, start_https_origin, stack_cli, wait_for

pytestmark = [
    pytest.mark.stack,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required"),
]

ORIGIN = "127.0.0.2"
SEEN: list[str] = []


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        SEEN.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    ca = trustme.CA()
    server, port = start_https_origin(ca, ORIGIN, _Ok)
    ca_file = tmp_path_factory.mktemp("origin-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield port, str(ca_file)
    server.shutdown()
    server.server_close()


def _through(s: Stack, port: int, header: str) -> tuple[int, str, str]:
    proxy = f"http://agent:x@127.0.0.1:{s.ports['http-proxy']}"
    p = subprocess.run(
        [
            "curl",
            "-s",
            "-S",
            "-i",
            "--suppress-connect-headers",
            "--max-time",
            "15",
            "-p",
            "-x",
            proxy,
            "--cacert",
            str(s.data_dir / "ca-cert.pem"),
            "-H",
            header,
            f"https://{ORIGIN}:{port}/k",
        ],
        capture_output=True,
        timeout=20,
    )
    assert p.returncode == 0, p.stderr
    head, _, body = p.stdout.decode().partition("\r\n\r\n")
    reason = next(
        (ln.split(":", 1)[1].strip() for ln in head.split("\r\n") if ln.lower().startswith("x-greyproxy-reason")), ""
    )
    return int(head.split(" ")[1]), reason, body


def test_10_the_key_file(origin: tuple[int, str]) -> None:
    port, ca_file = origin
    s = Stack({"mitm": {"upstreamCaFile": ca_file}})
    try:
        stack_cli(s, "cert", "generate")
        s.start()
        key_file = s.data_dir / "session.key"
        key = key_file.read_bytes()
        assert len(key) == 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert (
            s.request(
                "POST", "/api/rules", json={"container_pattern": "*", "destination_pattern": ORIGIN, "action": "allow"}
            ).status_code
            == 201
        )
        ph = f"greyproxy:credential:v1:gw-key:{secrets.token_hex(16)}"
        r = s.request(
            "POST",
            "/api/sessions",
            json={
                "session_id": "gw-key",
                "container_name": "c",
                "mappings": {ph: "key-test-value-1"},
                "labels": {ph: "KEYED"},
            },
        )
        assert r.status_code == 200, r.text
        assert (
            s.request("POST", "/api/credentials", json={"label": "KEYED_GLOBAL", "value": "global-key-val"}).status_code
            == 200
        )
        assert _through(s, port, f"X: {ph}")[0] == 200

        # 0644 → 0600 after a start, same key, still substituting.
        s.stop()
        key_file.chmod(0o644)
        s.start()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key_file.read_bytes() == key
        assert _through(s, port, f"X: {ph}")[0] == 200

        # 31 bytes: never overwritten; writes 503, reads 200, placeholders refused.
        s.stop()
        key_file.write_bytes(key[:31])
        s.start()
        assert key_file.read_bytes() == key[:31]
        r = s.request(
            "POST",
            "/api/sessions",
            json={
                "session_id": "gw-2",
                "container_name": "c",
                "mappings": {ph.replace("gw-key", "gw-2"): "another-value-1"},
            },
        )
        assert r.status_code == 503 and r.json()["error"].startswith(f"credential key {key_file} is unusable: "), r.text
        r = s.request("POST", "/api/credentials", json={"label": "NEW_ONE", "value": "new-value-123"})
        assert r.status_code == 503, r.text
        assert s.get("/api/sessions").status_code == 200 and s.get("/api/credentials").status_code == 200
        seen = len(SEEN)
        status, reason, body = _through(s, port, f"X: {ph}")
        assert (status, reason) == (403, "credentials_unavailable"), body
        assert len(SEEN) == seen  # the refused request never reached the origin
        assert _through(s, port, "X: nothing")[0] == 200  # no placeholder: served as ever
        assert key_file.read_bytes() == key[:31]

        # Lost: a new key, the rows sealed with the old one deleted and named once.
        s.stop()
        key_file.unlink()
        s.start()
        new = key_file.read_bytes()
        assert len(new) == 32 and new != key
        assert s.get("/api/sessions").json() == [] and s.get("/api/credentials").json() == []
        api_log = s.data_dir / "logs" / "api.log"
        wait_for(lambda: "2 sealed rows could not be decrypted" in api_log.read_text(), 5, message="the warning")
        text = api_log.read_text()
        assert "gw-key" in text and "KEYED" in text and "KEYED_GLOBAL" in text
    finally:
        s.cleanup()
        shutil.rmtree(s.root, ignore_errors=True)
