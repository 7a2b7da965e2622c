"""SPEC §16 pieces without sockets: secrets and their hashes, the proxy's Claims cache, the SOCKS5
handshake holding the authentication, and the Proxy-Authorization password."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greyproxy.identity import Claim, Claims, check_name, hash_secret, new_secret, verify_secret
from services.proxy import socks5
from services.proxy.http1 import parse_basic, parse_basic_user
from harness.fuzz import examples


def test_secret_is_32_random_bytes_and_only_its_hash_is_kept() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and len(base64.urlsafe_b64decode(a + "=")) == 32
    stored = hash_secret(a)
    assert a not in stored and stored.startswith("scrypt$")
    assert verify_secret(a, stored) and not verify_secret(b, stored) and not verify_secret("", stored)
    assert hash_secret(a) != stored  # salted
    assert not verify_secret(a, "garbage") and not verify_secret(a, "scrypt$1$2$3$x$y")


@pytest.mark.parametrize("bad", ["", "a:b", "proxy", "unknown-10.0.0.1", " a", "a\n", "x" * 129, None, 3])
def test_names_that_cannot_be_claimed(bad: object) -> None:
    with pytest.raises(ValueError):
        check_name(bad)


def test_claims_verify_once_per_name_and_secret_and_forget_on_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = new_secret()
    claims = Claims()
    claims.replace([Claim("agent", hash_secret(secret), 1)], 1)
    calls = []
    real = verify_secret
    monkeypatch.setattr("greyproxy.identity.verify_secret", lambda s, h: calls.append(s) or real(s, h))
    assert claims.judge("other", None) is True  # unclaimed: anything goes
    assert claims.judge("agent", None) is False  # claimed, no secret
    assert claims.judge("agent", secret) is None  # not verified yet: scrypt needed
    assert claims.verify("agent", secret) is True
    assert claims.judge("agent", secret) is True and len(calls) == 1  # from now on: no scrypt
    assert claims.judge("agent", "wrong") is None and claims.verify("agent", "wrong") is False
    assert claims.judge("agent", "wrong") is False and len(calls) == 2  # a wrong secret costs scrypt once too
    new = new_secret()
    changed = claims.replace([Claim("agent", hash_secret(new), 2)], 2)
    assert changed == ["agent"]
    assert claims.judge("agent", secret) is None and claims.verify("agent", secret) is False  # rotated away
    assert claims.verify("agent", new) is True and claims.judge("agent", new) is True
    assert claims.replace([], 3) == ["agent"] and claims.judge("agent", None) is True  # released


def _greet_auth(user: bytes, password: bytes) -> bytes:
    return b"\x05\x01\x02" + b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


def test_socks5_holds_the_authentication_for_the_caller() -> None:
    s = socks5.Socks5Server(hold_auth=True)
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    out = s.feed(_greet_auth(b"agent", b"s3cret") + request)  # pipelined: the request waits too
    assert out == [b"\x05\x02"] and s.pending_auth == ("agent", "s3cret") and s.request is None
    assert s.answer_auth(True) == b"\x01\x00" and s.pending_auth is None
    assert s.feed(b"") == [] and s.request is not None and s.request.username == "agent"
    assert (s.request.host, s.request.port) == ("127.0.0.1", 80)

    refused = socks5.Socks5Server(hold_auth=True)
    refused.feed(_greet_auth(b"agent", b"nope") + request)
    assert refused.answer_auth(False) == b"\x01\x01" and refused.failed and refused.request is None
    assert refused.feed(request) == [] and refused.request is None
    with pytest.raises(RuntimeError):
        refused.answer_auth(True)

    legacy = socks5.Socks5Server()  # without hold_auth: every credential accepted at once
    assert legacy.feed(_greet_auth(b"agent", b"x")) == [b"\x05\x02", b"\x01\x00"] and legacy.pending_auth is None


@settings(max_examples=examples(200))
@given(st.binary(max_size=80))
def test_socks5_hold_auth_survives_any_bytes(data: bytes) -> None:
    s = socks5.Socks5Server(hold_auth=True)
    try:
        s.feed(data)
    except socks5.SocksError:
        return
    if s.pending_auth is not None:
        s.answer_auth(False)
        assert s.failed


def test_basic_credentials_keep_the_password() -> None:
    enc = base64.b64encode(b"agent:pa:ss").decode()
    assert parse_basic(f"Basic {enc}") == ("agent", "pa:ss")
    assert parse_basic_user(f"Basic {enc}") == "agent"
    assert parse_basic("Basic " + base64.b64encode(b"agent:").decode()) == ("agent", None)
    assert parse_basic("Basic " + base64.b64encode(b"proxy:x").decode()) == (None, None)
    assert parse_basic("Bearer x") == (None, None) and parse_basic("Basic !!!") == (None, None)
