"""`greyproxy explain`'s target parsing and rendering (the API answer's shape is the stack tests')."""

from __future__ import annotations

import pytest

from greyproxy.cli_explain import render, split_target
from greyproxy.config import ConfigError


def test_targets() -> None:
    assert split_target("api.example.com", 443) == ("api.example.com", 443)
    assert split_target("api.example.com:8080", 443) == ("api.example.com", 8080)
    assert split_target("[::1]:80", 443) == ("::1", 80)
    assert split_target("::1", 443) == ("::1", 443)
    for bad in (":80", "x:http", "x:0", "x:70000", "[]:1"):
        with pytest.raises(ConfigError):
            split_target(bad, 443)


def test_render_marks_the_winner() -> None:
    rule = {
        "id": 3,
        "action": "deny",
        "container_pattern": "a",
        "destination_pattern": "x.example",
        "port_pattern": "*",
        "source": "global",
    }
    out = render(
        {
            "decision": "deny",
            "rule": rule,
            "layer": "global",
            "reason": "because",
            "candidates": [
                {
                    "rule": rule,
                    "matched": True,
                    "specificity": 210,
                    "matched_on": "host",
                    "why": "applies",
                    "winner": True,
                }
            ],
        }
    )
    assert "decision: deny" in out and "#3 deny a → x.example:*" in out and "  * #3 deny" in out
    assert "no rule names" in render(
        {"decision": "pending", "rule": None, "layer": None, "reason": "r", "candidates": []}
    )
