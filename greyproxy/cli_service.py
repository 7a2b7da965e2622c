"""`greyproxy service install|uninstall|start|stop|restart|status` (SPEC §14).

The stack runs as the user's own service, exactly as `greyproxy serve` runs it (supervisord in
the foreground), restarted when it fails:

- Linux: a systemd **user** unit, `$XDG_CONFIG_HOME/systemd/user/greyproxy.service`
  (`~/.config/...`), driven with `systemctl --user`;
- macOS: a launchd agent, `~/Library/LaunchAgents/greyproxy.plist`, driven with `launchctl`.

`install` and `uninstall` print the file they write or remove and every command they run, and
ask first (`--yes` does not ask). The unit pins the config file (`-C`, made absolute) and the
data dir as resolved now, so the service and `greyproxy env` in a shell agree.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .cli import EXTRA_COMMANDS, _add_config_args, _load
from .config import ENV_DATA, Config

UNIT_NAME = "greyproxy.service"
LAUNCHD_LABEL = "greyproxy"


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        print("greyproxy: not a terminal; pass --yes to go ahead", file=sys.stderr)
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


# ---------------------------------------------------------------- what the service runs


def serve_argv(config: str | None, host: str | None = None, python: str | None = None) -> list[str]:
    argv = [python or sys.executable, "-m", "greyproxy", "serve"]
    if config:
        argv += ["-C", str(Path(config).resolve())]
    if host:
        argv += ["--host", host]
    return argv


def service_env(cfg: Config) -> dict[str, str]:
    return {ENV_DATA: str(cfg.data_dir)}


# ---------------------------------------------------------------- systemd


def _systemd_word(word: str, variables: bool = True) -> str:
    """One ExecStart word: specifiers (%) and variables ($) literal, quoted when it has spaces.
    `variables=False`: an `Environment=` assignment, where systemd expands specifiers but gives `$`
    no meaning (systemd.exec(5)), so a `$` is written as it is."""
    for ch in word:
        if ord(ch) < 0x20 or ch == "\x7f":
            raise ValueError(f"cannot put a control character in a systemd unit: {word!r}")
    word = word.replace("%", "%%")
    if variables:
        word = word.replace("$", "$$")
    if any(c in word for c in " \t\"'\\;") or not word:
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _systemd_env(name: str, value: str) -> str:
    return _systemd_word(f"{name}={value}", variables=False)


def systemd_unit_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = (
        Path(env["XDG_CONFIG_HOME"])
        if env.get("XDG_CONFIG_HOME")
        else Path(env.get("HOME", "~")).expanduser() / ".config"
    )
    return base / "systemd" / "user" / UNIT_NAME


def render_systemd_unit(argv: list[str], env: dict[str, str]) -> str:
    lines = [
        "# Written by `greyproxy service install`; `greyproxy service uninstall` removes it.",
        "[Unit]",
        "Description=Greyproxy, the egress firewall for AI agents (proxy, API, recorder under supervisord)",
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_word(w) for w in argv),
        *(f"Environment={_systemd_env(k, v)}" for k, v in sorted(env.items())),
        "Restart=on-failure",
        "RestartSec=2",
        # SIGTERM to supervisord only: it stops its programs in order; leftovers get SIGKILL later.
        "KillMode=mixed",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- launchd


def launchd_plist_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("HOME", "~")).expanduser() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


def render_launchd_plist(argv: list[str], env: dict[str, str], log_dir: Path) -> bytes:
    return plistlib.dumps(
        {
            "Label": LAUNCHD_LABEL,
            "ProgramArguments": argv,
            "EnvironmentVariables": env,
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},  # restarted when it fails, not after a clean stop
            "StandardOutPath": str(log_dir / "launchd.log"),
            "StandardErrorPath": str(log_dir / "launchd.log"),
            "ProcessType": "Background",
        }
    )


# ---------------------------------------------------------------- the manager


@dataclass
class Manager:
    """What one service manager writes and runs."""

    kind: str  # "systemd" | "launchd"
    path: Path
    content: bytes
    commands: dict[str, list[list[str]]] = field(default_factory=dict)


def manager_for(
    cfg: Config, config: str | None, kind: str | None = None, env: dict[str, str] | None = None, host: str | None = None
) -> Manager:
    kind = kind or ("launchd" if sys.platform == "darwin" else "systemd")
    argv = serve_argv(config, host)
    senv = service_env(cfg)
    if kind == "systemd":
        sc = ["systemctl", "--user"]
        return Manager(
            kind,
            systemd_unit_path(env),
            render_systemd_unit(argv, senv).encode(),
            {
                "install": [[*sc, "daemon-reload"], [*sc, "enable", "--now", UNIT_NAME]],
                "uninstall": [[*sc, "disable", "--now", UNIT_NAME]],
                "after_uninstall": [[*sc, "daemon-reload"]],
                "start": [[*sc, "start", UNIT_NAME]],
                "stop": [[*sc, "stop", UNIT_NAME]],
                "restart": [[*sc, "restart", UNIT_NAME]],
                "status": [[*sc, "status", "--no-pager", "--lines=5", UNIT_NAME]],
            },
        )
    domain = f"gui/{os.getuid()}"
    target = f"{domain}/{LAUNCHD_LABEL}"
    path = launchd_plist_path(env)
    return Manager(
        kind,
        path,
        render_launchd_plist(argv, senv, cfg.log_dir),
        {
            "install": [["launchctl", "bootstrap", domain, str(path)]],
            "uninstall": [["launchctl", "bootout", target]],
            "after_uninstall": [],
            "start": [["launchctl", "kickstart", target]],
            "stop": [["launchctl", "kill", "SIGTERM", target]],
            "restart": [["launchctl", "kickstart", "-k", target]],
            "status": [["launchctl", "print", target]],
        },
    )


def _run(cmds: list[list[str]], check: bool = True) -> int:
    for cmd in cmds:
        try:
            code = subprocess.call(cmd)
        except OSError as exc:
            print(f"greyproxy: cannot run {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if code != 0 and check:
            print(f"greyproxy: {shlex.join(cmd)} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


def _manager(args: argparse.Namespace) -> tuple[Config, Manager]:
    cfg = _load(args)
    return cfg, manager_for(
        cfg, getattr(args, "config", None), getattr(args, "manager", None), host=getattr(args, "host", None)
    )


def cmd_install(args: argparse.Namespace) -> int:
    cfg, m = _manager(args)
    print(
        f"This installs Greyproxy as your user's {m.kind} service: it starts at login, runs the whole stack "
        f"as `greyproxy serve` does, and restarts it when it fails."
    )
    print(f"File {m.path}{' (replaced)' if m.path.exists() else ''}:")
    print("    " + m.content.decode().replace("\n", "\n    ").rstrip())
    print("Commands:")
    for cmd in m.commands["install"]:
        print(f"  {shlex.join(cmd)}")
    if not args.yes and not _confirm("Write it and run them now?"):
        print("Nothing was changed.")
        return 1
    m.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = m.path.with_name(m.path.name + ".tmp")
    tmp.write_bytes(m.content)
    os.chmod(tmp, 0o644)
    os.replace(tmp, m.path)
    print(f"wrote {m.path}")
    return _run(m.commands["install"])


def cmd_uninstall(args: argparse.Namespace) -> int:
    _cfg, m = _manager(args)
    if not m.path.exists():
        print(f"greyproxy: {m.path} does not exist: nothing to uninstall", file=sys.stderr)
        return 1
    print(f"This stops the Greyproxy {m.kind} service and removes {m.path}.")
    print("Commands:")
    for cmd in [*m.commands["uninstall"], ["rm", str(m.path)], *m.commands["after_uninstall"]]:
        print(f"  {shlex.join(cmd)}")
    if not args.yes and not _confirm("Run them now?"):
        print("Nothing was changed.")
        return 1
    _run(m.commands["uninstall"], check=False)  # a service that is not running is no reason to keep the file
    m.path.unlink(missing_ok=True)
    print(f"removed {m.path}")
    return _run(m.commands["after_uninstall"])


def _simple(action: str) -> object:
    def cmd(args: argparse.Namespace) -> int:
        _cfg, m = _manager(args)
        if not m.path.exists():
            print(f"greyproxy: the service is not installed ({m.path}); greyproxy service install", file=sys.stderr)
            return 1
        return _run(m.commands[action])

    return cmd


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    cfg, m = _manager(args)
    installed = m.path.exists()
    print(f"{m.kind} service: {'installed at ' + str(m.path) if installed else 'not installed'}")
    code = _run(m.commands["status"], check=False) if installed else 3
    try:
        url = f"{cfg.api_base()}/api/health"
    except Exception as exc:  # noqa: BLE001 - API disabled in this config
        print(f"API: {exc}")
        return 3
    try:
        r = httpx.get(url, timeout=5.0, trust_env=False)
        body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"API {url}: not reachable ({exc.__class__.__name__})")
        return 3
    down = body.get("down") or []
    print(f"API {url}: {body.get('status')}" + (f" (down: {', '.join(down)})" if down else ""))
    return 0 if r.status_code == 200 and code == 0 else 3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run Greyproxy as your user's service (systemd user unit, or launchd agent on macOS)."
    sub = parser.add_subparsers(dest="service_command", required=True)
    actions = (
        ("install", "write the unit and enable + start it (asks first)", cmd_install),
        ("uninstall", "stop and disable the service and remove the unit (asks first)", cmd_uninstall),
        ("start", "start the service", _simple("start")),
        ("stop", "stop the service", _simple("stop")),
        ("restart", "restart the service", _simple("restart")),
        ("status", "the service's state and /api/health", cmd_status),
    )
    for name, text, fn in actions:
        p = sub.add_parser(name, help=text)
        if name in ("install", "uninstall"):
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        p.add_argument("--manager", choices=("systemd", "launchd"), help=argparse.SUPPRESS)
        _add_config_args(p)
        p.set_defaults(service_fn=fn)


def run(args: argparse.Namespace) -> int:
    return int(args.service_fn(args))


EXTRA_COMMANDS["service"] = (configure, run, "run Greyproxy as your user's service (systemd, launchd)")
