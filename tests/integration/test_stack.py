"""Acceptance: the real five-process stack under supervisord (`greyproxy serve`), and the CLI."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    PYTHON,
    REPO,
    Stack,
    free_ports,
    pid_alive,
    service_env,
    short_tmpdir,
    wait_for,
    write_config,
)
from greyproxy import __version__

pytestmark = pytest.mark.stack

SERVICES = ("bus", "proxy", "api", "recorder", "maintenance")


@pytest.fixture(scope="module")
def stack():
    """One stack shared by the read-mostly tests of this module (started fresh, stopped at the end)."""
    with Stack() as s:
        yield s


def _up(stack: Stack, service: str, other_than: int | None = None) -> int | None:
    code, body = stack.health()
    svc = body["services"][service]
    if code == 200 and svc["up"] and svc["pid"] and svc["pid"] != other_than:
        return svc["pid"]
    return None


# ----------------------------------------------------------------------------- 1. startup


def test_serve_reports_every_service_up(stack: Stack) -> None:
    assert stack.startup_seconds is not None and stack.startup_seconds < 15, stack.startup_seconds
    code, body = stack.health()
    assert code == 200, body
    assert body["status"] == "ok"
    assert body["service"] == "greyproxy"
    assert body["version"] == __version__
    assert "down" not in body
    for name in SERVICES:
        svc = body["services"][name]
        assert svc["up"] is True, (name, body)
        assert isinstance(svc["pid"], int) and pid_alive(svc["pid"]), (name, svc)
    assert len({body["services"][n]["pid"] for n in SERVICES}) == len(SERVICES)
    assert body["ports"] == stack.ports
    assert stat.S_IMODE(os.stat(stack.data_dir).st_mode) == 0o700
    assert stack.db_path.is_file()
    assert body["database"]["up"] is True


# ----------------------------------------------------------------------------- 2. faults


@pytest.mark.parametrize("service", ["recorder", "proxy", "maintenance"])
def test_frozen_then_killed_service_is_reported_and_restarted(stack: Stack, service: str) -> None:
    old = wait_for(lambda: _up(stack, service), 15, message=f"{service} up before the fault")
    os.kill(old, signal.SIGSTOP)
    try:

        def degraded():
            code, body = stack.health()
            return code == 503 and body["status"] == "degraded" and service in body.get("down", []) and body

        body = wait_for(degraded, 5, interval=0.1, message=f"health to name {service} down")
        assert body["services"][service]["up"] is False
    finally:
        os.kill(old, signal.SIGKILL)  # also ends the stopped state
    new = wait_for(
        lambda: _up(stack, service, other_than=old), 15, interval=0.1, message=f"{service} restarted with a new pid"
    )
    assert new != old and pid_alive(new)
    assert not pid_alive(old)


def test_plain_kill_of_recorder_is_restarted(stack: Stack) -> None:
    old = wait_for(lambda: _up(stack, "recorder"), 15, message="recorder up")
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    new = wait_for(
        lambda: _up(stack, "recorder", other_than=old), 15, interval=0.1, message="recorder restarted with a new pid"
    )
    assert new != old
    assert time.monotonic() - t0 < 15


# ----------------------------------------------------------------------------- 3. shutdown


def test_sigterm_stops_serve_and_every_child(make_stack) -> None:
    s = make_stack()
    _code, body = s.health()
    pids = [body["services"][n]["pid"] for n in SERVICES]
    assert all(pids), body
    supervisor_children = s.child_pids()
    assert set(pids) <= set(supervisor_children), (pids, supervisor_children)
    t0 = time.monotonic()
    os.kill(s.proc.pid, signal.SIGTERM)
    try:
        s.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running 10s after SIGTERM\n{s.logs()}")
    wait_for(
        lambda: not any(pid_alive(p) for p in pids + supervisor_children),
        max(0.1, 10 - (time.monotonic() - t0)),
        message="every child gone",
    )
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------- 4. CLI and config


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "greyproxy", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else service_env(),
        cwd=str(REPO),
        timeout=timeout,
    )


@pytest.fixture
def cli_tmp():
    root = short_tmpdir("gpc")
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


BAD_CONFIGS = [
    ("unknown key", "greyproxy:\n  addr: ':0'\n  bogusKey: 1\n", "greyproxy.bogusKey"),
    ("unknown nested", "proxy:\n  holdTimout: 3\n", "proxy.holdTimout"),
    ("bad port", "greyproxy:\n  addr: ':70000'\n", "greyproxy.addr"),
    (
        "bad listener port",
        "services:\n  - {name: http-proxy, addr: ':http', handler: {type: http}, listener: {type: tcp}}\n",
        "services[0].addr",
    ),
    ("invalid yaml", "greyproxy: {addr: ':1'\nproxy: [\n", "invalid YAML"),
]


@pytest.mark.parametrize("command", ["serve", "config"])
@pytest.mark.parametrize("label,text,needle", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line(cli_tmp: Path, command: str, label: str, text: str, needle: str) -> None:
    cfg = cli_tmp / "bad.yaml"
    cfg.write_text(text)
    r = _cli(command, "-C", str(cfg), env=service_env(cli_tmp / "data"))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]
    assert lines[0].startswith("greyproxy: ")
    assert "Traceback" not in r.stderr
    # Nothing was started for a bad config.
    assert not (cli_tmp / "data" / "run" / "supervisord.pid").exists()


def test_version() -> None:
    r = _cli("version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"greyproxy {__version__}"


def _resolved(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)["resolved"]


def test_config_prints_ports_and_data_dir_in_order_of_precedence(cli_tmp: Path) -> None:
    ports = dict(zip(("api", "http-proxy", "socks5-proxy", "dns-proxy"), free_ports(4)))
    cfg = cli_tmp / "cfg.yaml"
    write_config(cfg, None, ports)
    home = cli_tmp / "home"
    home.mkdir()
    base = service_env(HOME=str(home))
    base.pop("XDG_DATA_HOME", None)

    env = dict(base, GREYPROXY_DATA_HOME=str(cli_tmp / "gdh"), XDG_DATA_HOME=str(cli_tmp / "xdg"))
    res = _resolved(_cli("config", "-C", str(cfg), env=env))
    assert res["ports"] == ports
    assert res["dataDir"] == str(cli_tmp / "gdh")
    assert res["db"] == str(cli_tmp / "gdh" / "greyproxy.db")

    env = dict(base, XDG_DATA_HOME=str(cli_tmp / "xdg"))
    res = _resolved(_cli("config", "-C", str(cfg), env=env))
    assert res["dataDir"] == str(cli_tmp / "xdg" / "greyproxy")

    res = _resolved(_cli("config", "-C", str(cfg), env=base))
    expected = home / ("Library/Application Support" if sys.platform == "darwin" else ".local/share") / "greyproxy"
    assert res["dataDir"] == str(expected)
    # `config` only reports: it must not create the data dir.
    assert not expected.exists()

    # The embedded default: the documented ports, bound to loopback.
    res = _resolved(_cli("config", env=base))
    assert res["ports"] == {"api": 43080, "http-proxy": 43051, "socks5-proxy": 43052, "dns-proxy": 43053}
    assert set(res["bind"].values()) == {f"127.0.0.1:{p}" for p in (43080, 43051, 43052, 43053)}


def test_host_all_interfaces_warns(cli_tmp: Path) -> None:
    env = service_env(cli_tmp / "data")
    r = _cli("config", "--host", "0.0.0.0", env=env)
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr.lower() and "0.0.0.0" in r.stderr, r.stderr
    res = yaml.safe_load(r.stdout)["resolved"]
    assert res["bind"]["http-proxy"] == "0.0.0.0:43051"
    # Loopback: no warning.
    r = _cli("config", "--host", "127.0.0.1", env=env)
    assert r.returncode == 0 and "warning" not in r.stderr.lower(), r.stderr
