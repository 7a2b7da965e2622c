"""`greyproxy cert generate|install|uninstall|reload` (SPEC §7.1).

`install`/`uninstall` print the exact OS commands and why, and run them only after the user
agrees (or with --yes): trusting a CA that can impersonate every site is the user's decision.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from . import certs
from .cli import EXTRA_COMMANDS, _add_config_args, _load
from .config import ensure_dirs


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        print("greyproxy: not a terminal; pass --yes to run these commands", file=sys.stderr)
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _run_plan(plan: list[list[str]], why: str, assume_yes: bool) -> int:
    print(why)
    print("Commands:")
    for cmd in plan:
        print(f"  {shlex.join(cmd)}")
    if not assume_yes and not _confirm("Run them now?"):
        print("Nothing was changed.")
        return 1
    for cmd in plan:
        try:
            code = subprocess.call(cmd)
        except OSError as exc:
            print(f"greyproxy: cannot run {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if code != 0:
            print(f"greyproxy: {shlex.join(cmd)} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    ensure_dirs(cfg)
    try:
        ca = certs.generate_ca(cfg.data_dir, force=args.force)
    except certs.CAExists as exc:
        print(f"greyproxy: {exc} (-f replaces it)", file=sys.stderr)
        return 1
    cert_path, key_path = certs.ca_paths(cfg.data_dir)
    print(f"CA certificate: {cert_path}\nCA key:         {key_path} (0600)\nSHA-256:        {ca.fingerprint}")
    print("A running proxy picks it up within a few seconds (or: greyproxy cert reload).")
    print("Clients must trust it to be intercepted: greyproxy cert install, or pass the file to them.")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    cfg = _load(args)
    cert_path, _ = certs.ca_paths(cfg.data_dir)
    if not cert_path.exists():
        print("greyproxy: no CA yet; run `greyproxy cert generate` first", file=sys.stderr)
        return 1
    why = (
        f"This adds {cert_path} to the system trust store, so programs on this machine accept the\n"
        "certificates Greyproxy makes when it intercepts HTTPS. Anyone holding the CA key could then\n"
        "impersonate any site to this machine; the key stays in the data dir, readable only by you."
    )
    return _run_plan(certs.install_plan(cert_path), why, args.yes)


def cmd_uninstall(args: argparse.Namespace) -> int:
    why = "This removes the Greyproxy CA from the system trust store."
    return _run_plan(certs.uninstall_plan(), why, args.yes)


def cmd_reload(args: argparse.Namespace) -> int:
    import httpx

    cfg = _load(args)
    url = f"{cfg.api_base()}/api/cert/reload"
    try:
        r = httpx.post(url, timeout=10.0, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"greyproxy: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return 1
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text}
    if r.status_code != 200:
        print(f"greyproxy: reload failed ({r.status_code}): {body.get('error', body)}", file=sys.stderr)
        return 1
    print(body.get("message", "reloaded"))
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Manage the HTTPS interception CA."
    sub = parser.add_subparsers(dest="cert_command", required=True)
    p = sub.add_parser("generate", help="create the CA in the data dir")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing CA")
    _add_config_args(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("install", help="add the CA to the system trust store (asks first)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_config_args(p)
    p.set_defaults(fn=cmd_install)
    p = sub.add_parser("uninstall", help="remove the CA from the system trust store (asks first)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_config_args(p)
    p.set_defaults(fn=cmd_uninstall)
    p = sub.add_parser("reload", help="ask the running proxy to reload the CA files")
    _add_config_args(p)
    p.set_defaults(fn=cmd_reload)


def run(args: argparse.Namespace) -> int:
    return int(args.fn(args))


EXTRA_COMMANDS["cert"] = (configure, run, "manage the HTTPS interception CA (generate, install, reload)")
