"""CURVE on every tcp:// bus endpoint (SPEC §15): authenticated and encrypted, peers by known key.

Keys live in the keys directory (bus.keysDir, default <data dir>/keys):

- ``bus.key_secret`` — this host's key pair (ZeroMQ certificate format, 0600), made on first use;
  ``bus.key`` — its public half, to copy to the other host (``greyproxy keys``).
- ``authorized/*.key`` — the public keys allowed to connect to this host's tcp:// endpoints
  (``greyproxy keys allow NAME KEY``); this host's own key is always allowed. Read at each
  connection, so a key added or removed takes effect without a restart.

A socket that binds a tcp:// endpoint is a CURVE server: a ZAP handler (pyzmq's
ThreadAuthenticator, one per ZeroMQ context) checks the connecting peer's public key and refuses
an unknown one, logging the refusal (a warning naming the key). A peer that fails the handshake
before any key check (no CURVE at all, or sealed for another server key) is logged too, from the
bound socket's ZeroMQ monitor (`_HandshakeWatch`). A socket that connects to a
tcp:// endpoint is a CURVE client with this host's key pair and the server's public key:
bus.serverKey (the central host's), or this host's own when empty (one host on tcp loopback),
or a key given per connection (a proxy's control endpoint, announced in its heartbeat).
ipc:// endpoints stay as they are: the file's permissions (0600) guard them.
"""

from __future__ import annotations

import logging
import os
import shlex
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from greyproxy.config import ConfigError
from greyproxy.throttle import Throttle

log = logging.getLogger("greyproxy.bus.curve")

KEY_FILE = "bus.key"
SECRET_FILE = "bus.key_secret"
AUTHORIZED_DIR = "authorized"
ZAP_DOMAIN = b"greyproxy"


class CurveError(ConfigError):
    """Keys missing or malformed (said with the file's path): a configuration error, said in one
    line by every command (greyproxy/cli.py)."""


def _cert_text(public: bytes, secret: bytes | None) -> str:
    lines = [
        "#   ZeroMQ CURVE certificate (greyproxy keys)",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def read_cert(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a certificate file (or a bare z85 public key)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CurveError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CurveError(f"{path}: not a CURVE certificate (not text)") from None
    public = secret = None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep:
            continue
        value = value.strip().strip('"').strip("'")
        if key.strip() == "public-key":
            public = value.encode()
        elif key.strip() == "secret-key":
            secret = value.encode()
    if public is None and len(text.strip()) == 40:
        public = text.strip().encode()
    if public is None or len(public) != 40 or (secret is not None and len(secret) != 40):
        raise CurveError(f"{path}: not a CURVE certificate (want 40-character z85 keys)")
    return public, secret


def check_public_key(key: str) -> bytes:
    key = key.strip()
    try:
        if len(key) != 40 or len(z85.decode(key.encode())) != 32:
            raise ValueError
    except (ValueError, KeyError, struct.error):
        raise CurveError(f"{key[:60]!r} is not a CURVE public key (40 characters of z85)") from None
    return key.encode()


def ensure_keypair(keys_dir: Path) -> tuple[bytes, bytes]:
    """This host's key pair, made on first use. Safe when several processes start at once: the
    first file linked into place wins and everyone reads that one. A keys directory that cannot be
    made or read (a file in its place, no permission) is a CurveError naming it."""
    try:
        return _ensure_keypair(keys_dir)
    except OSError as exc:
        where = exc.filename or keys_dir
        raise CurveError(f"keys directory {keys_dir}: {where}: {exc.strerror or exc}") from None


def _ensure_keypair(keys_dir: Path) -> tuple[bytes, bytes]:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (keys_dir / AUTHORIZED_DIR).mkdir(exist_ok=True, mode=0o700)
    secret_path = keys_dir / SECRET_FILE
    if not secret_path.exists():
        new_public, new_secret = zmq.curve_keypair()
        tmp = keys_dir / f".{SECRET_FILE}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_cert_text(new_public, new_secret))
        try:
            os.link(tmp, secret_path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    mode = secret_path.stat().st_mode & 0o777
    if mode & 0o077:  # a copy or an edit left it readable by others: this host's identity on the bus
        try:
            os.chmod(secret_path, 0o600)
            log.warning("%s was readable by others (mode %03o): made 0600", secret_path, mode)
        except OSError as exc:
            log.warning("%s is readable by others (mode %03o) and could not be made 0600: %s", secret_path, mode, exc)
    public, maybe_secret = read_cert(secret_path)
    if maybe_secret is None:
        raise CurveError(f"{secret_path}: has no secret-key")
    secret = maybe_secret
    try:
        derived = zmq.curve_public(secret)
    except (zmq.ZMQError, ValueError) as exc:
        raise CurveError(f"{secret_path}: its secret-key is not a CURVE key ({exc})") from None
    if derived != public:
        # Else every peer would fail the handshake, and both sides would blame bus.serverKey.
        raise CurveError(
            f"{secret_path}: its secret-key does not belong to its public-key (the file was edited or"
            " pieced together from two key pairs); move it away and run `greyproxy keys` for a new pair"
        )
    pub_path = keys_dir / KEY_FILE
    if not pub_path.exists() or read_cert(pub_path)[0] != public:
        tmp = keys_dir / f".{KEY_FILE}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(_cert_text(public, None))
        os.chmod(tmp, 0o644)
        os.replace(tmp, pub_path)
    return public, secret


def authorized_entries(keys_dir: Path) -> list[tuple[str, bytes]]:
    """Every authorized key file as (name, public key), by name: one key may be under two names."""
    out: list[tuple[str, bytes]] = []
    folder = keys_dir / AUTHORIZED_DIR
    for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
        try:
            out.append((path.stem, read_cert(path)[0]))
        except CurveError as exc:
            _bad_entry(path, str(exc))
    return out


_BAD_SAID: dict[tuple[str, int, int], None] = {}  # (path, mtime, size) of the bad entries logged


def _bad_entry(path: Path, why: str) -> None:
    """Log an authorized key file that is no key, once per version of the file: the directory is
    read at every connecting peer and every heartbeat (several times a second), and a line each
    time would flood the log for as long as the file stays."""
    try:
        st = path.stat()
        seen = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        seen = (str(path), 0, 0)
    if seen in _BAD_SAID:
        return
    if len(_BAD_SAID) >= 1024:
        _BAD_SAID.clear()
    _BAD_SAID[seen] = None
    log.warning("ignoring authorized key: %s (said once until the file changes)", why)


def authorized_keys(keys_dir: Path) -> dict[bytes, str]:
    """Allowed public key -> its name (the file's stem; the first by name when it has several)."""
    out: dict[bytes, str] = {}
    for name, key in authorized_entries(keys_dir):
        out.setdefault(key, name)
    return out


REFUSAL_LOG_EVERY = 60.0  # seconds between log lines about one refused peer (key, or endpoint and reason)


class _KeyCheck:
    """The ZAP callback of one bound endpoint: is this client's key ours or authorized? A refusal
    is logged, naming the endpoint: the first of each key at once, then at most one line per key
    every REFUSAL_LOG_EVERY seconds with the count since (greyproxy/throttle.py)."""

    def __init__(self, keys_dir: Path, own: bytes, where: str) -> None:
        self.keys_dir = keys_dir
        self.own = own
        self.where = where
        self.refused = 0
        self._throttle = Throttle(REFUSAL_LOG_EVERY)

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.own:
            return True
        name = authorized_keys(self.keys_dir).get(key)
        if name is not None:
            log.debug("bus peer with key %s (%s) allowed", key.decode(), name)
            with _State.lock:
                _State.admitted.add(key)
            return True
        self.refused += 1
        since = self._throttle.since(key)
        if since is not None:
            log.warning(
                "refused a bus peer on %s: its CURVE key %s is not in %s%s",
                self.where,
                key.decode(),
                self.keys_dir / AUTHORIZED_DIR,
                since,
            )
        return False


class _HandshakeWatch:
    """Handshakes that fail before the key check, said by the process that bound the endpoint.

    ZeroMQ ends them without calling ZAP: a peer with no CURVE at all (mechanism mismatch) or one
    whose HELLO is sealed for another server key (a cryptographic error). Each CURVE server socket
    gets a monitor (`zmq_socket_monitor` over inproc); one daemon thread per process reads them all
    and logs a warning naming the endpoint and what the peer got wrong: the first of each
    (endpoint, reason) at once, then at most one line every REFUSAL_LOG_EVERY seconds with the
    count since. The monitor's events carry no peer address (ZeroMQ gives only the accepted file
    descriptor, closed by the time a thread could read it)."""

    EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_MONITOR_STOPPED
    REASONS: dict[int, str] = {
        int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "it does not use CURVE (a peer without bus keys configured?)",
        int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): (
            "its CURVE handshake is sealed for another server key (its bus.serverKey is not this host's"
            " public key: `greyproxy keys` here prints it)"
        ),
    }

    def __init__(self) -> None:
        self._new: list[tuple[zmq.Context, str, str]] = []  # (context, inproc address, endpoint) to connect
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}  # one per ZeroMQ context (as the authenticators)
        self._throttle = Throttle(REFUSAL_LOG_EVERY)
        self.failed = 0

    def watch(self, sock: zmq.Socket, endpoint: str) -> None:
        """Start monitoring `sock` (a CURVE server, before it binds `endpoint`); its context's
        watcher thread reads the events from then on. Called on the socket's own thread."""
        ctx = sock.context
        addr = f"inproc://greyproxy.curve.monitor.{os.getpid()}.{id(sock)}"
        sock.monitor(addr, self.EVENTS)
        with self._lock:
            self._new.append((ctx, addr, endpoint))
            thread = self._threads.get(id(ctx))
            if thread is None or not thread.is_alive():
                thread = threading.Thread(target=self._run, args=(ctx,), name="curve-handshakes", daemon=True)
                self._threads[id(ctx)] = thread
                thread.start()

    def _run(self, ctx: zmq.Context) -> None:
        from zmq.utils.monitor import parse_monitor_message

        sync = zmq.Context.shadow(ctx.underlying)  # plain sockets on this thread, whatever ctx's kind
        poller = zmq.Poller()
        where: dict[zmq.Socket, str] = {}
        try:
            while True:
                with self._lock:
                    mine = [n for n in self._new if n[0] is ctx]
                    self._new = [n for n in self._new if n[0] is not ctx]
                for _ctx, addr, endpoint in mine:
                    pair = sync.socket(zmq.PAIR)
                    pair.setsockopt(zmq.LINGER, 0)
                    pair.connect(addr)
                    poller.register(pair, zmq.POLLIN)
                    where[pair] = endpoint
                for pair, _ in poller.poll(500):
                    event = parse_monitor_message(pair.recv_multipart())
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:  # the socket was closed
                        poller.unregister(pair)
                        where.pop(pair, None)
                        pair.close(linger=0)
                    else:
                        self.failed_handshake(where.get(pair, "?"), event["value"])
        except zmq.ContextTerminated:  # the process is ending: its context waits for these sockets
            pass
        finally:
            for pair in where:
                pair.close(linger=0)

    def failed_handshake(self, endpoint: str, code: int) -> None:
        self.failed += 1
        reason = self.REASONS.get(code)
        if reason is None:
            name = next((n for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_") and getattr(zmq, n) == code), hex(code))
            reason = f"ZeroMQ protocol error {name.removeprefix('PROTOCOL_ERROR_')}"
        since = self._throttle.since((endpoint, reason))
        if since is not None:
            log.warning(
                "refused a bus peer on %s: its handshake failed before any key check: %s%s", endpoint, reason, since
            )


class _State:
    servers: list[tuple[Any, str]] = []  # (weak reference to a socket that binds a tcp:// endpoint, the endpoint)
    authorized_seen: frozenset[bytes] | None = None  # the authorized keys at the last look (`revoked`)
    admitted: set[bytes] = set()  # authorized keys a peer connected with since (`revoked`): our own not counted
    keys_dir: Path | None = None
    public: bytes | None = None
    secret: bytes | None = None
    server_key: bytes | None = None
    authenticators: dict[int, Any] = {}
    checks: list[_KeyCheck] = []
    handshakes = _HandshakeWatch()
    lock = threading.Lock()


def configured() -> bool:
    return _State.keys_dir is not None


def configure(keys_dir: Path | None, server_key: str = "") -> None:
    """Called once per process (every `greyproxy run`) with bus.keysDir and bus.serverKey: from then
    on each tcp:// socket this process opens is a CURVE one."""
    _State.keys_dir = keys_dir
    _State.public = _State.secret = None
    _State.server_key = check_public_key(server_key) if server_key else None
    with _State.lock:
        _State.authorized_seen = None
        _State.admitted = set()


def _keys() -> tuple[bytes, bytes]:
    if _State.keys_dir is None:
        raise CurveError("a tcp:// bus endpoint needs CURVE keys, and no keys directory is configured")
    if _State.public is None:
        _State.public, _State.secret = ensure_keypair(_State.keys_dir)
    assert _State.secret is not None
    return _State.public, _State.secret


def public_key() -> str | None:
    """This process's public key (z85) when CURVE is configured, else None."""
    if _State.keys_dir is None:
        return None
    return _keys()[0].decode()


def _authenticator(sock: zmq.Socket, endpoint: str) -> bytes:
    """The ZAP domain for a socket that binds `endpoint`: one authenticator thread per ZeroMQ
    context, one domain (and key check) per endpoint, so that a refusal names the endpoint the
    peer came to."""
    ctx = sock.context
    domain = ZAP_DOMAIN + b" " + endpoint.encode()
    with _State.lock:
        auth = _State.authenticators.get(id(ctx))
        if auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(ctx, log=logging.getLogger("greyproxy.bus.zap"))
            auth.start()
            _State.authenticators[id(ctx)] = auth
        if domain.decode() not in auth.credentials_providers:
            check = _KeyCheck(_State.keys_dir, _keys()[0], endpoint)  # type: ignore[arg-type]
            auth.configure_curve_callback(domain.decode(), credentials_provider=check)
            _State.checks.append(check)
    return domain


def secure(sock: zmq.Socket, endpoint: str, *, server: bool, server_key: str | bytes | None = None) -> None:
    """Make `sock` a CURVE server (it will bind) or client (it will connect) when `endpoint` is tcp://."""
    if not endpoint.startswith("tcp://") or _State.keys_dir is None:
        return  # ipc://; or a library user (tests in one process) that did not configure CURVE
    public, secret = _keys()
    if server:
        sock.setsockopt(zmq.ZAP_DOMAIN, _authenticator(sock, endpoint))
        with _State.lock:
            _State.servers.append((weakref.ref(sock), endpoint))
        _State.handshakes.watch(sock, endpoint)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    else:
        if isinstance(server_key, str):
            server_key = server_key.encode()
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_key or _State.server_key or public


def servers() -> list[tuple[zmq.Socket, str]]:
    """This process's open sockets that bind a tcp:// endpoint (CURVE servers), with it."""
    with _State.lock:
        live = [(ref(), ep) for ref, ep in _State.servers]
        live = [(sock, ep) for sock, ep in live if sock is not None and not sock.closed]
        _State.servers = [(weakref.ref(sock), ep) for sock, ep in live]
    return live


def revoked() -> bool:
    """Whether a key authorized at the last look is no longer (`greyproxy keys revoke`), or a key a
    peer connected with is no longer, for a process with CURVE servers. ZeroMQ checks a key when a
    peer connects, never after: a connection already open stays, so the caller binds its endpoints
    again (`rebind`), which ends every connection, and each peer's reconnection is checked anew
    (authorized ones reconnect at once). The keys peers connected with count too: a key allowed,
    used and revoked between two looks (a second apart) was never seen at a look, and its peer
    stayed connected (a stack test failed so, once in five runs)."""
    if _State.keys_dir is None or not servers():
        return False
    with _State.lock:
        admitted = set(_State.admitted)  # (before the files are read: one allowed after is not in it)
    now = frozenset(key for _name, key in authorized_entries(_State.keys_dir))
    with _State.lock:
        before, _State.authorized_seen = _State.authorized_seen, now
        gone = admitted - now
        _State.admitted -= gone  # (the revoked ones are refused when they connect again)
    return bool(gone) or (before is not None and bool(before - now))


def try_bind(sock: zmq.Socket, endpoint: str) -> bool:
    """Bind `endpoint` again after `sock.unbind(endpoint)` (which ends the connections made through
    it): False while the old listener is still being closed."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EADDRINUSE:
            raise
        return False
    return True


def rebind_blocking(sock: zmq.Socket, endpoint: str, timeout: float = 5.0) -> None:
    """Unbind, then bind again (for a thread that may wait: the bus broker's)."""
    sock.unbind(endpoint)
    deadline = time.monotonic() + timeout
    while not try_bind(sock, endpoint):
        if time.monotonic() > deadline:
            raise CurveError(f"could not bind {endpoint} again after a key was revoked")
        time.sleep(0.01)


async def rebind_all(why: str = "a key was revoked") -> None:
    """Every CURVE server socket of this (asyncio) process bound again: on its loop's thread, which
    owns them. Its peers reconnect through the key check."""
    import asyncio

    for sock, endpoint in servers():
        sock.unbind(endpoint)
        for _ in range(500):
            if try_bind(sock, endpoint):
                break
            await asyncio.sleep(0.01)
        else:
            log.error("could not bind %s again after %s", endpoint, why)
            continue
        log.warning("%s: the connections to %s ended; authorized peers connect again", why, endpoint)


def refused() -> int:
    """Peers refused so far in this process: by key (all its authenticators) and by a handshake
    that failed before the key check."""
    return sum(c.refused for c in _State.checks) + _State.handshakes.failed


def diagnose(
    endpoint: str,
    server_key: str | bytes | None = None,
    timeout: float = 2.0,
    name: str = "NAME",
    kind: int = zmq.DEALER,
) -> str | None:
    """Why a tcp:// endpoint does not answer, from the connection's own events (a ZeroMQ socket
    monitor), in words for the person who set the keys up; None when the CURVE handshake succeeds
    (the transport is fine: the service behind it is what does not answer) or for an ipc:// one.

    `kind` is a socket type the endpoint's own accepts (DEALER for a control endpoint's ROUTER,
    SUB for the bus's XPUB): ZeroMQ ends a handshake between mismatched types as it ends one with
    the wrong key. Blocking (its own context, up to `timeout` seconds): call it off the event loop."""
    if not endpoint.startswith("tcp://") or _State.keys_dir is None:
        return None
    from zmq.utils.monitor import recv_monitor_message

    public = _keys()[0]
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    secure(sock, endpoint, server=False, server_key=server_key)
    monitor = sock.get_monitor_socket()
    connected = handshake_failed = False
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return None
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return (
                    f"{endpoint} refused this host's CURVE key {public.decode()}: on the host that"
                    f" serves it, run: greyproxy keys allow {name} {shlex.quote(public.decode())}"
                )
            if event == zmq.EVENT_CONNECTED:
                connected = True
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                handshake_failed = True
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()
    if connected or handshake_failed:
        # The server cannot read a HELLO sealed for another key, and drops the connection unanswered.
        return (
            f"{endpoint} accepts connections but the CURVE handshake never completes: bus.serverKey"
            " is probably not that host's public key (`greyproxy keys` there prints it)"
        )
    return f"nothing accepts connections at {endpoint}"
