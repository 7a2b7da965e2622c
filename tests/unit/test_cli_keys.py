"""`greyproxy keys` (SPEC §15) and the command list of `greyproxy --help`, as a person types them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bus import curve
from conftest import PYTHON, REPO


def _greyproxy(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"GREYPROXY_DATA_HOME": str(data_dir), "PATH": "/usr/bin:/bin", "HOME": str(data_dir)}
    return subprocess.run(
        [PYTHON, "-m", "greyproxy", *args], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=60
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_allow_takes_the_key_quoted_or_its_file_and_says_when_a_shell_cut_it(tmp_path: Path) -> None:
    central, other = tmp_path / "central", tmp_path / "other"
    shown = _greyproxy(other, "keys")
    assert shown.returncode == 0, shown.stderr
    key = shown.stdout.strip()
    assert len(key) == 40
    # The hint on stderr is a command a shell runs as shown: the z85 key quoted.
    hint = shown.stderr.strip().rsplit(": ", 1)[1]
    assert hint == f"greyproxy keys allow NAME '{key}'"

    # The other host's keys/bus.key file, copied over, works as well as the key itself.
    by_file = _greyproxy(central, "keys", "allow", "other", str(other / "keys" / "bus.key"))
    assert by_file.returncode == 0, by_file.stderr
    assert curve.authorized_keys(central / "keys") == {key.encode(): "other"}
    assert _greyproxy(central, "keys", "revoke", "other").returncode == 0
    assert _greyproxy(central, "keys", "allow", "other", key).returncode == 0
    assert curve.authorized_keys(central / "keys") == {key.encode(): "other"}

    # A key cut short (pasted unquoted, the shell ends it at a '>' or '&'): refused, saying so.
    cut = _greyproxy(central, "keys", "allow", "cut", key[:12])
    assert cut.returncode == 2
    assert "12 characters" in cut.stderr and "quote" in cut.stderr
    # ...also when the part left holds a '/' (z85 has it): it was "no such file" (a flaky failure
    # here, with ~13 % of random keys)
    slashed = _greyproxy(central, "keys", "allow", "cut", "bIT%x/=KzlM-")
    assert slashed.returncode == 2 and "12 characters" in slashed.stderr and "quote" in slashed.stderr
    # ...and when it starts with '-' (one key in 85): it was argparse's "required: key" (a flaky
    # failure here, with ~1 % of random keys)
    dashed = _greyproxy(central, "keys", "allow", "cut", "-W56+!kzlM-b")
    assert dashed.returncode == 2 and "12 characters" in dashed.stderr and "quote" in dashed.stderr, dashed.stderr
    # A file that is no key: its path named.
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    bad = _greyproxy(central, "keys", "allow", "junk", str(junk))
    assert bad.returncode == 2 and str(junk) in bad.stderr and "not a CURVE certificate" in bad.stderr
    for path, says in (
        (tmp_path, "not a key file"),  # a directory
        (_write(tmp_path / "bin.key", bytes(range(128, 256))), "not text"),
        (_write(tmp_path / "tilde.key", b'public-key = "' + b"~" * 40 + b'"\n'), "is not a CURVE public key"),
    ):
        r = _greyproxy(central, "keys", "allow", "junk", str(path))
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert set(curve.authorized_keys(central / "keys").values()) == {"other"}
    # A key file that is not there: said so (it was "20 characters: quote the key")
    gone = _greyproxy(central, "keys", "allow", "x", "/nonexistent/bus.key")
    assert gone.returncode == 2 and "no such file" in gone.stderr and "characters" not in gone.stderr


def test_help_lists_every_command_with_a_line_saying_what_it_does(tmp_path: Path) -> None:
    out = _greyproxy(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    names = listed.strip().splitlines()[0].strip().strip("{}").split(",")
    assert {"serve", "run", "keys", "env", "cert", "explain", "events", "export", "service"} <= set(names)
    lines = [line.split() for line in listed.splitlines()[1:] if line.startswith("    ") and line.split()]
    described = {words[0] for words in lines if len(words) > 1 and words[0] in names}
    missing = set(names) - described
    assert not missing, f"commands without a help line: {sorted(missing)}\n{out.stdout}"


@pytest.mark.parametrize("cmd", ["keys", "cert", "env"])
def test_each_extra_command_still_has_its_own_help(tmp_path: Path, cmd: str) -> None:
    out = _greyproxy(tmp_path, cmd, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: greyproxy {cmd}"), out.stderr


def test_a_key_that_starts_with_a_dash_is_a_key_not_an_option(tmp_path: Path) -> None:
    """One z85 key in 85 starts with '-': `keys allow NAME -W56…` must not read it as an option
    (a stack test met one: argparse answered "the following arguments are required: key")."""
    import zmq

    from greyproxy.cli_keys import key_after_dashes

    key = next(k.decode() for k, _ in iter(zmq.curve_keypair, None) if k.startswith(b"-"))
    assert key_after_dashes(["keys", "allow", "b", key]) == ["keys", "allow", "--", "b", key]
    assert key_after_dashes(["keys", "allow", "-C", "f.yaml", "b", key, "--host", "::1"]) == [
        "keys", "allow", "-C", "f.yaml", "--host", "::1", "--", "b", key,
    ]  # fmt: skip
    untouched = [["keys", "allow", "b", "x" * 40], ["keys", "revoke", key]]
    for argv in untouched:
        assert key_after_dashes(argv) == argv
    # A shorter one too (a key the shell cut): cmd_allow then says it was cut.
    assert key_after_dashes(["keys", "allow", "b", "-short"]) == ["keys", "allow", "--", "b", "-short"]
    central = tmp_path / "central"
    conf = tmp_path / "c.yaml"
    conf.write_text("proxy: {holdTimeout: 30}\n")
    for argv in (["b", key], ["b", key, "-C", str(conf)], ["-C", str(conf), "b", key], ["b", "--", key]):
        r = _greyproxy(central, "keys", "allow", *argv)
        assert r.returncode == 0, (argv, r.stderr)
        assert curve.authorized_keys(central / "keys") == {key.encode(): "b"}


def test_config_before_the_subcommand_duplicates_and_modes(tmp_path: Path) -> None:
    """SPEC §15 (`greyproxy keys`). Found by an outside run of docs/configuration.md's several-hosts
    steps:
    - `greyproxy keys -C FILE list` (the usage line puts -C there) ignored FILE: the subcommand's
      own -C default replaced it. Both places now work, and a bad FILE fails either way;
    - one key under two names: `list` showed one, `revoke` of it left the key allowed, silently;
    - the first command on a new host made the data dir with the umask's mode, not 0700;
    - a secret key file readable by others was used as it was."""
    import os
    import stat

    data = tmp_path / "fresh" / "data"
    custom = tmp_path / "custom-keys"
    cfg = tmp_path / "ck.yaml"
    cfg.write_text(f"bus:\n  keysDir: {custom}\n")
    before = _greyproxy(data, "keys", "-C", str(cfg), "show")
    after = _greyproxy(data, "keys", "show", "-C", str(cfg))
    assert before.returncode == after.returncode == 0, before.stderr
    assert before.stdout == after.stdout and (custom / "bus.key_secret").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("bogus: 1\n")
    for argv in (("keys", "-C", str(bad), "list"), ("keys", "list", "-C", str(bad))):
        r = _greyproxy(data, *argv)
        assert r.returncode == 2 and "bogus" in r.stderr, (argv, r.stderr)

    r = _greyproxy(data, "keys")  # the default keys dir, in a data dir that does not exist yet
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    key = r.stdout.strip()
    other = _greyproxy(tmp_path / "other", "keys").stdout.strip()
    assert _greyproxy(data, "keys", "allow", "old-name", other).returncode == 0
    twice = _greyproxy(data, "keys", "allow", "new-name", other)
    assert twice.returncode == 0 and "also authorized as old-name" in twice.stderr
    listed = _greyproxy(data, "keys", "list").stdout.splitlines()
    assert listed == [f"this host\t{key}", f"new-name\t{other}", f"old-name\t{other}"]
    r = _greyproxy(data, "keys", "revoke", "old-name")
    assert r.returncode == 3 and "still authorized as new-name" in r.stderr
    assert _greyproxy(data, "keys", "revoke", "new-name").returncode == 0
    assert curve.authorized_keys(data / "keys") == {}

    secret = data / "keys" / "bus.key_secret"
    os.chmod(secret, 0o644)
    r = _greyproxy(data, "keys")
    assert r.returncode == 0 and r.stdout.strip() == key
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_a_broken_key_file_is_one_clear_line_from_run_and_serve(tmp_path: Path) -> None:
    """With tcp:// bus endpoints and a corrupted bus.key_secret, `greyproxy run proxy` ended in a
    Python traceback and `greyproxy serve` said nothing while every service crash-looped under
    supervisord (an outside run: 45 exits and ~50 tracebacks in 20 s, the API never up). Both now
    check the pair first and say what is wrong in one line (exit 2), as `greyproxy keys` does."""
    from harness.util import free_port

    data = tmp_path / "data"
    assert _greyproxy(data, "keys").returncode == 0
    secret = data / "keys" / curve.SECRET_FILE
    secret.write_bytes(secret.read_bytes()[:60])
    cfg = tmp_path / "tcp.yaml"
    ports = [free_port() for _ in range(4)]
    cfg.write_text(
        "bus:\n"
        f"  pub: tcp://127.0.0.1:{ports[0]}\n"
        f"  sub: tcp://127.0.0.1:{ports[1]}\n"
        f"  journal: tcp://127.0.0.1:{ports[2]}\n"
        f"  recorderControl: tcp://127.0.0.1:{ports[3]}\n"
    )
    for argv in (("run", "proxy", "-C", str(cfg)), ("serve", "-C", str(cfg))):
        r = _greyproxy(data, *argv)
        assert r.returncode == 2, (argv, r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and str(secret) in r.stderr, (argv, r.stderr)
        assert "not a CURVE certificate" in r.stderr


def test_every_keys_command_says_a_broken_pair_or_keys_dir_in_one_line(tmp_path: Path) -> None:
    """`keys list` and `keys allow` ended in a traceback for a key pair that does not match, and
    every command for a keys directory that is a file (an outside run)."""
    import zmq

    data = tmp_path / "data"
    assert _greyproxy(data, "keys").returncode == 0
    secret = data / "keys" / curve.SECRET_FILE
    _pub, other_secret = zmq.curve_keypair()
    text = secret.read_text()
    mine = text.split('secret-key = "')[1].split('"')[0]
    secret.write_text(text.replace(mine, other_secret.decode()))
    other_key = zmq.curve_keypair()[0].decode()
    for argv in (("keys",), ("keys", "list"), ("keys", "allow", "x", other_key)):
        r = _greyproxy(data, *argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert "does not belong to its public-key" in r.stderr, (argv, r.stderr)
    cfg = tmp_path / "k.yaml"
    (tmp_path / "keys-file").write_text("not a directory\n")
    cfg.write_text(f"bus:\n  keysDir: {tmp_path / 'keys-file'}\n")
    for argv in (("keys", "-C", str(cfg)), ("keys", "list", "-C", str(cfg))):
        r = _greyproxy(data, *argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "keys-file" in r.stderr, (argv, r.stderr)
