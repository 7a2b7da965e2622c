"""The interception CA and the leaf certificates minted from it (SPEC §7, §7.1).

- The CA: ECDSA P-256, CN "Greyproxy CA", 10 years, CA with path length 0, random serial;
  `ca-cert.pem` (0644) and `ca-key.pem` (0600) in the data dir, each written atomically.
- Leaves: one per SNI host (an IP SAN for IP literals), ECDSA P-256, ~7 days backdated 1 h,
  served as leaf + CA, cached (LRU) as ready `ssl.SSLContext`s; the cache belongs to one CA.
- `CAWatcher` is the proxy's view: it reloads when both files were rewritten (stat poll) or on
  request, and keeps the old CA while the pair on disk is incomplete or mismatched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "BUNDLE_FILE",
    "CA_COMMON_NAME",
    "CAError",
    "CAExists",
    "CAWatcher",
    "CertAuthority",
    "LeafCache",
    "ca_bundle_path",
    "ca_paths",
    "ca_status",
    "generate_ca",
    "install_plan",
    "is_installed",
    "leaf_context",
    "load_ca",
    "mint_leaf",
    "system_ca_file",
    "uninstall_plan",
    "write_ca_bundle",
]

log = logging.getLogger("greyproxy.certs")

CA_COMMON_NAME = "Greyproxy CA"
CERT_FILE = "ca-cert.pem"
KEY_FILE = "ca-key.pem"
BUNDLE_FILE = "ca-bundle.pem"  # the system bundle + our CA, for runtimes that take one file (SPEC §14)
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=7)
BACKDATE = dt.timedelta(hours=1)  # tolerate clients whose clocks run a little behind
LEAF_CACHE_SIZE = 1024

# Where the OS trust stores take extra anchors (Linux) and the macOS system keychain.
DEBIAN_ANCHOR = Path("/usr/local/share/ca-certificates/greyproxy-ca.crt")
FEDORA_ANCHOR = Path("/etc/pki/ca-trust/source/anchors/greyproxy-ca.pem")
MACOS_KEYCHAIN = "/Library/Keychains/System.keychain"


class CAError(Exception):
    """The CA files are missing, unreadable or do not belong together."""


class CAExists(CAError):
    """A CA already exists and overwriting it was not asked for."""


@dataclass(frozen=True)
class CertAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, as `openssl x509 -fingerprint -sha256` prints it."""
        return ":".join(f"{b:02X}" for b in self.cert.fingerprint(hashes.SHA256()))

    @property
    def expires_at(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()


def ca_paths(data_dir: Path | str) -> tuple[Path, Path]:
    d = Path(data_dir)
    return d / CERT_FILE, d / KEY_FILE


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---------------------------------------------------------------------------- the CA


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a sibling temp file with its final mode, fsync, then rename over the target."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _keep_private(path: Path) -> None:
    """A private key readable by others (copied in, restored from a backup) is made 0600 again."""
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others; made it 0600", path)
    except OSError:
        pass


def _build_ca() -> CertAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Greyproxy"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAuthority(cert, key, cert.public_bytes(serialization.Encoding.PEM))


def generate_ca(data_dir: Path | str, force: bool = False) -> CertAuthority:
    """Create the CA in the data dir; CAExists when one is there and `force` is not given."""
    cert_path, key_path = ca_paths(data_dir)
    if not force and (cert_path.exists() or key_path.exists()):
        raise CAExists(f"a CA already exists in {cert_path.parent}")
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    ca = _build_ca()
    key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Key first: a watcher that sees the new cert with the old key keeps the old pair until both match.
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, ca.cert_pem, 0o644)
    write_ca_bundle(data_dir, ca.cert_pem)
    return ca


def load_ca(data_dir: Path | str) -> CertAuthority | None:
    """The CA on disk; None when neither file exists; CAError when they are unusable."""
    cert_path, key_path = ca_paths(data_dir)
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError:
        if not cert_path.exists() and not key_path.exists():
            return None
        raise CAError("only one of the CA files exists") from None
    except OSError as exc:
        raise CAError(f"cannot read the CA files: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"the CA files do not parse: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError("the CA key is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CAError("the CA key does not match the CA certificate")
    _keep_private(key_path)
    return CertAuthority(cert, key, cert.public_bytes(serialization.Encoding.PEM))


# ---------------------------------------------------------------------------- the bundle

# Where distributions keep the system's CA bundle (one PEM file), most common first.
_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL, CentOS
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # newer Fedora / RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, FreeBSD, Alpine
    "/usr/local/etc/openssl/cert.pem",  # Homebrew
)


def ca_bundle_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / BUNDLE_FILE


def system_ca_file() -> Path | None:
    """The system's CA bundle file, as OpenSSL was built to find it, else a known location, else
    certifi's. Environment variables (SSL_CERT_FILE...) are not read: after `greyproxy env` they
    point at our own bundle."""
    candidates = [ssl.get_default_verify_paths().openssl_cafile, *_SYSTEM_BUNDLES]
    for c in candidates:
        if c and os.path.isfile(c) and os.path.getsize(c) > 0:
            return Path(c)
    try:
        import certifi  # noqa: PLC0415 - optional

        return Path(certifi.where())
    except ImportError:
        return None


def bundle_bytes(ca_pem: bytes | None, system: Path | None = None) -> bytes:
    """The bundle's content: the system bundle, then our CA (when there is one)."""
    system = system_ca_file() if system is None else system
    parts = []
    if system is not None:
        try:
            data = system.read_bytes()
        except OSError as exc:
            log.warning("cannot read the system CA bundle %s: %s", system, exc.strerror or exc)
        else:
            parts.append(data if data.endswith(b"\n") else data + b"\n")
    if ca_pem:
        parts.append(b"# " + CA_COMMON_NAME.encode() + b" (greyproxy: HTTPS interception)\n" + ca_pem)
    return b"".join(parts)


def write_ca_bundle(data_dir: Path | str, ca_pem: bytes | None = None) -> Path:
    """Make `<data dir>/ca-bundle.pem` = system bundle + our CA, rewriting it only when its content
    would change (so a runtime reading it never sees a half-written file). `ca_pem` defaults to
    the CA on disk; without one the bundle is the system bundle alone."""
    path = ca_bundle_path(data_dir)
    if ca_pem is None:
        try:
            ca_pem = ca_paths(data_dir)[0].read_bytes()
        except FileNotFoundError:
            ca_pem = None
    data = bundle_bytes(ca_pem)
    try:
        if path.read_bytes() == data:
            return path
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data, 0o644)
    return path


# ---------------------------------------------------------------------------- trust store


def _linux_flavour() -> str:
    """'fedora' where update-ca-trust is the tool, else 'debian' (update-ca-certificates)."""
    if shutil.which("update-ca-certificates") is None and shutil.which("update-ca-trust") is not None:
        return "fedora"
    return "debian"


def install_plan(cert_path: Path | str, platform: str | None = None) -> list[list[str]]:
    """The commands (argv lists) that add the CA to the OS trust store."""
    platform = platform or ("macos" if sys.platform == "darwin" else "linux")
    cert = str(cert_path)
    if platform == "macos":
        return [["sudo", "security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k", MACOS_KEYCHAIN, cert]]
    if _linux_flavour() == "fedora":
        return [["sudo", "cp", cert, str(FEDORA_ANCHOR)], ["sudo", "update-ca-trust"]]
    return [["sudo", "cp", cert, str(DEBIAN_ANCHOR)], ["sudo", "update-ca-certificates"]]


def uninstall_plan(platform: str | None = None) -> list[list[str]]:
    """The commands that remove the CA from the OS trust store again."""
    platform = platform or ("macos" if sys.platform == "darwin" else "linux")
    if platform == "macos":
        return [["sudo", "security", "delete-certificate", "-c", CA_COMMON_NAME, MACOS_KEYCHAIN]]
    if _linux_flavour() == "fedora":
        return [["sudo", "rm", "-f", str(FEDORA_ANCHOR)], ["sudo", "update-ca-trust"]]
    return [["sudo", "rm", "-f", str(DEBIAN_ANCHOR)], ["sudo", "update-ca-certificates", "--fresh"]]


def _shell_line(plan: list[list[str]]) -> str:
    return " && ".join(shlex.join(cmd) for cmd in plan)


def install_commands(cert_path: Path | str) -> dict[str, str]:
    return {
        "linux": _shell_line(install_plan(cert_path, "linux")),
        "macos": _shell_line(install_plan(cert_path, "macos")),
    }


def is_installed(ca: CertAuthority) -> bool:
    """Whether this CA is in the system trust store (the anchor file, or the macOS keychain)."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["security", "find-certificate", "-a", "-Z", "-c", CA_COMMON_NAME, MACOS_KEYCHAIN],
                capture_output=True,
                text=True,
                timeout=3,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return ca.fingerprint.replace(":", "") in out.replace(" ", "").upper()
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    for anchor in (DEBIAN_ANCHOR, FEDORA_ANCHOR):
        try:
            installed = x509.load_pem_x509_certificates(anchor.read_bytes())
        except (OSError, ValueError):
            continue
        if any(c.public_bytes(serialization.Encoding.DER) == der for c in installed):
            return True
    return False


def ca_status(data_dir: Path | str) -> dict[str, Any]:
    """GET /api/cert/status (camelCase, as the reference)."""
    cert_path, key_path = ca_paths(data_dir)
    out: dict[str, Any] = {
        "generated": False,
        "certPath": str(cert_path),
        "keyPath": str(key_path),
        "subject": None,
        "expiresAt": None,
        "fingerprintSha256": None,
        "installed": False,
        "installCommands": install_commands(cert_path),
    }
    try:
        ca = load_ca(data_dir)
    except CAError as exc:
        out["error"] = str(exc)
        return out
    if ca is None:
        return out
    out.update(
        {
            "generated": True,
            "subject": ca.subject,
            "expiresAt": ca.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "fingerprintSha256": ca.fingerprint,
            "installed": is_installed(ca),
        }
    )
    return out


# ---------------------------------------------------------------------------- leaves


def _san_for(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def mint_leaf(ca: CertAuthority, host: str) -> tuple[bytes, bytes]:
    """(chain PEM = leaf + CA, key PEM) for `host` (a DNS name or an IP literal)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + LEAF_VALIDITY, ca.cert.not_valid_after_utc)
    cn = host if len(host) <= 64 else host[:64]  # X.520 caps CN at 64; the SAN carries the full name
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san_for(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


@contextlib.contextmanager
def _pem_path(data: bytes):  # noqa: ANN202 - a context manager yielding a path
    """A path holding `data` for ssl.load_cert_chain (which reads only files); in memory on Linux."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("greyproxy-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="greyproxy-leaf-")  # 0600, unlinked right after loading
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def leaf_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context for one leaf, offering HTTP/1.1 only (ALPN), sending no TLS 1.3 session
    tickets (`num_tickets = 0`).

    Why no tickets: a TLS 1.3 server sends them right after the handshake, and over loopback they
    reach the client while it writes its first request. Clients that read on one thread while they
    write on another through the same `ssl` socket (Python's `websockets.sync` client does, from
    its start) race there: OpenSSL objects are not for concurrent use, and ~1 connection in 300
    lost its first request (the client then waits for an answer until its timeout, the origin
    for a request until its own). Without tickets nothing arrives until the answer. The cost: a
    client cannot resume a TLS 1.3 session with the proxy (a full handshake per new connection;
    clients that keep connections alive, as agents and package managers do, make few)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.num_tickets = 0
    with _pem_path(chain_pem + key_pem) as path:
        ctx.load_cert_chain(path)
    return ctx


class LeafCache:
    """LRU of host → server SSLContext for one CA. Thread-safe (minting runs in worker threads)."""

    def __init__(self, ca: CertAuthority, size: int = LEAF_CACHE_SIZE) -> None:
        self.ca = ca
        self.size = size
        self._items: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()
        self.minted = 0

    def get(self, host: str) -> ssl.SSLContext | None:
        with self._lock:
            ctx = self._items.get(host)
            if ctx is not None:
                self._items.move_to_end(host)
            return ctx

    def context_for(self, host: str) -> ssl.SSLContext:
        """The cached context for `host`, minting one on a miss (call it off the event loop)."""
        ctx = self.get(host)
        if ctx is not None:
            return ctx
        ctx = leaf_context(*mint_leaf(self.ca, host))
        with self._lock:
            self.minted += 1
            self._items[host] = ctx
            self._items.move_to_end(host)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return ctx

    def __len__(self) -> int:
        return len(self._items)


def _stat_signature(paths: tuple[Path, Path]) -> tuple | None:
    try:
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (os.stat(p) for p in paths))
    except OSError:
        return None


class CAWatcher:
    """The proxy's current CA and its leaf cache; reloads when the files change or on request."""

    def __init__(self, data_dir: Path | str, cache_size: int = LEAF_CACHE_SIZE) -> None:
        self.paths = ca_paths(data_dir)
        self.data_dir = Path(data_dir)
        self.cache_size = cache_size
        self.leaves: LeafCache | None = None
        self.error: str | None = None
        self._signature: tuple | None = None

    @property
    def ca(self) -> CertAuthority | None:
        return self.leaves.ca if self.leaves is not None else None

    def check(self) -> bool:
        """Reload if the files changed since the last good load (cheap: two stat calls). True if swapped."""
        sig = _stat_signature(self.paths)
        if sig == self._signature and (sig is not None or self.leaves is None):
            return False
        return self._load(sig)

    def reload(self) -> str:
        """Re-read the files now: 'reloaded' when the CA in use changed, else 'unchanged'."""
        return "reloaded" if self._load(_stat_signature(self.paths)) else "unchanged"

    def _load(self, sig: tuple | None) -> bool:
        try:
            ca = load_ca(self.data_dir)
        except CAError as exc:
            # Half-written pair (or junk): keep serving with the CA we have, try again next poll.
            self.error = str(exc)
            return False
        self.error = None
        self._signature = sig
        current = self.ca
        if ca is None:
            changed = current is not None
            self.leaves = None
            return changed
        if current is not None and current.cert_pem == ca.cert_pem:
            return False
        self.leaves = LeafCache(ca, self.cache_size)  # a new CA: every cached leaf is stale
        try:  # a CA copied in (not made by generate_ca): the runtimes' bundle follows it
            write_ca_bundle(self.data_dir, ca.cert_pem)
        except OSError as exc:
            log.warning("cannot update %s: %s", ca_bundle_path(self.data_dir), exc.strerror or exc)
        return True
