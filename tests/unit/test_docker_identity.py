"""Container identity through the Engine API, against a local Unix-socket server that answers
`GET /containers/json` as Docker does (Content-Length or chunked)."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greyproxy.config import ConfigError, load_config
from services.proxy.docker_identity import DockerIdentity, EngineError, containers_by_ip, engine_get
from harness.fuzz import examples

CONTAINERS = [
    {
        "Id": "a" * 64,
        "Names": ["/web-agent"],
        "State": "running",
        "NetworkSettings": {
            "Networks": {
                "bridge": {"IPAddress": "172.17.0.2", "GlobalIPv6Address": "fd00::2"},
                "other": {"IPAddress": "10.9.0.5"},
            }
        },
    },
    {"Id": "b" * 64, "Names": ["/db"], "NetworkSettings": {"Networks": {"host": {"IPAddress": ""}}}},
]


class FakeEngine:
    """A Unix-socket HTTP server speaking the Engine API's JSON. `containers` may change; `requests`
    counts the calls; `chunked` sends Transfer-Encoding: chunked; `status` fails the call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.containers: Any = CONTAINERS
        self.requests: list[str] = []
        self.chunked = False
        self.status = 200
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def address_string(self) -> str:  # a Unix socket has no client address
                return "unix"

            def do_GET(self) -> None:  # noqa: N802
                engine.requests.append(self.path)
                body = json.dumps(
                    engine.containers if self.path.startswith("/containers/json") else {"message": "page not found"}
                ).encode()
                status = engine.status if self.path.startswith("/containers/json") else 404
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Api-Version", "1.45")
                if engine.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 7):
                        part = body[i : i + 7]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(path), Handler)
        # A short poll interval: shutdown() waits for the serving loop's next look (0.5 s by default).
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def engine(short_tmp: Path) -> Iterator[FakeEngine]:
    e = FakeEngine(short_tmp / "docker.sock")
    yield e
    e.close()


def test_containers_by_ip() -> None:
    m = containers_by_ip(CONTAINERS)
    assert m == {
        "172.17.0.2": ("web-agent", "a" * 64),
        "fd00::2": ("web-agent", "a" * 64),
        "10.9.0.5": ("web-agent", "a" * 64),
    }
    with pytest.raises(EngineError):
        containers_by_ip({"message": "nope"})


@settings(max_examples=examples(200), deadline=None)
@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(
                st.sampled_from(["Id", "Names", "NetworkSettings", "Networks", "IPAddress", "x"]), inner, max_size=4
            ),
        ),
        max_leaves=25,
    )
)
def test_any_engine_json_gives_a_map_or_a_clear_error(doc: Any) -> None:
    try:
        m = containers_by_ip(doc)
    except EngineError:
        assert not isinstance(doc, list)
        return
    assert all(isinstance(k, str) and isinstance(v, tuple) and v[0] for k, v in m.items())


@pytest.mark.parametrize("chunked", [False, True])
def test_lookup_through_the_socket(engine: FakeEngine, chunked: bool) -> None:
    engine.chunked = chunked

    async def main() -> None:
        d = DockerIdentity(str(engine.path), cache_ttl=30)
        assert await d.lookup("172.17.0.2") == ("web-agent", "a" * 64)
        assert await d.lookup("::ffff:172.17.0.2") == ("web-agent", "a" * 64)  # IPv4-mapped
        assert await d.lookup("10.9.0.5") == ("web-agent", "a" * 64)
        assert len(engine.requests) == 1  # cached
        assert engine.requests == ["/containers/json"]

    asyncio.run(main())


def test_unknown_address_refreshes_at_most_once_a_second(engine: FakeEngine, monkeypatch) -> None:
    import services.proxy.docker_identity as mod

    async def main() -> None:
        d = DockerIdentity(str(engine.path), cache_ttl=30)
        assert await d.lookup("172.17.0.9") is None
        assert await d.lookup("172.17.0.9") is None
        assert len(engine.requests) == 1  # the miss right after a fetch does not fetch again
        engine.containers = [
            *CONTAINERS,
            {"Id": "c" * 64, "Names": ["/new"], "NetworkSettings": {"Networks": {"n": {"IPAddress": "172.17.0.9"}}}},
        ]
        monkeypatch.setattr(mod, "MISS_REFRESH", 0.0)
        assert await d.lookup("172.17.0.9") == ("new", "c" * 64)  # a container that just started
        assert len(engine.requests) == 2

    asyncio.run(main())


def test_cache_ttl_expiry(engine: FakeEngine, monkeypatch) -> None:
    import services.proxy.docker_identity as mod

    monkeypatch.setattr(mod, "MISS_REFRESH", 0.0)

    async def main() -> None:
        d = DockerIdentity(str(engine.path), cache_ttl=0.2)
        assert await d.lookup("172.17.0.2") == ("web-agent", "a" * 64)
        engine.containers = []
        assert await d.lookup("172.17.0.2") == ("web-agent", "a" * 64)  # still cached
        await asyncio.sleep(0.3)
        assert await d.lookup("172.17.0.2") is None  # the container is gone

    asyncio.run(main())


def test_concurrent_lookups_share_one_fetch(engine: FakeEngine) -> None:
    async def main() -> None:
        d = DockerIdentity(str(engine.path), cache_ttl=30)
        got = await asyncio.gather(*(d.lookup("172.17.0.2") for _ in range(20)))
        assert set(got) == {("web-agent", "a" * 64)}
        assert len(engine.requests) == 1

    asyncio.run(main())


def test_unreachable_or_failing_engine_is_logged_once(short_tmp: Path, engine: FakeEngine, caplog, monkeypatch) -> None:
    import services.proxy.docker_identity as mod

    monkeypatch.setattr(mod, "MISS_REFRESH", 0.0)
    caplog.set_level(logging.INFO, logger="greyproxy.proxy")

    async def main() -> None:
        d = DockerIdentity(str(short_tmp / "missing.sock"), cache_ttl=0)
        for _ in range(3):
            assert await d.lookup("172.17.0.2") is None
        assert d.stats()["reachable"] is False
        warnings = [r for r in caplog.records if "cannot ask the engine" in r.getMessage()]
        assert len(warnings) == 1
        engine.status = 500
        with pytest.raises(EngineError, match="500"):
            await engine_get(str(engine.path), "/containers/json")
        d2 = DockerIdentity(str(engine.path), cache_ttl=0)
        assert await d2.lookup("172.17.0.2") is None
        engine.status = 200
        assert await d2.lookup("172.17.0.2") == ("web-agent", "a" * 64)
        assert any("answers again" in r.getMessage() for r in caplog.records)

    asyncio.run(main())


def test_config_keys_and_env(tmp_path: Path) -> None:
    env = {"GREYPROXY_DATA_HOME": str(tmp_path)}
    d = load_config(env=env).section("greyproxy")["docker"]
    assert d == {"enabled": False, "socket": "/var/run/docker.sock", "cacheTTL": 30}
    assert load_config(env={**env, "GREYPROXY_DOCKER_ENABLED": "true"}).section("greyproxy")["docker"]["enabled"]
    with pytest.raises(ConfigError, match="GREYPROXY_DOCKER_ENABLED"):
        load_config(env={**env, "GREYPROXY_DOCKER_ENABLED": "maybe"})
    bad = tmp_path / "c.yaml"
    bad.write_text("greyproxy: {docker: {cacheTTL: 0}}\n")
    with pytest.raises(ConfigError, match="cacheTTL"):
        load_config(bad, env=env)
