"""Configuration: validation (one line naming the key), address parsing, resolution of paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from greyproxy.config import ConfigError, ensure_dirs, load_config, parse_addr


ENDPOINTS = ("pub", "sub", "journal", "proxyControl", "recorderControl", "maintenanceControl")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"GREYPROXY_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path / "home")}


def load_text(tmp_path: Path, text: str, env: dict[str, str], host: str | None = None):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return load_config(path, host, env=env)


def load_dict(tmp_path: Path, data: dict, env: dict[str, str], host: str | None = None):
    return load_text(tmp_path, yaml.safe_dump(data), env, host)


def _svc(name: str, addr) -> dict:
    kind = {"http-proxy": "http", "socks5-proxy": "socks5", "dns-proxy": "dns"}.get(name, "http")
    return {
        "name": name,
        "addr": addr,
        "handler": {"type": kind},
        "listener": {"type": "dns" if kind == "dns" else "tcp"},
    }


# (label, config, text the one-line error must contain)
INVALID = [
    ("unknown top-level key", {"bogus": 1}, "'bogus'"),
    ("unknown nested key", {"greyproxy": {"adr": ":1"}}, "'greyproxy.adr'"),
    (
        "unknown deeply nested key",
        {"greyproxy": {"notifications": {"enabled": True, "sound": 1}}},
        "'greyproxy.notifications.sound'",
    ),
    ("unknown key in a listener", {"services": [dict(_svc("http-proxy", ":1"), extra=1)]}, "services[0].extra"),
    ("unknown listener name", {"services": [_svc("ftp-proxy", ":1")]}, "services[0].name"),
    ("listener listed twice", {"services": [_svc("http-proxy", ":1"), _svc("http-proxy", ":2")]}, "services[1].name"),
    ("listener without addr", {"services": [{"name": "http-proxy"}]}, "services[0].addr"),
    (
        "listener handler not a mapping",
        {"services": [dict(_svc("http-proxy", ":1"), handler="http")]},
        "services[0].handler",
    ),
    ("services not a list", {"services": {"name": "http-proxy"}}, "'services'"),
    ("section not a mapping", {"proxy": 5}, "'proxy'"),
    ("null section", {"greyproxy": None}, "'greyproxy'"),
    ("string for a number", {"proxy": {"holdTimeout": "30"}}, "'proxy.holdTimeout'"),
    ("float for an integer", {"bus": {"requestRetries": 1.5}}, "'bus.requestRetries'"),
    ("number for a string", {"greyproxy": {"addr": 43080}}, "'greyproxy.addr'"),
    ("int for a boolean", {"greyproxy": {"notifications": {"enabled": 1}}}, "'greyproxy.notifications.enabled'"),
    ("boolean for a number", {"proxy": {"holdTimeout": True}}, "'proxy.holdTimeout'"),
    ("boolean for an integer", {"proxy": {"maxPending": False}}, "'proxy.maxPending'"),
    ("boolean for retention", {"retention": {"days": True}}, "'retention.days'"),
    ("zero where positive", {"proxy": {"holdTimeout": 0}}, "'proxy.holdTimeout'"),
    ("negative where positive", {"retention": {"days": -1}}, "'retention.days'"),
    ("NaN for a number", {"bus": {"heartbeatInterval": float("nan")}}, "'bus.heartbeatInterval'"),
    ("infinity for a number", {"proxy": {"holdTimeout": float("inf")}}, "'proxy.holdTimeout'"),
    ("string for a list", {"dns": {"upstreams": "1.1.1.1:53"}}, "'dns.upstreams'"),
    ("list of wrong items", {"mitm": {"bypass": ["ok", 3]}}, "'mitm.bypass'"),
    ("port out of range", {"greyproxy": {"addr": ":65536"}}, "greyproxy.addr"),
    ("negative port", {"greyproxy": {"addr": ":-1"}}, "greyproxy.addr"),
    ("port not a number", {"services": [_svc("socks5-proxy", ":socks")]}, "services[0].addr"),
    ("addr without a colon", {"services": [_svc("http-proxy", "43051")]}, "services[0].addr"),
    ("unclosed v6 bracket", {"greyproxy": {"addr": "[::1:43080"}}, "greyproxy.addr"),
    ("v6 without port", {"greyproxy": {"addr": "[::1]"}}, "greyproxy.addr"),
    ("pathPrefix without slash", {"greyproxy": {"pathPrefix": "gp"}}, "greyproxy.pathPrefix"),
    ("inproc bus endpoint", {"bus": {"journal": "inproc://journal"}}, "bus.journal"),
    ("path as bus endpoint", {"bus": {"pub": "/tmp/pub.sock"}}, "bus.pub"),
    ("http bus endpoint", {"bus": {"sub": "http://127.0.0.1:1"}}, "bus.sub"),
    (
        "origin with a path",
        {"greyproxy": {"allowedOrigins": ["http://localhost:3000/app"]}},
        "greyproxy.allowedOrigins[0]",
    ),
    (
        "origin without a scheme",
        {"greyproxy": {"allowedOrigins": ["http://ok.example", "localhost:3000"]}},
        "greyproxy.allowedOrigins[1]",
    ),
    (
        "origin with a bad port",
        {"greyproxy": {"allowedOrigins": ["http://localhost:99999"]}},
        "greyproxy.allowedOrigins[0]",
    ),
    ("origin not a string", {"greyproxy": {"allowedOrigins": [3]}}, "greyproxy.allowedOrigins"),
    ("builtinRules not a boolean", {"greyproxy": {"builtinRules": "no"}}, "greyproxy.builtinRules"),
    # Each service speaks one protocol: another handler or listener type would be ignored.
    (
        "unknown handler type",
        {"services": [dict(_svc("http-proxy", ":1"), handler={"type": "ftp"})]},
        "'services[0].handler.type': http-proxy takes handler type http, not 'ftp'",
    ),
    (
        "udp listener for the http proxy",
        {"services": [dict(_svc("http-proxy", ":1"), listener={"type": "udp"})]},
        "'services[0].listener.type': http-proxy takes listener type tcp",
    ),
    (
        "http handler on the dns proxy",
        {"services": [_svc("http-proxy", ":1"), dict(_svc("dns-proxy", ":2"), handler={"type": "http"})]},
        "'services[1].handler.type': dns-proxy takes handler type dns",
    ),
    (
        "tcp listener for the dns proxy",
        {"services": [dict(_svc("dns-proxy", ":2"), listener={"type": "tcp"})]},
        "'services[0].listener.type'",
    ),
    ("socks handler on the http proxy", {"services": [_svc("socks5-proxy", ":1") | {"name": "http-proxy"}]}, "handler"),
    ("dns upstream not an IP", {"dns": {"upstreams": ["1.1.1.1", "not an ip"]}}, "'dns.upstreams[1]': 'not an ip'"),
    ("dns upstream a host name", {"dns": {"upstreams": ["dns.google:53"]}}, "'dns.upstreams[0]'"),
    ("dns upstream port out of range", {"dns": {"upstreams": ["1.2.3.4:99999"]}}, "'dns.upstreams[0]': port 99999"),
    ("dns upstream port 0", {"dns": {"upstreams": ["[::1]:0"]}}, "'dns.upstreams[0]'"),
    ("dns upstream port not a number", {"dns": {"upstreams": ["1.2.3.4:dns"]}}, "'dns.upstreams[0]'"),
    ("host not an IP", {"host": "not-an-ip"}, "'host': 'not-an-ip' is not an IP address"),
    (
        "host IPv4-mapped",
        {"host": "::ffff:0.0.0.0"},
        "'host': '::ffff:0.0.0.0' is an IPv4-mapped address; write the IPv4",
    ),
    ("listener host not an IP", {"services": [_svc("http-proxy", "not-an-ip:1")]}, "'services[0].addr'"),
    ("API host not an IP", {"greyproxy": {"addr": "api.example:1"}}, "'greyproxy.addr'"),
]


@pytest.mark.parametrize("label,data,needle", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_is_one_line_naming_the_key(
    tmp_path: Path, env: dict, label: str, data: dict, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_dict(tmp_path, data, env)
    msg = str(info.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_invalid_yaml_names_file_and_line(tmp_path: Path, env: dict) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "greyproxy:\n  addr: ':1'\nproxy: [\n", env)
    msg = str(info.value)
    assert "cfg.yaml" in msg and "invalid YAML" in msg and "line" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "a: [\nb: c d: e\n", env)
    # PyYAML's own words for what is wrong, not only where
    assert str(info.value).endswith("line 2 invalid YAML: expected ',' or ']', but got ':'"), info.value


@pytest.mark.parametrize(
    "text,where",
    [
        ("proxy:\n  holdTimeout: 5\n  holdTimeout: 600\n", "line 3: key 'holdTimeout' given twice (first on line 2)"),
        ("proxy: {holdTimeout: 5, holdTimeout: 600}\n", "line 1: key 'holdTimeout' given twice (first on line 1)"),
        ("proxy: {holdTimeout: 5}\ndns: {}\nproxy: {maxPending: 9}\n", "line 3: key 'proxy' given twice"),
        ("services:\n  - {name: http-proxy, addr: ':1', addr: ':2'}\n", "line 2: key 'addr' given twice"),
    ],
)
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path: Path, env: dict, text: str, where: str) -> None:
    """Plain YAML keeps the last of two equal keys silently (holdTimeout 600 above): refused."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    assert f"cfg.yaml': {where}" in str(info.value), info.value
    assert "\n" not in str(info.value)


def test_a_merge_key_may_still_be_overridden(tmp_path: Path, env: dict) -> None:
    """`<<: *anchor` then the same key is YAML's way to override, not a key given twice."""
    text = "greyproxy: {addr: ':1'}\nproxy:\n  <<: {holdTimeout: 5, maxPending: 7}\n  holdTimeout: 9\n"
    cfg = load_text(tmp_path, text, env)
    assert (cfg.raw["proxy"]["holdTimeout"], cfg.raw["proxy"]["maxPending"]) == (9, 7)


def test_what_the_new_checks_still_accept(tmp_path: Path, env: dict) -> None:
    """Resolver forms the DNS proxy reads, bind hosts it can bind, each service's own types."""
    upstreams = ["1.1.1.1", "8.8.8.8:53", "[2606:4700::1111]:53", "::1", "[::1]", "fe80::1%eth0"]
    services = [_svc("http-proxy", "localhost:1"), _svc("socks5-proxy", "[::1]:2"), _svc("dns-proxy", "*:3")]
    services[2] = services[2] | {"handler": {}}  # (no type given: the service's own)
    cfg = load_dict(tmp_path, {"host": "::1", "dns": {"upstreams": upstreams}, "services": services}, env)
    assert cfg.listeners["http-proxy"].host == "localhost"
    cfg = load_dict(tmp_path, {"host": "0.0.0.0", "greyproxy": {"addr": "127.0.0.1:5"}}, env, host="10.1.1.1")
    assert cfg.listeners["http-proxy"].host == "10.1.1.1"
    with pytest.raises(ConfigError, match="^--host: 'bogus' is not an IP address"):
        load_dict(tmp_path, {}, env, host="bogus")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, env: dict, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_text(tmp_path, text, env)


def test_missing_file(tmp_path: Path, env: dict) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env=env)
    assert "nope.yaml" in str(info.value)


def test_embedded_default_and_empty_file(tmp_path: Path, env: dict) -> None:
    for cfg in (load_config(None, env=env), load_text(tmp_path, "", env), load_text(tmp_path, "# nothing\n", env)):
        assert cfg.ports() == {"api": 43080, "http-proxy": 43051, "socks5-proxy": 43052, "dns-proxy": 43053}
        assert {lst.host for lst in cfg.listeners.values()} == {"127.0.0.1"}
        assert cfg.api is not None and cfg.api.host == "127.0.0.1"
        assert cfg.path_prefix == "/"
        assert cfg.warnings == []
        assert cfg.own_ports == {43080, 43051, 43052, 43053}
        assert cfg.api_base() == "http://127.0.0.1:43080"


def test_user_values_merge_over_defaults(tmp_path: Path, env: dict) -> None:
    cfg = load_dict(tmp_path, {"proxy": {"holdTimeout": 2}, "retention": {"days": 1.5}}, env)
    assert cfg.section("proxy")["holdTimeout"] == 2
    assert cfg.section("proxy")["maxPending"] == 10000  # untouched default beside it
    assert cfg.section("retention")["days"] == 1.5
    assert cfg.source.endswith("cfg.yaml")


@pytest.mark.parametrize(
    "addr,expected",
    [
        (":43051", ("", 43051)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:1234", ("::1", 1234)),
        ("[::]:0", ("::", 0)),
        (" localhost:65535 ", ("localhost", 65535)),
    ],
)
def test_parse_addr(addr: str, expected: tuple[str, int]) -> None:
    assert parse_addr(addr, "k") == expected


def test_bare_port_binds_loopback_and_host_overrides(tmp_path: Path, env: dict) -> None:
    data = {
        "greyproxy": {"addr": ":18080"},
        "services": [_svc("http-proxy", ":18051"), _svc("socks5-proxy", "[::1]:1234")],
    }
    cfg = load_dict(tmp_path, data, env)
    assert cfg.api.host == "127.0.0.1" and cfg.api.port == 18080
    assert cfg.listeners["http-proxy"].host == "127.0.0.1"
    assert (cfg.listeners["socks5-proxy"].host, cfg.listeners["socks5-proxy"].port) == ("::1", 1234)
    assert cfg.warnings == []

    cfg = load_dict(tmp_path, data, env, host="10.1.2.3")
    assert cfg.api.host == "10.1.2.3" and cfg.listeners["http-proxy"].host == "10.1.2.3"
    assert cfg.listeners["socks5-proxy"].host == "::1"  # an explicit host wins over --host

    cfg = load_dict(tmp_path, dict(data, host="10.9.9.9"), env)  # top-level host: in the file
    assert cfg.listeners["http-proxy"].host == "10.9.9.9"
    cfg = load_dict(tmp_path, dict(data, host="10.9.9.9"), env, host="10.1.1.1")  # --host wins
    assert cfg.listeners["http-proxy"].host == "10.1.1.1"


def test_v6_api_base(tmp_path: Path, env: dict) -> None:
    cfg = load_dict(tmp_path, {"greyproxy": {"addr": "[::1]:18080", "pathPrefix": "/gp/"}}, env)
    assert cfg.api_base() == "http://[::1]:18080/gp"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "*"])
def test_all_interfaces_warns(tmp_path: Path, env: dict, host: str) -> None:
    cfg = load_config(None, host, env=env)
    assert cfg.warnings and all(host in w for w in cfg.warnings)
    assert {lst.host for lst in cfg.listeners.values()} == {"0.0.0.0" if host == "*" else host}
    explicit = load_dict(tmp_path, {"services": [_svc("http-proxy", "0.0.0.0:1")]}, env)
    assert any("services[0].addr" in w for w in explicit.warnings)


@pytest.mark.parametrize(
    "prefix,expected",
    [
        ("/", "/"),
        ("", "/"),
        ("  ", "/"),
        ("/gp", "/gp"),
        ("/gp/", "/gp"),
        ("//gp//", "/gp"),
        ("/a/b/", "/a/b"),
    ],
)
def test_path_prefix_normalised(tmp_path: Path, env: dict, prefix: str, expected: str) -> None:
    cfg = load_dict(tmp_path, {"greyproxy": {"pathPrefix": prefix}}, env)
    assert cfg.path_prefix == expected
    assert cfg.api_base() == "http://127.0.0.1:43080" + ("" if expected == "/" else expected)


def test_api_disabled(tmp_path: Path, env: dict) -> None:
    cfg = load_dict(tmp_path, {"greyproxy": {"addr": ""}}, env)
    assert cfg.api is None
    assert cfg.ports()["api"] == 0
    assert 43080 not in cfg.own_ports
    with pytest.raises(ConfigError):
        cfg.api_base()


def test_bus_endpoints(tmp_path: Path, env: dict) -> None:
    cfg = load_config(None, env=env)
    for key in ENDPOINTS:
        assert cfg.bus[key].startswith(f"ipc://{cfg.run_dir}/"), cfg.bus[key]
    assert len({cfg.bus[k] for k in ENDPOINTS}) == len(ENDPOINTS)
    cfg = load_dict(tmp_path, {"bus": {"journal": "tcp://127.0.0.1:5555", "pub": "ipc:///tmp/x.sock"}}, env)
    assert cfg.bus["journal"] == "tcp://127.0.0.1:5555"
    assert cfg.bus["pub"] == "ipc:///tmp/x.sock"


def test_data_dir_precedence(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"GREYPROXY_DATA_HOME": str(tmp_path / "g"), "XDG_DATA_HOME": str(tmp_path / "x"), "HOME": str(home)}
    assert load_config(None, env=env).data_dir == tmp_path / "g"
    env.pop("GREYPROXY_DATA_HOME")
    assert load_config(None, env=env).data_dir == tmp_path / "x" / "greyproxy"
    env.pop("XDG_DATA_HOME")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # Path.home() reads the process environment
    try:
        cfg = load_config(None, env=env)
    finally:
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home
    assert cfg.data_dir == home / ".local" / "share" / "greyproxy"
    assert cfg.db_path == cfg.data_dir / "greyproxy.db"
    assert cfg.log_dir == cfg.data_dir / "logs"


def test_db_path_from_config(tmp_path: Path, env: dict) -> None:
    cfg = load_dict(tmp_path, {"greyproxy": {"db": str(tmp_path / "elsewhere.db")}}, env)
    assert cfg.db_path == tmp_path / "elsewhere.db"


def test_short_data_dir_keeps_runtime_dir_inside(tmp_path: Path) -> None:
    data = Path("/tmp/gpshort")
    cfg = load_config(None, env={"GREYPROXY_DATA_HOME": str(data)})
    assert cfg.run_dir == data / "run"


def test_long_data_dir_gets_a_short_runtime_dir(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 120) / "greyproxy"
    cfg = load_config(None, env={"GREYPROXY_DATA_HOME": str(data)})
    assert not str(cfg.run_dir).startswith(str(data))
    assert str(cfg.run_dir).startswith(f"/tmp/greyproxy-{os.getuid()}-")
    for key in ENDPOINTS:
        assert len(cfg.bus[key][len("ipc://") :]) < 100, cfg.bus[key]
    # Stable for the same data dir, different for another one.
    assert load_config(None, env={"GREYPROXY_DATA_HOME": str(data)}).run_dir == cfg.run_dir
    other = load_config(None, env={"GREYPROXY_DATA_HOME": str(data) + "2"})
    assert other.run_dir != cfg.run_dir


def test_env_config_and_host(tmp_path: Path, env: dict) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("greyproxy: {addr: ':18080'}\n")
    cfg = load_config(None, env=dict(env, GREYPROXY_CONFIG=str(path), GREYPROXY_HOST="10.0.0.5"))
    assert cfg.api.port == 18080 and cfg.api.host == "10.0.0.5"
    assert load_config(None, env=dict(env, GREYPROXY_SILENT_ALLOW="1")).silent_allow is True
    assert load_config(None, env=env).silent_allow is False


def test_ensure_dirs_are_private(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    cfg = load_config(None, env={"GREYPROXY_DATA_HOME": str(data)})
    ensure_dirs(cfg)
    for d in (cfg.data_dir, cfg.run_dir, cfg.log_dir):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d


def test_to_dict_reports_resolution(tmp_path: Path, env: dict) -> None:
    cfg = load_dict(tmp_path, {"greyproxy": {"addr": ":18080"}}, env)
    out = cfg.to_dict()
    assert out["resolved"]["ports"]["api"] == 18080
    assert out["resolved"]["dataDir"] == env["GREYPROXY_DATA_HOME"]
    assert out["resolved"]["bind"]["api"] == "127.0.0.1:18080"
    yaml.safe_dump(out)  # printable by `greyproxy config`
