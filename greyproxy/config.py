"""Configuration: the embedded default YAML, a user file merged over it, validation and resolution.

Every process resolves the same inputs (config file, --host, data dir) the same way, so
`greyproxy serve` only has to pass them on through the environment.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("greyproxy.config")

ENV_CONFIG = "GREYPROXY_CONFIG"
ENV_HOST = "GREYPROXY_HOST"
ENV_DATA = "GREYPROXY_DATA_HOME"
ENV_SILENT_ALLOW = "GREYPROXY_SILENT_ALLOW"
ENV_DOCKER_ENABLED = "GREYPROXY_DOCKER_ENABLED"  # overrides greyproxy.docker.enabled (SPEC §14)
# Set by `greyproxy serve` to its own pid, which supervisord keeps (serve execs it): the parent
# every program it runs is expected to have (see runtime.exit_with_parent).
ENV_SUPERVISOR_PID = "GREYPROXY_SUPERVISOR_PID"

SERVICE_NAMES = ("http-proxy", "socks5-proxy", "dns-proxy")
# (handler type, listener type) of each service: the one protocol it speaks, where it listens
# (dns: UDP and TCP).
SERVICE_TYPES = {"http-proxy": ("http", "tcp"), "socks5-proxy": ("socks5", "tcp"), "dns-proxy": ("dns", "dns")}
ENV_WORKER = "GREYPROXY_WORKER"  # a proxy worker's index (set by `greyproxy run proxy --worker N`)
MAX_WORKERS = 64
AUTO_WORKERS_CAP = 8  # proxy.workers: auto = the CPUs, at most this many


def resolve_workers(value: Any, cpus: int | None = None) -> int:
    """proxy.workers -> a count: 'auto' = the CPUs (at most 8), else an integer from 1 to 64."""
    if value == "auto":
        n = (
            cpus
            if cpus is not None
            else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        )
        return max(1, min(AUTO_WORKERS_CAP, n))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(
            f"config key 'proxy.workers': must be auto or an integer from 1 to {MAX_WORKERS}, not {value!r}"
        )
    return value


def worker_endpoint(endpoint: str, index: int) -> str:
    """Worker `index`'s own control endpoint derived from bus.proxyControl: ipc://.../x.sock ->
    ipc://.../x-INDEX.sock; tcp://HOST:PORT -> tcp://HOST:PORT+INDEX."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        return f"tcp://{host}:{int(port) + index}"
    base, dot, ext = endpoint.rpartition(".")
    if not dot or "/" in ext:
        return f"{endpoint}-{index}"
    return f"{base}-{index}.{ext}"


class ConfigError(Exception):
    """A configuration problem, reported as one line naming the key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently, so `holdTimeout: 5` then `holdTimeout: 600` would run with 600). Keys brought in by a
    merge (`<<: *base`) may still be overridden: that is what a merge is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise _DuplicateKey(key, first[key], line)
                    first[key] = line
                except TypeError:  # an unhashable key: construct_mapping says so below
                    continue
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {key!r} on line {again} was given already on line {first}")
        self.key, self.first, self.again = key, first, again


# Schema: leaf = type (or tuple of types); dict = nested section; list marker handled apart.
_NUM = (int, float)
_SCHEMA: dict[str, Any] = {
    "host": str,
    "greyproxy": {
        "addr": str,
        "pathPrefix": str,
        "db": str,
        "notifications": {"enabled": bool},
        "allowedHosts": [str],
        "allowedOrigins": [str],
        "builtinRules": bool,
        "docker": {"enabled": bool, "socket": str, "cacheTTL": _NUM},
    },
    "services": "services",
    "bus": {
        "pub": str,
        "sub": str,
        "journal": str,
        "proxyControl": str,
        "recorderControl": str,
        "maintenanceControl": str,
        "heartbeatInterval": _NUM,
        "stallTimeout": _NUM,
        "requestTimeout": _NUM,
        "requestRetries": int,
        "keysDir": str,
        "serverKey": str,
    },
    "proxy": {
        "holdTimeout": _NUM,
        "maxPending": int,
        "pendingTtlDays": _NUM,
        "connectTimeout": _NUM,
        "headerTimeout": _NUM,
        "idleTimeout": _NUM,
        "maxHeaderBytes": int,
        "maxHeaders": int,
        "maxConnections": int,
        "maxConnectionsPerClient": int,
        "journalOutbox": int,
        "journalOutboxMiB": int,
        "upstreamPoolSize": int,
        "upstreamIdleTimeout": _NUM,
        "halfClosedClients": bool,
        "workers": (int, str),
        "name": str,
        "rulesFrom": str,
    },
    "dns": {"upstreams": [str], "timeout": _NUM, "cacheSize": int},
    "mitm": {"bypass": [str], "upstreamCaFile": str},
    "capture": {"maxBodyBytes": int},
    "retention": {"days": _NUM, "maxDatabaseMiB": int},
    "database": {"checkpointInterval": _NUM, "walAutocheckpoint": int},
    "credentials": {"requireHosts": bool},
}

_POSITIVE = {
    "bus.heartbeatInterval",
    "bus.requestTimeout",
    "bus.requestRetries",
    "proxy.holdTimeout",
    "proxy.maxPending",
    "proxy.pendingTtlDays",
    "proxy.connectTimeout",
    "proxy.headerTimeout",
    "proxy.idleTimeout",
    "proxy.maxHeaderBytes",
    "proxy.maxHeaders",
    "proxy.maxConnections",
    "proxy.maxConnectionsPerClient",
    "proxy.journalOutbox",
    "proxy.journalOutboxMiB",
    "proxy.upstreamIdleTimeout",
    "dns.timeout",
    "dns.cacheSize",
    "capture.maxBodyBytes",
    "retention.days",
    "retention.maxDatabaseMiB",
    "database.walAutocheckpoint",
    "greyproxy.docker.cacheTTL",
}

_NON_NEGATIVE = {"proxy.upstreamPoolSize", "database.checkpointInterval", "bus.stallTimeout"}
# bus.stallTimeout: below this a busy but healthy process could be taken for a stalled one.
STALL_MIN = 2.0


def default_config_text() -> str:
    return resources.files("greyproxy").joinpath("default_config.yaml").read_text()


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return "number"
    return {str: "string", bool: "boolean", int: "integer"}.get(t, getattr(t, "__name__", str(t)))


def _check_leaf(path: str, value: Any, t: Any) -> None:
    if isinstance(t, list):
        if not isinstance(value, list) or not all(isinstance(v, t[0]) for v in value):
            raise ConfigError(f"config key {path!r}: expected a list of {_type_name(t[0])}s")
        return
    # bool is an int subclass: refuse it where a number is wanted.
    if isinstance(value, bool) and t is not bool:
        raise ConfigError(f"config key {path!r}: expected {_type_name(t)}, got boolean")
    if not isinstance(value, t):
        raise ConfigError(f"config key {path!r}: expected {_type_name(t)}, got {type(value).__name__}")
    # YAML's .nan/.inf are floats: a NaN slips past "<= 0" and an infinite timeout never ends.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {path!r}: must be a finite number")
    if path in _POSITIVE and value <= 0:
        raise ConfigError(f"config key {path!r}: must be greater than 0")
    if path in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"config key {path!r}: must be 0 or more")
    if path == "bus.stallTimeout" and 0 < value < STALL_MIN:
        raise ConfigError(f"config key {path!r}: must be 0 (no watchdog) or at least {STALL_MIN:g} seconds")


def _validate(node: Any, schema: Any, path: str) -> None:
    if schema == "services":
        _validate_services(node, path)
        return
    if isinstance(schema, dict):
        if not isinstance(node, dict):
            raise ConfigError(f"config key {path!r}: expected a mapping")
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in schema:
                raise ConfigError(f"unknown config key {sub!r}")
            _validate(value, schema[key], sub)
        return
    _check_leaf(path, node, schema)


def _validate_services(node: Any, path: str) -> None:
    if not isinstance(node, list):
        raise ConfigError(f"config key {path!r}: expected a list of services")
    seen: set[str] = set()
    for i, svc in enumerate(node):
        where = f"{path}[{i}]"
        if not isinstance(svc, dict):
            raise ConfigError(f"config key {where!r}: expected a mapping")
        for key in svc:
            if key not in ("name", "addr", "handler", "listener"):
                raise ConfigError(f"unknown config key '{where}.{key}'")
        name = svc.get("name")
        if name not in SERVICE_NAMES:
            raise ConfigError(f"config key '{where}.name': must be one of {', '.join(SERVICE_NAMES)}")
        if name in seen:
            raise ConfigError(f"config key '{where}.name': {name} listed twice")
        seen.add(name)
        if not isinstance(svc.get("addr"), str):
            raise ConfigError(f"config key '{where}.addr': expected a string like ':43051'")
        parse_addr(svc["addr"], f"{where}.addr")
        for sub in ("handler", "listener"):
            val = svc.get(sub, {})
            if not isinstance(val, dict) or any(k != "type" for k in val):
                raise ConfigError(f"config key '{where}.{sub}': expected {{type: ...}}")
            # Each service runs one fixed protocol: another type would be ignored, not obeyed.
            want = SERVICE_TYPES[name][0 if sub == "handler" else 1]
            if "type" in val and val["type"] != want:
                raise ConfigError(
                    f"config key '{where}.{sub}.type': {name} takes {sub} type {want}, not {val['type']!r}"
                )


def parse_addr(addr: str, key: str) -> tuple[str, int]:
    """Split 'host:port', ':port' or '[v6]:port'; the host may be empty (bare port)."""
    addr = addr.strip()
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0 or not addr[end + 1 :].startswith(":"):
            raise ConfigError(f"config key {key!r}: bad address {addr!r}")
        host, port_s = addr[1:end], addr[end + 2 :]
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep:
            raise ConfigError(f"config key {key!r}: bad address {addr!r} (want HOST:PORT or :PORT)")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"config key {key!r}: bad port {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"config key {key!r}: port {port} out of range 0-65535")
    return host, port


_WILDCARDS = ("0.0.0.0", "::")


def _check_bind_host(h: str, key: str) -> None:
    """A host to bind: empty (the default), an IP address, `localhost` or `*` (every address).
    Anything else could not be bound, and `serve` would only say the port cannot be taken."""
    h = h.strip()
    if h in ("", "*") or h.lower() == "localhost":
        return
    what = "--host" if key == "--host" else f"config key {key!r}"
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        raise ConfigError(f"{what}: {h!r} is not an IP address to listen on (e.g. 127.0.0.1, ::1, 0.0.0.0)") from None
    if addr.version == 6 and addr.ipv4_mapped is not None:  # (an IPv6 socket cannot bind one: EINVAL)
        raise ConfigError(f"{what}: {h!r} is an IPv4-mapped address; write the IPv4 address ({addr.ipv4_mapped})")


def check_dns_upstream(spec: Any, key: str) -> tuple[str, int]:
    """A DNS upstream as the DNS proxy reads it (`parse_upstream`): IP, IP:PORT, [IPv6]:PORT or a
    bare IPv6 (a zone `%eth0` allowed), port 1-65535. A malformed one would only be skipped with a
    warning in proxy.log, the others (or /etc/resolv.conf) used in its place."""
    s = str(spec).strip()
    host, port_s = s, "53"
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest and not rest.startswith(":"):
            host = ""
        port_s = rest[1:] if rest else "53"
    elif s.count(":") == 1:
        host, _, port_s = s.partition(":")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"config key {key!r}: {spec!r} is not a resolver IP or IP:PORT (e.g. 1.1.1.1:53)") from None
    if not 0 < port < 65536:
        raise ConfigError(f"config key {key!r}: port {port} out of range 1-65535")
    return host, port


def _bind_host_form(h: str) -> str:
    """A bind host as compared: lower case, localhost as 127.0.0.1, an IP in its canonical form."""
    h = h.strip().lower()
    if h == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def _same_bind(a: str, b: str) -> bool:
    """Whether two bind hosts collide on one port: equal, or either is a wildcard."""
    a, b = _bind_host_form(a), _bind_host_form(b)
    return a == b or a in _WILDCARDS or b in _WILDCARDS


def _check_port_conflicts(api: Listener | None, listeners: dict[str, Listener], services: list[dict]) -> None:
    """Two of our listeners on one host:port cannot both bind: say which keys at load time."""
    keyed: list[tuple[str, Listener]] = []
    if api is not None and api.port:
        keyed.append(("greyproxy.addr", api))
    for i, svc in enumerate(services):
        lst = listeners.get(svc["name"])
        if lst is not None and lst.port:  # port 0 = listener off
            keyed.append((f"services[{i}].addr", lst))
    for i, (key_a, a) in enumerate(keyed):
        for key_b, b in keyed[i + 1 :]:
            if a.port == b.port and _same_bind(a.host, b.host):
                raise ConfigError(
                    f"config keys {key_a!r} ({a.name}) and {key_b!r} ({b.name}) both use port {a.port}"
                    f" on {a.host if a.host == b.host else f'{a.host} and {b.host}'}"
                )


def _bus_binds(bus: dict[str, str], workers: int) -> list[tuple[str, str]]:
    """(what, endpoint) of every bus endpoint the stack binds: with proxy workers, each worker's
    own control endpoint derived from bus.proxyControl (`worker_endpoint`)."""
    out = []
    for key in ("pub", "sub", "journal", "proxyControl", "recorderControl", "maintenanceControl"):
        ep = bus[key]
        if key == "proxyControl" and workers > 1:
            how = "+ INDEX" if ep.startswith("tcp://") else "with -INDEX"
            out += [
                (
                    f"'bus.proxyControl' (worker {i}'s, the endpoint {how}, proxy.workers {workers})",
                    worker_endpoint(ep, i),
                )
                for i in range(workers)
            ]
        else:
            out.append((f"'bus.{key}'", ep))
    return out


def _check_bus_conflicts(
    bus: dict[str, str], workers: int, api: Listener | None, listeners: dict[str, Listener]
) -> None:
    """Two bus endpoints (or one and a listener) on one port, or one ipc:// path, cannot both bind:
    say which keys at load time, not as a crash loop of the one that binds second. Hosts collide
    when equal, or one is a wildcard and the other a loopback address or a wildcard (a proxy on
    another host names the central host's endpoints, which it connects to, not binds)."""
    binds: list[tuple[str, str, str | int]] = []  # (what, host or "ipc", port or path)
    for what, ep in _bus_binds(bus, workers):
        if ep.startswith("tcp://"):
            host, _, port = ep[len("tcp://") :].rpartition(":")
            if port.isdigit():
                binds.append((what, host.strip("[]").replace("*", "0.0.0.0"), int(port)))
        else:
            binds.append((what, "ipc", ep[len("ipc://") :]))
    others = [(f"'greyproxy.addr' ({api.name})", api.host, api.port)] if api is not None and api.port else []
    others += [(f"the {lst.name} listener", lst.host, lst.port) for lst in listeners.values() if lst.port]

    def clash(a: tuple[str, str, str | int], b: tuple[str, str, str | int]) -> bool:
        if (a[1] == "ipc") != (b[1] == "ipc") or a[2] != b[2]:
            return False
        return a[1] == "ipc" or _same_local_bind(a[1], b[1])

    for i, a in enumerate(binds):
        for b in binds[i + 1 :] + others:
            if clash(a, b):
                where = f"port {a[2]} on {a[1]}" if a[1] != "ipc" else f"ipc://{a[2]}"
                raise ConfigError(f"config keys {a[0]} and {b[0]} both use {where}")


def _same_local_bind(a: str, b: str) -> bool:
    """`_same_bind`, but a wildcard collides only with a loopback address or another wildcard."""
    a, b = _bind_host_form(a), _bind_host_form(b)
    if a == b:
        return True
    other = b if a in _WILDCARDS else a if b in _WILDCARDS else None
    if other is None:
        return False
    try:
        return other in _WILDCARDS or ipaddress.ip_address(other).is_loopback
    except ValueError:
        return False  # a host name: another host's


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def data_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(ENV_DATA):
        return Path(env[ENV_DATA]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "greyproxy"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "greyproxy"
    return Path.home() / ".local" / "share" / "greyproxy"


@dataclass(frozen=True)
class Listener:
    name: str
    host: str
    port: int


@dataclass
class Config:
    raw: dict
    data_dir: Path
    run_dir: Path
    log_dir: Path
    db_path: Path
    api: Listener | None
    path_prefix: str
    listeners: dict[str, Listener]
    bus: dict[str, Any]
    source: str = "<embedded default>"
    silent_allow: bool = False
    warnings: list[str] = field(default_factory=list)
    workers: int = 1  # proxy.workers resolved
    worker: int | None = None  # this process's worker index (`greyproxy run proxy --worker N`), None = the only one
    keys_dir: Path | None = None  # CURVE keys for tcp:// bus endpoints (see bus.curve)

    @property
    def proxy_name(self) -> str:
        """This proxy's name on the bus (heartbeats, /api/health): proxy.name, '-N' for worker N."""
        base = self.raw["proxy"]["name"]
        return base if self.worker is None else f"{base}-{self.worker}"

    @property
    def caps_split(self) -> int:
        """Over how many processes the proxy's connection caps are split: proxy.workers for a
        worker `greyproxy serve` starts (`--worker N`); 1 for a proxy run on its own (`greyproxy
        run proxy`, a proxy on another host), whatever proxy.workers says (auto: the CPUs)."""
        return self.workers if self.worker is not None else 1

    @property
    def proxy_control(self) -> str:
        """The control endpoint this proxy process binds."""
        ep = self.bus["proxyControl"]
        return ep if self.worker is None else worker_endpoint(ep, self.worker)

    def proxy_control_endpoints(self) -> list[str]:
        """Every local worker's control endpoint (the API calls them all; remote proxies announce theirs)."""
        ep = self.bus["proxyControl"]
        return [ep] if self.workers == 1 else [worker_endpoint(ep, i) for i in range(self.workers)]

    def section(self, name: str) -> dict[str, Any]:
        return self.raw[name]

    @property
    def own_ports(self) -> set[int]:
        """Ports of the stack's own listeners: the proxy must never connect to them."""
        ports = {lst.port for lst in self.listeners.values()}
        if self.api:
            ports.add(self.api.port)
        return {p for p in ports if p}

    def ports(self) -> dict[str, int]:
        out = {"api": self.api.port if self.api else 0}
        out.update({name: lst.port for name, lst in self.listeners.items()})
        return out

    def api_base(self) -> str:
        if not self.api:
            raise ConfigError("the API is disabled (greyproxy.addr is empty)")
        host = self.api.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.api.port}{self.path_prefix.rstrip('/')}"

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.raw)
        out["resolved"] = {
            "source": self.source,
            "dataDir": str(self.data_dir),
            "db": str(self.db_path),
            "ports": self.ports(),
            "bind": {n: f"{lst.host}:{lst.port}" for n, lst in self.listeners.items()}
            | ({"api": f"{self.api.host}:{self.api.port}"} if self.api else {}),
            "bus": self.bus,
        }
        return out


def _runtime_dir(data_dir: Path) -> Path:
    run = data_dir / "run"
    # ipc:// paths are limited to ~107 bytes: fall back to a short private dir in /tmp.
    if len(str(run / "maintenance-control.sock")) > 100:
        digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
        run = Path("/tmp") / f"greyproxy-{os.getuid()}-{digest}"
    return run


def _bind_host(host: str, default_host: str, warnings: list[str], key: str) -> str:
    host = host or default_host or "127.0.0.1"
    if host in ("0.0.0.0", "::", "*"):
        warnings.append(f"{key} binds {host}: every host on the network can reach it; Greyproxy is meant for loopback")
        if host == "*":
            host = "0.0.0.0"
    return host


def load_config(
    path: str | os.PathLike | None = None,
    host: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the configuration: embedded default, then FILE, then --host; validate it."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG) or None
    host = host if host is not None else env.get(ENV_HOST) or None
    default = yaml.safe_load(default_config_text())
    user: dict = {}
    source = "<embedded default>"
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
        try:
            user = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # (a SafeLoader: plain data only)
        except _DuplicateKey as exc:
            raise ConfigError(
                f"config file {str(path)!r}: line {exc.again}: key {exc.key!r} given twice"
                f" (first on line {exc.first}); say it once"
            ) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None)
            raise ConfigError(
                f"config file {str(path)!r}:{where} invalid YAML{': ' + problem if problem else ''}"
            ) from None
        if not isinstance(user, dict):
            raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
        source = str(path)
    _validate(user, _SCHEMA, "")
    raw = _merge(default, user)
    _validate(raw, _SCHEMA, "")
    if host is not None:
        raw["host"] = host
    _check_bind_host(raw["host"], "host" if host is None else "--host")
    for i, spec in enumerate(raw["dns"]["upstreams"]):
        check_dns_upstream(spec, f"dns.upstreams[{i}]")
    docker_env = env.get(ENV_DOCKER_ENABLED, "").strip().lower()
    if docker_env:
        if docker_env not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{ENV_DOCKER_ENABLED}={docker_env!r}: use true or false")
        raw["greyproxy"]["docker"]["enabled"] = docker_env in ("1", "true", "yes", "on")
    warnings: list[str] = []

    data_dir = data_dir_from_env(env)
    run_dir = _runtime_dir(data_dir)
    db_path = Path(raw["greyproxy"]["db"]).expanduser() if raw["greyproxy"]["db"] else data_dir / "greyproxy.db"

    api = None
    if raw["greyproxy"]["addr"].strip():
        h, p = parse_addr(raw["greyproxy"]["addr"], "greyproxy.addr")
        _check_bind_host(h, "greyproxy.addr")
        api = Listener("api", _bind_host(h, raw["host"], warnings, "greyproxy.addr"), p)
    listeners: dict[str, Listener] = {}
    for i, svc in enumerate(raw["services"]):
        h, p = parse_addr(svc["addr"], f"services[{i}].addr")
        _check_bind_host(h, f"services[{i}].addr")
        listeners[svc["name"]] = Listener(svc["name"], _bind_host(h, raw["host"], warnings, f"services[{i}].addr"), p)

    _check_port_conflicts(api, listeners, raw["services"])

    for i, org in enumerate(raw["greyproxy"]["allowedOrigins"]):
        _check_origin(org, f"greyproxy.allowedOrigins[{i}]")

    prefix = raw["greyproxy"]["pathPrefix"].strip() or "/"
    if not prefix.startswith("/"):
        raise ConfigError("config key 'greyproxy.pathPrefix': must start with '/'")
    prefix = "/" + prefix.strip("/")

    bus = dict(raw["bus"])
    defaults = {
        "pub": "bus-pub.sock",
        "sub": "bus-sub.sock",
        "journal": "journal.sock",
        "proxyControl": "proxy-control.sock",
        "recorderControl": "recorder-control.sock",
        "maintenanceControl": "maintenance-control.sock",
    }
    for key, fname in defaults.items():
        if not bus[key]:
            bus[key] = f"ipc://{run_dir / fname}"
        elif not bus[key].startswith(("ipc://", "tcp://")):
            raise ConfigError(f"config key 'bus.{key}': must be an ipc:// or tcp:// endpoint")

    workers = resolve_workers(raw["proxy"]["workers"])
    _check_bus_conflicts(bus, workers, api, listeners)
    if raw["proxy"]["rulesFrom"] not in ("database", "recorder"):
        raise ConfigError("config key 'proxy.rulesFrom': must be database or recorder")
    name = raw["proxy"]["name"]
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError("config key 'proxy.name': letters, digits, '-', '_' and '.' only")
    worker_env = env.get(ENV_WORKER, "").strip()
    worker = None
    if worker_env:
        if not worker_env.isdigit() or int(worker_env) >= MAX_WORKERS:
            raise ConfigError(f"{ENV_WORKER}={worker_env!r}: want a worker index from 0 to {MAX_WORKERS - 1}")
        worker = int(worker_env)
    if raw["bus"]["serverKey"]:
        from bus.curve import CurveError, check_public_key

        try:
            check_public_key(raw["bus"]["serverKey"])
        except CurveError as exc:
            raise ConfigError(f"config key 'bus.serverKey': {exc}") from None
    keys_dir = Path(raw["bus"]["keysDir"]).expanduser() if raw["bus"]["keysDir"] else data_dir / "keys"

    return Config(
        raw=raw,
        data_dir=data_dir,
        run_dir=run_dir,
        log_dir=data_dir / "logs",
        db_path=db_path,
        api=api,
        path_prefix=prefix,
        listeners=listeners,
        bus=bus,
        source=source,
        silent_allow=env.get(ENV_SILENT_ALLOW, "") in ("1", "true", "yes"),
        warnings=warnings,
        workers=workers,
        worker=worker,
        keys_dir=keys_dir,
    )


def _check_origin(value: str, key: str) -> None:
    """An allowed Origin is 'scheme://host[:port]' with scheme http or https, nothing more."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"config key {key!r}: {value!r} is not an origin like http://localhost:3000") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.password
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(f"config key {key!r}: {value!r} is not an origin like http://localhost:3000")


def ensure_dirs(cfg: Config) -> None:
    """Create the data, runtime and log dirs private to the user (0700)."""
    for d in (cfg.data_dir, cfg.run_dir, cfg.log_dir):
        d.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(d, 0o700)
        except OSError:
            pass
