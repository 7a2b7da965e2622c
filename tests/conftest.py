"""Shared helpers and fixtures for the whole suite.

Plain helpers (import them with ``from conftest import free_port, Stack, ...``; pytest puts
``tests/`` on ``sys.path`` because the test folders are not packages):

- ``free_port()`` / ``free_ports(n)`` -- unused TCP ports on 127.0.0.1.
- ``short_tmpdir(prefix)`` -- a fresh dir directly under /tmp (ipc:// paths must stay < ~100 bytes).
- ``wait_for(fn, timeout, ...)`` -- poll ``fn()`` until it returns something truthy.
- ``write_config(path, overrides, ports)`` -- a YAML config on the given ports, overrides deep-merged.
- ``service_env(data_dir, **extra)`` -- os.environ minus our GREYPROXY_* variables, repo on PYTHONPATH.
- ``Stack`` -- the whole stack (``greyproxy serve``) on free ports in a private data dir.
- ``run_service(name, cfg_path, env)`` -- one ``greyproxy run <name>`` process (``ServiceProcess``).
- ``pid_alive(pid)`` / ``descendants(pid)`` -- process inspection through /proc.
- ``start_https_origin(ca, host, handler)`` -- an HTTPS origin (``TlsHttpServer``) with a trustme cert.
- ``stack_cli(stack, *args)`` -- ``greyproxy <args> -C <stack config>`` with the stack's env.

Fixtures (they always clean up, even when the test fails):

- ``make_stack(**overrides)`` -- start a ``Stack`` and wait until ``/api/health`` is 200.
- ``service_runner(name, cfg_path, env)`` -- ``run_service`` whose processes are killed at teardown.
- ``short_tmp`` -- a ``short_tmpdir()`` removed at teardown.

Every process is started with ``sys.executable`` (so any venv works) in its own session, with
the repo root as working directory and first on PYTHONPATH (so the tree under test is the
code that runs, not some other installed copy).
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LISTENER_NAMES = ("http-proxy", "socks5-proxy", "dns-proxy")
# Variables of ours that must not leak from the developer's shell into a test process.
_OUR_ENV = ("GREYPROXY_CONFIG", "GREYPROXY_HOST", "GREYPROXY_SILENT_ALLOW", "GREYPROXY_DATA_HOME",
            "GREYPROXY_RUN_DIR", "GREYPROXY_LOG_DIR", "GREYPROXY_PYTHON", "GREYPROXY_SUPERVISOR_PID",
            "GREYPROXY_EXIT_WITH_PARENT")

T = TypeVar("T")


# ----------------------------------------------------------------------------- small helpers

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open together while choosing, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def short_tmpdir(prefix: str = "gp") -> Path:
    """A new private dir directly under /tmp: ipc:// socket paths are limited to ~100 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_for(fn: Callable[[], T], timeout: float, interval: float = 0.05, message: str = "condition") -> T:
    """Call fn() until it returns something truthy (returned) or timeout seconds pass (AssertionError).

    Exceptions raised by fn count as "not yet"; the last one is named in the failure.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {message}{extra}")
        time.sleep(interval)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_config(ports: dict[str, int]) -> dict[str, Any]:
    """A config dict with the API and listeners on the given ports and a fast heartbeat."""
    return {
        "greyproxy": {"addr": f":{ports['api']}"},
        "services": [
            {"name": "http-proxy", "addr": f":{ports['http-proxy']}", "handler": {"type": "http"},
             "listener": {"type": "tcp"}},
            {"name": "socks5-proxy", "addr": f":{ports['socks5-proxy']}", "handler": {"type": "socks5"},
             "listener": {"type": "tcp"}},
            {"name": "dns-proxy", "addr": f":{ports['dns-proxy']}", "handler": {"type": "dns"},
             "listener": {"type": "dns"}},
        ],
        "bus": {"heartbeatInterval": 0.3},
    }


def write_config(path: Path, overrides: dict | None = None, ports: dict[str, int] | None = None) -> dict:
    """Write a YAML config (free ports unless given; overrides deep-merged) and return the dict."""
    if ports is None:
        ports = dict(zip(("api", *LISTENER_NAMES), free_ports(4)))
    cfg = deep_merge(base_config(ports), overrides or {})
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def service_env(data_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """os.environ without our GREYPROXY_* variables, the repo first on PYTHONPATH, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in _OUR_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if data_dir is not None:
        env["GREYPROXY_DATA_HOME"] = str(data_dir)
    env.update(extra)
    return env




def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (a reaped-later child of a dead parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _is_ours(pid: int) -> bool:
    """Guard against pid reuse: only a process running greyproxy/supervisord is ours to kill."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"greyproxy" in cmd or b"supervisor" in cmd


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# ----------------------------------------------------------------------------- the whole stack

class StackError(AssertionError):
    """The stack did not start, or did not stop cleanly."""


class Stack:
    """``greyproxy serve`` on free ports in a private data dir under /tmp.

    Attributes: ``root`` (tmp dir), ``data_dir``, ``cfg_path``, ``config`` (the dict written),
    ``ports`` ({"api", "http-proxy", "socks5-proxy", "dns-proxy"}), ``api`` (base URL,
    ``http://127.0.0.1:PORT``), ``http_proxy_url``, ``socks_port``, ``dns_port``, ``db_path``,
    ``env`` (the serve process's environment), ``proc`` (its Popen), ``startup_seconds``.

    Use it as a context manager (which also removes ``root`` after a clean stop), or
    ``start()`` / ``stop()`` (and ``cleanup()`` in a finally; then removing ``root`` is yours).
    """

    def __init__(self, overrides: dict | None = None, root: Path | None = None) -> None:
        self.root = Path(root) if root else short_tmpdir("gp")
        self.data_dir = self.root / "data"
        self.cfg_path = self.root / "config.yaml"
        self.ports = dict(zip(("api", *LISTENER_NAMES), free_ports(4)))
        self.config = write_config(self.cfg_path, overrides, self.ports)
        prefix = "/" + str(self.config.get("greyproxy", {}).get("pathPrefix", "/")).strip().strip("/")
        self.api = f"http://127.0.0.1:{self.ports['api']}{prefix.rstrip('/')}"
        self.http_proxy_url = f"http://127.0.0.1:{self.ports['http-proxy']}"
        self.socks_port = self.ports["socks5-proxy"]
        self.dns_port = self.ports["dns-proxy"]
        self.db_path = self.data_dir / "greyproxy.db"
        self.env = service_env(self.data_dir)
        self.serve_log = self.root / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._known_pids: set[int] = set()
        self._client = httpx.Client(timeout=3.0, trust_env=False)

    # -- lifecycle --
    def start(self, timeout: float = 20.0, extra_args: tuple[str, ...] = ()) -> Stack:
        """Start serve and wait until /api/health is 200 (StackError with the logs otherwise)."""
        t0 = time.monotonic()
        with open(self.serve_log, "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "greyproxy", "serve", "-C", str(self.cfg_path), *extra_args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=str(REPO), start_new_session=True,
            )
        try:
            self.wait_healthy(timeout)
        except BaseException:
            with contextlib.suppress(Exception):  # the startup failure is the error to report
                self.cleanup()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def wait_healthy(self, timeout: float = 20.0) -> dict:
        """Poll /api/health until 200; return its body."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"greyproxy serve exited with {self.proc.returncode}\n{self.logs()}")
            try:
                code, body = self.health()
                if code == 200:
                    self._remember_pids(body)
                    return body
                last = f"{code} {body}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise StackError(f"/api/health not 200 after {timeout}s (last: {last})\n{self.logs()}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM serve (supervisord) and wait; past timeout kill everything and fail loudly."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            pids = self.child_pids()
            self._known_pids.update(pids)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_everything()
                raise StackError(f"greyproxy serve ignored SIGTERM for {timeout}s; killed it\n{self.logs()}")
        return self.proc.returncode

    def cleanup(self) -> None:
        """Teardown that never leaves a process behind: stop, then kill any straggler, then close."""
        try:
            try:
                self.stop()
            finally:
                left = [p for p in self._known_pids if pid_alive(p) and _is_ours(p)]
                if left:
                    _kill_pids(left)
                    raise StackError(f"processes {left} outlived greyproxy serve; killed them\n{self.logs()}")
        finally:
            self._client.close()

    def _kill_everything(self) -> None:
        assert self.proc is not None
        pids = descendants(self.proc.pid)
        self._known_pids.update(pids)
        # supervisord puts each program in its own process group: kill those too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _kill_pids(pids)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()  # raises if the stack did not stop cleanly: the tmp dir is kept to look at
        shutil.rmtree(self.root, ignore_errors=True)

    # -- inspection --
    def url(self, path: str) -> str:
        return f"{self.api}{path}"

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self._client.get(self.url(path), **kw)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self._client.request(method, self.url(path), **kw)

    def health(self) -> tuple[int, dict]:
        """(status code, body) of GET /api/health."""
        r = self._client.get(self.url("/api/health"))
        try:
            body = r.json()
        except ValueError:
            body = {"_raw": r.text}
        return r.status_code, body

    def pid(self, service: str) -> int | None:
        """The pid /api/health reports for a service (bus, proxy, api, recorder, maintenance)."""
        _code, body = self.health()
        pid = (body.get("services", {}).get(service) or {}).get("pid")
        if pid:
            self._known_pids.add(int(pid))
        return pid

    def child_pids(self) -> list[int]:
        """Live descendants of the serve process (supervisord's programs)."""
        if self.proc is None:
            return []
        return descendants(self.proc.pid)

    def _remember_pids(self, body: dict) -> None:
        for svc in (body.get("services") or {}).values():
            if isinstance(svc, dict) and svc.get("pid"):
                self._known_pids.add(int(svc["pid"]))
        self._known_pids.update(self.child_pids())

    def logs(self, lines: int = 40) -> str:
        """The tail of serve's output and of every log in <data>/logs."""
        parts = [f"== serve output ==\n{_tail(self.serve_log, lines)}"]
        log_dir = self.data_dir / "logs"
        if log_dir.is_dir():
            for path in sorted(log_dir.glob("*.log")):
                parts.append(f"== {path.name} ==\n{_tail(path, lines)}")
        return "\n".join(parts)


# ----------------------------------------------------------------------------- one service

class ServiceProcess:
    """One ``greyproxy run <name>`` process, its output in ``log_path``."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL past the timeout (then AssertionError)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s\n{self.logs()}") from None
        return self.proc.returncode

    def logs(self, lines: int = 60) -> str:
        return f"== {self.name} ({self.log_path}) ==\n{_tail(self.log_path, lines)}"


def run_service(name: str, cfg_path: str | os.PathLike, env: dict[str, str] | None = None,
                log_path: str | os.PathLike | None = None) -> ServiceProcess:
    """Start ``python -m greyproxy run <name> -C cfg_path`` in its own session.

    env: the full environment (see service_env(); GREYPROXY_DATA_HOME picks the data dir).
    The caller stops it (or use the ``service_runner`` fixture, which always does).
    """
    env = service_env() if env is None else env
    if log_path is None:
        log_path = Path(cfg_path).parent / f"{name}-{time.monotonic_ns()}.log"
    log_path = Path(log_path)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [PYTHON, "-m", "greyproxy", "run", name, "-C", str(cfg_path)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(REPO), start_new_session=True,
        )
    return ServiceProcess(name, proc, log_path)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh dir directly under /tmp (short enough for ipc:// paths), removed afterwards."""
    path = short_tmpdir("gpt")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_stack() -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(proxy={"holdTimeout": 2})`` starts a healthy Stack (overrides are
    deep-merged into the config; ``timeout=`` and ``extra_args=`` go to ``Stack.start``).
    Every stack made is stopped at teardown; a stack that does not stop cleanly fails the test."""
    stacks: list[Stack] = []

    def factory(timeout: float = 20.0, extra_args: tuple[str, ...] = (), **overrides: Any) -> Stack:
        stack = Stack(overrides)
        stacks.append(stack)
        return stack.start(timeout=timeout, extra_args=extra_args)

    yield factory
    errors = []
    for stack in stacks:
        try:
            stack.cleanup()
        except Exception as exc:  # noqa: BLE001 - clean up the others first, then fail
            errors.append(exc)
        else:
            shutil.rmtree(stack.root, ignore_errors=True)
    if errors:
        raise errors[0]


@pytest.fixture
def service_runner() -> Iterator[Callable[..., ServiceProcess]]:
    """``service_runner(name, cfg_path, env)``: run_service() whose processes are SIGKILLed
    (if still running) at teardown."""
    procs: list[ServiceProcess] = []

    def start(name: str, cfg_path: str | os.PathLike, env: dict[str, str] | None = None,
              log_path: str | os.PathLike | None = None) -> ServiceProcess:
        sp = run_service(name, cfg_path, env, log_path)
        procs.append(sp)
        return sp

    yield start
    for sp in procs:
        if sp.alive():
            with contextlib.suppress(Exception):
                sp.kill()


# ----------------------------------------------------------------------------- TLS origins, CLI

class TlsHttpServer(http.server.ThreadingHTTPServer):
    """A threaded HTTPS origin. Handshakes run in the handler threads, not in accept, so a client
    that does not trust the certificate fails only its own connection."""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        super().__init__(addr, handler)

    def get_request(self):  # noqa: ANN201
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request, client_address) -> None:  # noqa: ANN001
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            return
        super().finish_request(request, client_address)


def start_https_origin(ca: Any, host: str, handler: type, *more_names: str) -> tuple[TlsHttpServer, int]:
    """Serve `handler` (a BaseHTTPRequestHandler) over TLS on host:<free port> with a certificate
    from `ca` (a ``trustme.CA``) for `host` and `more_names`, in a daemon thread. Returns
    (server, port); the caller calls ``server.shutdown(); server.server_close()``. Let the proxy
    trust it through ``mitm.upstreamCaFile`` (``ca.cert_pem.write_to_path(...)``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host, *more_names).configure_cert(ctx)
    server = TlsHttpServer((host, 0), handler, ctx)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def stack_cli(stack: Stack, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``greyproxy <args> -C <the stack's config>`` with the stack's environment (check=True)."""
    return subprocess.run([PYTHON, "-m", "greyproxy", *args, "-C", str(stack.cfg_path)], env=stack.env,
                          cwd=str(REPO), capture_output=True, text=True, timeout=timeout, check=True)
