"""SPEC §15 (workers: a worker must not silently stop serving its share of the listeners) and the
guide's "a process killed mid-work": the stall watchdog (greyproxy.runtime.StallWatchdog,
bus.stallTimeout; docs/configuration.md, "A stalled service"). A process whose event loop
stops running exits, saying why and where each thread was; one whose loop keeps running does not.

Each case is a real Python process on uvloop, as a service runs (the watchdog's thread, the loop's
ticks and faulthandler's timer are process-wide, so they are not tried inside the test process).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from greyproxy.config import ConfigError, load_config
from greyproxy.runtime import EXIT_STALLED
from tests.harness.util import REPO

SCRIPT = """
import asyncio, logging, re, sys, time
import uvloop
from greyproxy.runtime import StallWatchdog

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
mode = sys.argv[1]

def blocking_step():  # a blocking call on the loop: releases the GIL, so the thread sees it
    time.sleep(30)

def catastrophic_regex():  # C code that never gives the GIL back: only the CPU-time fallback fires
    re.match(r"(a+)+$", "a" * 64 + "b")

async def main():
    dog = StallWatchdog("test-service", 1.0, fallback=0.5)
    dog.start(asyncio.get_running_loop())
    if mode == "frozen":  # the test stops the whole process (SIGSTOP) for 3 timeouts, then continues it
        print("ready", flush=True)
        for _ in range(40):
            await asyncio.sleep(0.1)
        dog.stop()
        print("clean end", flush=True)
        return
    if mode == "busy":  # responsive for 3 timeouts, then a clean stop
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            sum(range(20000))
            await asyncio.sleep(0)
        dog.stop()
        await asyncio.sleep(2.0)  # stopped: no longer watched, even while nothing ticks
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # nor while the loop's thread burns CPU without a tick
            pass
        print("clean end", flush=True)
        return
    await asyncio.sleep(0.3)
    blocking_step() if mode == "sleep" else catastrophic_regex()

uvloop.run(main())
"""


def _run(mode: str, timeout: float = 20.0) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), mode],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def test_a_loop_blocked_by_a_call_exits_with_its_reason_and_stack() -> None:
    code, out, took = _run("sleep")
    assert code == EXIT_STALLED, out
    assert took < 10, (took, out)  # 1 s of stall, not the 30 s of the call
    assert "CRITICAL test-service: the event loop has not run for" in out, out
    assert "bus.stallTimeout: 1" in out and f"exiting with status {EXIT_STALLED}" in out, out
    # where the loop's thread was: the blocking call, under the coroutine that made it
    assert "in blocking_step" in out and "in main" in out, out


def test_a_stall_that_holds_the_gil_is_ended_by_the_cpu_time_fallback() -> None:
    code, out, took = _run("regex", timeout=40.0)
    assert code == -signal.SIGVTALRM, out  # its default action, not the thread's exit (no GIL for it)
    # 1.5 s of CPU: the thread's deadline (1 s) + the fallback (0.5 s); wall time is longer on a busy
    # machine (10 s seen with load average 5 on 2 cores): the bound only says it ended
    assert 1.4 < took < 30, (took, out)
    assert "in catastrophic_regex" in out, out  # faulthandler's C handler: where each thread was
    assert "has not run for" not in out, out


def test_a_busy_responsive_loop_and_a_stopped_watchdog_never_exit() -> None:
    code, out, _took = _run("busy")
    assert code == 0, out  # (a CPU timer left armed by stop() would have ended it during the 2 s spin)
    assert "clean end" in out and "has not run" not in out and "Thread 0x" not in out, out


@pytest.mark.parametrize("value", [0.5, 1, -1])
def test_stall_timeout_below_the_minimum_is_refused(tmp_path, value) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"bus:\n  stallTimeout: {value}\n")
    with pytest.raises(ConfigError, match="bus.stallTimeout"):
        load_config(cfg, env={})


@pytest.mark.parametrize("value", [0, 2, 30])
def test_stall_timeout_off_or_at_least_the_minimum_is_taken(tmp_path, value) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"bus:\n  stallTimeout: {value}\n")
    assert float(load_config(cfg, env={}).bus["stallTimeout"]) == value


def test_default_is_thirty_seconds() -> None:
    assert float(load_config(None, env={}).bus["stallTimeout"]) == 30


def test_a_process_stopped_as_a_whole_is_not_taken_for_stalled() -> None:
    """Ctrl-Z on `greyproxy serve`, SIGSTOP, gdb: every thread stops, the watchdog's too. On SIGCONT
    the loop has not ticked for 3 s (3× the timeout), but the watchdog sees it did not run either,
    and the stopped process used no CPU for the fallback to count."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), "frozen"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(REPO),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "clean end" in out and "has not run" not in out, out


def test_the_watchdog_thread_tells_a_stalled_loop_from_a_stopped_process() -> None:
    """The judgement itself, on given times (after SIGCONT the loop's tick and the thread race,
    so the test above cannot tell which one saw the time first)."""
    from greyproxy.runtime import StallWatchdog

    dog = StallWatchdog("t", 30.0)
    assert dog.tick_every == 1.0 and dog.frozen == 5.0
    dog.last = 1000.0
    assert dog.stalled(now=1031.0, woke=1030.0) == 31.0  # the thread on time, the loop silent: stalled
    dog.last = 1000.0
    assert dog.stalled(now=1031.0, woke=1000.5) == 0.0  # the thread 30 s late too: stopped, a fresh start
    assert dog.last == 1031.0
    assert dog.stalled(now=1035.0, woke=1034.0) == 4.0
    short = StallWatchdog("t", 2.0)
    assert (short.tick_every, short.frozen) == (0.5, 1.0)  # a short timeout: a shorter lateness counts
