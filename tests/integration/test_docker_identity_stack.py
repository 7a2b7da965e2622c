"""Container identity through the real stack (SPEC §14): with greyproxy.docker enabled and the
socket pointing at a local server that speaks the Engine API's JSON, connections from an address
the engine lists are named after that container (logs carry its id); a proxy user name still wins."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import short_tmpdir, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

_spec = importlib.util.spec_from_file_location(
    "docker_fake", Path(__file__).resolve().parent.parent / "unit" / "test_docker_identity.py"
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)  # type: ignore[union-attr]
FakeEngine = _mod.FakeEngine

ID = "d" * 64


def test_connections_are_named_after_their_container(make_stack) -> None:
    sock_dir = short_tmpdir("gpd")
    engine = FakeEngine(sock_dir / "docker.sock")
    engine.containers = [
        {"Id": ID, "Names": ["/web-agent"], "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "127.0.0.1"}}}}
    ]
    try:
        stack = make_stack(greyproxy={"docker": {"enabled": True, "socket": str(engine.path), "cacheTTL": 5}})
        http_proxy = f"127.0.0.1:{stack.ports['http-proxy']}"
        api = f"{stack.api}/api/health"  # a destination that answers: blocked by the guard, logged all the same
        for proxy in (
            f"http://{http_proxy}",
            f"http://named:x@{http_proxy}",
            f"socks5h://127.0.0.1:{stack.ports['socks5-proxy']}",
        ):
            subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "--max-time", "10", "-x", proxy, api],
                capture_output=True,
                timeout=20,
            )

        def logs() -> list[dict] | None:
            items = stack.get("/api/logs", params={"limit": 50}).json()["items"]
            return items if len(items) >= 3 else None

        items = wait_for(logs, 10, message="three log entries")
        names = sorted(i["container_name"] for i in items)
        assert names == ["named", "web-agent", "web-agent"], items
        assert {i["container_id"] for i in items if i["container_name"] == "web-agent"} == {ID}
        assert engine.requests and set(engine.requests) == {"/containers/json"}
        assert len(engine.requests) <= 2  # cached between connections
    finally:
        engine.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
