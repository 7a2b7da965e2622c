"""`greyproxy env`: the environment that puts a process behind Greyproxy (SPEC §14).

    eval "$(greyproxy env --container agent)"

prints the proxy variables, with the identity as the proxy user name, and points every common
runtime's CA setting at one bundle, `<data dir>/ca-bundle.pem` (the system bundle + our CA;
rewritten when the CA changes). Two facts of the clients shape it:

- `requests` (and so pip) ignores `--cert` / `PIP_CERT` whenever `REQUESTS_CA_BUNDLE` is set,
  so both name the same bundle;
- pip (and other clients) send a proxy user name only together with a password, so the URL
  carries `NAME:x@` (the proxy ignores the password);
- git lets curl pick the proxy authentication after a 407 challenge, which the proxy never
  sends: `GIT_HTTP_PROXY_AUTHMETHOD=basic` makes it send the name up front.

`--check` runs one request with each runtime found on PATH (python, pip, node, npm, curl, git)
under that environment and says which work.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from urllib.parse import quote

from . import certs
from .cli import EXTRA_COMMANDS, _add_config_args, _load
from .config import Config, ConfigError, ensure_dirs

SHELLS = ("sh", "fish", "powershell")

# Variables that name a CA bundle, for the runtimes that read one file (our CA plus the system's).
BUNDLE_VARS = (
    "SSL_CERT_FILE",  # OpenSSL: Python's ssl/urllib, httpx, Ruby, many C programs
    "REQUESTS_CA_BUNDLE",  # requests; when set, requests ignores pip's --cert
    "CURL_CA_BUNDLE",  # curl, and requests as a fallback
    "PIP_CERT",  # pip --cert (same bundle, so pip agrees with requests whichever wins)
    "GIT_SSL_CAINFO",  # git over https
    "npm_config_cafile",  # npm (replaces its built-in list: hence the whole bundle)
    "DENO_CERT",
    "AWS_CA_BUNDLE",  # AWS CLI and SDKs
    "NIX_SSL_CERT_FILE",
    "CARGO_HTTP_CAINFO",
)
# Node adds NODE_EXTRA_CA_CERTS to its built-in list: our CA alone.
NODE_VAR = "NODE_EXTRA_CA_CERTS"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@dataclass(frozen=True)
class EnvPlan:
    """The variables to set, in order, and the notes for stderr."""

    variables: list[tuple[str, str]]
    notes: list[str]

    def as_dict(self) -> dict[str, str]:
        return dict(self.variables)


def _connect_host(host: str) -> str:
    """The address a client on this machine uses for a listener bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _userinfo(container: str | None, secret: str | None = None) -> str:
    if not container:
        return ""
    # An unclaimed name's password is ignored by the proxy, but pip (requests) sends the user name
    # only with one; a claimed name's password is its secret (SPEC §16).
    return f"{quote(container, safe='')}:{quote(secret, safe='') if secret else 'x'}@"


def claim_secret(cfg: Config, name: str) -> str:
    """Claim `name` through the running API (or rotate its claim): the new secret (SPEC §16).
    ConfigError saying why when the API refuses or cannot be reached."""
    import httpx

    base = f"{cfg.api_base()}/api/identities"
    try:
        with httpx.Client(timeout=15.0, trust_env=False) as client:
            r = client.post(base, json={"name": name, "notes": "greyproxy env --claim"})
            if r.status_code == 409:  # claimed already: a new secret replaces the old one
                r = client.post(f"{base}/{quote(name, safe='')}/rotate")
    except httpx.HTTPError as exc:
        raise ConfigError(f"--claim: cannot reach the API at {base}: {exc}") from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code not in (200, 201) or not isinstance(body.get("secret"), str):
        raise ConfigError(f"--claim: the API answered {r.status_code}: {body.get('error', r.text[:200])}")
    return body["secret"]


def check_container_name(name: str) -> str:
    if not name or name.strip() != name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise ConfigError(f"--container {name!r}: a non-empty name without spaces at its ends or control characters")
    if ":" in name:
        raise ConfigError(
            f"--container {name!r}: no ':' in a name (the proxy reads the user name of Basic credentials "
            "up to the first ':', so it would record the agent as "
            f"{name.split(':', 1)[0]!r})"
        )
    if name == "proxy":
        raise ConfigError("--container proxy: the proxy ignores the user name 'proxy' (SPEC §1); choose another")
    if name.startswith("unknown-"):
        raise ConfigError(
            f"--container {name!r}: names beginning 'unknown-' are the proxy's own for clients that give no "
            "name (unknown-<their address>); the proxy ignores them as a user name; choose another"
        )
    if len(name) > 200:
        raise ConfigError("--container: at most 200 characters")
    return name


def env_plan(
    cfg: Config, container: str | None = None, with_ca: bool = True, socks_all: bool = False, secret: str | None = None
) -> EnvPlan:
    """What `greyproxy env` sets, for this config (no I/O but the bundle file); `secret`: the
    claimed container's secret, the proxy password in the URLs."""
    variables: list[tuple[str, str]] = []
    notes: list[str] = []
    user = _userinfo(container, secret)
    http = cfg.listeners.get("http-proxy")
    socks = cfg.listeners.get("socks5-proxy")
    if http is not None and http.port:
        url = f"http://{user}{_connect_host(http.host)}:{http.port}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY"):
            variables += [(name, url), (name.lower(), url)]
    else:
        notes.append("the HTTP proxy listener is disabled in this config: no HTTP_PROXY/HTTPS_PROXY")
    # ALL_PROXY names the HTTP proxy (CONNECT carries any protocol) unless SOCKS is asked for:
    # httpx (and so the OpenAI and Anthropic SDKs) refuses to start with a socks5h:// ALL_PROXY
    # unless its optional socksio package is installed, even for https:// requests.
    if socks_all and socks is not None and socks.port:
        url = f"socks5h://{user}{_connect_host(socks.host)}:{socks.port}"
        variables += [("ALL_PROXY", url), ("all_proxy", url)]
    elif socks_all:
        notes.append("the SOCKS5 listener is disabled in this config: no ALL_PROXY")
    elif http is not None and http.port:
        url = f"http://{user}{_connect_host(http.host)}:{http.port}"
        variables += [("ALL_PROXY", url), ("all_proxy", url)]
    # Everything goes through the proxy, except our own API: the proxy refuses to connect to its
    # own listeners, so a client that honours host:port entries talks to the API directly.
    no_proxy = ""
    if cfg.api is not None and cfg.api.port:
        host = _connect_host(cfg.api.host)
        hosts = [host, "localhost"] if host in ("127.0.0.1", "[::1]") else [host]
        no_proxy = ",".join(f"{h}:{cfg.api.port}" for h in hosts)
    variables += [("NO_PROXY", no_proxy), ("no_proxy", no_proxy)]
    # Node 24+ makes its own http/https/fetch honour the proxy variables with this.
    variables.append(("NODE_USE_ENV_PROXY", "1"))
    if user:
        # git asks curl for "any" proxy auth, which sends credentials only after a 407 challenge;
        # the proxy never challenges, so without this git's requests would carry no identity.
        variables.append(("GIT_HTTP_PROXY_AUTHMETHOD", "basic"))
    if with_ca:
        cert_path, _ = certs.ca_paths(cfg.data_dir)
        if not cert_path.exists():
            notes.append(
                f"no CA in {cfg.data_dir} yet: HTTPS goes through but is not intercepted "
                "(greyproxy cert generate; the bundle then follows)"
            )
        bundle = certs.write_ca_bundle(cfg.data_dir)
        if certs.system_ca_file() is None:
            notes.append(f"no system CA bundle found: {bundle} holds only Greyproxy's CA")
        variables += [(name, str(bundle)) for name in BUNDLE_VARS]
        if cert_path.exists():  # (a missing file makes every node and npm run print a warning)
            variables.append((NODE_VAR, str(cert_path)))
    return EnvPlan(variables, notes)


# ---------------------------------------------------------------- rendering


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _fish_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ps_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def render(plan: EnvPlan, shell: str) -> str:
    """The lines a shell evaluates to get `plan`'s variables."""
    lines = ["# greyproxy env: eval this in the shell that runs the agent"]
    for name, value in plan.variables:
        if shell == "sh":
            lines.append(f"export {name}={_sh_quote(value)}")
        elif shell == "fish":
            lines.append(f"set -gx {name} {_fish_quote(value)}")
        elif shell == "powershell":
            lines.append(f"$Env:{name} = {_ps_quote(value)}")
        else:
            raise ValueError(f"unknown shell {shell!r}")
    return "\n".join(lines) + "\n"


def cmd_env(args: argparse.Namespace) -> int:
    cfg = _load(args)
    container = check_container_name(args.container) if args.container is not None else None
    if not args.no_ca:
        ensure_dirs(cfg)
    secret = None
    if args.claim:
        if container is None:
            raise ConfigError("--claim needs --container NAME (the name to claim)")
        secret = claim_secret(cfg, container)
        print(
            f"greyproxy env: {container!r} is claimed; its secret is in the proxy URLs below and shown nowhere "
            "else (run again with --claim for a new one)",
            file=sys.stderr,
        )
    plan = env_plan(cfg, container, with_ca=not args.no_ca, socks_all=args.socks, secret=secret)
    for note in plan.notes:
        print(f"greyproxy env: {note}", file=sys.stderr)
    if args.check:
        from .env_check import run_checks

        return run_checks(cfg, plan, container, args)
    sys.stdout.write(render(plan, args.shell))
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the environment that sends a process's traffic through Greyproxy and makes "
        'it trust the interception CA: eval "$(greyproxy env --container NAME)".'
    )
    parser.add_argument("--shell", choices=SHELLS, default="sh", help="syntax of the output (default sh)")
    parser.add_argument(
        "--container", metavar="NAME", help="the identity the proxy records this process under (the proxy user name)"
    )
    parser.add_argument(
        "--claim",
        action="store_true",
        help="claim the --container name through the running API (or rotate its claim) and put its "
        "secret in the proxy URLs: then no other process can use the name (SPEC §16)",
    )
    parser.add_argument("--no-ca", action="store_true", help="proxy variables only, no CA trust variables")
    parser.add_argument(
        "--socks",
        action="store_true",
        help="ALL_PROXY names the SOCKS5 listener (socks5h://) instead of the HTTP proxy "
        "(httpx then needs its socks extra)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="make one request with each runtime present (python, pip, node, npm, curl, git) "
        "through the running stack and say which work",
    )
    parser.add_argument(
        "--check-url",
        metavar="URL",
        default="https://pypi.org/simple/pip/",
        help="what python, node and curl fetch for --check (default %(default)s)",
    )
    parser.add_argument(
        "--check-git",
        metavar="URL",
        default=None,
        help="a git repository URL for git ls-remote in --check (default: --check-url)",
    )
    parser.add_argument(
        "--check-timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds each runtime may take (default %(default)s)",
    )
    _add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    return cmd_env(args)


EXTRA_COMMANDS["env"] = (configure, run, "print the environment that sends a process's traffic through Greyproxy")


def environ_with(plan: EnvPlan, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the plan's variables set, as after eval."""
    env = dict(os.environ if base is None else base)
    env.update(plan.as_dict())
    return env


__all__ = ["BUNDLE_VARS", "EnvPlan", "NODE_VAR", "check_container_name", "env_plan", "environ_with", "render"]
