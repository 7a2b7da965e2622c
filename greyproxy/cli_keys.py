"""`greyproxy keys`: the CURVE keys that guard tcp:// bus endpoints (SPEC §15, bus/curve.py).

greyproxy keys                 make this host's key pair if missing; print its public key
greyproxy keys allow NAME KEY  let the host with public key KEY connect (authorized/NAME.key); KEY
                               may also be a copy of that host's keys/bus.key file
greyproxy keys revoke NAME     take that permission back
greyproxy keys list            this host's public key and the authorized ones
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from bus import curve

from .cli import ARGV_FIXES, EXTRA_COMMANDS, _add_config_args, _load
from .config import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _keys_dir(args: argparse.Namespace):  # noqa: ANN202
    cfg = _load(args)
    assert cfg.keys_dir is not None
    if cfg.keys_dir.is_relative_to(cfg.data_dir) and not cfg.data_dir.exists():
        # often the first command run on a new host: the data dir is made private (0700) here too,
        # as `serve` and `run` make it, not with the umask's mode
        cfg.data_dir.mkdir(parents=True, mode=0o700)
        os.chmod(cfg.data_dir, 0o700)
    return cfg.keys_dir


def cmd_show(args: argparse.Namespace) -> int:
    keys_dir = _keys_dir(args)
    try:
        public, _secret = curve.ensure_keypair(keys_dir)
    except curve.CurveError as exc:
        raise ConfigError(str(exc)) from None
    print(public.decode())
    print(
        f"# this host's public key ({keys_dir / curve.KEY_FILE}); on the other host:"
        f" greyproxy keys allow NAME {shlex.quote(public.decode())}",
        file=sys.stderr,
    )
    return 0


_Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def _public_key_of(value: str) -> bytes:
    """KEY as printed by `greyproxy keys` (40 characters of z85), or the path of a key file copied
    from the other host (its keys/bus.key, a ZeroMQ certificate)."""
    try:
        return curve.check_public_key(value)
    except curve.CurveError as exc:
        path = Path(value).expanduser()
        if path.exists() and not path.is_file():
            raise ConfigError(f"{value}: not a key file (a directory?)") from None
        if not path.is_file():
            text = value.strip()
            missing = ConfigError(
                f"{value}: no such file (give a copy of the other host's keys/bus.key, or its 40-character key)"
            )
            if value.endswith(".key") or value.startswith(("/", "~", "./", "../")):
                raise missing from None
            if 0 < len(text) < 40 and all(c in _Z85 for c in text):
                # z85 uses < > & ( ) [ ] $ # and more: unquoted, the shell cuts the key short. (Also
                # when it holds a '/', as z85 may: no file by that name either.)
                raise ConfigError(
                    f"{exc}; it has {len(text)} characters: quote the key in single quotes,"
                    " or a shell may have cut it at a character such as > or &"
                    + (" (and there is no key file by that name)" if "/" in text else "")
                ) from None
            if "/" in value:
                raise missing from None
            raise ConfigError(str(exc)) from None
    try:
        return curve.check_public_key(curve.read_cert(path)[0].decode())
    except curve.CurveError as exc:
        raise ConfigError(str(exc)) from None


def cmd_allow(args: argparse.Namespace) -> int:
    if not NAME.match(args.name):
        raise ConfigError(f"key name {args.name!r}: letters, digits, '.', '_' and '-' only")
    key = _public_key_of(args.key)
    keys_dir = _keys_dir(args)
    curve.ensure_keypair(keys_dir)
    path = keys_dir / curve.AUTHORIZED_DIR / f"{args.name}.key"
    others = [name for name, k in curve.authorized_entries(keys_dir) if k == key and name != args.name]
    path.write_text(f'metadata\ncurve\n    public-key = "{key.decode()}"\n')
    print(f"allowed {args.name}: {key.decode()} ({path})")
    if others:
        print(
            f"greyproxy: note: this key is also authorized as {', '.join(others)}"
            f" (revoking {args.name} alone leaves it allowed)",
            file=sys.stderr,
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    path = _keys_dir(args) / curve.AUTHORIZED_DIR / f"{args.name}.key"
    if not NAME.match(args.name) or not path.exists():
        print(f"greyproxy: no authorized key named {args.name!r}", file=sys.stderr)
        return 1
    try:
        key: bytes | None = curve.read_cert(path)[0]
    except curve.CurveError:
        key = None
    path.unlink()
    print(f"revoked {args.name}")
    still = [name for name, k in curve.authorized_entries(_keys_dir(args)) if key is not None and k == key]
    if still:
        print(
            f"greyproxy: this key is still authorized as {', '.join(still)}: revoke those too to refuse it",
            file=sys.stderr,
        )
        return 3
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    keys_dir = _keys_dir(args)
    public, _ = curve.ensure_keypair(keys_dir)
    print(f"this host\t{public.decode()}")
    for name, key in curve.authorized_entries(keys_dir):  # every file: one key may be under two names
        print(f"{name}\t{key.decode()}")
    return 0


def _sub_config_args(p: argparse.ArgumentParser) -> None:
    """-C / --host after the subcommand too. Their default is to leave what was given before the
    subcommand (`greyproxy keys -C FILE list`): argparse would otherwise set the subcommand's
    None over it, and the config given first was silently ignored."""
    p.add_argument("-C", "--config", metavar="FILE", default=argparse.SUPPRESS, help="YAML config file")
    p.add_argument("--host", metavar="IP", default=argparse.SUPPRESS, help="address that bare ':PORT' listeners bind")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "CURVE keys for tcp:// bus endpoints (a proxy on another host)."
    _add_config_args(parser)
    parser.set_defaults(keys_fn=cmd_show)
    sub = parser.add_subparsers(dest="keys_command")
    p = sub.add_parser("show", help="make the key pair if missing and print the public key")
    _sub_config_args(p)
    p.set_defaults(keys_fn=cmd_show)
    p = sub.add_parser("allow", help="authorize another host's public key")
    p.add_argument("name")
    p.add_argument("key", help="its public key (`greyproxy keys` there), or a copy of its keys/bus.key file")
    _sub_config_args(p)
    p.set_defaults(keys_fn=cmd_allow)
    p = sub.add_parser("revoke", help="remove an authorized key")
    p.add_argument("name")
    _sub_config_args(p)
    p.set_defaults(keys_fn=cmd_revoke)
    p = sub.add_parser("list", help="this host's public key and the authorized ones")
    _sub_config_args(p)
    p.set_defaults(keys_fn=cmd_list)


_VALUED = ("-C", "--config", "--host")  # allow's options that take a value


def key_after_dashes(argv: list[str]) -> list[str]:
    """`keys allow NAME KEY`: one z85 key in 85 starts with '-' (`-W56+!k…`), which argparse would
    read as an unknown option. Such a KEY is passed after `--`, where argparse
    reads only positionals; any other argv is left as it is."""
    if argv[1:2] != ["allow"]:
        return argv
    options: list[str] = []
    positionals: list[str] = []
    i = 2
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positionals += argv[i + 1 :]
            break
        if arg in _VALUED and i + 1 < len(argv):
            options += argv[i : i + 2]
            i += 2
            continue
        if arg.startswith(("--config=", "--host=")) or arg in ("-h", "--help"):
            options.append(arg)
        else:
            positionals.append(arg)
        i += 1
    # (any length: a key cut short by the shell that starts with '-' gets the "quote it" answer, not
    # argparse's "the following arguments are required: key")
    if len(positionals) == 2 and positionals[1].startswith("-"):
        return [*argv[:2], *options, "--", *positionals]
    return argv


def run(args: argparse.Namespace) -> int:
    return int(args.keys_fn(args))


ARGV_FIXES["keys"] = key_after_dashes
EXTRA_COMMANDS["keys"] = (configure, run, "CURVE keys for tcp:// bus endpoints (a proxy on another host)")
