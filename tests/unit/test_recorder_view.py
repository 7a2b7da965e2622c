"""RecorderView (services/proxy/store_view.py): a proxy on another host reads the central store
through the recorder (SPEC §15). While the recorder does not answer, the proxy goes on with what
it has: the view says so once, and once more when the recorder is back, instead of every caller
logging a traceback each turn."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq.asyncio

from bus.reqrep import ControlServer, ServiceUnavailable
from services.proxy import store_view
from services.proxy.store_view import RecorderAway, RecorderView


def _serve(endpoint: str, stop: threading.Event, ready: threading.Event) -> None:
    async def go() -> None:
        ctx = zmq.asyncio.Context()
        server = ControlServer(endpoint, {"view.rules_version": lambda args: 7}, ctx=ctx)
        task = asyncio.ensure_future(server.serve())
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        task.cancel()
        server.close()
        ctx.term()

    asyncio.run(go())


def test_an_absent_recorder_is_said_once_and_its_return_once(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(store_view, "AWAY_RETRY", 0.05)
    endpoint = f"ipc://{tmp_path}/rec.sock"
    view = RecorderView(endpoint, timeout=0.1, retries=1)
    with caplog.at_level(logging.INFO, logger="greyproxy.proxy"):
        for _ in range(3):
            with pytest.raises(RecorderAway) as info:
                view.rules_version()
            assert isinstance(info.value, ServiceUnavailable)  # callers that catch that still do
        away = [r for r in caplog.records if "does not answer" in r.getMessage()]
        assert len(away) == 1 and away[0].levelno == logging.WARNING
        assert endpoint in away[0].getMessage()

        stop, ready = threading.Event(), threading.Event()
        server = threading.Thread(target=_serve, args=(endpoint, stop, ready))
        server.start()
        try:
            assert ready.wait(5)
            view.timeout, view.retries = 1.0, 3
            time.sleep(0.1)  # AWAY_RETRY: asked again only after it
            assert view.rules_version() == 7
            assert view.rules_version() == 7
        finally:
            stop.set()
            server.join(5)
    back = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert len([r for r in caplog.records if "does not answer" in r.getMessage()]) == 1


def test_a_watcher_logs_its_failures_but_not_the_recorder_being_away(caplog) -> None:
    from services.proxy.store_view import log_failure

    log = logging.getLogger("greyproxy.proxy")
    with caplog.at_level(logging.INFO, logger="greyproxy.proxy"):
        try:
            raise RecorderAway("recorder", "no answer")
        except Exception:
            log_failure(log, "rule version check failed")
        assert caplog.records == []  # the view said it once; no traceback per watcher and turn
        try:
            raise ValueError("a bug")
        except Exception:
            log_failure(log, "rule version check failed")
    assert [r.getMessage() for r in caplog.records] == ["rule version check failed"]
    assert caplog.records[0].exc_info is not None


def test_while_the_recorder_is_away_callers_are_told_at_once(tmp_path: Path, monkeypatch) -> None:
    """A proxy on another host asks the recorder from a few threads: the watchers every 2 s, each new
    destination's look at the pending queue, each claimed identity's check. With every call waiting
    timeout x retries for a recorder that is away (6 s by default), an outside run saw each new
    destination wait 12-17 s before it was even held, four at once one after another (up to 50 s),
    and a claimed identity's first connection 4-5 s. Now once it did not answer, one caller at a
    time asks it (once, at most every AWAY_RETRY s) and the others are told at once."""
    monkeypatch.setattr(store_view, "AWAY_RETRY", 0.5)
    endpoint = f"ipc://{tmp_path}/rec.sock"
    view = RecorderView(endpoint, timeout=0.3, retries=3)
    t0 = time.monotonic()
    with pytest.raises(RecorderAway):
        view.rules_version()
    assert time.monotonic() - t0 >= 0.8  # the first failure: every try
    with ThreadPoolExecutor(8) as pool:

        def one(_: int) -> float:
            t = time.monotonic()
            with pytest.raises(RecorderAway):
                view.pending_state([("agent", "new.example", 443)])
            return time.monotonic() - t

        assert max(pool.map(one, range(16))) < 0.2  # told at once, not 0.9 s each
    time.sleep(0.6)  # past AWAY_RETRY: one caller asks again, once (one try), the others still at once
    with ThreadPoolExecutor(4) as pool:
        waits = sorted(pool.map(one, range(4)))
    assert waits[-1] < 0.6 and waits[0] < 0.2, waits
    stop, ready = threading.Event(), threading.Event()
    server = threading.Thread(target=_serve, args=(endpoint, stop, ready))
    server.start()
    try:
        assert ready.wait(5)
        deadline = time.monotonic() + 5
        while True:  # back: answered again once the next ask is due
            try:
                assert view.rules_version() == 7
                break
            except RecorderAway:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert view.rules_version() == 7
    finally:
        stop.set()
        server.join(5)


def test_the_pending_queue_look_tries_once(tmp_path: Path) -> None:
    """A new destination's client waits for the look at the pending queue (and the next new one
    behind it): at the start of an outage it waited every try (3 x 2 s, ~6.5 s in an outside run).
    The look tries once; the proxy goes by its last count without it."""
    view = RecorderView(f"ipc://{tmp_path}/rec.sock", timeout=0.3, retries=3)
    t0 = time.monotonic()
    with pytest.raises(RecorderAway):
        view.pending_state([("agent", "new.example", 443)])
    assert time.monotonic() - t0 < 0.6
