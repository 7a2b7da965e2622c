"""RecorderView (services/proxy/store_view.py): a proxy on another host reads the central store
through the recorder (SPEC §15). While the recorder does not answer, the proxy goes on with what
it has: the view says so once, and once more when the recorder is back, instead of every caller
logging a traceback each turn."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
import zmq.asyncio

from bus.reqrep import ControlServer, ServiceUnavailable
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


def test_an_absent_recorder_is_said_once_and_its_return_once(tmp_path: Path, caplog) -> None:
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
