"""The suite's pytest fixtures (conftest.py imports them, so every test module sees them)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from .stack import ServiceProcess, Stack, run_service
from .util import short_tmpdir


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh dir directly under /tmp (short enough for ipc:// paths), removed afterwards."""
    path = short_tmpdir("gpt")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_stack() -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(proxy={"holdTimeout": 2})`` starts a healthy Stack (overrides are
    deep-merged into the config; ``timeout=`` and ``extra_args=`` go to ``Stack.start``).
    Every stack made is stopped at teardown; a stack that does not stop cleanly fails the test."""
    stacks: list[Stack] = []

    def factory(timeout: float = 20.0, extra_args: tuple[str, ...] = (), **overrides: Any) -> Stack:
        stack = Stack(overrides)
        stacks.append(stack)
        return stack.start(timeout=timeout, extra_args=extra_args)

    factory.stacks = stacks  # type: ignore[attr-defined]  # (a failed test's report shows their logs: conftest)
    yield factory
    errors = []
    for stack in stacks:
        try:
            stack.cleanup()
        except Exception as exc:  # noqa: BLE001 - clean up the others first, then fail
            errors.append(exc)
        else:
            shutil.rmtree(stack.root, ignore_errors=True)
    if errors:
        raise errors[0]


@pytest.fixture
def service_runner() -> Iterator[Callable[..., ServiceProcess]]:
    """``service_runner(name, cfg_path, env)``: run_service() whose processes are SIGKILLed
    (if still running) at teardown."""
    procs: list[ServiceProcess] = []

    def start(
        name: str,
        cfg_path: str | os.PathLike,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
    ) -> ServiceProcess:
        sp = run_service(name, cfg_path, env, log_path)
        procs.append(sp)
        return sp

    yield start
    for sp in procs:
        if sp.alive():
            with contextlib.suppress(Exception):
                sp.kill()


@pytest.fixture(scope="module")
def origin_ca() -> trustme.CA:
    """A trustme CA for a module's HTTPS origins (``harness.tls.https_origin``)."""
    return trustme.CA()


@pytest.fixture(scope="module")
def origin_ca_file(origin_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``origin_ca`` as a PEM file, for the stack's ``mitm.upstreamCaFile``."""
    path = tmp_path_factory.mktemp("origin-ca") / "origin-ca.pem"
    origin_ca.cert_pem.write_to_path(str(path))
    return path
