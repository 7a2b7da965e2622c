"""uvloop's table of its transports by file descriptor, kept without the Python of a WeakValueDictionary.

uvloop's event loop enters every transport it makes (each accepted and each connected socket) in a
`weakref.WeakValueDictionary` keyed by file descriptor, for one check only: `add_reader`,
`add_writer` and the `sock_*` calls refuse a descriptor that a live transport owns
(`RuntimeError: File descriptor N is used by transport ...`). That dictionary is Python code: entering
a transport builds a `KeyedRef` with a removal callback (about 6 000 instructions), and the callback
runs again as Python when the transport is freed. A new spliced tunnel has two transports: the table
was about 14 000 of the ~118 000 instructions the proxy spent on one (bench/tunnel_instr.py).

`TransportTable` gives that check the same answers for a fraction of the cost (an extension type
when compiled): one plain weak reference per descriptor, with no callback, replaced when a new
transport takes the descriptor; a lookup returns the transport while it lives and raises KeyError
once it is gone (or if there never was one). A dead reference stays until its descriptor is used
again or looked up: at most one small object per descriptor number a transport ever had.

uvloop builds the table in each loop's `__init__` from a name it binds once, when its `loop` module
is first imported (`weakref_WeakValueDictionary`, a C global). `import_uvloop()` therefore imports
uvloop with `weakref.WeakValueDictionary` standing for `TransportTable` for the time of that import
only, after importing the standard modules uvloop imports (so no other module's import happens
inside it). If uvloop was imported already, the loops keep uvloop's own dictionary: nothing else
differs. `table_of(loop)` says which table a loop has.
"""

from __future__ import annotations

import gc
import importlib
import sys
import weakref
from types import ModuleType
from typing import Any

# What uvloop's loop module imports (uvloop/includes/stdlib.pxi, and what its reading of
# `concurrent.futures.ThreadPoolExecutor` loads): imported before the window in which
# `weakref.WeakValueDictionary` is ours, so that only uvloop's own code runs in it
# (tests/unit/test_transport_table.py checks that no other module is imported in the window).
_UVLOOP_IMPORTS = (
    "asyncio",
    "asyncio.log",
    "asyncio.base_events",
    "asyncio.sslproto",
    "asyncio.coroutines",
    "asyncio.futures",
    "asyncio.transports",
    "collections.abc",
    "concurrent.futures",
    "concurrent.futures.thread",
    "queue",
    "errno",
    "functools",
    "gc",
    "inspect",
    "itertools",
    "os",
    "signal",
    "socket",
    "subprocess",
    "ssl",
    "stat",
    "sys",
    "threading",
    "traceback",
    "time",
    "warnings",
    "weakref",
)


class TransportTable:
    """File descriptor -> the live transport using it (KeyError if none): what uvloop asks of it."""

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[int, Any] = {}

    def __setitem__(self, fd: int, transport: object) -> None:
        self._refs[fd] = weakref.ref(transport)

    def __getitem__(self, fd: int) -> object:
        transport = self._refs[fd]()
        if transport is None:
            del self._refs[fd]
            raise KeyError(fd)
        return transport

    def __len__(self) -> int:
        """Descriptors with an entry, dead ones not yet replaced included."""
        return len(self._refs)


def import_uvloop() -> ModuleType:
    """`import uvloop`, its loops keeping their transports in a `TransportTable` (see the module's
    docstring); uvloop as it is if it was imported before."""
    if "uvloop.loop" in sys.modules:
        return importlib.import_module("uvloop")
    for name in _UVLOOP_IMPORTS:
        importlib.import_module(name)
    standard = weakref.WeakValueDictionary
    weakref.WeakValueDictionary = TransportTable  # type: ignore[misc,assignment]
    try:
        import uvloop.loop  # noqa: F401 - binds uvloop's table type: ours, for the time of this import
    finally:
        weakref.WeakValueDictionary = standard  # type: ignore[misc]
    return importlib.import_module("uvloop")


def table_of(loop: object) -> object | None:
    """The table of transports a uvloop loop keeps (a `TransportTable` or uvloop's own
    WeakValueDictionary); None for another loop."""
    for ref in gc.get_referents(loop):
        if isinstance(ref, (TransportTable, weakref.WeakValueDictionary)):
            return ref
    return None
