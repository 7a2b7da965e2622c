"""`greyproxy env` without a stack: the variables, their quoting per shell, the CA bundle."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greyproxy import certs
from greyproxy.cli_env import BUNDLE_VARS, NODE_VAR, EnvPlan, check_container_name, env_plan, render
from greyproxy.config import ConfigError, load_config
from harness.fuzz import examples


@pytest.fixture
def cfg(tmp_path: Path):
    return load_config(env={"GREYPROXY_DATA_HOME": str(tmp_path / "data")})


def test_proxy_variables_carry_the_identity_with_a_password(cfg) -> None:
    env = env_plan(cfg, "agent", with_ca=False).as_dict()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        assert env[name] == "http://agent:x@127.0.0.1:43051", name
    assert env["NO_PROXY"] == env["no_proxy"] == "127.0.0.1:43080,localhost:43080"
    assert env["GIT_HTTP_PROXY_AUTHMETHOD"] == "basic"
    assert not set(BUNDLE_VARS) & set(env) and NODE_VAR not in env


def test_socks_all_proxy_and_no_identity(cfg) -> None:
    env = env_plan(cfg, None, with_ca=False, socks_all=True).as_dict()
    assert env["ALL_PROXY"] == "socks5h://127.0.0.1:43052"
    assert env["HTTP_PROXY"] == "http://127.0.0.1:43051"
    assert "GIT_HTTP_PROXY_AUTHMETHOD" not in env


def test_names_are_percent_encoded(cfg) -> None:
    env = env_plan(cfg, "a b/c:d@e", with_ca=False).as_dict()
    assert env["HTTP_PROXY"] == "http://a%20b%2Fc%3Ad%40e:x@127.0.0.1:43051"


def test_wildcard_and_ipv6_binds(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("host: '::'\n")
    cfg = load_config(path, env={"GREYPROXY_DATA_HOME": str(tmp_path / "d")})
    env = env_plan(cfg, "a", with_ca=False).as_dict()
    assert env["HTTP_PROXY"] == "http://a:x@[::1]:43051"
    assert env["NO_PROXY"] == "[::1]:43080,localhost:43080"


@pytest.mark.parametrize(
    "bad", ["", " agent", "agent\n", "a\x00b", "proxy", "unknown-10.0.0.1", "x" * 201, "team:agent"]
)
def test_bad_container_names(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_container_name(bad)


def test_ca_variables_point_at_one_bundle(cfg) -> None:
    certs.generate_ca(cfg.data_dir)
    env = env_plan(cfg, "agent").as_dict()
    bundle = cfg.data_dir / "ca-bundle.pem"
    for name in BUNDLE_VARS:
        assert env[name] == str(bundle), name
    # requests ignores --cert when REQUESTS_CA_BUNDLE is set: both must name the same file.
    assert env["PIP_CERT"] == env["REQUESTS_CA_BUNDLE"]
    assert env[NODE_VAR] == str(cfg.data_dir / "ca-cert.pem")
    data = bundle.read_bytes()
    system = certs.system_ca_file()
    if system is not None:
        assert data.startswith(system.read_bytes().rstrip(b"\n"))
    assert data.endswith((cfg.data_dir / "ca-cert.pem").read_bytes())
    assert bundle.stat().st_mode & 0o777 == 0o644


def test_bundle_follows_a_new_ca(cfg) -> None:
    certs.generate_ca(cfg.data_dir)
    bundle = certs.write_ca_bundle(cfg.data_dir)
    old = bundle.read_bytes()
    certs.generate_ca(cfg.data_dir, force=True)  # as `greyproxy cert generate -f`
    new_ca = (cfg.data_dir / "ca-cert.pem").read_bytes()
    assert bundle.read_bytes() != old and bundle.read_bytes().endswith(new_ca)


def test_watcher_rebuilds_bundle_for_a_copied_in_ca(tmp_path: Path) -> None:
    """A CA pair copied into the data dir (not made by generate_ca) reaches the bundle once the
    proxy's watcher loads it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    certs.generate_ca(src)
    dst.mkdir()
    certs.write_ca_bundle(dst)  # system bundle only
    watcher = certs.CAWatcher(dst)
    assert not watcher.check()
    for name in (certs.KEY_FILE, certs.CERT_FILE):
        shutil.copy(src / name, dst / name)
    assert watcher.check()
    assert (dst / "ca-bundle.pem").read_bytes().endswith((src / "ca-cert.pem").read_bytes())


def test_a_colon_in_a_name_is_refused_with_what_the_proxy_would_record() -> None:
    # Basic credentials split at the first ':': `team:agent` would be recorded as `team`
    with pytest.raises(ConfigError, match="'team'"):
        check_container_name("team:agent")


def test_without_a_ca_node_is_not_pointed_at_a_missing_file(cfg) -> None:
    env = env_plan(cfg, "agent").as_dict()  # (no `cert generate` yet)
    assert NODE_VAR not in env and env["SSL_CERT_FILE"] == str(cfg.data_dir / "ca-bundle.pem")
    certs.generate_ca(cfg.data_dir)
    assert env_plan(cfg, "agent").as_dict()[NODE_VAR] == str(cfg.data_dir / "ca-cert.pem")


def test_bundle_without_a_ca_is_the_system_bundle(cfg) -> None:
    cfg.data_dir.mkdir(parents=True)
    bundle = certs.write_ca_bundle(cfg.data_dir)
    system = certs.system_ca_file()
    expected = b"" if system is None else system.read_bytes()
    assert bundle.read_bytes().rstrip(b"\n") == expected.rstrip(b"\n")


_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@settings(max_examples=examples(60), deadline=None)
@given(_values)
def test_sh_quoting_round_trips(value: str) -> None:
    out = render(EnvPlan([("GP_TEST_VALUE", value)], []), "sh")
    p = subprocess.run(["sh", "-c", out + 'printf %s "$GP_TEST_VALUE"'], capture_output=True, timeout=10)
    assert p.stdout.decode("utf-8", "surrogateescape") == value


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
@settings(max_examples=examples(30), deadline=None)
@given(_values)
def test_fish_quoting_round_trips(value: str) -> None:
    out = render(EnvPlan([("GP_TEST_VALUE", value)], []), "fish")
    p = subprocess.run(["fish", "-c", out + 'printf %s "$GP_TEST_VALUE"'], capture_output=True, timeout=10)
    assert p.stdout.decode() == value


@pytest.mark.skipif(shutil.which("pwsh") is None, reason="PowerShell is not installed")
def test_powershell_quoting_runs() -> None:
    out = render(EnvPlan([("GP_TEST_VALUE", "it's $HOME `x`")], []), "powershell")
    p = subprocess.run(
        ["pwsh", "-NoProfile", "-Command", out + "Write-Output $Env:GP_TEST_VALUE"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.stdout.strip() == "it's $HOME `x`"


def test_fish_and_powershell_lines() -> None:
    plan = EnvPlan([("A", "x'y\\z")], [])
    assert render(plan, "fish").splitlines()[1] == "set -gx A 'x\\'y\\\\z'"
    assert render(plan, "powershell").splitlines()[1] == "$Env:A = 'x''y\\z'"
