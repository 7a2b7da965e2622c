"""The interception CA and leaf minting (greyproxy/certs.py) and the ClientHello reader."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from greyproxy import certs
from services.proxy.tls import NotClientHello, looks_like_tls, parse_client_hello


def test_generate_ca_shape_and_modes(tmp_path: Path) -> None:
    ca = certs.generate_ca(tmp_path)
    cert_path, key_path = certs.ca_paths(tmp_path)
    assert stat.S_IMODE(os.stat(cert_path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Greyproxy CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < life < dt.timedelta(days=3652)
    assert ca.fingerprint.count(":") == 31
    # Random serials: two CAs never share one.
    other = certs.generate_ca(tmp_path / "b")
    assert other.cert.serial_number != ca.cert.serial_number
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ca-bundle.pem", "ca-cert.pem", "ca-key.pem"]


def test_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = certs.generate_ca(tmp_path)
    with pytest.raises(certs.CAExists):
        certs.generate_ca(tmp_path)
    second = certs.generate_ca(tmp_path, force=True)
    assert second.fingerprint != first.fingerprint
    assert certs.load_ca(tmp_path).fingerprint == second.fingerprint  # type: ignore[union-attr]


def test_load_ca_missing_and_mismatched(tmp_path: Path) -> None:
    assert certs.load_ca(tmp_path) is None
    certs.generate_ca(tmp_path / "a")
    certs.generate_ca(tmp_path / "b")
    (tmp_path / "ca-cert.pem").write_bytes((tmp_path / "a" / "ca-cert.pem").read_bytes())
    with pytest.raises(certs.CAError):
        certs.load_ca(tmp_path)  # only one file
    (tmp_path / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    with pytest.raises(certs.CAError, match="does not match"):
        certs.load_ca(tmp_path)


def test_status(tmp_path: Path) -> None:
    st = certs.ca_status(tmp_path)
    assert st["generated"] is False and st["fingerprintSha256"] is None
    assert set(st["installCommands"]) == {"linux", "macos"}
    ca = certs.generate_ca(tmp_path)
    st = certs.ca_status(tmp_path)
    assert st["generated"] is True
    assert st["subject"] == "O=Greyproxy,CN=Greyproxy CA"
    assert st["fingerprintSha256"] == ca.fingerprint
    assert st["expiresAt"].endswith("Z")
    assert st["installed"] is False
    assert str(st["certPath"]) in st["installCommands"]["macos"]
    assert "add-trusted-cert" in st["installCommands"]["macos"]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _verify_chain(ca: certs.CertAuthority, chain_pem: bytes, host: str) -> x509.Certificate:
    """The chain is leaf + CA, and the leaf verifies for `host` against a store holding only the CA."""
    from cryptography.x509.verification import PolicyBuilder, Store

    leaf, issuer = x509.load_pem_x509_certificates(chain_pem)
    assert issuer == ca.cert
    subject = x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)
    PolicyBuilder().store(Store([ca.cert])).build_server_verifier(subject).verify(leaf, [])
    return leaf


@pytest.mark.parametrize("host", ["example.com", "api.example.co.uk", "127.0.0.2", "::1"])
def test_leaf_verifies_against_the_ca(tmp_path: Path, host: str) -> None:
    ca = certs.generate_ca(tmp_path)
    chain, key = certs.mint_leaf(ca, host)
    leaf = _verify_chain(ca, chain, host)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(days=7) <= life <= dt.timedelta(days=7, hours=1, seconds=5)
    assert leaf.not_valid_before_utc < dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=59)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    kind = x509.IPAddress if _is_ip(host) else x509.DNSName
    assert len(san.get_values_for_type(kind)) == 1
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    ctx = certs.leaf_context(chain, key)
    assert isinstance(ctx, ssl.SSLContext)


def test_leaf_context_handshake_in_memory(tmp_path: Path) -> None:
    """A real TLS handshake between the minted leaf and a client trusting only the CA."""
    ca = certs.generate_ca(tmp_path)
    server_ctx = certs.leaf_context(*certs.mint_leaf(ca, "intercepted.test"))
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="intercepted.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = set()
    for _ in range(10):
        for name, obj, out, peer_in in (("c", client, c_out, s_in), ("s", server, s_out, c_in)):
            if name not in done:
                try:
                    obj.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if done == {"c", "s"}:
            break
    assert done == {"c", "s"}
    assert client.selected_alpn_protocol() == "http/1.1"  # HTTP/1.1 only is offered
    assert len(client.getpeercert(binary_form=False)["subjectAltName"]) == 1
    # SPEC §7: no TLS 1.3 session ticket follows the handshake (certs.leaf_context says why): the first
    # bytes after it are the server's answer.
    server.write(b"answer")
    c_in.write(s_out.read())
    assert client.version() == "TLSv1.3" and client.read(100) == b"answer"
    assert client.session is not None and not client.session.has_ticket


def test_leaf_cache_is_lru_and_thread_safe(tmp_path: Path) -> None:
    cache = certs.LeafCache(certs.generate_ca(tmp_path), size=3)
    a = cache.context_for("a.test")
    assert cache.context_for("a.test") is a
    for h in ("b.test", "c.test", "d.test"):
        cache.context_for(h)
    assert len(cache) == 3 and cache.get("a.test") is None  # evicted, least recently used
    errors: list[BaseException] = []

    def mint(i: int) -> None:
        try:
            cache.context_for(f"h{i % 5}.test")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=mint, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 3


def test_watcher_reloads_on_rewrite_and_keeps_ca_on_mismatch(tmp_path: Path) -> None:
    w = certs.CAWatcher(tmp_path)
    assert w.check() is False and w.leaves is None
    first = certs.generate_ca(tmp_path)
    assert w.check() is True and w.ca.fingerprint == first.fingerprint  # type: ignore[union-attr]
    leaf_ctx = w.leaves.context_for("x.test")  # type: ignore[union-attr]
    assert w.check() is False and w.reload() == "unchanged"
    # Half a rewrite (a foreign key): the old CA stays in use.
    certs.generate_ca(tmp_path / "other")
    (tmp_path / "ca-key.pem").write_bytes((tmp_path / "other" / "ca-key.pem").read_bytes())
    assert w.check() is False and w.ca.fingerprint == first.fingerprint and w.error  # type: ignore[union-attr]
    second = certs.generate_ca(tmp_path, force=True)
    assert w.check() is True and w.ca.fingerprint == second.fingerprint  # type: ignore[union-attr]
    assert w.leaves.get("x.test") is None and w.leaves.context_for("x.test") is not leaf_ctx  # type: ignore[union-attr]
    (tmp_path / "ca-cert.pem").unlink()
    (tmp_path / "ca-key.pem").unlink()
    assert w.check() is True and w.leaves is None


# ---------------------------------------------------------------- ClientHello


def _client_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if server_hostname is None:
        ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_client_hello_sni_and_alpn() -> None:
    hello = _client_hello("API.Example.com", ["h2", "http/1.1"])
    assert looks_like_tls(hello) is True
    parsed = parse_client_hello(hello)
    assert parsed is not None and parsed.sni == "api.example.com" and parsed.alpn == ("h2", "http/1.1")
    for cut in (1, 5, 40, len(hello) - 1):
        assert parse_client_hello(hello[:cut]) is None  # incomplete: wait for more
    assert parse_client_hello(_client_hello("127.0.0.1")).sni is None  # no SNI for IP literals


def test_client_hello_split_across_records() -> None:
    hello = _client_hello("split.test")
    body = hello[5:]
    rec = lambda part: b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part  # noqa: E731
    parsed = parse_client_hello(rec(body[:30]) + rec(body[30:]))
    assert parsed is not None and parsed.sni == "split.test"


def test_not_a_client_hello() -> None:
    assert looks_like_tls(b"GET / HTTP/1.1\r\n") is False
    assert looks_like_tls(b"\x16") is None
    with pytest.raises(NotClientHello):
        parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")
    with pytest.raises(NotClientHello):
        parse_client_hello(b"\x16\x03\x01\x00\x00")
