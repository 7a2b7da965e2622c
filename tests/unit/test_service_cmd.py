"""`greyproxy service`: the systemd unit and launchd plist it renders, checked by
`systemd-analyze verify` where present, and the commands it runs, recorded by a fake
`systemctl` on PATH (no real service manager is touched)."""

from __future__ import annotations

import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from greyproxy.cli_service import _systemd_env, _systemd_word, manager_for, render_systemd_unit, serve_argv
from greyproxy.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, data: str = "data"):
    return load_config(env={"GREYPROXY_DATA_HOME": str(tmp_path / data)})


def _verify(unit: Path) -> str:
    """systemd-analyze's complaints about `unit` ('' when it has none)."""
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    return "\n".join(line for line in (p.stdout + p.stderr).splitlines() if str(unit) in line or p.returncode)


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
def test_rendered_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    odd = tmp_path / "dir with space%and$dollar"
    odd.mkdir()
    config = odd / "config.yaml"
    config.write_text("{}\n")
    unit = tmp_path / "greyproxy.service"
    m = manager_for(_cfg(tmp_path, "da ta"), str(config), "systemd", env={"HOME": str(tmp_path)})
    unit.write_bytes(m.content)
    assert _verify(unit) == ""
    text = m.content.decode()
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text and "KillMode=mixed" in text
    assert f'"{str(config).replace("%", "%%").replace("$", "$$")}"' in text
    assert f'Environment="GREYPROXY_DATA_HOME={tmp_path}/da ta"' in text
    # The check itself fails on a broken unit.
    unit.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    assert "restart" in _verify(unit).lower()


def test_systemd_words_round_trip_through_a_shell_like_split() -> None:
    assert _systemd_word("/usr/bin/python3") == "/usr/bin/python3"
    assert _systemd_word("a b") == '"a b"'
    assert _systemd_word('say "x"\\') == '"say \\"x\\"\\\\"'
    assert _systemd_word("100%$HOME") == "100%%$$HOME"
    # Environment=: specifiers are expanded there, variables are not ($ means nothing: systemd.exec(5))
    assert _systemd_env("GREYPROXY_DATA_HOME", "/d/$x%y") == "GREYPROXY_DATA_HOME=/d/$x%%y"
    assert _systemd_env("GREYPROXY_DATA_HOME", "/d i/$x") == '"GREYPROXY_DATA_HOME=/d i/$x"'
    with pytest.raises(ValueError):
        _systemd_word("a\nb")


def test_unit_runs_serve_as_serve_does(tmp_path: Path) -> None:
    argv = serve_argv(str(tmp_path / "c.yaml"), "127.0.0.1")
    assert argv == [sys.executable, "-m", "greyproxy", "serve", "-C", str(tmp_path / "c.yaml"), "--host", "127.0.0.1"]
    unit = render_systemd_unit(argv, {"GREYPROXY_DATA_HOME": "/d"})
    assert f"ExecStart={sys.executable} -m greyproxy serve -C {tmp_path}/c.yaml --host 127.0.0.1" in unit


def test_launchd_plist(tmp_path: Path) -> None:
    m = manager_for(_cfg(tmp_path), None, "launchd", env={"HOME": str(tmp_path)})
    assert m.path == tmp_path / "Library" / "LaunchAgents" / "greyproxy.plist"
    plist = plistlib.loads(m.content)
    assert plist["Label"] == "greyproxy"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "greyproxy", "serve"]
    assert plist["EnvironmentVariables"] == {"GREYPROXY_DATA_HOME": str(tmp_path / "data")}
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert m.commands["install"][0][:2] == ["launchctl", "bootstrap"]


# ---------------------------------------------------------------- the CLI with a fake systemctl


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    fake = bin_dir / "systemctl"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in *status*) echo "greyproxy.service - fake: active (running)";; esac
exit 0
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREYPROXY_")}
    env.update(
        {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "HOME": str(tmp_path / "home"),
            "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
            "GREYPROXY_DATA_HOME": str(tmp_path / "data"),
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def _gp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    config = Path(env["HOME"]).parent / "config.yaml"
    # An API port nothing listens on: status must say the API is not reachable.
    config.write_text("greyproxy: {addr: ':1'}\n")
    return subprocess.run(
        [sys.executable, "-m", "greyproxy", "service", *args, "-C", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=str(REPO),
    )


def _calls(env: dict[str, str]) -> list[str]:
    log = Path(env["HOME"]).parent / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def test_install_asks_without_yes(fake_env: dict[str, str]) -> None:
    p = _gp(fake_env, "install")
    assert p.returncode == 1 and "Nothing was changed" in p.stdout
    assert "systemctl --user enable --now greyproxy.service" in p.stdout  # printed, not run
    assert not (Path(fake_env["XDG_CONFIG_HOME"]) / "systemd/user/greyproxy.service").exists()
    assert _calls(fake_env) == []


def test_install_start_stop_restart_status_uninstall(fake_env: dict[str, str]) -> None:
    unit = Path(fake_env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "greyproxy.service"
    p = _gp(fake_env, "install", "--yes")
    assert p.returncode == 0, p.stderr
    assert unit.exists() and oct(unit.stat().st_mode & 0o777) == "0o644"
    assert all(line in p.stdout for line in unit.read_text().splitlines())  # what it wrote was shown
    assert f"Environment=GREYPROXY_DATA_HOME={fake_env['GREYPROXY_DATA_HOME']}" in unit.read_text()
    assert _calls(fake_env) == ["--user daemon-reload", "--user enable --now greyproxy.service"]
    for action in ("start", "stop", "restart"):
        assert _gp(fake_env, action).returncode == 0
    assert _calls(fake_env)[2:] == [
        "--user start greyproxy.service",
        "--user stop greyproxy.service",
        "--user restart greyproxy.service",
    ]
    p = _gp(fake_env, "status")
    assert "fake: active (running)" in p.stdout and "not reachable" in p.stdout and p.returncode == 3
    p = _gp(fake_env, "uninstall", "--yes")
    assert p.returncode == 0, p.stderr
    assert not unit.exists()
    assert _calls(fake_env)[-2:] == ["--user disable --now greyproxy.service", "--user daemon-reload"]
    p = _gp(fake_env, "stop")
    assert p.returncode == 1 and "not installed" in p.stderr


@pytest.mark.stack
def test_status_reports_the_running_stack(fake_env: dict[str, str], make_stack) -> None:
    stack = make_stack()
    env = {**fake_env, "GREYPROXY_DATA_HOME": str(stack.data_dir)}
    unit = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "greyproxy.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    p = subprocess.run(
        [sys.executable, "-m", "greyproxy", "service", "status", "-C", str(stack.cfg_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=str(REPO),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"API {stack.api}/api/health: ok" in p.stdout
    assert _calls(env) == ["--user status --no-pager --lines=5 greyproxy.service"]
