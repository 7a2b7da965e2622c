"""Two of our listeners on one host:port: a ConfigError naming both keys (and exit 2, one line)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from greyproxy.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent.parent


def _svc(name: str, addr: str) -> dict:
    kind = {"http-proxy": "http", "socks5-proxy": "socks5", "dns-proxy": "dns"}[name]
    return {
        "name": name,
        "addr": addr,
        "handler": {"type": kind},
        "listener": {"type": kind if kind == "dns" else "tcp"},
    }


def _config(api: str, http: str, socks: str, dns: str) -> dict:
    return {
        "greyproxy": {"addr": api},
        "services": [_svc("http-proxy", http), _svc("socks5-proxy", socks), _svc("dns-proxy", dns)],
    }


def _load(tmp_path: Path, data: dict, host: str | None = None):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, host, env={"GREYPROXY_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path)})


CONFLICTS = [
    ("api and http", _config(":9100", ":9100", ":9102", ":9103"), ("'greyproxy.addr'", "'services[0].addr'")),
    ("http and socks", _config(":9100", ":9101", ":9101", ":9103"), ("'services[0].addr'", "'services[1].addr'")),
    ("socks and dns", _config(":9100", ":9101", ":9102", ":9102"), ("'services[1].addr'", "'services[2].addr'")),
    ("api and dns", _config(":9100", ":9101", ":9102", ":9100"), ("'greyproxy.addr'", "'services[2].addr'")),
    (
        "explicit loopback vs bare port",
        _config("127.0.0.1:9100", ":9100", ":9102", ":9103"),
        ("'greyproxy.addr'", "'services[0].addr'"),
    ),
    (
        "wildcard vs loopback",
        _config("0.0.0.0:9100", ":9101", "127.0.0.1:9100", ":9103"),
        ("'greyproxy.addr'", "'services[1].addr'"),
    ),
    (
        "localhost vs 127.0.0.1",
        _config("localhost:9100", "127.0.0.1:9100", ":9102", ":9103"),
        ("'greyproxy.addr'", "'services[0].addr'"),
    ),
    (
        "v6 spellings",
        _config("[::1]:9100", "[0:0::1]:9100", ":9102", ":9103"),
        ("'greyproxy.addr'", "'services[0].addr'"),
    ),
]


@pytest.mark.parametrize("label,data,keys", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_port_conflict_names_both_keys(tmp_path: Path, label: str, data: dict, keys: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, data)
    msg = str(err.value)
    assert "\n" not in msg
    for key in keys:
        assert key in msg, msg
    assert "9100" in msg or "9101" in msg or "9102" in msg


@pytest.mark.parametrize(
    "data",
    [
        _config(":9100", ":9101", ":9102", ":9103"),
        _config("127.0.0.1:9100", "127.0.0.2:9100", ":9102", ":9103"),  # other loopback address: no clash
        _config(":0", ":0", ":9102", ":0"),  # port 0 = listener off
        _config("", ":9101", ":9102", ":9103"),  # API disabled
    ],
    ids=["distinct ports", "distinct hosts", "disabled listeners", "api disabled"],
)
def test_no_conflict(tmp_path: Path, data: dict) -> None:
    _load(tmp_path, data)


def test_host_flag_makes_bare_ports_collide_with_an_explicit_one(tmp_path: Path) -> None:
    data = _config("10.1.2.3:9100", ":9100", ":9102", ":9103")
    _load(tmp_path, data)  # 127.0.0.1 and 10.1.2.3: different addresses
    with pytest.raises(ConfigError, match="greyproxy.addr"):
        _load(tmp_path, data, host="10.1.2.3")


@pytest.mark.parametrize("command", ["config", "serve"])
def test_port_conflict_exits_2_with_one_line(tmp_path: Path, command: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(":9100", ":9101", ":9101", ":9103")))
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "GREYPROXY_DATA_HOME": str(tmp_path / "data"),
        "HOME": str(tmp_path),
    }
    r = subprocess.run(
        [sys.executable, "-m", "greyproxy", command, "-C", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=60,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("greyproxy: ") and "'services[0].addr'" in lines[0] and "'services[1].addr'" in lines[0]
    assert not (tmp_path / "data" / "run" / "supervisord.pid").exists()


@pytest.mark.parametrize("taken", ["api", "socks", "dns-udp"])
def test_serve_refuses_a_port_another_program_holds(tmp_path: Path, taken: str) -> None:
    """A port held by someone else: serve says which and exits 1 at once, instead of supervisord
    restarting the program that cannot bind over and over."""
    import socket

    ports = []
    holders = []
    for _ in range(4):  # four distinct free ports, kept open below only for the taken one
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        holders.append(s)
    for s in holders:
        s.close()
    api, http, socks, dns = ports
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(f":{api}", f":{http}", f":{socks}", f":{dns}")))
    kind, port = {
        "api": (socket.SOCK_STREAM, api),
        "socks": (socket.SOCK_STREAM, socks),
        "dns-udp": (socket.SOCK_DGRAM, dns),
    }[taken]
    holder = socket.socket(socket.AF_INET, kind)
    holder.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        holder.listen()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "GREYPROXY_DATA_HOME": str(tmp_path / "data"),
        "HOME": str(tmp_path),
    }
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "greyproxy", "serve", "-C", str(cfg)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(REPO),
            timeout=60,
        )
        took = time.monotonic() - t0
    finally:
        holder.close()
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f":{port}" in r.stderr and "in use" in r.stderr.lower(), r.stderr
    # refused at once (no waiting as for closing connections), naming the program: this test process
    assert took < 15 and "waiting" not in r.stderr, r.stderr
    assert f"listening program: pid {os.getpid()} (" in r.stderr, r.stderr
    assert not (tmp_path / "data" / "run" / "supervisord.pid").exists()


def _bus(workers: int, **endpoints: str) -> dict:
    data = _config(":9100", ":9101", ":9102", ":9103")
    data["proxy"] = {"workers": workers}
    data["bus"] = endpoints
    return data


NUMBERED = {  # tcp endpoints on consecutive ports, as an outside tester numbered them
    k: f"tcp://127.0.0.1:{47901 + i}"
    for i, k in enumerate(("pub", "sub", "journal", "proxyControl", "recorderControl", "maintenanceControl"))
}


def test_bus_endpoints_that_collide_are_refused_naming_both_keys(tmp_path: Path) -> None:
    """SPEC §15 (proxy workers, several hosts). With proxy.workers N, worker i binds bus.proxyControl's
    port + i (its own control endpoint):
    tcp endpoints numbered one after another gave a stack whose worker 1 could never bind (a crash
    loop: 26 exits in 30 s, /api/health degraded) while `greyproxy config` said nothing."""
    _load(tmp_path, _bus(1, **NUMBERED))  # one worker: no clash
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _bus(2, **NUMBERED))
    msg = str(err.value)
    assert "'bus.proxyControl' (worker 1's" in msg and "'bus.recorderControl'" in msg and "47905" in msg, msg
    assert "\n" not in msg
    spaced = {**NUMBERED, "recorderControl": "tcp://127.0.0.1:47915", "maintenanceControl": "tcp://127.0.0.1:47916"}
    _load(tmp_path, _bus(3, **spaced))  # room for three workers' control endpoints
    with pytest.raises(ConfigError, match="'bus.pub' and 'bus.sub' both use port 47901"):
        _load(tmp_path, _bus(1, **{**NUMBERED, "sub": "tcp://127.0.0.1:47901"}))
    with pytest.raises(ConfigError, match=r"'bus.journal' and 'greyproxy.addr' \(api\) both use port 9100"):
        _load(tmp_path, _bus(1, **{**NUMBERED, "journal": "tcp://*:9100"}))
    with pytest.raises(ConfigError, match="'bus.pub' and 'bus.journal' both use ipc://"):
        _load(tmp_path, _bus(1, pub="ipc:///tmp/x.sock", journal="ipc:///tmp/x.sock"))
    # A proxy on another host names the central host's endpoints (connected to, not bound): its own
    # control endpoint on a wildcard does not collide with a port of another address.
    remote = {**NUMBERED, "recorderControl": "tcp://10.1.2.3:47904", "proxyControl": "tcp://0.0.0.0:47904"}
    _load(tmp_path, _bus(1, **remote))
