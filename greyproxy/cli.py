"""The `greyproxy` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from . import __version__
from .config import (
    ENV_CONFIG,
    ENV_DATA,
    ENV_HOST,
    ENV_SILENT_ALLOW,
    ENV_SUPERVISOR_PID,
    ENV_WORKER,
    Config,
    ConfigError,
    ensure_dirs,
    load_config,
)

SERVICES = ("bus", "proxy", "api", "recorder", "maintenance")
# Extra subcommands registered by later capabilities: name -> (configure(parser), run(args) -> int).
EXTRA_COMMANDS: dict[str, tuple] = {}  # name -> (configure(parser), run(args), one-line help)
# name -> a function given the whole argv of that command, returning it as argparse should see it
ARGV_FIXES: dict[str, Callable[[list[str]], list[str]]] = {}


def _supervisord_conf() -> Path:
    conf = Path(__file__).resolve().parent.parent / "supervisord.conf"
    if not conf.exists():
        raise ConfigError(f"supervisord.conf not found at {conf}")
    return conf


def render_supervisord_conf(text: str, workers: int) -> str:
    """supervisord.conf for `workers` proxy processes: [program:proxy] becomes a numprocs program
    (proxy-0, proxy-1 ...), each started with `--worker N` and logging to proxy-N.log. One worker:
    the file as it is."""
    if workers == 1:
        return text
    head, sep, rest = text.partition("[program:proxy]\n")
    if not sep:
        raise ConfigError("supervisord.conf has no [program:proxy] section")
    section, nxt, tail = rest.partition("\n[")
    lines = []
    for line in section.splitlines():
        if line.startswith("command="):
            line += " --worker %(process_num)d"
        elif line.startswith("stdout_logfile="):
            line = line.replace("/proxy.log", "/proxy-%(process_num)d.log")
        lines.append(line)
    lines += [f"numprocs={workers}", "process_name=proxy-%(process_num)d"]
    return head + sep + "\n".join(lines) + "\n" + nxt + tail


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", "--config", metavar="FILE", help="YAML config file (default: the embedded one)")
    p.add_argument("--host", metavar="IP", help="address that bare ':PORT' listeners bind (default 127.0.0.1)")


def _load(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "host", None))


def listen_addresses(cfg: Config) -> list[tuple[str, str, int, int]]:
    """What the stack will listen on: (what, host, port, socket type)."""
    wanted: list[tuple[str, str, int, int]] = []
    if cfg.api:
        wanted.append(("API (greyproxy.addr)", cfg.api.host, cfg.api.port, socket.SOCK_STREAM))
    for lst in cfg.listeners.values():
        if lst.port:
            wanted.append((lst.name, lst.host, lst.port, socket.SOCK_STREAM))
            if lst.name == "dns-proxy":
                wanted.append((f"{lst.name} (udp)", lst.host, lst.port, socket.SOCK_DGRAM))
    return wanted


def ports_in_use(cfg: Config, say: Callable[[str], None] = print, wait: float | None = None) -> list[str]:
    """The configured listening addresses that cannot be had, one line each; [] when all are free.

    Checked before supervisord starts: a taken port would otherwise make the program that needs it
    exit and be restarted over and over, with the reason only in its log file. A port a program
    listens on is reported at once, naming the program; one held only by connections that are
    closing (TIME_WAIT) is waited for, up to `wait` s (default ports.LINGER_WAIT; said once through `say`)."""
    from . import ports  # here, not at the top: it brings asyncio into every service process

    if wait is None:
        wait = ports.LINGER_WAIT
    wanted = listen_addresses(cfg)
    problems: list[str] = []
    lingering = []
    for what, host, port, kind in wanted:  # first every port at once: a listening program is refused now
        err = ports.try_bind(host, port, kind)
        if err is None:
            continue
        if not ports.is_in_use(err):
            problems.append(f"{what}: cannot listen on {host or '*'}:{port}: {err.strerror or err}")
            continue
        verdict = ports.diagnose(host, port, kind)
        if verdict.listening:
            problems.append(str(ports.PortBusy(what, host, port, verdict.holders, "")))
        else:
            lingering.append((what, host, port, kind))
    if problems:
        return problems
    for what, host, port, kind in lingering:  # then wait for the closing connections (their clocks run together)
        try:
            ports.wait_until_bindable(what, host, port, kind, wait=wait, say=say)
        except OSError as exc:
            problems.append(str(exc))
    return problems


def check_keys(cfg: Config) -> None:
    """With a tcp:// bus endpoint: this host's CURVE key pair, checked (made on first use) before
    any service starts. A broken key file is then one clear line, not a traceback from each
    process (and under `serve`, a crash loop of all of them)."""
    if not any(isinstance(v, str) and v.startswith("tcp://") for v in cfg.bus.values()):
        return
    from bus import curve

    if cfg.keys_dir is None:
        raise ConfigError("a tcp:// bus endpoint needs CURVE keys, and no keys directory is configured")
    try:
        curve.ensure_keypair(cfg.keys_dir)
    except curve.CurveError as exc:
        raise ConfigError(f"bus keys: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    ensure_dirs(cfg)
    check_keys(cfg)
    for w in cfg.warnings:
        print(f"greyproxy: warning: {w}", file=sys.stderr)
    busy = ports_in_use(cfg, say=lambda line: print(f"greyproxy: {line}", file=sys.stderr, flush=True))
    if busy:
        for line in busy:
            print(f"greyproxy: {line}", file=sys.stderr)
        print("greyproxy: stop what holds the port, or choose other ports (-C FILE).", file=sys.stderr)
        return 1
    env = dict(os.environ)
    env[ENV_DATA] = str(cfg.data_dir)
    if args.config:
        env[ENV_CONFIG] = str(Path(args.config).resolve())
    if args.host:
        env[ENV_HOST] = args.host
    if args.silent_allow:
        env[ENV_SILENT_ALLOW] = "1"
    env["GREYPROXY_PYTHON"] = sys.executable
    env[ENV_SUPERVISOR_PID] = str(os.getpid())  # execve keeps the pid: this is supervisord's
    env["GREYPROXY_RUN_DIR"] = str(cfg.run_dir)
    # /api/health's restart counts start with the stack, and silent mode is lost on restart (SPEC §4)
    for left in ("restarts.json", "api.alive", "silent.json"):
        with contextlib.suppress(OSError):
            (cfg.run_dir / left).unlink()
    env["GREYPROXY_LOG_DIR"] = str(cfg.log_dir)
    listen_ports = cfg.ports()
    api = f"API http://{cfg.api.host}:{cfg.api.port}{cfg.path_prefix}" if cfg.api else "API disabled"
    listeners = " ".join(f"{k} :{v}" for k, v in listen_ports.items() if k != "api")
    workers = f"{cfg.workers} proxy worker{'s' if cfg.workers != 1 else ''}"
    print(
        f"greyproxy {__version__}: {api} | {listeners} ({workers}) | data {cfg.data_dir} | logs {cfg.log_dir}",
        flush=True,
    )
    conf = _supervisord_conf()
    if cfg.workers > 1:
        rendered = cfg.run_dir / "supervisord.conf"
        rendered.write_text(render_supervisord_conf(conf.read_text(), cfg.workers))
        conf = rendered
    # Private files by default (supervisord's logs, the database, sockets), inherited by every
    # program; supervisord's own `umask` setting applies only when it daemonizes. ca-cert.pem
    # is made 0644 explicitly.
    os.umask(0o077)
    # exec: supervisord becomes this process, so Ctrl-C / SIGTERM reach it and it stops the group.
    os.execve(sys.executable, [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)], env)
    return 0  # pragma: no cover


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import exit_with_parent, setup_logging

    # First thing: a supervisord killed with -9 must not leave this process behind.
    exit_with_parent()
    os.umask(0o077)  # as under `serve`: what this process creates is its user's alone
    if getattr(args, "worker", None) is not None:
        if args.service != "proxy":
            raise ConfigError("--worker applies to the proxy only")
        os.environ[ENV_WORKER] = str(args.worker)
    cfg = _load(args)
    ensure_dirs(cfg)
    setup_logging(args.service)
    from bus import curve

    curve.configure(cfg.keys_dir, cfg.bus["serverKey"])  # every tcp:// bus socket is CURVE
    check_keys(cfg)
    for w in cfg.warnings:
        logging.getLogger("greyproxy").warning(w)
    if args.service == "bus":
        from bus.broker import run_broker

        run_broker(cfg.bus["pub"], cfg.bus["sub"], float(cfg.bus["heartbeatInterval"]))
    elif args.service == "proxy":
        from services.proxy.service import run
    elif args.service == "api":
        from services.api.service import run
    elif args.service == "recorder":
        from services.recorder.service import run
    elif args.service == "maintenance":
        from services.maintenance.service import run
    if args.service != "bus":
        run(cfg)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    for w in cfg.warnings:
        print(f"greyproxy: warning: {w}", file=sys.stderr)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"greyproxy {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greyproxy", description="Local egress firewall for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the whole stack under supervisord in the foreground")
    _add_config_args(p)
    p.add_argument("--silent-allow", action="store_true", help="start in allow-all (silent) mode")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("run", help="run one service in the foreground")
    p.add_argument("service", choices=SERVICES)
    _add_config_args(p)
    p.add_argument("--worker", type=int, metavar="N", help="proxy only: run as worker N of proxy.workers")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(fn=cmd_version)

    for name, (configure, run, summary) in EXTRA_COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        configure(p)
        p.set_defaults(fn=run)
    return parser


def _load_extra_commands() -> None:
    # Later capabilities (events, cert) live in their own modules and register here.
    for mod in (
        "greyproxy.cli_events",
        "greyproxy.cli_cert",
        "greyproxy.cli_env",
        "greyproxy.cli_export",
        "greyproxy.cli_service",
        "greyproxy.cli_keys",
        "greyproxy.cli_explain",
    ):
        try:
            __import__(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["run"]:
        # A service process (`greyproxy run NAME`) needs none of the extra commands: importing them
        # would load what they need (cryptography for `cert`, ...) into every one of the five.
        _load_extra_commands()
    fix = ARGV_FIXES.get(argv[0]) if argv else None
    if fix is not None:
        argv = fix(list(argv))
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except ConfigError as exc:
        print(f"greyproxy: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
