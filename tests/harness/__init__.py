"""The test harness: the real stack and single services as processes, origins, clients, helpers.

tests/conftest.py re-exports every name here and the fixtures of ``harness.fixtures``, so test
modules keep importing from ``conftest`` (``from conftest import Stack, free_port, ...``); new code
may import from ``harness`` directly. Modules:

- ``util``: ports, temp dirs, polling, configs, processes;
- ``stack``: ``Stack``, ``intercepting_stack``, ``ServiceProcess``, ``run_service``, ``stack_cli``;
- ``tls``: ``start_https_origin``, ``https_origin``, ``server_context``;
- ``origin``: ``plain_origin``, ``websocket_origin``, ``echo_origin``, the handlers ``OriginHandler``,
  ``ReachedHandler``, ``HelloHandler``, ``PathHandler``, ``JsonEchoHandler``;
- ``clients``: ``curl``, ``curl_proxy``, ``proxy_url``, ``proxy_connect``,
  ``add_rule``, ``log_entries``, ``wait_log_entry``;
- ``fixtures``: ``make_stack``, ``service_runner``, ``short_tmp``, ``origin_ca``, ``origin_ca_file``;
- ``curve_peers``: ``curve_server`` (a CURVE server socket and three key pairs, in one process;
  import it from ``harness.curve_peers``).
"""

from .clients import add_rule, curl, curl_proxy, log_entries, proxy_connect, proxy_url, wait_log_entry
from .origin import (
    echo_origin,
    HelloHandler,
    JsonEchoHandler,
    OriginHandler,
    PathHandler,
    ReachedHandler,
    plain_origin,
    websocket_origin,
)
from .stack import ServiceProcess, Stack, StackError, intercepting_stack, run_service, stack_cli
from .tls import TlsHttpServer, https_origin, server_context, start_https_origin
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
    "HelloHandler",
    "JsonEchoHandler",
    "OriginHandler",
    "PathHandler",
    "ReachedHandler",
    "ServiceProcess",
    "Stack",
    "StackError",
    "TlsHttpServer",
    "add_rule",
    "base_config",
    "curl",
    "curl_proxy",
    "deep_merge",
    "descendants",
    "free_port",
    "free_ports",
    "log_entries",
    "wait_log_entry",
    "plain_origin",
    "echo_origin",
    "proxy_connect",
    "proxy_url",
    "https_origin",
    "intercepting_stack",
    "pid_alive",
    "run_service",
    "server_context",
    "service_env",
    "short_tmpdir",
    "stack_cli",
    "start_https_origin",
    "wait_for",
    "websocket_origin",
    "write_config",
]
