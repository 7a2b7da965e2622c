"""The hard guard of a stack bound to a wildcard address (`serve --host 0.0.0.0`), through the real
stack: the API answers on every address of the machine then, and a client of the proxy must not
reach it (nor the proxies themselves) at the machine's non-loopback address either (SPEC §2.3: "on
any local address"). It gets the guard's refusal over HTTP, CONNECT and SOCKS5, the log says
blocked by the guard, explain says `guard`, and the API never sees the request (silent allow-all
stays off).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
from collections.abc import Callable

import pytest

from conftest import Stack, add_rule, log_entries, proxy_connect, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]


def _own_address() -> str | None:
    """A non-loopback address of this machine (the source the kernel picks towards a documentation
    address: a UDP connect sends nothing), or None."""
    for family, far in ((socket.AF_INET, "198.51.100.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((far, 9))
                ip = s.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    return None


def test_this_machines_address_on_our_ports_is_refused_when_bound_to_a_wildcard(
    make_stack: Callable[..., Stack],
) -> None:
    ip = _own_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    stack = make_stack(extra_args=("--host", "0.0.0.0" if ":" not in ip else "::"))
    add_rule(stack, container_pattern="*", destination_pattern="*", action="allow")
    api = stack.ports["api"]
    authority = f"[{ip}]:{api}" if ":" in ip else f"{ip}:{api}"
    # (the Host header the API accepts: the client chooses it, so the API's own check is no help)
    out = subprocess.run(
        [
            "curl", "-s", "--max-time", "10", "-w", "\n%{http_code}",
            "-x", f"http://wildsb@127.0.0.1:{stack.ports['http-proxy']}",
            "-H", f"Host: localhost:{api}", "-X", "POST", "-d", '{"mode":"allow"}',
            f"http://{authority}/api/allowall",
        ],
        capture_output=True, text=True, timeout=20,
    ).stdout  # fmt: skip
    assert out.endswith("\n403") and "one of Greyproxy's own listeners" in out, out
    with proxy_connect(stack, "wildsb", authority) as s:
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    socks = subprocess.run(
        [
            "curl", "-s", "--max-time", "10", "--socks5-hostname", f"wildsb:x@127.0.0.1:{stack.socks_port}",
            f"http://{authority}/api/health",
        ],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert socks.returncode == 97, socks  # curl: the SOCKS5 server refused the connection (0x02)
    assert stack.get("/api/allowall").json()["active"] is False

    def three() -> list[dict] | None:
        rows = [r for r in log_entries(stack, "wildsb") if r["container_name"] == "wildsb"]
        return rows if len(rows) >= 3 else None

    rows = wait_for(three, 10, message="three log entries")
    assert [(r["result"], r["reason"], r["rule_id"]) for r in rows] == [("blocked", "guard", None)] * 3, rows
    assert {r["method"] for r in rows} == {"HTTP", "CONNECT", "SOCKS5"}, rows
    for port in (api, stack.ports["http-proxy"]):
        explained = stack.get("/api/rules/explain", params={"container": "wildsb", "host": ip, "port": port}).json()
        assert explained["decision"] == "guard", explained
    # another port of the same address is no listener of ours: the rule decides it
    explained = stack.get("/api/rules/explain", params={"container": "wildsb", "host": ip, "port": 9}).json()
    assert explained["decision"] == "allow", explained
