"""The proxies under test: this project (the whole stack) and the peers, each on a free port.

Peers run with their shipped defaults except where a load needs a limit raised (connection
counts, timeouts) or where the load would otherwise measure something else (mitmdump streams
bodies over 1 MiB instead of buffering the 256 MiB download; it passes CONNECT tunnels through
raw unless it is the intercepting instance). Every setting is written into results.md.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .procs import Managed, free_port, run_capture, status_kb, tree_rss_kb, wait_port

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
PEERS_VENV = BENCH / ".venv-peers"


def _test_harness() -> Any:
    """tests/harness (the suite's Stack), imported by path under its own name: this package is
    also called `harness`, so a plain `import harness` from there would find us instead."""
    name = "greyproxy_tests_harness"
    if name in sys.modules:
        return sys.modules[name]
    pkg = REPO / "tests" / "harness"
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    if spec is None or spec.loader is None:
        raise ImportError(f"no package at {pkg}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class Unavailable(Exception):
    """This proxy cannot run here (not installed, failed to start): reported as n/a."""


class ProxyUnderTest:
    name = "?"
    settings = ""  # how it was configured, for results.md

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self.proc: Managed | None = None

    # -- lifecycle --
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def version(self) -> str | None:
        return None

    # -- figures --
    def main_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def rss_kb(self) -> int | None:
        """Resident memory of the proxy (its whole process tree for forking/threaded peers)."""
        pid = self.main_pid()
        return tree_rss_kb(pid) if pid else None

    def _wait(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        if not wait_port("127.0.0.1", self.port, timeout, self.proc):
            tail = self.proc.tail()
            self.stop()
            raise Unavailable(f"did not start: {tail[-300:]!r}")


# ----------------------------------------------------------------------------- this project


class GreyProxy(ProxyUnderTest):
    name = "greyproxy"

    def __init__(self, root: Path, upstream_ca: Path | None = None, want_mitm: bool = False, workers: int = 1) -> None:
        super().__init__(root)
        self.workers = workers  # proxy.workers (SPEC §15); the column is "greyproxy-wN" past 1
        if workers != 1:
            self.name = f"greyproxy-w{workers}"
        self.stack: Any = None
        self.upstream_ca = upstream_ca
        self.want_mitm = want_mitm
        self.mitm_ca: Path | None = None
        self.mitm_na: str | None = "interception not tried"
        self.settings = (
            "the whole stack (`greyproxy serve`: bus, proxy, api, recorder, maintenance) on free ports "
            "in a temp data dir; proxy.maxConnectionsPerClient 20000, maxConnections 20000, "
            f"idleTimeout 600, proxy.workers {workers} (caps split per worker); loads go to 127.0.0.1 "
            "(builtin allow rule) plus a rule "
            "`bench* → *` for named bench clients"
        )

    def start(self) -> None:
        try:
            Stack = _test_harness().Stack  # noqa: N806 - the suite's own helper: whole stack, free ports, temp dir
        except ImportError as exc:
            raise Unavailable(f"cannot import tests/harness Stack: {exc}") from None
        overrides: dict[str, Any] = {
            "proxy": {
                "maxConnectionsPerClient": 20000,
                "maxConnections": 20000,
                "holdTimeout": 30,
                "idleTimeout": 600,
                "headerTimeout": 30,
                "workers": self.workers,
            },
        }
        if self.upstream_ca is not None:
            overrides["mitm"] = {"upstreamCaFile": str(self.upstream_ca)}
        stack = Stack(overrides)
        self.stack = stack
        if self.want_mitm:
            self.mitm_ca, self.mitm_na = self._generate_ca(stack)
        try:
            stack.start(timeout=40)
        except Exception as exc:  # noqa: BLE001 - reported as n/a with the reason
            self.stack = None
            raise Unavailable(f"stack did not start: {str(exc)[:400]}") from None
        self.port = stack.ports["http-proxy"]
        r = stack.request(
            "POST",
            "/api/rules",
            json={"container_pattern": "bench*", "destination_pattern": "*", "action": "allow", "notes": "bench"},
        )
        if r.status_code not in (200, 201):
            self.stop()
            raise Unavailable(f"could not add the bench rule: {r.status_code} {r.text[:200]}")

    def _generate_ca(self, stack: Any) -> tuple[Path | None, str | None]:
        """`greyproxy cert generate` before the stack starts. (CA path, None) or (None, why not)."""
        py = sys.executable
        env = dict(stack.env)
        code, out = run_capture([py, "-m", "greyproxy", "cert", "--help"], 20, env)
        if code != 0:
            return None, "interception not available yet (no `greyproxy cert` command)"
        stack.data_dir.mkdir(parents=True, exist_ok=True)
        code, out = run_capture([py, "-m", "greyproxy", "cert", "generate", "-C", str(stack.cfg_path)], 60, env)
        if code != 0:
            code, out2 = run_capture([py, "-m", "greyproxy", "cert", "generate"], 60, env)
            out += out2
        if code != 0:
            return None, f"`greyproxy cert generate` failed ({code}): {out.strip()[-200:]}"
        # The CA path: printed by the command, else the first certificate file in the data dir.
        for word in out.replace("'", " ").replace('"', " ").split():
            p = Path(word.rstrip(".,:;"))
            if p.suffix in (".pem", ".crt") and p.is_file() and b"BEGIN CERTIFICATE" in p.read_bytes():
                return p, None
        cands = sorted(
            q
            for q in stack.data_dir.rglob("*")
            if q.suffix in (".pem", ".crt")
            and q.is_file()
            and "key" not in q.name.lower()
            and b"BEGIN CERTIFICATE" in q.read_bytes()
        )
        if cands:
            return cands[0], None
        return None, f"`greyproxy cert generate` ran but no CA certificate file was found: {out.strip()[-200:]}"

    def set_mitm(self, enabled: bool, wait: float) -> str | None:
        """PUT /api/settings {"mitmEnabled": ...}; the proxy follows on the settings event (or its 2 s
        check). None on success, else why not."""
        if self.stack is None:
            return "no stack"
        try:
            r = self.stack.request("PUT", "/api/settings", json={"mitmEnabled": enabled})
        except Exception as exc:  # noqa: BLE001
            return repr(exc)
        if r.status_code != 200:
            return f"{r.status_code} {r.text[:200]}"
        time.sleep(wait)
        return None

    def stop(self) -> None:
        if self.stack is not None:
            try:
                self.stack.cleanup()
            except Exception as exc:  # noqa: BLE001
                print(f"bench: greyproxy stack did not stop cleanly: {str(exc)[:300]}", file=sys.stderr)
            shutil.rmtree(self.stack.root, ignore_errors=True)
            self.stack = None

    def version(self) -> str | None:
        from greyproxy import __version__

        code, rev = run_capture(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], 10)
        _, dirty = run_capture(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], 10)
        suffix = f" ({rev.strip()}{'+dirty' if dirty.strip() else ''})" if code == 0 else ""
        return f"{__version__}{suffix}"

    def service_pid(self, service: str = "proxy") -> int | None:
        if self.stack is None:
            return None
        try:
            _, body = self.stack.health()
        except Exception:  # noqa: BLE001
            return None
        pid = ((body.get("services") or {}).get(service) or {}).get("pid")
        return int(pid) if pid else None

    def main_pid(self) -> int | None:
        return self.service_pid("proxy")

    def proxy_pids(self) -> list[int]:
        """Every proxy process: `proxy`, or each worker `proxy-N` (proxy.workers > 1)."""
        if self.stack is None:
            return []
        try:
            _, body = self.stack.health()
        except Exception:  # noqa: BLE001
            return []
        services = body.get("services") or {}
        workers = [s for name, s in services.items() if name.startswith("proxy-") and name[6:].isdigit()]
        # (with workers, the `proxy` entry is their summary, its pid the first worker's)
        return [int(s["pid"]) for s in (workers or [services.get("proxy") or {}]) if s.get("pid")]

    def rss_kb(self) -> int | None:
        """The proxy processes alone (the brief's figure): every worker's, summed."""
        sizes = [status_kb(pid) for pid in self.proxy_pids()]
        known = [k for k in sizes if k is not None]
        return sum(known) if known else None


# ----------------------------------------------------------------------------- the floor


class BareUvloop(ProxyUnderTest):
    """harness/bare_tunnel.py as its own process: a CONNECT-only tunnel, no rules, no records. Not a
    peer (the ratio to the best peer never counts it): the floor a Python proxy on uvloop stands on,
    for the CONNECT download target (≥ 90 % of it) and beside tinyproxy's CPU per new tunnel."""

    name = "bare-uvloop"
    settings = (
        "bench/harness/bare_tunnel.py in its own process (this project's Python, uvloop): reads the CONNECT "
        "head, `create_connection`, 200, relays with flow control; no rules, no log, no caps, no timers; "
        "CONNECT only (the plain-HTTP and intercepted rows are n/a)"
    )

    def start(self) -> None:
        try:
            import uvloop  # noqa: F401 - the tunnel's event loop
        except ImportError:
            raise Unavailable("not installed: uvloop") from None
        self.port = free_port()
        self.proc = Managed(
            self.name,
            [sys.executable, str(BENCH / "harness" / "bare_tunnel.py"), "--port", str(self.port)],
            self.root / "bare-uvloop.out",
        ).start()
        self._wait()

    def version(self) -> str | None:
        try:
            import uvloop
        except ImportError:
            return None
        return f"uvloop {uvloop.__version__}"


# ----------------------------------------------------------------------------- peers


def _which(*cands: str) -> str | None:
    for c in cands:
        if os.path.isabs(c):
            if os.access(c, os.X_OK):
                return c
        elif shutil.which(c):
            return shutil.which(c)
    return None


class Tinyproxy(ProxyUnderTest):
    name = "tinyproxy"
    settings = (
        "Debian package, `tinyproxy -d -c <conf>`: MaxClients 4000, Timeout 600, no Via header, "
        "LogLevel Critical, no ConnectPort restriction"
    )

    def binary(self) -> str | None:
        return _which("tinyproxy", "/usr/bin/tinyproxy", "/usr/sbin/tinyproxy")

    def start(self) -> None:
        b = self.binary()
        if not b:
            raise Unavailable("not installed: tinyproxy (apt-get install tinyproxy)")
        self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "tinyproxy.conf"
        user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}Port {self.port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 4000\n"
            f'LogFile "{self.root}/tinyproxy.log"\nLogLevel Critical\nPidFile "{self.root}/tinyproxy.pid"\n'
            "DisableViaHeader Yes\nAllow 127.0.0.1\n"
        )
        os.chmod(self.root, 0o777)  # it drops to nobody and writes its log here
        self.proc = Managed("tinyproxy", [b, "-d", "-c", str(conf)], self.root / "tinyproxy.out").start()
        self._wait()

    def version(self) -> str | None:
        b = self.binary()
        if not b:
            return None
        _, out = run_capture([b, "-v"])
        return out.strip().replace("tinyproxy", "").strip() or None


class Mitmdump(ProxyUnderTest):
    name = "mitmdump"

    def __init__(self, root: Path, intercept: bool = False, upstream_ca: Path | None = None) -> None:
        super().__init__(root)
        self.intercept = intercept
        self.upstream_ca = upstream_ca
        self.ca_cert: Path | None = None
        base = "`mitmdump -q` (regular mode), flow_detail 0, stream_large_bodies 1m, connection limits default"
        self.settings = base + (
            "; intercepting: every CONNECT decrypted, upstream verified against the origin's "
            "CA (ssl_verify_upstream_trusted_ca)"
            if intercept
            else "; ignore_hosts '.*' (CONNECT tunnels are passed through raw, not decrypted)"
        )

    def binary(self) -> str | None:
        return _which(str(PEERS_VENV / "bin" / "mitmdump"), "mitmdump")

    def start(self) -> None:
        b = self.binary()
        if not b:
            raise Unavailable("not installed: mitmproxy (bench/setup.sh peers)")
        self.port = free_port()
        confdir = self.root / "mitm-conf"
        confdir.mkdir(parents=True, exist_ok=True)
        argv = [
            b,
            "-q",
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--set",
            f"confdir={confdir}",
            "--set",
            "flow_detail=0",
            "--set",
            "stream_large_bodies=1m",
            "--set",
            "termlog_verbosity=error",
        ]
        if self.intercept:
            if self.upstream_ca is None:
                raise Unavailable("no origin TLS material")
            argv += ["--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"]
        else:
            argv += ["--ignore-hosts", ".*"]
        self.proc = Managed("mitmdump", argv, self.root / "mitmdump.out").start()
        self._wait(30)
        self.ca_cert = confdir / "mitmproxy-ca-cert.pem"
        if self.intercept:
            deadline = time.monotonic() + 10
            while not self.ca_cert.exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    def version(self) -> str | None:
        b = self.binary()
        if not b:
            return None
        _, out = run_capture([b, "--version"], 30)
        for line in out.splitlines():
            if line.lower().startswith("mitmproxy:"):
                return line.split(":", 1)[1].strip()
        return None


class ProxyPy(ProxyUnderTest):
    name = "proxy.py"
    settings = (
        "`proxy --hostname 127.0.0.1` with defaults (threadless, one worker per core), "
        "--timeout 600, --backlog 4096, --open-file-limit 20000, --log-level WARNING"
    )

    def binary(self) -> str | None:
        return _which(str(PEERS_VENV / "bin" / "proxy"))

    def start(self) -> None:
        b = self.binary()
        if not b:
            raise Unavailable("not installed: proxy.py (bench/setup.sh peers)")
        self.port = free_port()
        data = self.root / "proxypy-data"
        data.mkdir(parents=True, exist_ok=True)
        self.proc = Managed(
            "proxy.py",
            [
                b,
                "--hostname",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--timeout",
                "600",
                "--backlog",
                "4096",
                "--open-file-limit",
                "20000",
                "--log-level",
                "WARNING",
                "--data-dir",
                str(data),
            ],
            self.root / "proxypy.out",
        ).start()
        self._wait(30)

    def version(self) -> str | None:
        b = self.binary()
        if not b:
            return None
        code, out = run_capture([b, "--version"], 30)
        return out.strip().splitlines()[-1] if code == 0 and out.strip() else None


def tool_version(argv: list[str], prefix_strip: str = "") -> str | None:
    code, out = run_capture(argv, 20)
    if code == 127 or not out.strip():
        return None
    first = out.strip().splitlines()[0]
    return first.replace(prefix_strip, "").strip() if prefix_strip else first.strip()


def pyspy_binary() -> str | None:
    return _which(str(PEERS_VENV / "bin" / "py-spy"), "py-spy")
