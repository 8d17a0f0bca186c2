from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.auth import Auth, AuthError
from server.settings import Settings

SECRET = "unit-secret-" + "x" * 32


def auth() -> Auth:
    return Auth(Settings(jwt_secret=SECRET, api_keys=("k1", "k2"), ops_token="ops"))


def test_mint_and_verify_round_trip() -> None:
    a = auth()
    ident = a.verify_device_token(a.mint_device_token("u1", "d1", ttl=60))
    assert (ident.user, ident.device) == ("u1", "d1")
    assert time.time() + 50 < ident.expires_at <= time.time() + 61


def _tok(claims: dict[str, object], key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, "missing_token"),
        ("", "missing_token"),
        ("garbage", "bad_token"),
        (_tok({"sub": "u", "did": "d", "exp": int(time.time()) - 10}), "token_expired"),
        (
            _tok({"sub": "u", "did": "d", "exp": int(time.time()) + 60}, key="wrong-" + "y" * 32),
            "bad_token",
        ),
        (_tok({"sub": "u", "exp": int(time.time()) + 60}), "bad_token"),
        (_tok({"sub": "u", "did": "d"}), "bad_token"),
        (_tok({"sub": "u/x", "did": "d", "exp": int(time.time()) + 60}), "bad_token"),
        (_tok({"sub": "u", "did": "", "exp": int(time.time()) + 60}), "bad_token"),
        (
            _tok({"sub": "u", "did": "d", "exp": int(time.time()) + 60}, key="", alg="none"),
            "bad_token",
        ),
    ],
)
def test_bad_tokens_are_refused(token: str | None, code: str) -> None:
    with pytest.raises(AuthError) as info:
        auth().verify_device_token(token)
    assert info.value.code == code


def test_public_key_tokens() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    a = Auth(Settings(jwt_public_key=pem, api_keys=("k",), ops_token="o"))
    good = jwt.encode(
        {"sub": "u", "did": "d", "exp": int(time.time()) + 60}, private, algorithm="ES256"
    )
    assert a.verify_device_token(good).user == "u"
    # An HS256 token "signed" with the public key text must not pass (key confusion).
    forged = jwt.encode(
        {"sub": "u", "did": "d", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256"
    )
    with pytest.raises(AuthError):
        a.verify_device_token(forged)
    with pytest.raises(AuthError, match="minting needs"):
        a.mint_device_token("u", "d")


def test_publisher_and_ops_keys() -> None:
    a = auth()
    assert a.is_publisher("Bearer k1")
    assert a.is_publisher("bearer k2")
    assert not a.is_publisher("Bearer k3")
    assert not a.is_publisher("k1")
    assert not a.is_publisher(None)
    assert not a.is_publisher("Bearer ops")
    assert a.is_ops("Bearer ops")
    assert not a.is_ops("Bearer k1")
