"""Intercepted HTTPS req/s with and without credential substitution (SPEC §12.5, §12 acceptance 13).

Starts a whole stack (`greyproxy serve`) from a source tree (`--src`, default this repo; give an
export of another commit, e.g. `git archive main | tar -x -C /tmp/gp-main`, to measure "before"),
a TLS origin on 127.0.0.1 (asyncio + uvloop, a trustme certificate the proxy trusts through
`mitm.upstreamCaFile`, 1 KiB answers, keep-alive), and drives it with one curl process
(`-Z --parallel-max N`, trusting only the proxy's CA, as bench/run.py's HTTPS row) in rounds
that alternate the modes, so a busy machine weighs on both alike:

- `none`: every request carries `X-Key: <a plain 49-character value>`;
- `placeholder`: every request carries `X-Key: <placeholder>`, substituted by the proxy (a session
  credential bound to 127.0.0.1); skipped when the tree has no /api/sessions.

Prints one JSON line per round and a summary (median req/s per mode).

    .venv/bin/python bench/credentials_bench.py --rounds 6 --requests 3000
    .venv/bin/python bench/credentials_bench.py --src /tmp/gp-main --rounds 6 --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trustme
import yaml

REPO = Path(__file__).resolve().parent.parent
BODY = b"x" * 1024
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n" + BODY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _origin(port: int, cert: str, key: str) -> None:
    import uvloop

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", port, ssl=ctx, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def start_origin(root: Path) -> tuple[multiprocessing.Process, int, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = root / "origin-cert.pem", root / "origin-key.pem", root / "origin-ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    proc = multiprocessing.Process(target=_origin, args=(port, str(cert_file), str(key_file)), daemon=True)
    proc.start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port, ca_file


class Serve:
    def __init__(self, src: Path, root: Path, origin_ca: Path) -> None:
        self.src, self.root = src, root
        self.data = root / "data"
        self.ports = {k: free_port() for k in ("api", "http", "socks", "dns")}
        cfg = {
            "greyproxy": {"addr": f":{self.ports['api']}"},
            "services": [
                {
                    "name": "http-proxy",
                    "addr": f":{self.ports['http']}",
                    "handler": {"type": "http"},
                    "listener": {"type": "tcp"},
                },
                {
                    "name": "socks5-proxy",
                    "addr": f":{self.ports['socks']}",
                    "handler": {"type": "socks5"},
                    "listener": {"type": "tcp"},
                },
                {
                    "name": "dns-proxy",
                    "addr": f":{self.ports['dns']}",
                    "handler": {"type": "dns"},
                    "listener": {"type": "dns"},
                },
            ],
            "mitm": {"upstreamCaFile": str(origin_ca)},
        }
        self.cfg = root / "config.yaml"
        self.cfg.write_text(yaml.safe_dump(cfg))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GREYPROXY_")}
        self.env.update({"GREYPROXY_DATA_HOME": str(self.data), "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"})
        self.proc: subprocess.Popen | None = None
        self.api = f"http://127.0.0.1:{self.ports['api']}"

    def cli(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "greyproxy", *args, "-C", str(self.cfg)],
            cwd=self.src,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self.cli("cert", "generate")
        log = open(self.root / "serve.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "greyproxy", "serve", "-C", str(self.cfg)],
            cwd=self.src,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.api}/api/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the stack did not become healthy: " + (self.root / "serve.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def load(serve: Serve, url: str, header: str, n: int, parallel: int) -> dict[str, float]:
    argv = [
        "curl",
        "-s",
        "--http1.1",
        "-Z",
        "--parallel-max",
        str(parallel),
        "--noproxy",
        "",
        "-x",
        f"http://bench:x@127.0.0.1:{serve.ports['http']}",
        "--cacert",
        str(serve.data / "ca-cert.pem"),
        "--max-time",
        "300",
        "-H",
        header,
        "-w",
        "%{http_code}\\n",
        "-o",
        "/dev/null",
        f"{url}?[1-{n}]",
    ]
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=320, stdin=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    ok = sum(1 for c in p.stdout.split() if c == "200")
    return {"rps": ok / secs, "ok": ok, "errors": n - ok, "seconds": secs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=REPO, help="source tree to run the stack from")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per mode (alternating)")
    ap.add_argument("--requests", type=int, default=3000, help="requests per round")
    ap.add_argument("--parallel", type=int, default=20, help="curl's parallel connections")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gp-credbench-"))
    origin, port, origin_ca = start_origin(root)
    serve = Serve(args.src.resolve(), root, origin_ca)
    try:
        serve.start()
        url = f"https://127.0.0.1:{port}/1k"
        modes = {"none": "X-Key: " + "n" * 49}
        ph = f"greyproxy:credential:v1:bench:{secrets.token_hex(16)}"
        r = httpx.post(
            f"{serve.api}/api/sessions",
            trust_env=False,
            timeout=10,
            json={
                "session_id": "bench",
                "container_name": "bench",
                "mappings": {ph: "sk-bench-" + secrets.token_hex(16)},
                "labels": {ph: "BENCH_KEY"},
                "hosts": {ph: ["127.0.0.1"]},
                "ttl_seconds": 3600,
            },
        )
        if r.status_code == 200:
            modes["placeholder"] = f"X-Key: {ph}"
        load(serve, url, modes["none"], max(200, args.requests // 10), args.parallel)  # warm-up
        results: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(args.rounds):
            for mode, header in modes.items():
                res = load(serve, url, header, args.requests, args.parallel)
                if mode == "placeholder":  # keep the session alive for long runs
                    httpx.post(f"{serve.api}/api/sessions/bench/heartbeat", trust_env=False, timeout=10)
                print(json.dumps({"round": i, "mode": mode, **{k: round(v, 1) for k, v in res.items()}}), flush=True)
                if res["errors"]:
                    print(f"warning: {res['errors']} failed requests in {mode}", file=sys.stderr)
                results[mode].append(res["rps"])
        summary = {
            m: {"median_rps": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
            for m, v in results.items()
        }
        print(json.dumps({"src": str(args.src), "summary": summary}))
    finally:
        serve.stop()
        origin.terminate()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
