"""`greyproxy env` through the real stack: plain pip, npm, curl and git in a shell that has only
what `eval "$(greyproxy env --container agent)"` gives it, against a local HTTPS origin (`localhost`) with
a trustme certificate (the proxy trusts it through mitm.upstreamCaFile). The origin serves a tiny
PEP 503 simple index with a real wheel, an npm registry packument, a git smart-HTTP ref
advertisement and plain pages. Every request must be intercepted and recorded under `agent`.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import select
import shutil
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import PYTHON, REPO, Stack, intercepting_stack, start_https_origin, wait_for

pytestmark = pytest.mark.stack

# A name, not an IP literal: npm's proxy agent checks an IP-literal registry's certificate
# against "localhost" (it passes no host to TLS), so it cannot be tested that way.
ORIGIN = "localhost"
ORIGIN_IP = "127.0.0.1"
GIT_SHA = "1f2e3d4c5b6a79880796a5b4c3d2e1f001122334"
# Variables a developer's shell may carry that would let a runtime succeed without `greyproxy env`.
_STRIP_PREFIXES = (
    "PIP_",
    "npm_config_",
    "NPM_CONFIG_",
    "GIT_",
    "CURL_",
    "REQUESTS_",
    "SSL_CERT",
    "NODE_",
    "AWS_CA",
    "DENO_",
    "NIX_SSL",
    "CARGO_HTTP",
)
_STRIP_EXACT = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def _wheel(name: str, version: str) -> bytes:
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 1\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},sha256={hashlib.sha256(data).hexdigest()},{len(data)}\n" for path, data in files.items())
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return buf.getvalue()


WHEEL = _wheel("tinypkg", "0.1")
WHEEL_NAME = "tinypkg-0.1-py3-none-any.whl"


def _pkt(line: str) -> bytes:
    data = line.encode()
    return f"{len(data) + 4:04x}".encode() + data


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path, _, query = self.path.partition("?")
        base = f"https://{self.headers['Host']}"
        if path in ("/simple/tinypkg/", "/simple/pip/"):
            digest = hashlib.sha256(WHEEL).hexdigest()
            name = "tinypkg-0.1-py3-none-any.whl" if "tinypkg" in path else "pip-99.0-py3-none-any.whl"
            self._send(
                200,
                f'<html><body><a href="/files/{name}#sha256={digest}">{name}</a></body></html>'.encode(),
                "text/html",
            )
        elif path == f"/files/{WHEEL_NAME}":
            self._send(200, WHEEL, "application/octet-stream")
        elif path.strip("/") in ("tinypkg", "npm"):  # an npm registry packument
            name = path.strip("/")
            doc = {
                "name": name,
                "dist-tags": {"latest": "1.0.0"},
                "versions": {
                    "1.0.0": {
                        "name": name,
                        "version": "1.0.0",
                        "dist": {"tarball": f"{base}/{name}/-/{name}-1.0.0.tgz", "shasum": "0" * 40},
                    }
                },
            }
            self._send(200, json.dumps(doc).encode(), "application/json")
        elif path == "/repo.git/info/refs" and query == "service=git-upload-pack":
            body = (
                _pkt("# service=git-upload-pack\n")
                + b"0000"
                + _pkt(f"{GIT_SHA} HEAD\0symref=HEAD:refs/heads/main agent=git/test-origin\n")
                + _pkt(f"{GIT_SHA} refs/heads/main\n")
                + b"0000"
            )
            self._send(200, body, "application/x-git-upload-pack-advertisement")
        else:
            self._send(200, f"hello {path}\n".encode(), "text/plain")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin(origin_ca: trustme.CA) -> Iterator[int]:
    server, port = start_https_origin(origin_ca, ORIGIN_IP, _Origin, ORIGIN)
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(origin_ca_file: Path) -> Iterator[Stack]:
    with intercepting_stack({"proxy": {"holdTimeout": 2}}, origin_ca_file, allow=(ORIGIN,)) as s:
        yield s


def _bare_env(stack: Stack) -> dict[str, str]:
    """The stack's environment without any proxy or CA variable: a shell before `greyproxy env`."""
    env = {k: v for k, v in stack.env.items() if not k.startswith(_STRIP_PREFIXES) and k.lower() not in _STRIP_EXACT}
    env["npm_config_update_notifier"] = "false"
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GREYPROXY"] = f"{PYTHON} -m greyproxy"
    env["GREYPROXY_CFG"] = str(stack.cfg_path)
    return env


def _in_agent_shell(
    stack: Stack, script: str, tmp: Path, container: str = "agent", env_args: str = ""
) -> subprocess.CompletedProcess:
    full = (
        f'eval "$($GREYPROXY env --container {container} {env_args} -C "$GREYPROXY_CFG")" || exit 99\n'
        f"cd {tmp}\n{script}"
    )
    return subprocess.run(
        ["bash", "-c", full], env=_bare_env(stack), capture_output=True, text=True, timeout=120, cwd=str(REPO)
    )


def _transaction(stack: Stack, container: str, path: str) -> dict:
    def find() -> dict | None:
        r = stack.get("/api/transactions", params={"container": container, "limit": 200})
        assert r.status_code == 200, r.text
        for item in r.json()["items"]:
            if item["url"].split("?")[0].endswith(path):
                return item
        return None

    try:
        return wait_for(find, 10, message=f"a transaction {path} under {container}")
    except AssertionError:
        r = stack.get("/api/transactions", params={"limit": 20})
        raise AssertionError(
            f"no transaction {path} under {container}; latest: "
            f"{[(i['container_name'], i['url']) for i in r.json()['items']]}"
        ) from None


def _ua(item: dict) -> str:
    for k, v in item["request_headers"].items():
        if k.lower() == "user-agent":
            return v[0]
    return ""


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")


def test_bare_shell_has_no_proxy_or_ca(stack: Stack, origin: int, tmp_path: Path) -> None:
    """The baseline the other tests rely on: without `greyproxy env` curl goes direct (not recorded)
    and does not trust the origin."""
    _need("curl")
    env = _bare_env(stack)
    assert not any(k.lower().endswith("_proxy") for k in env)
    p = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"https://{ORIGIN}:{origin}/bare"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert p.returncode != 0 and "certificate" in p.stderr.lower(), p.stderr


def test_pip_download_through_env(stack: Stack, origin: int, tmp_path: Path) -> None:
    p = _in_agent_shell(
        stack,
        f"{PYTHON} -m pip download --no-deps --no-cache-dir --disable-pip-version-check "
        f"--index-url https://{ORIGIN}:{origin}/simple/ -d dl tinypkg",
        tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "dl" / WHEEL_NAME).read_bytes() == WHEEL
    item = _transaction(stack, "agent", f"/files/{WHEEL_NAME}")
    assert item["status_code"] == 200 and _ua(item).startswith("pip/")
    assert _transaction(stack, "agent", "/simple/tinypkg/")["destination_host"] == ORIGIN


def test_npm_view_through_env(stack: Stack, origin: int, tmp_path: Path) -> None:
    _need("npm")
    p = _in_agent_shell(
        stack,
        f"npm view tinypkg version --registry https://{ORIGIN}:{origin}/ --cache {tmp_path}/npm-cache --prefer-online",
        tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == "1.0.0"
    item = _transaction(stack, "agent", "/tinypkg")
    assert item["status_code"] == 200 and _ua(item).startswith("npm/")


def test_curl_through_env(stack: Stack, origin: int, tmp_path: Path) -> None:
    _need("curl")
    p = _in_agent_shell(stack, f"curl -sS -f --max-time 20 https://{ORIGIN}:{origin}/curl-page", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hello /curl-page\n"
    assert _ua(_transaction(stack, "agent", "/curl-page")).startswith("curl/")


def test_git_ls_remote_through_env(stack: Stack, origin: int, tmp_path: Path) -> None:
    _need("git")
    p = _in_agent_shell(stack, f"git ls-remote https://{ORIGIN}:{origin}/repo.git", tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"{GIT_SHA}\trefs/heads/main" in p.stdout
    assert _ua(_transaction(stack, "agent", "/repo.git/info/refs")).startswith("git/")


def test_python_clients_through_env(stack: Stack, origin: int, tmp_path: Path) -> None:
    """urllib, requests-style (pip's vendored requests) and httpx all honour the same variables."""
    script = (
        f"{PYTHON} - <<'EOF'\n"
        "import urllib.request, httpx\n"
        "from pip._vendor import requests\n"
        f"base = 'https://{ORIGIN}:{origin}'\n"
        "print(urllib.request.urlopen(base + '/py-urllib', timeout=20).status)\n"
        "print(requests.get(base + '/py-requests', timeout=20).status_code)\n"
        "print(httpx.get(base + '/py-httpx', timeout=20).status_code)\n"
        "EOF"
    )
    p = _in_agent_shell(stack, script, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["200", "200", "200"]
    for path in ("/py-urllib", "/py-requests", "/py-httpx"):
        _transaction(stack, "agent", path)


def test_env_check_reports_each_runtime(stack: Stack, origin: int, tmp_path: Path) -> None:
    base = f"https://{ORIGIN}:{origin}"
    env = _bare_env(stack)
    env["PIP_INDEX_URL"] = f"{base}/simple/"
    env["npm_config_registry"] = f"{base}/"
    cmd = [
        PYTHON,
        "-m",
        "greyproxy",
        "env",
        "--check",
        "--container",
        "checker",
        "--check-url",
        f"{base}/check",
        "--check-git",
        f"{base}/repo.git",
        "--check-timeout",
        "30",
        "-C",
        str(stack.cfg_path),
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    print(p.stdout)
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines()[1:] if ln.startswith("  ") and ln.split()}
    for name, binary in (
        ("python", "python3"),
        ("pip", "pip"),
        ("node", "node"),
        ("npm", "npm"),
        ("curl", "curl"),
        ("git", "git"),
    ):
        if name == "pip" and not (shutil.which("pip") or shutil.which("pip3")):
            assert "absent" in lines[name]
        elif shutil.which(binary) is None:
            assert "absent" in lines[name]
        else:
            assert "works (recorded)" in lines[name], p.stdout + p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    _transaction(stack, "checker", "/check")

    # Without the CA variables the same runtimes cannot trust the intercepted connections.
    cmd_no_ca = [*cmd[:4], "--no-ca", *cmd[4:]]
    q = subprocess.run(cmd_no_ca, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert q.returncode == 1, q.stdout + q.stderr
    for name in ("python", "curl", "git", "node"):
        if name in lines and "absent" not in lines[name]:
            assert f"  {name:<7} FAILS" in q.stdout, q.stdout


def _reachable(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)  # noqa: S310 - fixed URL
        return True
    except Exception:  # noqa: BLE001 - not reachable from this machine: the test is skipped
        return False


def test_real_registries_through_env(stack: Stack, tmp_path: Path) -> None:
    """Where this machine reaches PyPI and the npm registry, plain pip and npm go through the
    proxy to them, intercepted (the proxy verifies them against the system trust store)."""
    targets = {
        "pypi": _reachable("https://pypi.org/simple/six/"),
        "npm": _reachable("https://registry.npmjs.org/left-pad") and shutil.which("npm") is not None,
    }
    if not any(targets.values()):
        pytest.skip("neither PyPI nor the npm registry is reachable from here")
    for host in ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org"):
        r = stack.request(
            "POST",
            "/api/rules",
            json={
                "container_pattern": "real-agent",
                "destination_pattern": host,
                "port_pattern": "443",
                "action": "allow",
            },
        )
        assert r.status_code == 201, r.text
    if targets["pypi"]:
        # PIP_CONFIG_FILE=/dev/null: no machine-wide pip.conf (local wheel dirs, extra indexes) takes part.
        p = _in_agent_shell(
            stack,
            f"PIP_CONFIG_FILE=/dev/null {PYTHON} -m pip download --no-deps --no-cache-dir "
            "--disable-pip-version-check --only-binary :all: -d dl six==1.16.0",
            tmp_path,
            container="real-agent",
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert list((tmp_path / "dl").glob("six-1.16.0-*.whl"))
        item = _transaction(stack, "real-agent", ".whl")
        assert item["destination_host"] == "files.pythonhosted.org" and _ua(item).startswith("pip/")
    if targets["npm"]:
        p = _in_agent_shell(
            stack,
            f"npm view left-pad version --registry https://registry.npmjs.org/ "
            f"--cache {tmp_path}/npm-cache --prefer-online",
            tmp_path,
            container="real-agent",
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.strip()
        assert _ua(_transaction(stack, "real-agent", "/left-pad")).startswith("npm/")


def test_env_check_names_what_the_gate_refused(stack: Stack, origin: int, tmp_path: Path) -> None:
    """SPEC §14 `greyproxy env --check` (with §3 pending): a runtime that fails because its
    destination waits for approval: the check says which destination, why, and which pending entry
    to allow."""
    _need("curl")
    held = f"127.0.0.2:{origin}"  # no rule for it: held (holdTimeout 2 s here), then refused
    env = _bare_env(stack)
    env["PIP_INDEX_URL"] = f"https://{held}/simple/"
    env["npm_config_registry"] = f"https://{held}/"
    cmd = [PYTHON, "-m", "greyproxy", "env", "--check", "--container", "stranger", "--check-url"]
    cmd += [f"https://{held}/check", "--check-timeout", "20", "-C", str(stack.cfg_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    print(p.stdout)
    assert p.returncode == 1, p.stdout + p.stderr
    entry = _pending_entry(stack, "stranger", "127.0.0.2", origin)
    assert "  blocked by Greyproxy during the check:\n" in p.stdout, p.stdout
    want = (
        f"    {held}  held for approval, and nobody answered in time; pending #{entry['id']}:"
        f" allow it in the dashboard, {stack.api}/?pending={entry['id']}, or"
        f" curl --noproxy '*' -X POST {stack.api}/api/pending/{entry['id']}/allow\n"
    )
    assert want in p.stdout, p.stdout
    assert p.stdout.count(f"    {held}  ") == 1, p.stdout  # once, however many runtimes met it
    assert "greyproxy explain stranger HOST:PORT" in p.stdout, p.stdout
    assert "  curl    FAILS: " in p.stdout, p.stdout


def _pending_entry(stack: Stack, container: str, host: str, port: int) -> dict:
    items = stack.get("/api/pending", params={"container": container}).json()["items"]
    found = [i for i in items if i["destination_host"] == host and i["destination_port"] == port]
    assert len(found) == 1, items
    return found[0]


def test_env_check_runs_the_runtimes_at_once_and_says_what_waits(
    origin_ca: trustme.CA, origin_ca_file: Path, origin: int
) -> None:
    """SPEC §14 `greyproxy env --check` (with §3 pending): a first check on a stack with no rule for
    its destination: every runtime is held on it at once, the check says on stderr which pending
    entry waits, and one allow releases them all."""
    # npm asks the module's origin by its name, `localhost` (a builtin rule allows it): npm checks an
    # IP-literal registry's certificate against "localhost", so it cannot be pointed at 127.0.0.2.
    present = [b for b in ("python3", "node", "curl", "git") if shutil.which(b)]
    present += ["pip"] if shutil.which("pip") or shutil.which("pip3") else []
    if len(present) < 2:
        pytest.skip("fewer than two runtimes installed")
    server, port = start_https_origin(origin_ca, "127.0.0.2", _Origin)  # (no rule, builtin or other, names it)
    held = f"127.0.0.2:{port}"
    try:
        with intercepting_stack({"proxy": {"holdTimeout": 60}}, origin_ca_file) as stack:
            env = _bare_env(stack)
            env["PIP_INDEX_URL"] = f"https://{held}/simple/"
            env["npm_config_registry"] = f"https://{ORIGIN}:{origin}/"
            cmd = [PYTHON, "-m", "greyproxy", "env", "--check", "--container", "newcomer"]
            cmd += ["--check-url", f"https://{held}/check", "--check-git", f"https://{held}/repo.git"]
            cmd += ["--check-timeout", "90", "-C", str(stack.cfg_path)]
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO)
            )
            try:
                assert proc.stderr is not None
                ready, _, _ = select.select([proc.stderr], [], [], 30)  # (the check announces the wait)
                assert ready, "nothing on the check's stderr within 30 s"
                first = proc.stderr.readline()
                entry = _pending_entry(stack, "newcomer", "127.0.0.2", port)
                assert first.startswith(
                    f"greyproxy env --check: {held} waits for a decision (pending #{entry['id']})"
                ), first
                assert f"/api/pending/{entry['id']}/allow" in first, first

                def all_held() -> bool:  # (one at a time, a sequential check would hold one)
                    return _pending_entry(stack, "newcomer", "127.0.0.2", port)["waiting"] >= len(present)

                wait_for(all_held, 30, message=f"{len(present)} runtimes held at once ({present})")
                r = stack.request("POST", f"/api/pending/{entry['id']}/allow", json={})
                assert r.status_code == 200, r.text
                out, err = proc.communicate(timeout=120)
            finally:
                proc.kill()
            print(out, first, err)
            assert proc.returncode == 0, out + err
            for name in ("python", "node", "npm", "curl", "git"):
                if name != "python" and shutil.which(name) is None:
                    continue
                assert f"  {name:<7} works (recorded)" in out, out
            assert "blocked by Greyproxy" not in out, out
    finally:
        server.shutdown()
        server.server_close()


def test_env_check_of_an_http_url_and_of_an_answer_the_proxy_gave(stack: Stack, origin: int, tmp_path: Path) -> None:
    """SPEC §14 `greyproxy env --check --check-url http://…`: python, node and curl fetch it through
    HTTP_PROXY (node too: no CONNECT and TLS), and each works. An https:// URL at the same plain-HTTP
    origin gets the proxy's own 502 (its TLS to the origin fails): each fails, saying so, rather than
    "works: 502"."""
    server = http.server.ThreadingHTTPServer((ORIGIN_IP, 0), _Origin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    plain = server.server_address[1]
    env = _bare_env(stack)
    env["PIP_INDEX_URL"] = f"https://{ORIGIN}:{origin}/simple/"
    env["npm_config_registry"] = f"https://{ORIGIN}:{origin}/"
    cmd = [PYTHON, "-m", "greyproxy", "env", "--check", "--container", "plain-checker", "--check-timeout", "30"]
    cmd += ["--check-git", f"https://{ORIGIN}:{origin}/repo.git", "-C", str(stack.cfg_path), "--check-url"]
    try:
        p = subprocess.run(
            [*cmd, f"http://{ORIGIN}:{plain}/plain-check"], env=env, capture_output=True, text=True, timeout=300
        )
        q = subprocess.run(
            [*cmd, f"https://{ORIGIN}:{plain}/tls-check"], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        server.shutdown()
        server.server_close()
    print(p.stdout, q.stdout)
    for name in ("python", "node", "curl"):
        if name != "python" and shutil.which(name) is None:
            continue
        assert f"  {name:<7} works (recorded): " in p.stdout and "200" in p.stdout, p.stdout + p.stderr
        line = next(ln for ln in q.stdout.splitlines() if ln.startswith(f"  {name:<7} "))
        assert line.startswith(f"  {name:<7} FAILS: "), q.stdout
        assert "502" in line and "from Greyproxy, not from the destination: Greyproxy: " in line, line
    assert p.returncode == 0, p.stdout + p.stderr
    assert q.returncode == 1, q.stdout + q.stderr
    _transaction(stack, "plain-checker", "/plain-check")
