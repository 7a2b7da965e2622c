"""The build's one addition to pyproject.toml: the proxy's hot modules compiled with Cython.

The modules in greyproxy/compiled.py's MODULES are compiled from their unchanged .py files
(Cython's pure-Python mode) into greyproxy/_compiled/<module>.<digest of the .py><EXT_SUFFIX>,
never beside the .py; greyproxy/compiled.py loads one only while the .py still has that digest
(with a Cython .pxd beside the .py: the .py's, the .pxd's and those of the modules it cimports).
An editable install (`make install`) copies them into the source tree's greyproxy/_compiled/ and
compiles only the modules whose current source has no compiled file yet (`make compile`); a wheel
carries them as package files. Without Cython or a C compiler, or with GREYPROXY_COMPILE=0, the
build warns and the package is pure Python, as it is everywhere a module's file is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _compiled_rules():  # greyproxy/compiled.py itself, without importing the greyproxy package
    spec = spec_from_file_location("_greyproxy_compiled_rules", HERE / "greyproxy" / "compiled.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compiled = _compiled_rules()
OUT = Path("greyproxy") / "_compiled"

# Python's semantics kept: annotations are for mypy, not C types (Cython would make `x: float` a
# C double); functions stay introspectable, bindable Python-like objects.
DIRECTIVES = {"language_level": 3, "binding": True, "annotation_typing": False}
# -O2 without debug information: two thirds of the compile CPU of Python's -O3 -g, same speed (s6-e).
CFLAGS = ["-O2", "-g0"] if os.name == "posix" else []


def _warn(message: str) -> None:
    print(f"greyproxy: {message}; the proxy runs as pure Python", file=sys.stderr)


class BuildCompiled(build_ext):
    """build_ext for .py sources: cythonize lazily, name outputs by source digest, never fail the install."""

    digests: dict[str, str] = {}  # module -> digest of the source being compiled

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def get_ext_fullpath(self, ext_name: str) -> str:
        if ext_name not in self.digests:
            return super().get_ext_fullpath(ext_name)
        return os.path.join(self.build_lib, OUT, compiled.compiled_name(ext_name, self.digests[ext_name]))

    def _in_source(self, ext_name: str) -> Path:
        return HERE / OUT / compiled.compiled_name(ext_name, self.digests[ext_name])

    def run(self) -> None:
        if os.environ.get("GREYPROXY_COMPILE") == "0":
            _warn("GREYPROXY_COMPILE=0: nothing compiled")
            self.extensions = []
            return
        try:
            from Cython.Build import cythonize
        except ImportError:
            _warn("Cython is not installed: nothing compiled")
            self.extensions = []
            return
        self.digests = {e.name: compiled.module_digest(HERE / e.sources[0]) for e in self.extensions}
        if self.editable_mode or self.inplace:  # compile only what the source tree lacks
            self.extensions = [e for e in self.extensions if not self._in_source(e.name).exists()]
        if not self.extensions:
            return
        try:
            self.extensions = cythonize(
                self.extensions,
                compiler_directives=DIRECTIVES,
                build_dir=os.path.join(self.build_temp, "cython"),
                nthreads=int(self.parallel or 0),
                quiet=True,
            )
        except Exception as e:  # a Cython that cannot compile a module: the build stays pure Python
            _warn(f"Cython failed ({e})")
            self.extensions = []
            return
        for ext in self.extensions:
            ext.extra_compile_args = [*ext.extra_compile_args, *CFLAGS]
        super().run()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # no compiler, no Python headers: that module stays Python
            _warn(f"{ext.name} not compiled ({e})")

    def get_output_mapping(self) -> dict[str, str]:
        if not (self.editable_mode or self.inplace):
            return {}
        return {
            self.get_ext_fullpath(e.name): str(self._in_source(e.name))
            for e in self.extensions
            if e.name in self.digests
        }

    def copy_extensions_to_source(self) -> None:
        for regular, inplace in self.get_output_mapping().items():
            if not os.path.exists(regular):
                continue
            target = Path(inplace)
            target.parent.mkdir(parents=True, exist_ok=True)
            module = target.name[: -len(compiled.SUFFIX)].rpartition(".")[0]
            for old in target.parent.glob(f"{module}.*{compiled.SUFFIX}"):
                if old != target and old.name[: -len(compiled.SUFFIX)].rpartition(".")[0] == module:
                    old.unlink()  # the same module compiled from an older source
            shutil.copyfile(regular, f"{target}.tmp")
            os.replace(f"{target}.tmp", target)  # a running process keeps the file it mapped


setup(
    ext_modules=[Extension(m[:-3].replace("/", "."), [m], optional=True) for m in compiled.MODULES],
    cmdclass={"build_ext": BuildCompiled},
)
