"""Connecting upstream: async DNS, the guard on every resolved address, clear failure kinds."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

from .conn import Conn


class UpstreamFailure(Exception):
    """Why an allowed connection could not reach its destination."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # 'dns' | 'refused' | 'unreachable' | 'network' | 'timeout' | 'guard'


async def connect(host: str, port: int, timeout: float, guard: Callable[[str, int], bool]) -> Conn:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout)
    except asyncio.TimeoutError:
        raise UpstreamFailure("timeout", f"DNS lookup for {host} timed out") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise UpstreamFailure("dns", f"DNS lookup for {host} failed: {exc}") from None
    if not infos:
        raise UpstreamFailure("dns", f"no address for {host}")
    last: UpstreamFailure | None = None
    for family, stype, proto, _canon, addr in infos:
        ip = addr[0]
        if guard(ip, port):
            # A name that resolves onto our own listeners: refuse like a direct request.
            raise UpstreamFailure("guard", f"{host}:{port} resolves to this proxy's own listener")
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise UpstreamFailure("timeout", f"connecting to {host}:{port} timed out")
        try:
            _t, conn = await asyncio.wait_for(
                loop.create_connection(Conn, ip, addr[1]), remaining)
            sock = _t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            return conn
        except asyncio.TimeoutError:
            last = UpstreamFailure("timeout", f"connecting to {host}:{port} timed out")
        except ConnectionRefusedError:
            last = UpstreamFailure("refused", f"connection to {host}:{port} refused")
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EAFNOSUPPORT):
                last = UpstreamFailure("network", f"network unreachable for {host}:{port}")
            elif exc.errno == errno.ECONNREFUSED:
                last = UpstreamFailure("refused", f"connection to {host}:{port} refused")
            else:
                last = UpstreamFailure("unreachable", f"cannot reach {host}:{port}: {exc.strerror or exc}")
    assert last is not None
    raise last
