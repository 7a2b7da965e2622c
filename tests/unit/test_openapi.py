"""GET /api/openapi.json describes exactly the routes the app serves (it cannot drift silently).

The routes are read straight from Falcon's compiled router here (not through falcon.inspect,
which the generator uses), so the test does not just repeat the code under test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.asgi
import falcon.testing
import pytest

from harness.api import offline_app
from services.api import openapi

HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def make_app(tmp_path: Path, prefix: str) -> falcon.asgi.App:
    # Building the app and its document touches neither the bus nor the database.
    return offline_app(tmp_path, prefix)


def _nodes(nodes: list[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _nodes(node.children)


def router_operations(app: falcon.asgi.App, prefix: str) -> set[tuple[str, str]]:
    """{(path relative to the prefix in OpenAPI form, METHOD)} of every responder the resources define."""
    out = set()
    for node in _nodes(app._router._roots):
        if node.resource is None:
            continue
        path = _PARAM.sub(r"{\1}", node.uri_template)[len(prefix) :]
        for method, responder in node.method_map.items():
            if getattr(responder, "__self__", None) is not node.resource:
                continue  # Falcon's defaults: OPTIONS and 405 for methods the resource lacks
            out.add((path, "GET" if method == "WEBSOCKET" else method))
    return out


@pytest.fixture(params=["/", "/proxy"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[falcon.asgi.App, str, dict[str, Any]]:
    prefix = request.param.rstrip("/")
    app = make_app(tmp_path, request.param)
    res = falcon.testing.TestClient(app).simulate_get(f"{prefix}/api/openapi.json", host="localhost")
    assert res.status_code == 200 and res.headers["content-type"].startswith("application/json")
    return app, prefix, res.json


def test_every_routed_operation_is_documented_and_nothing_else(served) -> None:
    app, prefix, doc = served
    routed = router_operations(app, prefix)
    documented = {
        (path, method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if method.upper() in HTTP_METHODS
    }
    assert len(routed) >= 30, routed  # the areas registered themselves
    assert routed - documented == set(), "served but missing from /api/openapi.json"
    assert documented - routed == set(), "documented but not served"
    undocumented = [(p, m) for p, item in doc["paths"].items() for m, o in item.items() if o.get("x-undocumented")]
    assert undocumented == [], "served but not described in services/api/openapi.py OPERATIONS"
    stale = {(p, m) for p, m in openapi.OPERATIONS} - routed
    assert stale == set(), "described in OPERATIONS for routes that are not served"


def test_operations_are_complete(served) -> None:
    _app, prefix, doc = served
    assert doc["openapi"].startswith("3.1") and doc["servers"] == [
        {"url": prefix or "/", "description": doc["servers"][0]["description"]}
    ]
    ids = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            assert op["summary"] and op["operationId"] not in ids, where
            ids.add(op["operationId"])
            responses = op["responses"]
            assert "default" not in responses, where  # every status is named: conformance checks mean something
            assert {"403", "421"} <= set(responses), where  # the LocalOnly middleware's answers
            assert any(code.startswith("2") or code == "101" for code in responses), where
            params = {p["name"]: p for p in op.get("parameters", [])}
            for name in re.findall(r"\{(\w+)\}", path):
                assert params[name]["in"] == "path" and params[name]["required"], where
                # Row ids are integers; conversation ids (SPEC §13.6) are strings that may hold `/`.
                assert params[name]["schema"]["type"] in ("integer", "string") and "404" in responses, where
            if "requestBody" in op or any(p["in"] == "query" for p in params.values()):
                assert "400" in responses, where


def test_components_and_refs(served) -> None:
    _app, _prefix, doc = served
    schemas = doc["components"]["schemas"]
    for name in ("Rule", "Pending", "LogEntry", "Transaction", "Error"):
        assert name in schemas
    assert schemas["Error"]["required"] == ["error"]
    text = repr(doc)
    for ref in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert ref in schemas, ref


def test_document_is_valid_openapi(served) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    _app, _prefix, doc = served
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema


def test_shapes_match_what_the_api_builds() -> None:
    """The schemas agree with greyproxy.shapes / capture for real rows (keys and nullability)."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    from greyproxy.capture import transaction_json
    from greyproxy.shapes import log_json, pending_json, rule_json

    rows = {
        "Rule": rule_json(
            {
                "id": 1,
                "container_pattern": "*",
                "destination_pattern": "a.com",
                "port_pattern": "*",
                "rule_type": "glob",
                "action": "allow",
                "created_at": 1.7e9,
                "expires_at": None,
                "last_used_at": None,
                "created_by": "api",
                "notes": None,
                "source": "global",
                "session_id": None,
                "hit_count": 0,
            }
        ),
        "Pending": pending_json(
            {
                "id": 1,
                "container_name": "c",
                "container_id": "",
                "destination_host": "a.com",
                "destination_port": 443,
                "resolved_hostname": None,
                "first_seen": 1.7e9,
                "last_seen": 1.7e9,
                "attempt_count": 2,
            },
            1,
        ),
        "LogEntry": log_json(
            {
                "id": 1,
                "timestamp": 1.7e9,
                "container_name": "c",
                "container_id": "",
                "destination_host": "a.com",
                "destination_port": 443,
                "resolved_hostname": None,
                "method": "CONNECT",
                "result": "blocked",
                "rule_id": None,
                "response_time_ms": 1.25,
                "reason": "default_deny",
                "mitm_skip_reason": None,
            },
            None,
        ),
        "Transaction": transaction_json(
            {
                "id": 1,
                "timestamp": 1.7e9,
                "container_name": "c",
                "destination_host": "a.com",
                "destination_port": 443,
                "method": "GET",
                "url": "https://a.com/",
                "request_headers": '{"Accept": ["*/*"]}',
                "request_body": None,
                "request_body_size": 0,
                "request_content_type": None,
                "status_code": 200,
                "response_headers": "{}",
                "response_body": "hi",
                "response_body_size": 2,
                "response_content_type": "text/plain",
                "duration_ms": 3.5,
                "rule_id": 4,
                "result": "allowed",
                "conversation_id": None,
                "substituted_credentials": "[]",
                "session_id": None,
            },
            include_bodies=True,
        ),
    }
    for name, instance in rows.items():
        schema = {**openapi.SCHEMAS[name], "$defs": {}}
        assert set(instance) <= set(schema["properties"]), (name, set(instance) - set(schema["properties"]))
        jsonschema_rs.validator_for(schema).validate(instance)
