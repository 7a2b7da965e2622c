"""The test harness: the real stack and single services as processes, HTTPS origins, small helpers.

tests/conftest.py re-exports every name here and the fixtures of ``harness.fixtures``, so test
modules keep importing from ``conftest`` (``from conftest import Stack, free_port, ...``); new code
may import from ``harness`` directly. Modules: ``util`` (ports, temp dirs, polling, configs,
processes), ``stack`` (``Stack``, ``ServiceProcess``, ``run_service``, ``stack_cli``), ``tls``
(``start_https_origin``, ``https_origin``), ``origin`` (``plain_origin``, ``ReachedHandler``), ``fixtures`` (``make_stack``, ``service_runner``,
``short_tmp``, ``origin_ca``, ``origin_ca_file``).
"""

from .origin import ReachedHandler, plain_origin
from .stack import ServiceProcess, Stack, StackError, run_service, stack_cli
from .tls import TlsHttpServer, https_origin, start_https_origin
from .util import (
    LISTENER_NAMES,
    PYTHON,
    REPO,
    base_config,
    deep_merge,
    descendants,
    free_port,
    free_ports,
    pid_alive,
    service_env,
    short_tmpdir,
    wait_for,
    write_config,
)

__all__ = [
    "LISTENER_NAMES",
    "PYTHON",
    "REPO",
    "ReachedHandler",
    "ServiceProcess",
    "Stack",
    "StackError",
    "TlsHttpServer",
    "base_config",
    "deep_merge",
    "descendants",
    "free_port",
    "free_ports",
    "plain_origin",
    "https_origin",
    "pid_alive",
    "run_service",
    "service_env",
    "short_tmpdir",
    "stack_cli",
    "start_https_origin",
    "wait_for",
    "write_config",
]
