"""The user-facing docs name only what the code has:

- docs/configuration.md's key tables list every config key of the schema (greyproxy/config.py)
  and no other, with the defaults of greyproxy/default_config.yaml;
- every API call of the curl walk-throughs (README.md, docs/*.md) is a route the app serves,
  with that method.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from greyproxy import config as C
from harness.api import offline_app
from test_openapi import router_operations

REPO = Path(__file__).resolve().parents[2]
CONFIG_DOC = REPO / "docs" / "configuration.md"
DEFAULTS = yaml.safe_load((REPO / "greyproxy" / "default_config.yaml").read_text())
KEY_TABLE = re.compile(r"^\|\s*key\s*\|\s*default\s*\|")
SECTION = re.compile(r"^##+ .*\(`(\w+):`\)")  # "## Bus (`bus:`)": the table's keys are relative


def schema_keys(schema: dict[str, Any] = C._SCHEMA, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, spec in schema.items():
        if isinstance(spec, dict):
            out |= schema_keys(spec, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}[]" if spec == "services" else f"{prefix}{name}")
    return out


def documented() -> dict[str, tuple[int, str]]:
    """{dotted key: (line number, default cell)} from every `| key | default | what |` table."""
    out: dict[str, tuple[int, str]] = {}
    prefix, in_table = "", False
    for n, line in enumerate(CONFIG_DOC.read_text().splitlines(), 1):
        if line.startswith("#"):
            m = SECTION.match(line)
            prefix = f"{m.group(1)}." if m else "" if line.startswith("## ") else prefix
            in_table = False
        elif KEY_TABLE.match(line):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for key in re.findall(r"`([^`]+)`", cells[0]):
                assert key not in out, f"docs/configuration.md:{n}: {key} is documented twice (line {out[key][0]})"
                out[f"{prefix}{key}"] = (n, cells[1])
    return out


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    doc, schema = set(documented()), schema_keys()
    assert doc - schema == set(), "docs/configuration.md documents keys the config schema does not have"
    assert schema - doc == set(), "config keys missing from docs/configuration.md's key tables"


def test_the_documented_defaults_are_the_embedded_ones() -> None:
    """A default cell that is one literal (`30`, `auto`, `""`) equals default_config.yaml's value;
    prose cells (`ipc sockets in run/`, `<data dir>/keys` for an empty value) are not compared."""
    compared = 0
    for key, (n, cell) in documented().items():
        if key == "services[]" or not re.fullmatch(r"`[^`]*`", cell):
            continue
        value: Any = DEFAULTS
        for part in key.split("."):
            value = value[part]
        said = yaml.safe_load(cell.strip("`")) if cell != '`""`' else ""
        if value == "" and said != "":
            continue  # an empty value documented by what it means (`<data dir>/keys`)
        assert said == value, f"docs/configuration.md:{n}: {key} default {cell}, default_config.yaml says {value!r}"
        compared += 1
    assert compared >= 35


# ------------------------------------------------------------------------------- curl walk-throughs

API_URL = re.compile(r"^(?:https?://)?(?:localhost|127\.0\.0\.1):43080(/[^?\s]*)")


def curl_calls(path: Path) -> list[tuple[int, str, str]]:
    """(line, METHOD, API path) of each curl command line that calls the API (`$API` expanded)."""
    text = path.read_text()
    api = dict(re.findall(r"^(\w+)=(\S+)$", text, re.M))
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith(("curl ", "ID=$(curl ")):
            continue
        cmd = line.split("$(", 1)[-1].split("|")[0].rstrip(" )\\")
        cmd = cmd.split(" #")[0]
        try:
            words = shlex.split(cmd)
        except ValueError:  # a body quoted over several lines: `-d '{` ... `}'`
            words = shlex.split(cmd[: cmd.index("'")])
        words = [re.sub(r"\$(\w+)", lambda m: api.get(m.group(1), m.group(0)), w) for w in words]
        if "-x" in words or "-p" in words or any(w.startswith("--socks5") for w in words):
            continue  # through the proxy, not the API
        method = words[words.index("-X") + 1] if "-X" in words else ("POST" if "-d" in words else "GET")
        for w in words[1:]:
            m = API_URL.match(w)
            if m:
                out.append((n, method, m.group(1)))
    return out


def _served_matcher() -> list[tuple[re.Pattern[str], str]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ops = router_operations(offline_app(Path(tmp), "/"), "")
    return [(re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(p)) + "$"), m) for p, m in ops]


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in (REPO / "docs").glob("*.md"))])
def test_walk_through_calls_are_served_routes(doc: str) -> None:
    path = REPO / doc if doc == "README.md" else REPO / "docs" / doc
    served = _served_matcher()
    calls = curl_calls(path)
    wrong = [
        f"{doc}:{n}: {method} {p}"
        for n, method, p in calls
        # a conversation id may hold `/` (SPEC §13.6): `$ID/subagents` is the {cid} route
        if not any(rx.match(p) and m == method for rx, m in served)
        and not (method == "GET" and p.startswith("/api/conversations/"))
    ]
    assert wrong == [], "curl calls to routes the API does not serve"
    if doc == "README.md":
        assert len(calls) >= 20  # the walk-throughs were read (the parser did not silently skip them)
