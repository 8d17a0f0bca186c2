"""Device tokens (JWT), publisher keys and the ops token."""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from server.settings import Settings

IDENT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""Users and devices: 1-128 characters of ``[A-Za-z0-9_.:-]``."""

KIND = re.compile(r"[a-z0-9_.-]{1,64}")

MAX_TIME = 253_402_300_799
"""9999-12-31T23:59:59Z: the largest ``exp``/``iat``/``nbf`` accepted (Unix seconds)."""

_TIME_CLAIMS = ("exp", "iat", "nbf")


class AuthError(Exception):
    """A credential was refused. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    user: str
    device: str
    expires_at: float


class Auth:
    def __init__(self, settings: Settings) -> None:
        self._key: Any
        if settings.jwt_public_key:
            # One algorithm, chosen by the key's type: a token naming another one is refused
            # as invalid, never handed to a key of the wrong kind.
            self._key, algorithm = public_key(settings.jwt_public_key)
            self._algorithms = [algorithm]
        elif settings.jwt_secret:
            self._key = settings.jwt_secret
            self._algorithms = ["HS256"]
        else:
            raise ValueError("no device token key configured")
        self._can_mint = bool(settings.jwt_secret)
        self._api_keys = tuple(k.encode() for k in settings.api_keys)
        self._ops_token = (settings.ops_token or "").encode()

    def verify_device_token(self, token: str | None) -> DeviceIdentity:
        """The identity in a device token, or ``AuthError`` for any token that is not exactly
        what docs/protocol.md describes. Never raises anything else, whatever ``token`` holds."""
        if not token:
            raise AuthError("missing_token", "a device token is required (Authorization: Bearer)")
        try:
            # PyJWT checks the signature and the algorithm; the claims are checked below,
            # strictly (PyJWT would accept "exp": "123" or 1.5, and an empty "aud").
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as exc:  # InvalidTokenError, InvalidKeyError, ...
            raise AuthError("bad_token", f"the device token is invalid: {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise AuthError("bad_token", "the device token is malformed") from None
        return _identity(claims, time.time())

    def mint_device_token(self, user: str, device: str, ttl: int = 3600) -> str:
        """A device token signed with the shared secret (backends usually mint their own)."""
        if not self._can_mint:
            raise AuthError(
                "no_secret", "minting needs COURIER_JWT_SECRET (a public key cannot sign)"
            )
        for name, value in (("user", user), ("device", device)):
            if not IDENT.fullmatch(value):
                raise AuthError(
                    "bad_identity", f"{name} must be 1-128 characters of [A-Za-z0-9_.:-]"
                )
        now = int(time.time())
        claims = {"sub": user, "did": device, "iat": now, "exp": now + ttl}
        return jwt.encode(claims, self._key, algorithm="HS256")

    def is_publisher(self, authorization: str | None) -> bool:
        token = bearer(authorization)
        return token is not None and any(hmac.compare_digest(token, k) for k in self._api_keys)

    def is_ops(self, authorization: str | None) -> bool:
        token = bearer(authorization)
        return (
            token is not None
            and bool(self._ops_token)
            and hmac.compare_digest(token, self._ops_token)
        )


def bearer(authorization: str | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def _identity(claims: dict[str, Any], now: float) -> DeviceIdentity:
    if "aud" in claims:
        raise AuthError("bad_token", "the device token must not carry an 'aud' claim")
    for name in _TIME_CLAIMS:
        if name not in claims and name != "exp":
            continue
        value = claims.get(name)
        if name not in claims:
            raise AuthError("bad_token", "the device token lacks the 'exp' claim")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TIME:
            raise AuthError(
                "bad_token", f"the token's {name!r} must be whole Unix seconds (up to {MAX_TIME})"
            )
    if claims["exp"] <= now:
        raise AuthError("token_expired", "the device token has expired")
    for name in ("iat", "nbf"):
        if claims.get(name, 0) > now:
            raise AuthError("bad_token", f"the token's {name!r} is in the future")
    user, device = claims.get("sub"), claims.get("did")
    for name, value in (("sub", user), ("did", device)):
        if value is None:
            raise AuthError("bad_token", f"the device token lacks the {name!r} claim")
        if not isinstance(value, str) or not IDENT.fullmatch(value):
            raise AuthError(
                "bad_token", f"the token's {name!r} must be 1-128 characters of [A-Za-z0-9_.:-]"
            )
    assert isinstance(user, str) and isinstance(device, str)
    return DeviceIdentity(user, device, float(claims["exp"]))


def public_key(pem: str) -> tuple[Any, str]:
    """The key object of a PEM public key and the one algorithm it verifies.

    Raises ``ValueError`` for anything but an RSA key (RS256) or a P-256 key (ES256).
    """
    key = load_pem_public_key(pem.encode())
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"the RSA key has {key.key_size} bits; at least 2048 are needed")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError("the key must be an RSA key (RS256) or an EC P-256 key (ES256)")
