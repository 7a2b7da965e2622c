"""Each of the stack's processes loads only what it uses (issue 18: idle memory).

`bench/idle_rss.py` starts the whole stack with tests/harness/moddump on PYTHONPATH and has every
service process write the names in its sys.modules once idle. A big import that a process never
uses costs every installation its memory (cryptography alone is ~15 MB per process): the lists
below fail the test when one comes back (e.g. the bus importing falcon, peewee or cryptography
again because the CLI loaded every subcommand's module).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.stack

# What each process must not have imported at idle (a package, or a module and its submodules).
HEAVY = ("falcon", "uvicorn", "peewee", "cryptography", "dns", "prometheus_client", "httptools", "websockets")
FORBIDDEN = {
    "bus": (*HEAVY, "zstandard", "brotli", "publicsuffixlist", "asyncio", "uvloop", "services", "greyproxy.store"),
    "recorder": (
        *HEAVY[:2],
        *HEAVY[3:],
        "publicsuffixlist",
        "greyproxy.policy",
        "services.api",
        "services.maintenance",
    ),
    "maintenance": (*HEAVY[:2], *HEAVY[3:], "publicsuffixlist", "services.api", "services.proxy", "services.recorder"),
    "proxy": ("falcon", "uvicorn", "prometheus_client", "services.api", "services.recorder"),
    # prometheus_client: only once /metrics is scraped; the proxy stack and dnspython never.
    "api": ("dns", "prometheus_client", "services.proxy.service", "services.proxy.http1", "services.recorder"),
}
# ... and what it must have (so an empty or broken dump cannot pass).
EXPECTED = {
    "bus": ("zmq", "bus.broker"),
    "recorder": ("peewee", "services.recorder.service"),
    "maintenance": ("peewee", "services.maintenance.service"),
    "proxy": ("dns", "cryptography", "services.proxy.service"),
    "api": ("falcon", "uvicorn", "services.api.service"),
}


def _hits(modules: list[str], name: str) -> list[str]:
    return [m for m in modules if m == name or m.startswith(name + ".")]


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("idle") / "idle.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "idle_rss.py"), "--settle", "1", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("service", sorted(FORBIDDEN))
def test_process_loads_only_what_it_uses(idle: dict, service: str) -> None:
    proc = idle["processes"][service]
    modules = proc["modules"]
    assert modules, f"{service}: no module list was written"
    for name in EXPECTED[service]:
        assert _hits(modules, name), f"{service}: {name} missing from its modules: the dump is not this service's"
    extra = {name: _hits(modules, name)[:5] for name in FORBIDDEN[service] if _hits(modules, name)}
    assert not extra, f"{service} imports what it never uses at idle: {extra}"
    assert proc["rss_kb"] and proc["rss_kb"] > 5_000, proc
