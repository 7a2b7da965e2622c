"""SPEC §14 `greyproxy env --check`: its report of what the gate refused during the check, the
error line it keeps of a failed runtime, its watch of held destinations, and a proxy that does not
answer (greyproxy/env_check.py), from API answers and runtime output."""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

import pytest

from greyproxy.env_check import (
    PendingWatch,
    _last_line,
    _npm_judge,
    announce_pending,
    blocked_lines,
    proxy_away,
    run_checks,
)


API = "http://127.0.0.1:43080"


def _log(host: str, port: int, reason: str, container: str = "agent", **extra: object) -> dict:
    return {"container_name": container, "destination_host": host, "destination_port": port} | {
        "result": "blocked",
        "reason": reason,
        "rule_id": None,
        "rule_summary": None,
        **extra,
    }


def test_each_destination_once_oldest_first_with_why_and_what_to_do() -> None:
    logs = [  # newest first, as GET /api/logs lists them
        _log("registry.npmjs.org", 443, "hold_timeout"),
        _log("evil.example", 443, "rule", rule_id=7, rule_summary="agent → evil.example:443"),
        {**_log("pypi.org", 443, "rule"), "result": "allowed"},
        _log("registry.npmjs.org", 443, "hold_timeout"),
        _log("127.0.0.1", 43080, "guard"),
    ]
    pending = [
        {"id": 4, "container_name": "agent", "destination_host": "registry.npmjs.org", "destination_port": 443},
        {"id": 9, "container_name": "other", "destination_host": "evil.example", "destination_port": 443},
    ]
    assert blocked_lines(logs, pending, "agent", API) == [
        "    127.0.0.1:43080  it is one of Greyproxy's own listeners",
        "    registry.npmjs.org:443  held for approval, and nobody answered in time; pending #4:"
        f" allow it in the dashboard, {API}/?pending=4, or curl --noproxy '*' -X POST {API}/api/pending/4/allow",
        "    evil.example:443  denied by rule 7 (agent → evil.example:443)",
    ]


def test_only_the_checked_identity_and_named_when_none_was_given() -> None:
    logs = [_log("a.example", 443, "silent_deny", "agent-2"), _log("b.example", 80, "queue_full", "agent")]
    # (the API's container filter is a substring: agent-2's entries come back for "agent" too)
    assert blocked_lines(logs, [], "agent", API) == ["    b.example:80  the pending queue is full"]
    assert blocked_lines(logs, [], None, API) == [
        "    agent: b.example:80  the pending queue is full",
        "    agent-2: a.example:443  silent mode denies what no rule allows",
    ]
    assert blocked_lines([_log("c.example", 1, "something_new")], [], "agent", API) == [
        "    c.example:1  something_new"
    ]


def test_npm_error_line_is_the_failed_request_not_its_advice_or_log_pointer() -> None:
    err = (
        "npm error code E403\n"
        "npm error 403 403 Forbidden - GET https://registry.npmjs.org/npm\n"
        "npm error 403 In most cases, you or one of your dependencies are requesting\n"
        "npm error 403 a package version that is forbidden by your security policy, or\n"
        "npm error 403 on a server you do not have access to.\n"
        "npm error A complete log of this run can be found in: /tmp/x/_logs/debug-0.log\n"
    )
    assert _npm_judge(1, "", err) == (False, "npm error 403 403 Forbidden - GET https://registry.npmjs.org/npm")
    no_request = "npm error code ECONNREFUSED\nnpm error errno ECONNREFUSED\nnpm error A complete log of this run ...\n"
    assert _npm_judge(1, "", no_request) == (False, "npm error code ECONNREFUSED")
    assert _npm_judge(0, "1.0.0\n", "") == (True, "1.0.0")
    # Any runtime: the debug log's pointer is never the line kept.
    assert _last_line("boom: it failed\nnpm error A complete log of this run can be found in: x\n") == "boom: it failed"


def _pending(pid: int, container: str = "agent", waiting: int = 1, last_seen: str = "2026-12-06T21:00:05Z") -> dict:
    return {
        "id": pid,
        "container_name": container,
        "destination_host": "pypi.org",
        "destination_port": 443,
        "waiting": waiting,
        "last_seen": last_seen,
    }


def test_the_watch_announces_each_held_destination_of_the_check_once() -> None:
    from greyproxy.config import load_config

    watch = PendingWatch(load_config(None, env={}), "agent", 0.0)
    after = "2026-12-06T21:00:00Z"
    assert watch._ours(_pending(1), after)
    assert not watch._ours(_pending(2, waiting=0), after)  # nobody held on it (any more)
    assert not watch._ours(_pending(3, last_seen="2026-12-06T20:59:59Z"), after)  # from before the check
    assert not watch._ours(_pending(4, container="agent-2"), after)  # another identity
    watch.announced.add(1)
    assert not watch._ours(_pending(1), after)  # said once
    unnamed = PendingWatch(load_config(None, env={}), None, 0.0)
    assert unnamed._ours(_pending(5, container="unknown-127.0.0.1"), after)
    assert not unnamed._ours(_pending(6), after)
    assert announce_pending(_pending(7), API) == (
        "greyproxy env --check: pypi.org:443 waits for a decision (pending #7): allow it in the"
        f" dashboard, {API}/?pending=7, or curl --noproxy '*' -X POST {API}/api/pending/7/allow"
    )


def test_a_stack_that_is_not_running_is_named_before_any_runtime_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from greyproxy.cli_env import EnvPlan
    from greyproxy.config import load_config

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = EnvPlan([("HTTPS_PROXY", f"http://agent:x@127.0.0.1:{port}"), ("HTTP_PROXY", "ignored")], [])
    args = argparse.Namespace(check_url="https://pypi.org/simple/pip/", check_git=None, check_timeout=30.0)
    t0 = time.monotonic()
    assert run_checks(load_config(None, env={}), plan, "agent", args) == 1
    assert time.monotonic() - t0 < 5  # (no runtime was started)
    err = capsys.readouterr().err
    assert f"greyproxy env --check: nothing answers at 127.0.0.1:{port}, the proxy these variables name" in err, err
    assert "is Greyproxy running? Start it: greyproxy serve" in err, err
    assert proxy_away({}) == "no HTTPS_PROXY or HTTP_PROXY is set"


def test_a_remote_proxy_that_is_not_running_is_started_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a host B config (proxy.rulesFrom: recorder), the way to start it is `greyproxy run
    proxy -C FILE` (SPEC §15), not `serve`, which would start a whole stack of its own."""
    from greyproxy.cli_env import EnvPlan
    from greyproxy.config import load_config

    cfg_path = tmp_path / "host b.yaml"
    cfg_path.write_text("proxy: {rulesFrom: recorder}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = EnvPlan([("HTTPS_PROXY", f"http://agent:x@127.0.0.1:{port}")], [])
    args = argparse.Namespace(check_url="https://x/", check_git=None, check_timeout=30.0, config=str(cfg_path))
    cfg = load_config(cfg_path, env={"GREYPROXY_DATA_HOME": str(tmp_path)})
    assert run_checks(cfg, plan, "agent", args) == 1
    assert f"Start it: greyproxy run proxy -C '{cfg_path}'" in capsys.readouterr().err
