"""bus.stallTimeout on a real stack (SPEC §15: workers; docs/architecture.md, Faults): a service
whose event loop stops running exits with where it was in its log, and supervisord starts it again.

The stall is a real one: tests/harness/stall/sitecustomize.py makes SIGUSR2 block the main thread
(the loop's) of the processes this stack starts, as a blocking call made on the loop would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from conftest import PathHandler, Stack, log_entries, plain_origin, wait_for
from greyproxy.runtime import EXIT_STALLED
from tests.harness.util import REPO

pytestmark = [pytest.mark.stack]

STALL = 2  # bus.stallTimeout, seconds
HARNESS = REPO / "tests" / "harness" / "stall"


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(PathHandler, "127.0.0.1") as port:  # a builtin rule allows 127.0.0.1
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack({"proxy": {"workers": 2}, "bus": {"stallTimeout": STALL}})
    s.env["PYTHONPATH"] = os.pathsep.join([str(HARNESS), s.env["PYTHONPATH"]])
    s.env["GREYPROXY_TEST_STALL"] = "1"
    with s:
        yield s


def pids(stack: Stack) -> dict[str, int]:
    code, body = stack.health()
    assert code == 200, body
    return {name: svc["pid"] for name, svc in body["services"].items() if name != "proxy"}


def restarts(stack: Stack) -> dict[str, int]:
    """/api/health's count of restarts after a death, per service (not the API's own)."""
    return {name: svc["restarts"] for name, svc in stack.health()[1]["services"].items() if name != "api"}


def up_again(stack: Stack, name: str, old: int) -> int | None:
    code, body = stack.health()
    svc = body["services"].get(name) or {}
    return svc["pid"] if code == 200 and svc.get("up") and svc.get("pid") not in (None, old) else None


def get_all(stack: Stack, origin: int, n: int, container: str) -> None:
    for i in range(n):  # a new connection each: the kernel spreads them over both workers
        with stack.proxy_client(container) as c:
            r = c.get(f"http://127.0.0.1:{origin}/{i}")
            assert r.status_code == 200, (i, r.status_code, r.text)


def service_log(stack: Stack, name: str) -> str:
    return (stack.data_dir / "logs" / f"{name}.log").read_text(errors="replace")


def test_processes_whose_loop_runs_are_never_taken_for_stalled(stack: Stack, origin: int) -> None:
    before = pids(stack)
    assert set(restarts(stack).values()) == {0}
    t_end = time.monotonic() + 2.5 * STALL
    while time.monotonic() < t_end:
        get_all(stack, origin, 10, "busy")
    assert pids(stack) == before
    assert set(restarts(stack).values()) == {0}
    for name in ("proxy-0", "proxy-1", "recorder", "api", "maintenance"):
        assert "has not run for" not in service_log(stack, name), name


@pytest.mark.parametrize("name", ["proxy-0", "recorder"])
def test_a_stalled_service_exits_saying_where_and_is_started_again(stack: Stack, origin: int, name: str) -> None:
    before = pids(stack)
    counted = restarts(stack)
    old = before[name]
    t0 = time.monotonic()
    os.kill(old, signal.SIGUSR2)
    if name == "recorder":  # traffic meanwhile: the journal keeps it until the new recorder takes it
        get_all(stack, origin, 20, "during-stall")
    new = wait_for(lambda: up_again(stack, name, old), 30, interval=0.1, message=f"{name} started again")
    took = time.monotonic() - t0
    assert took < STALL + 15, took  # not the 120 s the stall lasts
    text = service_log(stack, name)
    assert f"{name}: the event loop has not run for" in text, text[-3000:]
    assert f"exiting with status {EXIT_STALLED}" in text, text[-3000:]
    assert "in _stalled_by_the_test" in text, text[-3000:]  # where its loop's thread was
    sup = (stack.data_dir / "logs" / "supervisord.log").read_text()
    assert f"exited: {name} (exit status {EXIT_STALLED}; not expected)" in sup, sup[-2000:]
    # The others were left alone, and the stack serves and records as before.
    after = pids(stack)
    assert {k: v for k, v in after.items() if k != name} == {k: v for k, v in before.items() if k != name}
    assert after[name] == new
    # /api/health counts it (it sent no `stopping` heartbeat), and only it ("proxy" sums its workers)
    counted[name] += 1
    if name.startswith("proxy-"):
        counted["proxy"] += 1
    assert restarts(stack) == counted
    assert stack.health()[1]["services"][name]["last_restart"] is not None
    get_all(stack, origin, 10, f"after-{name}")
    if name == "recorder":
        wait_for(
            lambda: len(log_entries(stack, "during-stall")) == 20,
            30,
            message="the requests made while the recorder was stalled, recorded",
        )
