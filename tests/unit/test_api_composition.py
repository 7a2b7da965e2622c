"""The API is put together in one visible place: app.AREAS, nothing registered by importing, no import cycle."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import falcon.testing

from harness.api import offline_context
from services.api import app, health
from services.api.context import ApiContext
from services.api.ws.hub import Hub

API = Path(__file__).resolve().parents[2] / "services" / "api"
MODULES = sorted(
    ".".join(("services", "api", *p.relative_to(API).with_suffix("").parts)).removesuffix(".__init__")
    for p in API.rglob("*.py")
    if p.name != "__main__.py"
)


def _ctx(tmp_path: Path) -> ApiContext:
    return offline_context(tmp_path)


def test_every_module_imports_first_without_a_cycle() -> None:
    """Each module imported first in a clean state: a cycle shows up as an ImportError for some order."""
    script = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('services.api')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(" + repr(MODULES) + "))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
    assert "services.api.ws.hub" in MODULES and "services.api.app" in MODULES


def test_no_area_registers_itself() -> None:
    for path in API.rglob("*.py"):
        text = path.read_text()
        assert "ROUTE_PROVIDERS" not in text, path
        if path.name not in ("app.py", "service.py"):  # the service builds the app; areas never import it
            assert "from .app import" not in text and "from ..app import" not in text, path


def test_create_app_serves_exactly_the_areas_given(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    only_health = falcon.testing.TestClient(app.create_app(ctx, areas=[health.register]))
    assert only_health.simulate_get("/api/rules", host="localhost").status_code == 404
    doc = only_health.simulate_get("/api/openapi.json", host="localhost").json
    assert set(doc["paths"]) == {"/api/health", "/api/openapi.json"}
    full = falcon.testing.TestClient(app.create_app(ctx))
    paths = set(full.simulate_get("/api/openapi.json", host="localhost").json["paths"])
    assert {"/api/rules", "/api/pending", "/ws", "/api/settings"} <= paths


def test_context_declares_its_live_state(tmp_path: Path) -> None:
    names = {f.name for f in dataclasses.fields(ApiContext)}
    assert {"ws_hub", "notification_claims"} <= names
    ctx = _ctx(tmp_path)
    assert isinstance(ctx.ws_hub, Hub) and ctx.ws_hub.ctx is ctx and ctx.notification_claims == 0


def test_areas_are_named_once_and_resolve() -> None:
    assert len(set(app.AREAS)) == len(app.AREAS)
    registers = app.area_registers()
    assert [r.__module__ for r in registers] == [f"services.api.{name}" for name in app.AREAS]
    try:
        app.area_registers(["util"])  # a module of the package that is not an area
    except TypeError as exc:
        assert "services.api.util has no register" in str(exc)
    else:
        raise AssertionError("a module without register() was accepted as an area")
