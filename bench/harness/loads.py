"""Load generators: wrk (with Lua for absolute-URI and CONNECT requests), curl, and small Python
clients (smoke mode, exact-count pipelined requests, idle tunnels, approval holds).

Every loop here is bounded by a count and a deadline; every socket has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ORIGIN_HOST = "127.0.0.1"


def pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s))) - 1))]


def basic_auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:x".encode()).decode()


# ----------------------------------------------------------------------------- wrk

_LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, \"connect\": %d, \"read\": %d, " ..
    "\"write\": %d, \"status\": %d, \"timeout\": %d, \"p50_us\": %d, \"p99_us\": %d, \"max_us\": %d}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def lua_absolute(origin_port: int, path: str = "/1k", close: bool = False) -> str:
    """Plain HTTP through a forward proxy: the request line carries the absolute URI."""
    url = f"http://{ORIGIN_HOST}:{origin_port}{path}"
    lines = ['wrk.method = "GET"', f'wrk.path = "{url}"', f'wrk.headers["Host"] = "{ORIGIN_HOST}:{origin_port}"']
    if close:
        lines.append('wrk.headers["Connection"] = "close"')
    return "\n".join(lines) + "\n" + _LUA_DONE


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    proxy_port: int, lua: str, conns: int, duration: float, workdir: Path, threads: int = 1, timeout_s: int = 5
) -> dict[str, Any]:
    """wrk against the proxy; figures from the script's done() hook (exact, in µs)."""
    script = workdir / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text(lua)
    dur = max(1, int(round(duration)))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{dur}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        f"http://127.0.0.1:{proxy_port}",
    ]
    try:
        p = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=dur + 30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"error": "wrk did not finish"}
    finally:
        with contextlib.suppress(OSError):
            script.unlink()
    data = None
    for line in p.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[8:])
    if data is None:
        return {"error": f"wrk failed ({p.returncode}): {p.stdout.strip()[-300:]}"}
    secs = data["duration_us"] / 1e6
    good = data["requests"] - data["status"]
    # wrk's "read" errors include a proxy closing the connection after a complete response (tinyproxy
    # never keeps a client connection alive): those are not failed requests, so they are only reported.
    errors = data["connect"] + data["timeout"] + data["status"]
    return {
        "rps": good / secs if secs > 0 else 0.0,
        "p50_ms": data["p50_us"] / 1000.0,
        "p99_ms": data["p99_us"] / 1000.0,
        "max_ms": data["max_us"] / 1000.0,
        "requests": data["requests"],
        "duration_s": secs,
        "errors": errors,
        "non2xx": data["status"],
        "socket_errors": {k: data[k] for k in ("connect", "read", "write", "timeout")},
        "error_rate": errors / max(1, data["requests"] + data["connect"]) if data["requests"] else 1.0,
    }


# ----------------------------------------------------------------------------- tunnelbench (C)

_TB_SRC = Path(__file__).resolve().parent / "tunnelbench.c"


def tunnelbench_binary(build_dir: Path) -> tuple[str | None, str]:
    """Compile harness/tunnelbench.c once (cc -O2) into build_dir. (path, "") or (None, why not)."""
    out = build_dir / "tunnelbench"
    if out.exists() and out.stat().st_mtime >= _TB_SRC.stat().st_mtime:
        return str(out), ""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc) to build bench/harness/tunnelbench.c"
    build_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        [cc, "-O2", "-o", str(out), str(_TB_SRC)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    if p.returncode != 0:
        return None, f"building tunnelbench failed: {p.stdout[-300:]}"
    return str(out), ""


def run_tunnelbench(binary: str, proxy_port: int, origin_port: int, conns: int, duration: float) -> dict[str, Any]:
    argv = [binary, str(proxy_port), ORIGIN_HOST, str(origin_port), str(conns), str(duration), "/1k"]
    try:
        p = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=duration + 30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"error": "tunnelbench did not finish"}
    try:
        d = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"tunnelbench failed ({p.returncode}): {(p.stdout + p.stderr).strip()[-300:]}"}
    secs = d["seconds"]
    n = d["tunnels"]
    return {
        "rps": n / secs if secs > 0 else 0.0,
        "p50_ms": d["p50_us"] / 1000.0,
        "p99_ms": d["p99_us"] / 1000.0,
        "max_ms": d["max_us"] / 1000.0,
        "requests": n + d["errors"],
        "errors": d["errors"],
        "refused": d["refused"],
        "duration_s": secs,
        "error_rate": d["errors"] / max(1, n + d["errors"]) if n else 1.0,
    }


# ----------------------------------------------------------------------------- Python HTTP loads


def _request(origin_port: int, path: str, close: bool, user: str | None = None) -> bytes:
    hdr = f"GET http://{ORIGIN_HOST}:{origin_port}{path} HTTP/1.1\r\nHost: {ORIGIN_HOST}:{origin_port}\r\n"
    if user:
        hdr += f"Proxy-Authorization: {basic_auth(user)}\r\n"
    if close:
        hdr += "Connection: close\r\n"
    return (hdr + "\r\n").encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep-alive) after reading one whole Content-Length response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, keep = 0, True
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v.strip())
        elif k == "connection" and "close" in v.lower():
            keep = False
    if length:
        await reader.readexactly(length)
    return status, keep


async def _http_worker(
    proxy_port: int,
    req: bytes,
    close: bool,
    deadline: float,
    lat: list[float],
    counts: dict[str, int],
    max_requests: int,
) -> None:
    loop = asyncio.get_running_loop()
    reader = writer = None
    try:
        while loop.time() < deadline and counts["done"] < max_requests:
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy_port), 5)
                writer.write(req)
                status, keep = await asyncio.wait_for(_read_response(reader), 10)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                counts["errors"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
                continue
            lat.append((time.perf_counter() - t0) * 1000.0)
            counts["done" if status < 400 else "errors"] += 1
            if close or not keep:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def _timed_clients(
    conns: int, duration: float, client: Callable[[float, list[float], dict[str, int]], Awaitable[None]]
) -> dict[str, Any]:
    """Run `conns` copies of ``client(deadline, latencies_ms, counts)`` until `duration` seconds
    have passed (counts: "done" and "errors"); the load's rate, latencies and error share."""

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        lat: list[float] = []
        counts = {"done": 0, "errors": 0}
        t0 = loop.time()
        await asyncio.gather(*[client(t0 + duration, lat, counts) for _ in range(conns)])
        secs = loop.time() - t0
        return {
            "rps": counts["done"] / secs,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "requests": counts["done"] + counts["errors"],
            "errors": counts["errors"],
            "duration_s": secs,
            "error_rate": counts["errors"] / max(1, counts["done"] + counts["errors"]),
        }

    return asyncio.run(main())


def py_http_load(
    proxy_port: int, origin_port: int, conns: int, duration: float, close: bool = False, max_requests: int = 1_000_000
) -> dict[str, Any]:
    """The smoke-mode stand-in for wrk: conns asyncio clients for `duration` seconds."""
    req = _request(origin_port, "/1k", close)
    return _timed_clients(
        conns,
        duration,
        lambda deadline, lat, counts: _http_worker(proxy_port, req, close, deadline, lat, counts, max_requests),
    )


def py_connect_load(
    proxy_port: int, origin_port: int, conns: int, duration: float, max_tunnels: int = 1_000_000
) -> dict[str, Any]:
    """New tunnels per second (smoke mode): CONNECT + one GET, read to EOF, close."""
    auth = f"{ORIGIN_HOST}:{origin_port}"
    connect = f"CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n\r\n".encode()
    get = f"GET /1k HTTP/1.1\r\nHost: {auth}\r\nConnection: close\r\n\r\n".encode()

    async def one(deadline: float, lat: list[float], counts: dict[str, int]) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and counts["done"] < max_tunnels:
            t0 = time.perf_counter()
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy_port), 5)
                writer.write(connect)
                reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                if b" 200" not in reply.split(b"\r\n", 1)[0]:
                    raise OSError(f"refused: {reply[:40]!r}")
                writer.write(get)
                data = await asyncio.wait_for(reader.read(-1), 10)
                ok = data.startswith(b"HTTP/1.1 200") and len(data) > 1024
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                ok = False
            finally:
                if writer is not None:
                    writer.close()
            if ok:
                counts["done"] += 1
                lat.append((time.perf_counter() - t0) * 1000.0)
            else:
                counts["errors"] += 1
                await asyncio.sleep(0.01)

    return _timed_clients(conns, duration, one)


def pipelined_requests(
    proxy_port: int, origin_port: int, user: str, total: int, conns: int = 8, depth: int = 64, deadline_s: float = 120.0
) -> dict[str, Any]:
    """Exactly `total` keep-alive requests (as `user`), pipelined `depth` deep on `conns` connections.

    Responses are counted by their status lines (the 1 KiB bodies are all 'x', so they cannot
    contain one). Returns completed count, errors and the wall time.
    """
    req = _request(origin_port, "/1k", False, user)
    marker = b"HTTP/1.1 "

    async def worker(n: int, stats: dict[str, int], stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        sent = 0
        reader = writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy_port), 5)
            while sent < n and loop.time() < stop_at:
                k = min(depth, n - sent)
                writer.write(req * k)
                got, tail = 0, b""
                while got < k:
                    chunk = await asyncio.wait_for(reader.read(262144), max(0.1, stop_at - loop.time()))
                    if not chunk:
                        raise ConnectionError("proxy closed the connection")
                    buf = tail + chunk
                    got += buf.count(marker) - tail.count(marker)
                    tail = buf[-(len(marker) - 1) :]
                    if b"HTTP/1.1 4" in buf or b"HTTP/1.1 5" in buf:
                        stats["errors"] += 1
                sent += k
                stats["done"] += k
        except (OSError, asyncio.TimeoutError, ConnectionError):
            stats["errors"] += 1
        finally:
            if writer is not None:
                writer.close()

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stats = {"done": 0, "errors": 0}
        t0 = loop.time()
        share = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
        await asyncio.gather(*[worker(n, stats, t0 + deadline_s) for n in share if n])
        return {"done": stats["done"], "errors": stats["errors"], "seconds": loop.time() - t0}

    return asyncio.run(main())


# ----------------------------------------------------------------------------- downloads


def curl_download(
    url: str, proxy_port: int | None = None, tunnel: bool = False, timeout: float = 120.0
) -> dict[str, Any]:
    """MB/s (10^6 bytes) of one download with curl, bodies discarded."""
    argv = [
        "curl",
        "-s",
        "-S",
        "-o",
        "/dev/null",
        "--max-time",
        str(int(timeout)),
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        "--noproxy",
        "",
    ]
    if proxy_port is not None:
        argv += ["-x", f"http://127.0.0.1:{proxy_port}"]
        if tunnel:
            argv.append("-p")
    argv.append(url)
    try:
        p = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout + 10,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    except subprocess.TimeoutExpired:
        return {"error": "curl timed out"}
    try:
        code, size, secs = p.stdout.split()
        code_i, size_i, secs_f = int(code), int(float(size)), float(secs)
    except ValueError:
        return {"error": f"curl failed: {p.stderr.strip()[-200:]}"}
    if code_i != 200:
        return {"error": f"HTTP {code_i}: {p.stderr.strip()[-200:]}"}
    if p.returncode != 0:  # e.g. 28: --max-time ran out; the figures are of a partial download
        return {"error": f"curl exit {p.returncode} after {size_i} bytes in {secs_f:.1f} s: {p.stderr.strip()[-200:]}"}
    return {"mbps": size_i / secs_f / 1e6 if secs_f > 0 else 0.0, "bytes": size_i, "seconds": secs_f}


def py_download(
    origin_port: int, proxy_port: int | None, tunnel: bool, expect: int, timeout: float = 60.0
) -> dict[str, Any]:
    """Smoke-mode download: raw socket, HTTP/1.0-style read until the body is complete."""
    target = ("127.0.0.1", proxy_port) if proxy_port else ("127.0.0.1", origin_port)
    t0 = time.perf_counter()
    s = socket.create_connection(target, timeout=10)
    try:
        return _py_download(s, t0, origin_port, proxy_port, tunnel, expect, timeout)
    except OSError as exc:
        return {"error": f"download failed: {exc!r}"}
    finally:
        s.close()


def _py_download(
    s: socket.socket, t0: float, origin_port: int, proxy_port: int | None, tunnel: bool, expect: int, timeout: float
) -> dict[str, Any]:
    if proxy_port and tunnel:
        s.sendall(f"CONNECT {ORIGIN_HOST}:{origin_port} HTTP/1.1\r\nHost: {ORIGIN_HOST}:{origin_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            c = s.recv(4096)
            if not c:
                return {"error": "tunnel closed"}
            head += c
        if b" 200" not in head.split(b"\r\n", 1)[0]:
            return {"error": head.split(b"\r\n", 1)[0].decode(errors="replace")}
        path = "/big"
    else:
        path = f"http://{ORIGIN_HOST}:{origin_port}/big" if proxy_port else "/big"
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ORIGIN_HOST}:{origin_port}\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    stop = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf and time.monotonic() < stop:
        c = s.recv(65536)
        if not c:
            break
        buf += c
    head, _, body = buf.partition(b"\r\n\r\n")
    length = expect
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    got = len(body)
    while got < length and time.monotonic() < stop:
        c = s.recv(1 << 20)
        if not c:
            break
        got += len(c)
    secs = time.perf_counter() - t0
    if got < expect:
        return {"error": f"short download: {got} < {expect}"}
    return {"mbps": got / secs / 1e6, "bytes": got, "seconds": secs}


# ----------------------------------------------------------------------------- HTTPS through interception


def curl_https_load(
    proxy_port: int, url: str, ca_file: Path, n: int, parallel: int = 20, timeout: float = 120.0
) -> dict[str, Any]:
    """n HTTPS GETs through the proxy (CONNECT, TLS to the proxy's minted certificate), `parallel`
    connections kept alive by one curl process. req/s = successes / wall time."""
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
        f"http://127.0.0.1:{proxy_port}",
        "--cacert",
        str(ca_file),
        "--max-time",
        str(int(timeout)),
        "-w",
        "%{http_code}\\n",
        "-o",
        "/dev/null",
        f"{url}?[1-{n}]",
    ]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout + 10,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    except subprocess.TimeoutExpired:
        return {"error": "curl timed out"}
    secs = time.perf_counter() - t0
    codes = p.stdout.split()
    ok = sum(1 for c in codes if c == "200")
    if ok == 0:
        return {"error": f"no successful request (curl {p.returncode}): {p.stderr.strip()[-200:]}"}
    return {"rps": ok / secs, "requests": n, "ok": ok, "errors": n - ok, "seconds": secs, "error_rate": (n - ok) / n}


def curl_probe_https(proxy_port: int, url: str, ca_file: Path) -> tuple[bool, str]:
    argv = [
        "curl",
        "-s",
        "-S",
        "--http1.1",
        "--noproxy",
        "",
        "-x",
        f"http://127.0.0.1:{proxy_port}",
        "--cacert",
        str(ca_file),
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ]
    try:
        p = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    except subprocess.TimeoutExpired:
        return False, "probe timed out"
    if p.stdout.strip() == "200":
        return True, ""
    return False, (p.stderr.strip() or f"HTTP {p.stdout.strip()}")[-200:]


# ----------------------------------------------------------------------------- idle tunnels


def open_idle_tunnels(
    proxy_port: int, origin_port: int, n: int, deadline_s: float = 60.0
) -> tuple[list[socket.socket], str | None]:
    """n CONNECT tunnels to the origin, established and left idle. (sockets, error or None)."""
    socks: list[socket.socket] = []
    req = f"CONNECT {ORIGIN_HOST}:{origin_port} HTTP/1.1\r\nHost: {ORIGIN_HOST}:{origin_port}\r\n\r\n".encode()
    stop = time.monotonic() + deadline_s
    err = None
    # Open in waves of 50: send all CONNECTs of a wave, then read their answers.
    while len(socks) < n and time.monotonic() < stop:
        wave = []
        for _ in range(min(50, n - len(socks))):
            try:
                s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
                s.sendall(req)
                wave.append(s)
            except OSError as exc:
                err = f"connect failed after {len(socks) + len(wave)} tunnels: {exc}"
                break
        for s in wave:
            try:
                head = b""
                while b"\r\n\r\n" not in head and time.monotonic() < stop:
                    c = s.recv(1024)
                    if not c:
                        break
                    head += c
                if b" 200" in head.split(b"\r\n", 1)[0]:
                    socks.append(s)
                    continue
                err = f"tunnel refused: {head[:60]!r}"
            except OSError as exc:
                err = f"tunnel failed: {exc}"
            s.close()
        if err:
            break
    return socks, err


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
