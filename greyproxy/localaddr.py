"""Whether an address is one of this machine's own: the hard guard's question (SPEC §2.3) when the
stack binds a wildcard address (`serve --host 0.0.0.0` or `::`), so that its listeners answer on
every address of the machine, not only on loopback and the configured hosts.

The kernel is asked, address by address, instead of keeping a list of interfaces: a UDP socket
connect()ed to an address takes as its own address the source the kernel would send from, and for
an address of this machine that is the address itself (Linux: a `local` route's source is its
destination; IPv6 source selection's first rule prefers the same address); for any other address
it is a different one. No packet is sent: a UDP connect only looks the route up, in the kernel,
and returns at once (it never waits on the network), so the answer is cheap enough to ask where
it is needed, and it follows addresses as they come and go (DHCP, a VPN, a container's bridge)
with nothing to keep current. Only the guard asks, and only for one of the stack's own ports
while it binds a wildcard address (`policy.judge.Guard.asks_kernel`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("greyproxy")

_PROBE_PORT = 9  # (discard: any port does, nothing is sent)


def is_local_address(ip: str) -> bool:
    """Whether `ip` (an IPv4 or IPv6 address, IPv4-mapped judged as its IPv4 address) is an address
    of this machine. An address the kernel cannot route to (unreachable, an IPv6 link-local one
    without its zone) cannot be connected to either: not local. When no socket can be made at all
    (file descriptors exhausted) the answer is True: the guard fails closed."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False  # not an address (a name is judged by the addresses it resolves to)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        # (numeric: parsed, never looked up; it keeps an IPv6 zone as the socket address's scope)
        sockaddr = socket.getaddrinfo(str(addr), _PROBE_PORT, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]
    except (OSError, UnicodeError):
        return False
    tries: list[Any] = [sockaddr]
    if addr.version == 6 and addr.is_link_local and len(sockaddr) == 4 and not sockaddr[3]:
        # A link-local address without its zone: the probe alone cannot route it (EINVAL), while a
        # connect may still reach it on an interface that has it. Asked on every interface.
        try:
            tries = [(str(addr), _PROBE_PORT, 0, index) for index, _name in socket.if_nameindex()]
        except OSError as exc:
            log.warning("cannot tell whether %s is a local address (%s): judged local", addr, exc)
            return True
    for target in tries:
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)  # (one per try: a failed connect spoils it)
        except OSError as exc:
            log.warning("cannot tell whether %s is a local address (%s): judged local", addr, exc)
            return True
        with sock:
            try:
                sock.connect(target)
                own = sock.getsockname()[0]
            except OSError:
                continue
        try:
            if ipaddress.ip_address(own.split("%", 1)[0]).packed == addr.packed:
                return True
        except ValueError:
            continue
    return False


def local_addresses(ips: Iterable[str]) -> list[str]:
    """Those of `ips` that are addresses of this machine (`is_local_address`), as given."""
    return [ip for ip in ips if is_local_address(ip)]
