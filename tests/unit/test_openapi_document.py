"""The OpenAPI document, byte for byte: it is compared with tests/unit/data/openapi.json.

The stored copy was dumped from main before services/api/openapi.py was refactored (its
operations are now built by small helpers), so a refactor that changes what the document says
fails here; schemathesis (tests/integration/test_openapi_fuzz.py) then checks the API against it.

A deliberate change to the API's description: regenerate with
``GREYPROXY_REGEN_OPENAPI=1 .venv/bin/python -m pytest tests/unit/test_openapi_document.py``
and review the diff of the JSON file with the change. The package version is masked (it moves
with every release, not with the API).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from greyproxy import __version__
from services.api import openapi
from harness.api import offline_app

GOLDEN = Path(__file__).resolve().parent / "data" / "openapi.json"


def _document(tmp_path: Path, prefix: str) -> dict:
    app = offline_app(tmp_path, prefix)
    openapi.install_extensions()
    doc = openapi.build_document(app, prefix.rstrip("/"))
    assert doc["info"]["version"] == __version__
    doc["info"]["version"] = "<version>"
    return doc


def _dump(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=False) + "\n"


def test_the_document_is_the_stored_one(tmp_path: Path) -> None:
    text = _dump(_document(tmp_path, "/"))
    if os.environ.get("GREYPROXY_REGEN_OPENAPI") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    stored = GOLDEN.read_text()
    # Key order is part of the comparison (the served bytes keep it), and so is every value.
    assert json.loads(text) == json.loads(stored), "the OpenAPI document changed (see this module's docstring)"
    assert text == stored


@pytest.mark.parametrize("prefix", ["/proxy", "/a/b/"])
def test_a_prefix_changes_only_the_server_url(tmp_path: Path, prefix: str) -> None:
    doc = _document(tmp_path, prefix)
    assert doc["servers"][0]["url"] == prefix.rstrip("/")
    doc["servers"][0]["url"] = "/"
    assert doc == json.loads(GOLDEN.read_text())


def test_the_first_request_builds_the_document_off_the_event_loop(tmp_path: Path) -> None:
    """SPEC §5 and the guide's "no blocking calls on an event loop": the build is ~0.3 s of Python: on the API's loop it held up every other request, /ws and
    the heartbeats. It runs in a thread; requests that come during it share that one build."""
    import asyncio
    import threading

    import falcon.testing

    app = offline_app(tmp_path, "/")
    openapi.install_extensions()
    resource = openapi.OpenApiResource(app, "")
    app.add_route("/x/openapi.json", resource)
    threads: list[int] = []
    build = resource._build

    def counted() -> bytes:
        threads.append(threading.get_ident())
        return build()

    resource._build = counted  # type: ignore[method-assign]

    async def three_at_once() -> tuple[int, list[bytes]]:
        async with falcon.testing.ASGIConductor(app) as conductor:
            got = await asyncio.gather(*(conductor.simulate_get("/x/openapi.json", host="localhost") for _ in range(3)))
        return threading.get_ident(), [r.content for r in got]

    loop_thread, bodies = asyncio.run(three_at_once())
    assert len(threads) == 1 and threads[0] != loop_thread  # one build, not on the loop's thread
    assert bodies[0] == bodies[1] == bodies[2]
    assert json.loads(bodies[0]) == resource.document()  # (its paths include the route added here)
