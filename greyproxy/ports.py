"""Binding a listening port that may be busy: a listening program refuses at once, lingering connections wait.

The default ports (43080, 43051-43053) lie inside Linux's ephemeral range (32768-60999), so an
outbound connection may have used one as its local port. Once closed, such a connection sits
in TIME_WAIT for up to a minute, and if its socket was bound without SO_REUSEADDR our listener
cannot bind the port until it is gone, although nothing listens there. That is worth waiting
for; a program listening on the port is not. Which of the two holds a port is read from
/proc/net/{tcp,tcp6,udp,udp6} (the socket's state and inode), and the program from the
/proc/<pid>/fd link to that inode when we may read it. Without /proc a TCP connect() tells
whether something listens.

One module for `greyproxy serve` (before supervisord starts) and for the services' own binds
(a restarted program, or a race with a connection that closed just now).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LINGER_WAIT = 65.0  # TIME_WAIT lasts 60 s on Linux (TCP_TIMEWAIT_LEN); a little more for the timer's slack
RETRY_INTERVAL = 0.25
PROC = Path("/proc")
TCP_LISTEN = "0A"
# /proc/net/tcp's st column (include/net/tcp_states.h)
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
    "0C": "NEW_SYN_RECV",
}
MAX_COMMAND = 200

log = logging.getLogger("greyproxy.ports")


@dataclass(frozen=True)
class Holder:
    """One socket on the port, as /proc/net shows it."""

    address: str  # the local address, e.g. "127.0.0.1" or "::"
    state: str  # "LISTEN", "TIME_WAIT", ..., or "BOUND" for a UDP socket
    inode: int  # 0 for a TIME_WAIT socket: no process owns it any more
    pid: int | None = None
    command: str | None = None

    @property
    def listening(self) -> bool:
        """A program's socket that will not go away by itself (a TCP listener, any UDP socket)."""
        return self.state in ("LISTEN", "BOUND")

    def describe(self) -> str:
        if self.pid is None:
            who = "a program this user cannot see in /proc (another user's?)"
        else:
            who = f"pid {self.pid}" + (f" ({self.command})" if self.command else "")
        return who


class PortError(OSError):
    """A port we cannot listen on; str() is the whole message (no "[Errno 98]")."""

    def __str__(self) -> str:
        return str(self.strerror)


class PortBusy(PortError):
    """The port is held by a program listening on it: refused at once, naming the program."""

    def __init__(self, what: str, host: str, port: int, holders: list[Holder], reason: str) -> None:
        self.what, self.host, self.port, self.holders = what, host, port, holders
        named = "; ".join(dict.fromkeys(h.describe() for h in holders)) or "a program (not named: /proc not readable)"
        super().__init__(
            errno.EADDRINUSE,
            f"{what}: {host or '*'}:{port} is in use by a listening program: {named}"
            + (f" ({reason})" if reason else ""),
        )


class PortLingering(PortError):
    """Still not bindable after the wait for lingering connections."""


# ----------------------------------------------------------------------------- reading /proc


def _parse_address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))  # one little-endian 32-bit word
    # IPv6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(words)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def parse_proc_net(text: str, port: int, udp: bool) -> list[Holder]:
    """The sockets on local `port` in one /proc/net/{tcp,tcp6,udp,udp6} table (text)."""
    out: list[Holder] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[1]:
            continue
        hex_addr, _, hex_port = fields[1].rpartition(":")
        try:
            if int(hex_port, 16) != port:
                continue
            address = _parse_address(hex_addr)
            inode = int(fields[9])
        except ValueError:
            continue
        state = "BOUND" if udp else TCP_STATES.get(fields[3].upper(), fields[3])
        out.append(Holder(address, state, inode))
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def socket_owners(inodes: Iterable[int], proc: Path = PROC) -> dict[int, tuple[int, str | None]]:
    """{inode: (pid, command)} for the sockets we may see (our user's processes, or all as root)."""
    wanted = {f"socket:[{i}]": i for i in inodes if i}
    found: dict[int, tuple[int, str | None]] = {}
    if not wanted:
        return found
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(proc / pid / "fd")
        except OSError:
            continue  # gone, or not ours
        for fd in fds:
            try:
                link = os.readlink(proc / pid / "fd" / fd)
            except OSError:
                continue
            inode = wanted.get(link)
            if inode is not None and inode not in found:
                found[inode] = (int(pid), _command(proc / pid))
        if len(found) == len(wanted):
            break
    return found


def _command(pid_dir: Path) -> str | None:
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return None
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return text[:MAX_COMMAND] + ("…" if len(text) > MAX_COMMAND else "") if text else None


def _compatible(ours: str, theirs: str) -> bool:
    """Could a socket bound to `theirs` conflict with our bind of `ours`? (a wildcard meets everything)"""
    wild = ("", "0.0.0.0", "::")
    return ours in wild or theirs in wild or ours == theirs or (ours == "localhost" and theirs in ("127.0.0.1", "::1"))


def holders(host: str, port: int, kind: int = socket.SOCK_STREAM, proc: Path = PROC) -> list[Holder] | None:
    """The sockets that may hold host:port (named where /proc lets us); None when /proc/net is unreadable."""
    udp = kind == socket.SOCK_DGRAM
    tables = ("udp", "udp6") if udp else ("tcp", "tcp6")
    texts = [t for t in (_read(proc / "net" / name) for name in tables) if t is not None]
    if not texts:
        return None
    found = [h for t in texts for h in parse_proc_net(t, port, udp) if _compatible(host, h.address)]
    owners = socket_owners((h.inode for h in found if h.listening), proc)
    return [Holder(h.address, h.state, h.inode, *owners.get(h.inode, (None, None))) for h in found]


def _something_listens(host: str, port: int) -> bool:
    """Without /proc: does a TCP connect to the port succeed?"""
    target = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
    try:
        with socket.create_connection((target, port), timeout=1.0):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class Verdict:
    """Why a bind failed: `listening` (refuse now) or not (connections linger: wait)."""

    listening: bool
    holders: list[Holder]
    lingering: int  # non-listening TCP sockets on the port (TIME_WAIT and the like)


def diagnose(host: str, port: int, kind: int = socket.SOCK_STREAM, proc: Path = PROC) -> Verdict:
    found = holders(host, port, kind, proc)
    if found is None:  # no /proc: a UDP bind conflict is always a program; for TCP, ask the port
        listening = kind == socket.SOCK_DGRAM or _something_listens(host, port)
        return Verdict(listening, [], 0 if listening else 1)
    programs = [h for h in found if h.listening]
    return Verdict(bool(programs), programs, len(found) - len(programs))


def try_bind(host: str, port: int, kind: int = socket.SOCK_STREAM) -> OSError | None:
    """Bind (and drop) a socket on host:port as the services do; the error, or None when it is free."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {exc}")
    family, _t, _p, _c, addr = infos[0]
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the services bind
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc
    return None


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEADDR (as asyncio's servers bind), not yet listening."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _c, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def is_in_use(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno == errno.EADDRINUSE or "address already in use" in str(exc).lower())


def _lingering_message(what: str, host: str, port: int, verdict: Verdict, wait: float) -> str:
    n = verdict.lingering
    held = f"{n} closed connection{'s' if n != 1 else ''} (TIME_WAIT)" if n else "connections that are closing"
    return (
        f"{what}: {host or '*'}:{port} is held by {held}, not by a listening program; "
        f"waiting up to {wait:.0f} s for the port to come free"
    )


def wait_until_bindable(
    what: str,
    host: str,
    port: int,
    kind: int = socket.SOCK_STREAM,
    *,
    wait: float = LINGER_WAIT,
    say: Callable[[str], None] = print,
    proc: Path = PROC,
) -> None:
    """Return once host:port can be bound. PortBusy at once for a listening program; PortLingering
    when lingering connections still hold it after `wait` s (said once, through `say`, when waiting)."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        err = try_bind(host, port, kind)
        if err is None:
            return
        if not is_in_use(err):
            raise PortError(err.errno, f"{what}: cannot listen on {host or '*'}:{port}: {err.strerror or err}")
        verdict = diagnose(host, port, kind, proc)
        if verdict.listening:
            raise PortBusy(what, host, port, verdict.holders, "")
        if time.monotonic() >= deadline:
            raise PortLingering(
                errno.EADDRINUSE,
                f"{what}: {host or '*'}:{port} is still in use after {wait:.0f} s (connections on it did not close)",
            )
        if not said:
            say(_lingering_message(what, host, port, verdict, wait))
            said = True
        time.sleep(RETRY_INTERVAL)


async def bind_retrying(
    bind: Callable[[], Awaitable[T]],
    what: str,
    host: str,
    port: int,
    kinds: tuple[int, ...] = (socket.SOCK_STREAM,),
    *,
    wait: float = LINGER_WAIT,
    logger: logging.Logger = log,
) -> T:
    """Run an async bind (a server start); on "address in use" by lingering connections, retry until
    `wait` s have passed (logged once). A listening program raises PortBusy naming it, at once.
    `kinds`: the socket types the bind makes (the DNS proxy: UDP and TCP)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    said = False
    while True:
        try:
            return await bind()
        except OSError as exc:
            if not is_in_use(exc):
                raise
            verdict = await loop.run_in_executor(None, _diagnose_all, host, port, kinds)
            if verdict.listening:
                raise PortBusy(what, host, port, verdict.holders, str(exc)) from exc
            if loop.time() >= deadline:
                raise
            if not said:
                logger.warning("%s", _lingering_message(what, host, port, verdict, wait))
                said = True
            await asyncio.sleep(RETRY_INTERVAL)


def _diagnose_all(host: str, port: int, kinds: tuple[int, ...]) -> Verdict:
    verdicts = [diagnose(host, port, kind) for kind in kinds]
    return Verdict(
        any(v.listening for v in verdicts), [h for v in verdicts for h in v.holders], sum(v.lingering for v in verdicts)
    )
