"""greyproxy.transport_table: uvloop's table of transports, kept without WeakValueDictionary's Python.

The table must answer uvloop's one question as uvloop's own did (is this descriptor a live
transport's?), be what the services' loops get, and its import must not change anything else."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import pytest

from greyproxy.transport_table import TransportTable
from tests.harness.util import REPO, service_env


class _Transport:
    """Anything weakly referable stands for a transport in the table."""


def test_a_lookup_finds_the_transport_while_it_lives():
    table = TransportTable()
    tr = _Transport()
    table[7] = tr
    assert table[7] is tr
    with pytest.raises(KeyError):
        table[8]


def test_a_dead_transport_is_not_found_and_its_entry_goes():
    table = TransportTable()
    table[7] = _Transport()  # no other reference: freed at once
    gc.collect()
    assert len(table) == 1  # (no callback: the entry stays until looked up or replaced)
    with pytest.raises(KeyError):
        table[7]
    assert len(table) == 0


def test_a_new_transport_on_a_reused_descriptor_replaces_the_old_entry():
    table = TransportTable()
    old, new = _Transport(), _Transport()
    table[7] = old
    table[7] = new
    assert table[7] is new
    assert len(table) == 1


def test_the_table_keeps_no_transport_alive():
    table = TransportTable()
    tr = _Transport()
    ref = weakref.ref(tr)
    table[3] = tr
    del tr
    gc.collect()
    assert ref() is None


def _run(code: str) -> dict:
    """Run code in a fresh interpreter (uvloop not imported yet); it prints one JSON line."""
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=service_env(),
        cwd=str(REPO),
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


# A live transport's descriptor refused by add_reader (uvloop's check, answered by the table); once
# the transport is closed and freed, a new socket on the same descriptor number accepted.
_CHECK = """
    import asyncio, gc, json, socket

    async def check():
        loop = asyncio.get_running_loop()
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        tr, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        fd = tr.get_extra_info("socket").fileno()
        try:
            loop.add_reader(fd, lambda: None)
            refused = None
        except RuntimeError as exc:
            refused = str(exc)
        tr.close()
        await asyncio.sleep(0.05)
        del tr, _
        gc.collect()
        s = socket.socket()
        reused = s.fileno() == fd
        loop.add_reader(s.fileno(), lambda: None)  # must not raise: the transport is gone
        loop.remove_reader(s.fileno())
        s.close()
        srv.close()
        return {"refused": refused, "reused": reused}
"""


def test_uvloop_imported_through_it_keeps_its_transports_in_the_table_with_the_same_answers():
    out = _run(
        _CHECK
        + """
    import sys
    from greyproxy.transport_table import _UVLOOP_IMPORTS, import_uvloop, table_of
    import importlib
    for name in _UVLOOP_IMPORTS:
        importlib.import_module(name)
    before = set(sys.modules)
    uvloop = import_uvloop()
    imported = sorted(set(sys.modules) - before)
    import weakref
    standard = weakref.WeakValueDictionary.__module__ == "weakref"
    loop = uvloop.new_event_loop()
    res = loop.run_until_complete(check())
    res.update(table=type(table_of(loop)).__name__, imported=imported, standard=standard)
    print(json.dumps(res))
    """
    )
    assert out["table"] == "TransportTable"
    assert out["refused"] and "is used by transport" in out["refused"]
    assert out["reused"]
    assert out["standard"]  # weakref.WeakValueDictionary is the standard one again
    # Only uvloop's own modules (and Cython's runtime modules) were imported while
    # WeakValueDictionary stood for the table.
    others = [
        m for m in out["imported"] if m != "uvloop" and not m.startswith(("uvloop.", "_cython_", "cython_runtime"))
    ]
    assert others == []


def test_uvloop_imported_before_keeps_its_own_dictionary():
    out = _run(
        _CHECK
        + """
    import uvloop
    from greyproxy.transport_table import import_uvloop, table_of
    assert import_uvloop() is uvloop
    loop = uvloop.new_event_loop()
    res = loop.run_until_complete(check())
    res.update(table=type(table_of(loop)).__name__)
    print(json.dumps(res))
    """
    )
    assert out["table"] == "WeakValueDictionary"
    assert out["refused"] and "is used by transport" in out["refused"]


@pytest.mark.parametrize("service", ["proxy", "api", "recorder", "maintenance"])
def test_every_service_loop_gets_the_table(service, tmp_path):
    """Each service module imported as `greyproxy run` does, then run_async_service: its loop has
    the table (a service module that imported uvloop itself would leave uvloop's dictionary)."""
    out = _run(
        f"""
    import asyncio, json, os
    os.environ["GREYPROXY_DATA_HOME"] = {str(tmp_path)!r}
    import services.{service}.service
    from greyproxy.config import load_config
    from greyproxy.runtime import run_async_service
    from greyproxy.transport_table import table_of

    async def main(rt):
        print(json.dumps({{"table": type(table_of(asyncio.get_running_loop())).__name__}}), flush=True)

    run_async_service("probe", load_config(), main)
    """
    )
    assert out["table"] == "TransportTable"
