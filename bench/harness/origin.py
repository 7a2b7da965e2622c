"""The origin every proxy talks to: nginx on loopback (or a small Python server in smoke mode).

Both listen on 127.0.0.1 and 127.0.0.2 at the same port: 127.0.0.1 is what the loads use
(covered by Greyproxy's builtin loopback rule), 127.0.0.2 is covered by no rule, so requests
there are held in the pending queue (the approval-latency measure).

Paths: /1k (1024 bytes of 'x'), /big (the download file, zeros).
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from .procs import Managed, free_port_on, run_capture, wait_port

HOSTS = ("127.0.0.1", "127.0.0.2")
ONE_K = b"x" * 1024


@dataclass
class TlsFiles:
    ca_pem: Path  # the origin's CA (what a proxy must trust upstream)
    cert_pem: Path  # server chain for 127.0.0.1 / localhost
    key_pem: Path


def make_tls(dirpath: Path) -> TlsFiles | None:
    """A throwaway CA and a server certificate for 127.0.0.1 (trustme, from the dev extras)."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    dirpath.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(dirpath / "origin-ca.pem", dirpath / "origin-cert.pem", dirpath / "origin-key.pem")
    ca.cert_pem.write_to_path(str(files.ca_pem))
    cert.private_key_pem.write_to_path(str(files.key_pem))
    with open(files.cert_pem, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return files


def make_files(www: Path, big_bytes: int) -> None:
    www.mkdir(parents=True, exist_ok=True)
    (www / "1k").write_bytes(ONE_K)
    big = www / "big"
    with open(big, "wb") as f:
        f.truncate(big_bytes)  # sparse: instant, reads as zeros


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def nginx_version() -> str | None:
    b = nginx_binary()
    if not b:
        return None
    _, out = run_capture([b, "-v"])
    return out.strip().split("/", 1)[-1] if "nginx" in out else None


class NginxOrigin:
    def __init__(self, root: Path, big_bytes: int, tls: TlsFiles | None, unique_heads: bool = False) -> None:
        self.root = root
        self.big_bytes = big_bytes
        self.tls = tls
        # Each answer carries a header of its own (X-Request-Id, as most real APIs send): no two
        # response heads alike, so a memo keyed by a head's text never hits.
        self.unique_heads = unique_heads
        self.port = 0
        self.tls_port = 0
        self.proc: Managed | None = None

    def start(self) -> "NginxOrigin":
        binary = nginx_binary()
        if not binary:
            raise RuntimeError("nginx not installed")
        www = self.root / "www"
        make_files(www, self.big_bytes)
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root / "tmp" / d).mkdir(parents=True, exist_ok=True)
        self.port = free_port_on(HOSTS)
        listens = "".join(f"    listen {h}:{self.port} backlog=4096;\n" for h in HOSTS)
        tls_block = ""
        if self.tls is not None:
            self.tls_port = free_port_on(("127.0.0.1",))
            tls_block = (
                "  server {\n"
                f"    listen 127.0.0.1:{self.tls_port} ssl backlog=4096;\n"
                f"    ssl_certificate {self.tls.cert_pem};\n"
                f"    ssl_certificate_key {self.tls.key_pem};\n"
                "    ssl_session_cache shared:SSL:10m;\n"
                f"    root {www};\n"
                "    location / { }\n"
                "  }\n"
            )
        user = "user root;\n" if os.geteuid() == 0 else ""
        t = self.root / "tmp"
        conf = (
            f"{user}worker_processes 1;\n"
            "daemon off;\n"
            "master_process on;\n"
            f"pid {self.root}/nginx.pid;\n"
            f"error_log {self.root}/error.log warn;\n"
            "worker_rlimit_nofile 20000;\n"
            "events { worker_connections 10000; multi_accept on; }\n"
            "http {\n"
            "  access_log off;\n"
            "  default_type application/octet-stream;\n"
            "  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n"
            "  keepalive_timeout 300s;\n  keepalive_requests 10000000;\n"
            "  client_header_timeout 300s;\n"
            f"  client_body_temp_path {t}/client_body;\n  proxy_temp_path {t}/proxy;\n"
            f"  fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n"
            "  server {\n"
            f"{listens}"
            + ("    add_header X-Request-Id $request_id always;\n" if self.unique_heads else "")
            + f"    root {www};\n"
            "    location / { }\n"
            "  }\n"
            f"{tls_block}"
            "}\n"
        )
        conf_path = self.root / "nginx.conf"
        conf_path.write_text(conf)
        self.proc = Managed(
            "nginx",
            [binary, "-p", str(self.root), "-c", str(conf_path), "-e", str(self.root / "error.log")],
            self.root / "nginx.out",
        ).start()
        if not wait_port("127.0.0.1", self.port, 10, self.proc):
            err = (
                self.proc.tail() + (self.root / "error.log").read_text(errors="replace")
                if (self.root / "error.log").exists()
                else self.proc.tail()
            )
            self.stop()
            raise RuntimeError(f"nginx did not start: {err[-800:]}")
        if self.tls_port:
            wait_port("127.0.0.1", self.tls_port, 5, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are separate writes: no 40 ms delayed-ACK stalls
    big_bytes = 0

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/big"):
            n = self.big_bytes
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = bytes(65536)
            left = n
            while left > 0:
                k = min(left, len(chunk))
                self.wfile.write(chunk[:k])
                left -= k
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(ONE_K)))
        self.end_headers()
        self.wfile.write(ONE_K)

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:  # clients that hang up are normal here
        pass


class PyOrigin:
    """The smoke-mode origin: a threading http.server on both loopback addresses."""

    def __init__(self, big_bytes: int) -> None:
        self.big_bytes = big_bytes
        self.port = 0
        self.tls_port = 0
        self.tls = None
        self._servers: list[http.server.ThreadingHTTPServer] = []

    def start(self) -> "PyOrigin":
        handler = type("H", (_Handler,), {"big_bytes": self.big_bytes})
        self.port = free_port_on(HOSTS)
        for h in HOSTS:
            srv = _Server((h, self.port), handler)
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
            self._servers.append(srv)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers.clear()
