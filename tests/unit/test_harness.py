"""The harness's own helpers: free_ports hands a port out once per process and pytest-xdist
workers take disjoint ports (so a stack's listeners never get a port another pick already
named); examples() bounds the everyday property runs and keeps the thorough one whole."""

from __future__ import annotations

import pytest

from harness import fuzz, util


class _ScriptedSocket:
    """A socket whose bind(("127.0.0.1", 0)) gets the next port of a script (as the kernel may
    offer a port again once the socket that held it is closed)."""

    script: list[int] = []

    def __init__(self, *args: object) -> None:
        self.port = 0

    def bind(self, addr: tuple[str, int]) -> None:
        self.port = self.script.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        pass


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[_ScriptedSocket]:
    monkeypatch.setattr(util.socket, "socket", _ScriptedSocket)
    monkeypatch.setattr(util, "_HANDED_OUT", set())
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    return _ScriptedSocket


def test_a_port_is_handed_out_once(scripted: type[_ScriptedSocket]) -> None:
    scripted.script = [40001, 40002, 40001, 40002, 40003, 40001, 40004]
    assert util.free_ports(2) == [40001, 40002]
    assert util.free_ports(1) == [40003]  # the kernel offered 40001 and 40002 again
    assert util.free_port() == 40004


def test_xdist_workers_take_disjoint_ports(scripted: type[_ScriptedSocket], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    scripted.script = [40010, 40012, 40014, 40016]  # even ports, as Linux gives bind(0)
    assert util.free_ports(2) == [40010, 40014]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    scripted.script = [40020, 40022, 40024]
    assert util.free_ports(2) == [40020, 40024]


def test_each_xdist_worker_gets_real_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        assert len(set(util.free_ports(8))) == 8


def test_real_ports_are_distinct_and_free() -> None:
    first, second = util.free_ports(20), util.free_ports(20)
    assert len(set(first) | set(second)) == 40
    for port in first[:3]:
        with util.socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nobody holds it


def test_examples_are_a_quarter_every_day_and_all_in_the_deep_profile() -> None:
    assert [fuzz.examples(n, "ci-deep") for n in (10, 100, 1000)] == [10, 100, 1000]
    assert [fuzz.examples(n, "default") for n in (10, 60, 100, 400, 1000)] == [10, 25, 25, 100, 250]
