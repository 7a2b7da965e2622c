"""The HAR export through the real stack when it does not end well (SPEC §14): a client that goes
away mid-export stops it (the API does not produce the rest for nobody), and a failure after the
status line went out breaks the transfer off (curl and the CLI see an incomplete export, never a
clean end of a half document; the CLI leaves no FILE behind and exits non-zero)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from conftest import PYTHON, REPO, Stack, wait_for
from greyproxy.capture import TRANSACTION_COLUMNS

pytestmark = pytest.mark.stack

ROWS = 30_000  # ~3 s of export: long enough to leave or break in the middle of
_TICK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"proxy": {"holdTimeout": 2}}) as s:
        cols = [c for c in TRANSACTION_COLUMNS if c not in ("id", "request_body_base", "response_body_base")]
        body = json.dumps({"choices": [{"message": {"content": "x" * 400}}]})
        headers = json.dumps({"Content-Type": ["application/json"]})
        t0 = time.time() - 3 * 3600
        values = {
            "container_name": "many",
            "destination_host": "api.test",
            "destination_port": 443,
            "method": "POST",
            "request_headers": headers,
            "request_body": body,
            "request_body_size": len(body),
            "request_content_type": "application/json",
            "status_code": 200,
            "response_headers": headers,
            "response_body": body,
            "response_body_size": len(body),
            "response_content_type": "application/json",
            "result": "allowed",
            "substituted_credentials": "[]",
            "refused_credentials": "[]",
            "host_mismatch": 0,
        }
        con = sqlite3.connect(s.db_path, timeout=30)
        with con:
            con.executemany(
                f"INSERT INTO http_transactions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                (
                    [(values | {"timestamp": t0 + i * 0.01, "url": f"https://api.test/v1?i={i}"}).get(c) for c in cols]
                    for i in range(ROWS)
                ),
            )
        con.close()
        yield s


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _api_log(stack: Stack) -> str:
    return (stack.data_dir / "logs" / "api.log").read_text(errors="replace")


def test_a_client_that_leaves_stops_the_export(stack: Stack) -> None:
    pid = stack.pid("api")
    assert pid
    for _ in range(2):
        got = 0
        with httpx.stream(
            "GET", stack.url("/api/transactions/export.har"), params={"container": "many"}, trust_env=False, timeout=30
        ) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw(4096):
                got += len(chunk)
                if got >= 30_000:
                    break
        time.sleep(0.5)  # the API notices (its next step)
        c0 = _cpu(pid)
        time.sleep(1.5)
        burnt = _cpu(pid) - c0
        assert burnt < 0.4, f"the API spent {burnt:.2f} s of CPU in 1.5 s after the client left"
    wait_for(lambda: "client went away" in _api_log(stack), 5, message="the export's stop in the API log")
    # and a whole export still works
    doc = orjson.loads(stack.get("/api/transactions/export.har", params={"limit": "3"}).content)
    assert len(doc["log"]["entries"]) == 3


class _TableAway:
    """The transactions table renamed while an export runs (a real failure of its database reads
    after the first bytes went out), and put back."""

    def __init__(self, stack: Stack) -> None:
        self.db = stack.db_path

    def __enter__(self) -> None:
        con = sqlite3.connect(self.db, timeout=30)
        con.execute("ALTER TABLE http_transactions RENAME TO http_transactions_away")
        con.commit()
        con.close()

    def __exit__(self, *exc: object) -> None:
        con = sqlite3.connect(self.db, timeout=30)
        con.execute("ALTER TABLE http_transactions_away RENAME TO http_transactions")
        con.commit()
        con.close()


def _wait_size(path: Path | None, pattern: str | None, at_least: int, proc: subprocess.Popen) -> None:
    def grown() -> bool:
        paths = [path] if path else list(Path(pattern).parent.glob(Path(pattern).name)) if pattern else []
        return any(p.exists() and p.stat().st_size >= at_least for p in paths if p)

    wait_for(lambda: grown() or proc.poll() is not None, 20, message="the export's first bytes")
    assert proc.poll() is None, "the export ended before it could be broken"


def test_a_failure_mid_export_is_an_incomplete_transfer(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "curl.har"
    url = stack.url("/api/transactions/export.har") + "?container=many"
    p = subprocess.Popen(
        ["curl", "-sS", "--max-time", "60", "-o", str(out), url], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        _wait_size(out, None, 200_000, p)
        with _TableAway(stack):
            _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0, "curl saw a clean end of an export that failed half way"
    assert p.returncode == 18 or b"transfer closed" in err or b"chunk" in err.lower(), (p.returncode, err)

    # the CLI: non-zero, a message naming the cause, no FILE and nothing of it left behind
    har = tmp_path / "cli" / "out.har"
    har.parent.mkdir()
    cli = subprocess.Popen(
        [PYTHON, "-m", "greyproxy", "export", "--har", str(har), "--container", "many", "-C", str(stack.cfg_path)],
        env=stack.env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_size(None, str(har.parent / "*"), 200_000, cli)
        with _TableAway(stack):
            _, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode != 0 and "wrote" not in err, err
    assert "export" in err and ("incomplete" in err or "broke off" in err), err
    assert list(har.parent.iterdir()) == [], "the CLI left a file behind"
    # the API is fine afterwards
    ok = subprocess.run(
        [PYTHON, "-m", "greyproxy", "export", "--har", str(har), "--container", "many", "-C", str(stack.cfg_path)],
        env=stack.env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "wrote" in ok.stderr, ok.stderr
    assert len(orjson.loads(har.read_bytes())["log"]["entries"]) == ROWS
