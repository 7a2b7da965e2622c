"""Shared helpers and fixtures for the whole suite; they live in the ``tests/harness`` package.

Plain helpers (import them with ``from conftest import free_port, Stack, ...``, or from
``harness``; pytest puts ``tests/`` on ``sys.path`` because the test folders are not packages):

- ``free_port()`` / ``free_ports(n)`` -- unused TCP ports on 127.0.0.1.
- ``short_tmpdir(prefix)`` -- a fresh dir directly under /tmp (ipc:// paths must stay < ~100 bytes).
- ``wait_for(fn, timeout, ...)`` -- poll ``fn()`` until it returns something truthy.
- ``write_config(path, overrides, ports)`` -- a YAML config on the given ports, overrides deep-merged.
- ``service_env(data_dir, **extra)`` -- os.environ minus our GREYPROXY_* variables, repo on PYTHONPATH.
- ``Stack`` -- the whole stack (``greyproxy serve``) on free ports in a private data dir.
- ``run_service(name, cfg_path, env)`` -- one ``greyproxy run <name>`` process (``ServiceProcess``).
- ``pid_alive(pid)`` / ``descendants(pid)`` -- process inspection through /proc.
- ``start_https_origin(ca, host, handler)`` -- an HTTPS origin (``TlsHttpServer``) with a trustme cert;
  ``https_origin(...)`` is the same as a context manager yielding the port.
- ``stack_cli(stack, *args)`` -- ``greyproxy <args> -C <stack config>`` with the stack's env.

Fixtures (they always clean up, even when the test fails):

- ``make_stack(**overrides)`` -- start a ``Stack`` and wait until ``/api/health`` is 200.
- ``service_runner(name, cfg_path, env)`` -- ``run_service`` whose processes are killed at teardown.
- ``short_tmp`` -- a ``short_tmpdir()`` removed at teardown.
- ``origin_ca`` / ``origin_ca_file`` -- a module's trustme CA for HTTPS origins, and its PEM file
  (for ``mitm.upstreamCaFile``).

Every process is started with ``sys.executable`` (so any venv works) in its own session, with
the repo root as working directory and first on PYTHONPATH (so the tree under test is the
code that runs, not some other installed copy).
"""

from __future__ import annotations

from harness import (  # noqa: F401 - re-exported for `from conftest import ...`
    LISTENER_NAMES,
    PYTHON,
    REPO,
    ReachedHandler,
    ServiceProcess,
    Stack,
    StackError,
    TlsHttpServer,
    base_config,
    deep_merge,
    descendants,
    free_port,
    free_ports,
    https_origin,
    pid_alive,
    plain_origin,
    run_service,
    service_env,
    short_tmpdir,
    stack_cli,
    start_https_origin,
    wait_for,
    write_config,
)
from harness.fixtures import make_stack, origin_ca, origin_ca_file, service_runner, short_tmp  # noqa: F401 - fixtures
