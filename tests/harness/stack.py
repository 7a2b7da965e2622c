"""The whole stack (`greyproxy serve`) and single services (`greyproxy run`) as test processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from .util import (
    LISTENER_NAMES,
    PYTHON,
    REPO,
    _is_ours,
    _kill_pids,
    _tail,
    descendants,
    free_ports,
    pid_alive,
    service_env,
    short_tmpdir,
    write_config,
)


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
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(REPO),
                start_new_session=True,
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
                raise StackError(f"greyproxy serve ignored SIGTERM for {timeout}s; killed it\n{self.logs()}") from None
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
        # `with Stack(...).start(timeout=...)` must not start a second serve (it would find the
        # ports taken and exit, leaving this object pointing at the dead one)
        return self if self.proc is not None else self.start()

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

    def db_rows(self, sql: str, args: tuple = (), timeout: float = 10.0) -> list[tuple]:
        """`sql` on the stack's database, read-only (a connection of its own, closed after)."""
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=timeout)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def proxy_client(self, user: str, timeout: float = 10.0) -> httpx.Client:
        """An httpx client whose requests go through the HTTP proxy as `user` (password x)."""
        return httpx.Client(
            proxy=f"http://{user}:x@127.0.0.1:{self.ports['http-proxy']}", trust_env=False, timeout=timeout
        )

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


def run_service(
    name: str, cfg_path: str | os.PathLike, env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None
) -> ServiceProcess:
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
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )
    return ServiceProcess(name, proc, log_path)


def stack_cli(stack: Stack, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``greyproxy <args> -C <the stack's config>`` with the stack's environment (check=True)."""
    return subprocess.run(
        [PYTHON, "-m", "greyproxy", *args, "-C", str(stack.cfg_path)],
        env=stack.env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


@contextlib.contextmanager
def intercepting_stack(
    overrides: dict | None = None,
    upstream_ca_file: str | os.PathLike | None = None,
    allow: Iterable[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A started ``Stack`` that intercepts HTTPS: its CA generated before start (the proxy loads it
    at once), ``upstream_ca_file`` trusted for the origins (``mitm.upstreamCaFile``; the module's
    ``origin_ca_file``), an allow rule ``* -> host``, any port, for each host of ``allow``, ``env``
    added to its processes' environment. Stopped and removed when the block ends."""
    over = dict(overrides or {})
    if upstream_ca_file is not None:
        over["mitm"] = {**over.get("mitm", {}), "upstreamCaFile": str(upstream_ca_file)}
    s = Stack(over)
    s.env.update(env or {})
    try:
        stack_cli(s, "cert", "generate")
        s.start()
        for host in allow:
            r = s.request(
                "POST",
                "/api/rules",
                json={"container_pattern": "*", "destination_pattern": host, "port_pattern": "*", "action": "allow"},
            )
            assert r.status_code == 201, r.text
        yield s
    finally:
        s.cleanup()
        shutil.rmtree(s.root, ignore_errors=True)
