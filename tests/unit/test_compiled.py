"""greyproxy/compiled.py: a compiled module is loaded only while its .py is the source it was built from."""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import ExtensionFileLoader
from pathlib import Path

import pytest

from greyproxy import compiled

ROOT = Path(__file__).resolve().parents[2]
MODULE = "gp_compiled_probe.mod"


def _tree(tmp_path: Path, source: bytes) -> tuple[Path, Path]:
    pkg = tmp_path / "src" / "gp_compiled_probe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_bytes(source)
    out = tmp_path / "_compiled"
    out.mkdir()
    return pkg, out


def _built_from(out: Path, source: bytes) -> Path:
    """A compiled file's name for that source (empty: the finder's spec is checked, nothing is loaded)."""
    so = out / compiled.compiled_name(MODULE, compiled.source_digest(source))
    so.write_bytes(b"")
    return so


def test_a_module_built_from_this_source_is_loaded_compiled(tmp_path: Path) -> None:
    pkg, out = _tree(tmp_path, b"X = 1\n")
    so = _built_from(out, b"X = 1\n")
    finder = compiled.CompiledFinder(out)
    spec = finder.find_spec(MODULE, [str(pkg)])
    assert spec is not None and isinstance(spec.loader, ExtensionFileLoader)
    assert spec.origin == str(so)
    assert finder.state == {MODULE: "compiled"}


def test_an_edited_module_runs_as_python_not_its_stale_compiled_file(tmp_path: Path) -> None:
    pkg, out = _tree(tmp_path, b"X = 2\n")  # the developer's edit
    _built_from(out, b"X = 1\n")  # what was compiled before it
    finder = compiled.CompiledFinder(out)
    spec = finder.find_spec(MODULE, [str(pkg)])
    assert spec is not None and not isinstance(spec.loader, ExtensionFileLoader)
    assert spec.origin == str(pkg / "mod.py")
    assert finder.state == {MODULE: "python (changed since compiled)"}


def test_modules_without_a_compiled_file_are_left_to_the_import_system(tmp_path: Path) -> None:
    pkg, out = _tree(tmp_path, b"X = 1\n")
    _built_from(out, b"X = 1\n")
    digest = compiled.source_digest(b"X = 1\n")
    (out / f"{MODULE}.{digest}.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    finder = compiled.CompiledFinder(out)
    assert finder.find_spec("gp_compiled_probe.other", [str(pkg)]) is None
    assert finder.find_spec("json", None) is None
    assert set(finder.built) == {MODULE}  # another Python's file is not this one's


def test_greyproxy_pure_leaves_the_finder_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, compiled.CompiledFinder)])
    monkeypatch.setenv("GREYPROXY_PURE", "1")
    compiled.install()
    assert not any(isinstance(f, compiled.CompiledFinder) for f in sys.meta_path)


def test_this_install_imports_every_hot_module_compiled_where_it_was_built() -> None:
    """Where setup.py compiled them (a C compiler was there), the tests run the compiled modules."""
    if not any(isinstance(f, compiled.CompiledFinder) for f in sys.meta_path):
        pytest.skip("no compiled modules in this install (GREYPROXY_PURE=1, GREYPROXY_COMPILE=0 or no compiler)")
    for path in compiled.MODULES:
        name = path[:-3].replace("/", ".")
        module = importlib.import_module(name)
        so = compiled.DIRECTORY / compiled.compiled_name(name, compiled.source_digest((ROOT / path).read_bytes()))
        if so.exists():
            assert module.__file__ == str(so), name
            assert compiled.status()[name] == "compiled"
        else:
            assert module.__file__ == str(ROOT / path), name
