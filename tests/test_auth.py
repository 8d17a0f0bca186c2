from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.auth import Auth, AuthError
from server.settings import Settings, SettingsError

SECRET = "unit-secret-" + "x" * 32


def auth() -> Auth:
    return Auth(Settings(jwt_secret=SECRET, api_keys=("k1", "k2"), ops_token="ops"))


def test_mint_and_verify_round_trip() -> None:
    a = auth()
    ident = a.verify_device_token(a.mint_device_token("u1", "d1", ttl=60))
    assert (ident.user, ident.device) == ("u1", "d1")
    assert time.time() + 50 < ident.expires_at <= time.time() + 61


def _tok(claims: dict[str, object], key: Any = SECRET, alg: str = "HS256") -> str:
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


def _pem(private: Any) -> str:
    return str(
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


RSA_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())


def _claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "u", "did": "d", "exp": int(time.time()) + 60, **extra}


@pytest.mark.parametrize(
    ("key", "token"),
    [
        # A token whose alg does not match the key's type (PyJWT's InvalidKeyError before).
        (_pem(RSA_PRIVATE), _tok(_claims(), key=EC_PRIVATE, alg="ES256")),
        (_pem(EC_PRIVATE), _tok(_claims(), key=RSA_PRIVATE, alg="RS256")),
        # Key confusion: the public key's text used as an HS256 secret.
        (_pem(RSA_PRIVATE), jwt.encode(_claims(), "k" * 40, algorithm="HS256")),
        # An exp far past what a float holds (OverflowError before).
        (_pem(RSA_PRIVATE), _tok(_claims(exp=10**400), key=RSA_PRIVATE, alg="RS256")),
    ],
)
def test_public_key_refuses_every_foreign_token(key: str, token: str) -> None:
    a = Auth(Settings(jwt_public_key=key, api_keys=("k",), ops_token="o"))
    with pytest.raises(AuthError) as info:
        a.verify_device_token(token)
    assert info.value.code == "bad_token"


def test_public_key_accepts_its_own_algorithm() -> None:
    for private, alg in ((RSA_PRIVATE, "RS256"), (EC_PRIVATE, "ES256")):
        a = Auth(Settings(jwt_public_key=_pem(private), api_keys=("k",), ops_token="o"))
        assert a.verify_device_token(_tok(_claims(), key=private, alg=alg)).device == "d"


@pytest.mark.parametrize(
    "claims",
    [
        _claims(aud=[]),
        _claims(aud=""),
        _claims(aud="courier"),
        _claims(exp=str(int(time.time()) + 60)),
        _claims(exp=time.time() + 60.5),
        _claims(exp=True),
        _claims(exp=10**400),
        _claims(exp=-1),
        _claims(iat="0"),
        _claims(nbf=1.5),
        _claims(nbf=None),  # found by the fuzzer (a 500 until then)
        _claims(iat=None),
        _claims(exp=None),
        _claims(nbf=int(time.time()) + 60),
        _claims(sub=7),
        _claims(did=None),
    ],
)
def test_only_documented_claims_pass(claims: dict[str, Any]) -> None:
    with pytest.raises(AuthError) as info:
        auth().verify_device_token(_tok(claims))
    assert info.value.code == "bad_token"


def test_a_public_key_setting_must_be_rsa_or_p256() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    for private in (small, p384):
        with pytest.raises(SettingsError, match="COURIER_JWT_PUBLIC_KEY"):
            Settings(jwt_public_key=_pem(private), api_keys=("k",), ops_token="o").with_secrets()
