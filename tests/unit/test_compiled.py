"""greyproxy/compiled.py: a compiled module is loaded only while its .py is the source it was built from."""

from __future__ import annotations

import ast
import importlib
import re
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
        so = compiled.DIRECTORY / compiled.compiled_name(name, compiled.module_digest(ROOT / path))
        if so.exists():
            assert module.__file__ == str(so), name
            assert compiled.status()[name] == "compiled"
        else:
            assert module.__file__ == str(ROOT / path), name


def _declared(tmp_path: Path) -> tuple[Path, Path]:
    """A module with a .pxd that cimports another project module's declarations."""
    pkg, out = _tree(tmp_path, b"class A:\n    __slots__ = ('x',)\n")
    (pkg / "mod.pxd").write_text("from gp_compiled_probe.dep cimport B\ncdef class A:\n    cdef public B x\n")
    (pkg / "dep.py").write_text("class B:\n    __slots__ = ('y',)\n")
    (pkg / "dep.pxd").write_text("cdef class B:\n    cdef public object y\n")
    for name, py in ((MODULE, pkg / "mod.py"), ("gp_compiled_probe.dep", pkg / "dep.py")):
        (out / compiled.compiled_name(name, compiled.module_digest(py))).write_bytes(b"")
    return pkg, out


def test_a_module_with_a_pxd_is_named_after_its_pxd_and_what_that_cimports(tmp_path: Path) -> None:
    pkg, out = _declared(tmp_path)
    py = pkg / "mod.py"
    assert compiled.cimports((pkg / "mod.pxd").read_bytes()) == ["gp_compiled_probe.dep"]
    assert compiled.module_digest(py) != compiled.source_digest(py.read_bytes())
    spec = compiled.CompiledFinder(out).find_spec(MODULE, [str(pkg)])
    assert spec is not None and isinstance(spec.loader, ExtensionFileLoader)
    for edited, text in ((pkg / "mod.pxd", "cdef class A:\n    cdef public object x\n"), (pkg / "dep.py", "B = 1\n")):
        before = edited.read_text()
        edited.write_text(text)  # the .pxd, or a module whose declarations it was compiled against
        finder = compiled.CompiledFinder(out)
        spec = finder.find_spec(MODULE, [str(pkg)])
        assert spec is not None and spec.origin == str(py), edited
        assert finder.state == {MODULE: "python (changed since compiled)"}
        edited.write_text(before)


def test_a_module_built_against_one_that_was_not_compiled_runs_as_python(tmp_path: Path) -> None:
    pkg, out = _declared(tmp_path)
    for so in out.glob("gp_compiled_probe.dep.*"):
        so.unlink()  # its compile failed (no C compiler for it, say): its extension types are Python classes
    (out / f"gp_compiled_probe.dep.0000000000000000{compiled.SUFFIX}").write_bytes(b"")  # another source's
    finder = compiled.CompiledFinder(out)
    spec = finder.find_spec(MODULE, [str(pkg)])
    assert spec is not None and spec.origin == str(pkg / "mod.py")
    assert finder.state == {MODULE: "python (gp_compiled_probe.dep is not compiled)"}


def _attributes(tree: ast.Module, name: str) -> set[str]:
    """A class's attributes in its source: its __slots__, or a dataclass's annotated fields."""
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__slots__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    assert any("dataclass" in ast.unparse(d) for d in cls.decorator_list), f"{name}: no __slots__"
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def test_the_pxd_files_declare_exactly_the_attributes_of_their_classes() -> None:
    """An attribute in __slots__ but not in the .pxd would not exist on the compiled class; one in
    the .pxd only would exist compiled but not as Python."""
    for path in compiled.MODULES:
        pxd = (ROOT / path).with_suffix(".pxd")
        if not pxd.exists():
            continue
        tree = ast.parse((ROOT / path).read_text())
        for cls, body in re.findall(r"^cdef class (\w+).*?:\n((?:[ \t]+.*\n|\n)*)", pxd.read_text(), re.M):
            declared = set()
            for decl in re.findall(r"^\s+cdef public (.*)$", body, re.M):
                words = decl.split(",")[0].split()
                names = decl.split(None, 1)[1] if len(words) > 1 else decl  # `Type a, b` or `a, b`
                declared |= {n.strip() for n in names.split(",")}
            attributes = _attributes(tree, cls)
            assert declared == attributes, (path, cls, declared ^ attributes)


def test_the_classes_a_pxd_declares_are_extension_types_where_compiled() -> None:
    """conn.pxd's Conn, context.pxd's ClientConn, ...: compiled, each is a C type (not a heap type:
    no instance dict, its attributes C struct fields); as Python (GREYPROXY_PURE=1), a slotted class."""
    checked = 0
    for path in compiled.MODULES:
        pxd = (ROOT / path).with_suffix(".pxd")
        if not pxd.exists():
            continue
        name = path[:-3].replace("/", ".")
        module = importlib.import_module(name)
        is_compiled = compiled.status().get(name) == "compiled"
        for cls_name in re.findall(r"^cdef class (\w+)", pxd.read_text(), re.M):
            cls = getattr(module, cls_name)
            assert bool(cls.__flags__ & (1 << 9)) is not is_compiled, (name, cls_name)  # Py_TPFLAGS_HEAPTYPE
            if not is_compiled:
                assert "__slots__" in vars(cls), (name, cls_name)
            checked += 1
    assert checked >= 10
