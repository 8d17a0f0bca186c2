"""Device tokens (JWT), publisher keys and the ops token."""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass

import jwt

from server.settings import Settings

IDENT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""Users and devices: 1-128 characters of ``[A-Za-z0-9_.:-]``."""

KIND = re.compile(r"[a-z0-9_.-]{1,64}")


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
        if settings.jwt_public_key:
            self._key: str = settings.jwt_public_key
            self._algorithms = ["RS256", "ES256"]
        elif settings.jwt_secret:
            self._key = settings.jwt_secret
            self._algorithms = ["HS256"]
        else:
            raise ValueError("no device token key configured")
        self._can_mint = bool(settings.jwt_secret)
        self._api_keys = tuple(k.encode() for k in settings.api_keys)
        self._ops_token = (settings.ops_token or "").encode()

    def verify_device_token(self, token: str | None) -> DeviceIdentity:
        if not token:
            raise AuthError("missing_token", "a device token is required (Authorization: Bearer)")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["exp", "sub", "did"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the device token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(
                "bad_token", f"the device token lacks the {exc.claim!r} claim"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("bad_token", f"the device token is invalid: {exc}") from None
        user, device = claims.get("sub"), claims.get("did")
        for name, value in (("sub", user), ("did", device)):
            if not isinstance(value, str) or not IDENT.fullmatch(value):
                raise AuthError(
                    "bad_token", f"the token's {name!r} must be 1-128 characters of [A-Za-z0-9_.:-]"
                )
        assert isinstance(user, str) and isinstance(device, str)
        return DeviceIdentity(user, device, float(claims["exp"]))

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
