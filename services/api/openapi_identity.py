"""OpenAPI descriptions of SPEC §16 routes: claimed identities and the rule explanation. Kept
apart from openapi.py as openapi_llm.py is: openapi.py imports this module, which adds its schemas
and operations."""

from __future__ import annotations

from typing import Any

from greyproxy.identity import MAX_NAME, MAX_NOTES
from greyproxy.policy import DECISIONS

from . import openapi as o

IDENTITY_PROPS: dict[str, Any] = {
    "name": o.STR,
    "notes": o.nullable(o.STR),
    "created_at": o.TS,
    "rotated_at": o.nullable(o.TS),
    "last_used_at": o.nullable(o.TS),
    "version": {"type": "integer", "minimum": 1},
}
SECRET = {
    "type": "string",
    "minLength": 43,
    "maxLength": 43,
    "description": "32 random bytes, URL-safe base64: shown in this answer only, stored as a hash",
}
LAYER = {"type": "string", "enum": ["global", "session", "builtin"]}
_NON_EMPTY = {"type": "string", "minLength": 1, "maxLength": 1000}


SCHEMAS: dict[str, Any] = {
    "Identity": o.obj(IDENTITY_PROPS, description="SPEC §16: a claimed client name (never its secret)"),
    "IdentityWithSecret": o.obj(
        {**IDENTITY_PROPS, "secret": SECRET}, description="SPEC §16: a claim just made or rotated, with its secret"
    ),
    "IdentityList": o.list_of("Identity"),
    "IdentityInput": o.obj(
        {
            "name": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_NAME,
                "description": "the proxy user name to claim: printable, no ':', not 'proxy' nor 'unknown-…'",
            },
            "notes": o.nullable({"type": "string", "maxLength": MAX_NOTES}),
        },
        required=["name"],
    ),
    "Explanation": o.obj(
        {
            "decision": {"type": "string", "enum": list(DECISIONS)},
            "rule": o.nullable(o.ref("Rule")),
            "layer": o.nullable(LAYER),
            "reason": o.STR,
            "matched_on": o.nullable({"type": "string", "enum": ["host", "resolved", "address"]}),
            "resolved_hostname": o.nullable(o.STR),
            "addresses": o.nullable({"type": "array", "items": o.STR}),
            "silent_mode": o.nullable({"type": "string", "enum": ["allow", "deny"]}),
            "candidates": {
                "type": "array",
                "items": o.obj(
                    {
                        "rule": o.nullable(o.ref("Rule")),
                        "matched": o.BOOL,
                        "specificity": o.INT,
                        "matched_on": {"type": "string", "enum": ["host", "resolved", "address"]},
                        "why": o.STR,
                        "winner": o.BOOL,
                    }
                ),
            },
        },
        description="SPEC §16: the gate's decision for a destination, the winning rule and every candidate",
    ),
}

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/identities", "GET"): o.op(
        "Claimed identities (names, creation, last use; never secrets)",
        o.response("the claims", o.ref("IdentityList")),
        tag="identities",
    ),
    ("/api/identities", "POST"): o.op(
        "Claim a client name: its connections must then give the secret as proxy password",
        o.response("the claim and its secret (shown once)", o.ref("IdentityWithSecret")),
        code="201",
        tag="identities",
        request=o.body(o.ref("IdentityInput")),
        errors={"409": "the name is claimed already (rotate it for a new secret)"},
    ),
    ("/api/identities/{name}", "DELETE"): o.op(
        "Release a claim: the name is anyone's again",
        o.response("released"),
        code="204",
        tag="identities",
        errors={"404": "the name is not claimed"},
    ),
    ("/api/identities/{name}/rotate", "POST"): o.op(
        "A new secret for a claim; the old one fails from this answer on",
        o.response("the claim and its new secret (shown once)", o.ref("IdentityWithSecret")),
        tag="identities",
        errors={"404": "the name is not claimed"},
    ),
    ("/api/rules/explain", "GET"): o.op(
        "What the proxy does with a destination, and why (the gate's own decision function)",
        o.response("the explanation", o.ref("Explanation")),
        tag="rules",
        params=[
            o.q("container", _NON_EMPTY, "the client identity", required=True),
            o.q("host", _NON_EMPTY, "host name or IP address", required=True),
            o.q("port", {"type": "integer", "minimum": 1, "maximum": 65535}, required=True),
            o.q("resolved", o.TEXT, "the hostname an IP destination was resolved from (default: the DNS cache's)"),
        ],
    ),
}


def install() -> None:
    o.SCHEMAS.update(SCHEMAS)
    o.OPERATIONS.update(OPERATIONS)
