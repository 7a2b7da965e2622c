"""The proxy's hot modules compiled with Cython, loaded only while their .py is unchanged.

`pip install` (editable or not) compiles the modules in `MODULES` from their unchanged .py files
(Cython's pure-Python mode, see setup.py) into `greyproxy/_compiled/`, one file per module named
after the module and the digest of the source it was compiled from:
`services.proxy.http1.<digest>.cpython-311-x86_64-linux-gnu.so`. No extension module ever lies
beside a .py, so Python's own import system never prefers one to the source.

`install()` (run by each top-level package's `__init__`) puts `CompiledFinder` first on
`sys.meta_path`. For a module that has compiled files it finds the .py the import would load,
hashes it, and loads the compiled file only if one was built from exactly those bytes; otherwise
the .py is imported as usual. So a developer who edits a .py runs the edit (as Python) at once;
`make compile` compiles it again. The figures: bench/results.md, "s6-e".

A module may have a Cython declaration file beside it (`http1.pxd` beside `http1.py`: its classes
as extension types with typed attributes, Cython's "augmenting .pxd"; Python never reads it). Its
compiled file is then named after the .py, the .pxd and the modules the .pxd cimports (their own
digests): a compiled module that reads another's extension types by their C layout is loaded only
with that module compiled from the same sources (else both run as Python), see `module_digest`.

`GREYPROXY_PURE=1` runs everything as Python: for cProfile, py-spy and debuggers, which see no
Python frames inside compiled functions.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec, PathFinder
from importlib.util import spec_from_file_location
from pathlib import Path
from typing import Any, Sequence

# The modules compiled by setup.py: the request path's and the new connection's hot modules
# (bench/proxy_path.py --functions, bench/conn_path.py --profile), all pure Python.
MODULES = (
    "services/proxy/http1.py",
    "services/proxy/keepalive.py",
    "services/proxy/exchange.py",
    "services/proxy/gate.py",
    "services/proxy/pipeline.py",
    "services/proxy/conn.py",
    "services/proxy/hooks.py",
    "services/proxy/http_proxy.py",
    "services/proxy/pool.py",
    "services/proxy/context.py",
    "services/proxy/upstream.py",
    "services/proxy/tunnel.py",
    "services/proxy/httpio.py",
    "services/proxy/mitm.py",
    "greyproxy/redaction.py",
    "greyproxy/capture.py",
    "greyproxy/metrics.py",
    "bus/records.py",
    "bus/journal.py",
    "services/recorder/apply.py",
    "services/recorder/transactions.py",
    "greyproxy/store/journal_applied.py",
    "greyproxy/transport_table.py",
)

DIRECTORY = Path(__file__).resolve().parent / "_compiled"
SUFFIX = EXTENSION_SUFFIXES[0]  # this interpreter's ABI: '.cpython-311-x86_64-linux-gnu.so'


def source_digest(source: bytes) -> str:
    """The digest of a module's source that names its compiled file (one without a .pxd)."""
    return hashlib.sha256(source).hexdigest()[:16]


# `from services.proxy.http1 cimport RequestHead` / `cimport services.proxy.http1` in a .pxd
_CIMPORT = re.compile(rb"^\s*(?:from\s+([\w.]+)\s+cimport\b|cimport\s+([\w.]+))", re.M)


def cimports(pxd: bytes) -> list[str]:
    """The modules a .pxd cimports (absolute names; `cython` and C libraries included)."""
    return [(m.group(1) or m.group(2)).decode() for m in _CIMPORT.finditer(pxd)]


def module_digest(py: Path, _seen: frozenset[Path] = frozenset()) -> str:
    """The digest that names a module's compiled file (setup.py uses it too): its source's, or with
    a .pxd beside it, that of the source, the .pxd and the digests of the project modules the .pxd
    cimports (found from the .py's directory up), so editing any of them makes it run as Python."""
    source = py.read_bytes()
    pxd_path = py.with_suffix(".pxd")
    try:
        pxd = pxd_path.read_bytes()
    except OSError:
        return source_digest(source)
    parts = [source, b"\0pxd\0", pxd]
    for dep in cimports(pxd):
        dep_py = _find_module(py.parent, dep)
        if dep_py is not None and dep_py not in _seen:
            parts += [b"\0", dep.encode(), b"=", module_digest(dep_py, _seen | {py}).encode()]
    return source_digest(b"".join(parts))


def module_dependencies(py: Path) -> list[tuple[str, Path]]:
    """The project modules (name, .py) whose .pxd declarations `py`'s compiled file was built against."""
    try:
        pxd = py.with_suffix(".pxd").read_bytes()
    except OSError:
        return []
    out = []
    for dep in cimports(pxd):
        dep_py = _find_module(py.parent, dep)
        if dep_py is not None:
            out.append((dep, dep_py))
    return out


def _find_module(start: Path, dotted: str) -> Path | None:
    """`services.proxy.http1` -> .../services/proxy/http1.py in `start` or a directory above it."""
    rel = Path(*dotted.split(".")).with_suffix(".py")
    for base in (start, *start.parents):
        if (base / rel).is_file():
            return base / rel
    return None


def compiled_name(module: str, digest: str) -> str:
    """`services.proxy.http1` + digest -> the compiled file's name in DIRECTORY."""
    return f"{module}.{digest}{SUFFIX}"


def slotted(module_globals: dict[str, Any], *names: str) -> None:
    """Give the named dataclasses of a module __slots__ for their fields when they run as Python
    (what dataclass(slots=True) makes: cheaper to build and read, no stray attributes). Compiled,
    a class with a .pxd is an extension type (Cython's dataclass, which takes no `slots=`) and has
    its fields as C struct fields already: left as it is. Called at the end of the module, through
    its globals() (a compiled module's extension types are not names that can be assigned)."""
    for name in names:
        cls = module_globals[name]
        if not cls.__flags__ & (1 << 9):  # Py_TPFLAGS_HEAPTYPE: unset on an extension type
            continue
        fields = tuple(cls.__dataclass_fields__)
        ns = {k: v for k, v in cls.__dict__.items() if k not in fields and k not in ("__dict__", "__weakref__")}
        ns["__slots__"] = fields
        new = type(cls)(cls.__name__, cls.__bases__, ns)
        new.__qualname__ = cls.__qualname__
        module_globals[name] = new


class CompiledFinder:
    """A meta path finder: a module's compiled file if it was built from the .py found, else nothing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.built: dict[str, set[str]] = {}  # module -> digests of the compiled files present
        self.state: dict[str, str] = {}  # module -> "compiled" or "python (changed since compiled)"
        try:
            names = os.listdir(directory)
        except OSError:
            names = []
        for name in names:
            if name.endswith(SUFFIX):
                module, _, digest = name[: -len(SUFFIX)].rpartition(".")
                self.built.setdefault(module, set()).add(digest)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: object = None) -> ModuleSpec | None:
        digests = self.built.get(fullname)
        if digests is None:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return spec
        py = Path(spec.origin)
        try:
            digest = module_digest(py)
            deps = module_dependencies(py)
        except OSError:
            return spec
        if digest not in digests:
            self.state[fullname] = "python (changed since compiled)"
            return spec
        for dep, dep_py in deps:  # (built, but one it was built against was not: a compile that failed)
            if module_digest(dep_py) not in self.built.get(dep, ()):
                self.state[fullname] = f"python ({dep} is not compiled)"
                return spec
        compiled = str(self.directory / compiled_name(fullname, digest))
        self.state[fullname] = "compiled"
        return spec_from_file_location(fullname, compiled, loader=ExtensionFileLoader(fullname, compiled))


def install() -> None:
    """Put the finder first on sys.meta_path (once per process); GREYPROXY_PURE=1 leaves it out."""
    if os.environ.get("GREYPROXY_PURE", "") not in ("", "0"):
        return
    if any(isinstance(f, CompiledFinder) for f in sys.meta_path):
        return
    finder = CompiledFinder(DIRECTORY)
    if finder.built:
        sys.meta_path.insert(0, finder)


def status() -> dict[str, str]:
    """Each compiled-capable module imported so far: "compiled" or why it runs as Python."""
    for finder in sys.meta_path:
        if isinstance(finder, CompiledFinder):
            return dict(finder.state)
    return {}


def main() -> int:
    """`python -c 'import greyproxy.compiled as c; c.main()'`: import every hot module and say how each runs; exit 1 when
    one runs as Python (a module that failed to compile at install only warns there: CI runs this
    where a C compiler is present, so such a module fails the build instead of slowing it quietly)."""
    import importlib

    install()
    for path in MODULES:
        importlib.import_module(path[:-3].replace("/", "."))
    states = status()
    for name in sorted(states):
        print(f"{name}: {states[name]}")
    missing = [p for p in MODULES if states.get(p[:-3].replace("/", ".")) != "compiled"]
    if missing:
        print(f"{len(missing)} of {len(MODULES)} hot modules run as Python: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"all {len(MODULES)} hot modules compiled")
    return 0
