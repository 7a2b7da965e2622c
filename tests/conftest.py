"""Shared helpers and fixtures for the whole suite; they live in the ``tests/harness`` package.

Plain helpers (import them with ``from conftest import free_port, Stack, ...``, or from
``harness``; pytest puts ``tests/`` on ``sys.path`` because the test folders are not packages):

- ``free_port()`` / ``free_ports(n)`` -- unused TCP ports on 127.0.0.1.
- ``short_tmpdir(prefix)`` -- a fresh dir directly under /tmp (ipc:// paths must stay < ~100 bytes).
- ``wait_for(fn, timeout, ...)`` -- poll ``fn()`` until it returns something truthy.
- ``write_config(path, overrides, ports)`` -- a YAML config on the given ports, overrides deep-merged.
- ``service_env(data_dir, **extra)`` -- os.environ minus our GREYPROXY_* variables, repo on PYTHONPATH.
- ``Stack`` -- the whole stack (``greyproxy serve``) on free ports in a private data dir.
- ``intercepting_stack(overrides, upstream_ca_file, allow, env)`` -- a started ``Stack`` with its
  interception CA, trusting the origins' CA, allowing ``* -> host`` for each host of ``allow``.
- ``run_service(name, cfg_path, env)`` -- one ``greyproxy run <name>`` process (``ServiceProcess``).
- ``pid_alive(pid)`` / ``descendants(pid)`` -- process inspection through /proc.
- ``start_https_origin(ca, host, handler)`` -- an HTTPS origin (``TlsHttpServer``) with a trustme cert;
  ``https_origin(...)`` is the same as a context manager yielding the port;
  ``server_context(ca, host)`` the TLS context alone (for ``websocket_origin(..., ssl=...)``).
- ``stack_cli(stack, *args)`` -- ``greyproxy <args> -C <stack config>`` with the stack's env.
- ``plain_origin(handler, host)`` -- a threaded HTTP origin for a ``with`` block (yields the port);
  handlers ``ReachedHandler`` / ``HelloHandler`` / ``PathHandler`` / ``JsonEchoHandler``, or a
  subclass of ``OriginHandler`` (its ``reply(body, content_type, status, **headers)``);
  ``websocket_origin(handler, host, ssl)`` a WebSocket one; ``echo_origin(host, banner)`` a TCP echo
  server (the banner sent first).
- ``curl_proxy(stack, url, user, password, *curl_options)`` -- curl through the stack's HTTP proxy:
  (status code, response head); ``proxy_url(stack, user, password)`` the proxy's URL.
- ``curl(*args, timeout)`` -- ``curl -s -S --max-time T <args>``: (exit code, stdout, stderr).
- ``proxy_connect(stack, user, target)`` -- a socket that sent ``CONNECT target`` to the proxy.
- ``examples(n)`` (``from harness.fuzz import examples``) -- a property test's ``max_examples``:
  n under ``HYPOTHESIS_PROFILE=ci-deep``, a quarter (at least 25) in the everyday run.
- ``add_rule(stack, **body)`` -- POST /api/rules, asserting 201; ``log_entries(stack, container)``;
  ``wait_log_entry(stack, container)`` the newest entry of exactly that container, waited for.

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

from typing import Any

import pytest

from harness import (  # noqa: F401 - re-exported for `from conftest import ...`
    LISTENER_NAMES,
    PYTHON,
    REPO,
    HelloHandler,
    JsonEchoHandler,
    OriginHandler,
    PathHandler,
    ReachedHandler,
    ServiceProcess,
    Stack,
    StackError,
    TlsHttpServer,
    add_rule,
    base_config,
    curl,
    curl_proxy,
    deep_merge,
    descendants,
    echo_origin,
    free_port,
    free_ports,
    https_origin,
    intercepting_stack,
    log_entries,
    wait_log_entry,
    pid_alive,
    plain_origin,
    proxy_connect,
    proxy_url,
    run_service,
    server_context,
    service_env,
    short_tmpdir,
    stack_cli,
    start_https_origin,
    wait_for,
    websocket_origin,
    write_config,
)
from harness.fixtures import make_stack, origin_ca, origin_ca_file, service_runner, short_tmp  # noqa: F401 - fixtures
from harness.fuzz import register_profiles

# Property tests run a quarter of their examples unless HYPOTHESIS_PROFILE=ci-deep (harness/fuzz.py).
register_profiles()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:  # noqa: ARG001
    """A stack test that failed gets the tail of its stack's logs in its report ("stack logs"): a
    failure seen once (a timeout under load) can then be read without running it again."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        stacks = [value] if isinstance(value, Stack) else getattr(value, "stacks", None)  # (make_stack's)
        for i, stack in enumerate(stacks if isinstance(stacks, list) else ()):
            try:
                text = stack.logs(80)
            except Exception as exc:  # noqa: BLE001 - the report must not fail for the logs' sake
                text = f"(logs unavailable: {exc})"
            report.sections.append((f"stack logs ({name}{f' {i}' if i else ''})", text))
