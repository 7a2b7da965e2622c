"""Small helpers of the test harness: free ports, temp dirs, polling, configs, process inspection."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
LISTENER_NAMES = ("http-proxy", "socks5-proxy", "dns-proxy")
# Variables of ours that must not leak from the developer's shell into a test process.
_OUR_ENV = (
    "GREYPROXY_CONFIG",
    "GREYPROXY_HOST",
    "GREYPROXY_SILENT_ALLOW",
    "GREYPROXY_DATA_HOME",
    "GREYPROXY_RUN_DIR",
    "GREYPROXY_LOG_DIR",
    "GREYPROXY_PYTHON",
    "GREYPROXY_SUPERVISOR_PID",
    "GREYPROXY_EXIT_WITH_PARENT",
)

T = TypeVar("T")


# Every port free_ports() handed out in this process: never handed out twice, so two picks (a
# stack's listeners and, later, its bus's tcp ports) cannot name the same port.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def _worker_slot() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker, (0, 1) outside xdist: each worker only takes the
    ports whose number halved, modulo count, is its index, so two workers never pick the same port
    (halved: Linux hands out even ports to bind(("", 0)) while it has some, odd ones to connect)."""
    name, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if name.startswith("gw") and name[2:].isdigit() and count.isdigit() and int(count) > 0:
        return int(name[2:]) % int(count), int(count)
    return 0, 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (see free_ports)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports on 127.0.0.1 that nobody listens on right now and that this process
    never handed out before (nor, under pytest-xdist, another worker: see _worker_slot). The
    sockets stay bound while choosing, so the kernel offers a new port each time."""
    index, count = _worker_slot()
    socks: list[socket.socket] = []
    chosen: list[int] = []
    try:
        with _HANDED_OUT_LOCK:
            while len(chosen) < n:
                if len(socks) >= 64 * count * (n + 8):
                    raise RuntimeError(f"no {n} free ports after trying {len(socks)}")
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                if (port // 2) % count == index and port not in _HANDED_OUT:
                    chosen.append(port)
            _HANDED_OUT.update(chosen)
        return chosen
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
            {
                "name": "http-proxy",
                "addr": f":{ports['http-proxy']}",
                "handler": {"type": "http"},
                "listener": {"type": "tcp"},
            },
            {
                "name": "socks5-proxy",
                "addr": f":{ports['socks5-proxy']}",
                "handler": {"type": "socks5"},
                "listener": {"type": "tcp"},
            },
            {
                "name": "dns-proxy",
                "addr": f":{ports['dns-proxy']}",
                "handler": {"type": "dns"},
                "listener": {"type": "dns"},
            },
        ],
        "bus": {"heartbeatInterval": 0.3},
        # One proxy process as before proxy.workers existed (auto would start one per CPU); the
        # worker tests (test_workers.py) ask for more.
        "proxy": {"workers": 1},
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


def best_time(fn: Callable[..., Any], *args: Any, rounds: int = 3) -> float:
    """The shortest of `rounds` timings of `fn(*args)`, in seconds: for bounds on work done (an
    algorithm's order), where a slow round is the machine's noise, not the code's."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best
