"""A fake FCM HTTP v1 endpoint and a fake OAuth2 token endpoint, on a real local port.

They speak the documented formats. The token endpoint takes google-auth's JWT-bearer
grant and checks its assertion: the signature with the service account's public key,
``iss``, ``aud`` (Google's token endpoint, whatever endpoint is used) and ``scope``.
``messages:send`` checks the bearer token and answers by the device token's prefix:

* ``ok-…``: 200 ``{"name": "projects/<p>/messages/<n>"}``
* ``gone-…``: 404 with the FcmError ``UNREGISTERED``
* ``bad-…``: 400 with the FcmError ``INVALID_ARGUMENT``
* ``busy-…``: 429 ``QUOTA_EXCEEDED`` with ``Retry-After: 2`` the first time, then 200
* ``unavail-…``: 503 ``UNAVAILABLE`` with ``Retry-After`` as an HTTP date two minutes on
* ``down-…``: 500 ``INTERNAL`` every time
* ``denied-…``: 403 ``PERMISSION_DENIED`` with the FcmError ``SENDER_ID_MISMATCH``
* ``slow-…``: answers 200 after ``slow_seconds``
* ``hang-…``: never answers (until the server stops)

* ``badfield-…``: 400 ``INVALID_ARGUMENT`` naming a payload field (``message.android.ttl``)

A bearer token it did not issue (or revoked by :meth:`revoke`) is answered 401
``UNAUTHENTICATED``. A message that breaks FCM's shape (data values not strings, unknown
fields, a priority or ttl FCM would refuse) is answered 400 ``INVALID_ARGUMENT`` naming the
field, and noted in ``problems``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.harness import ThreadServer, free_port

PROJECT = "courier-test"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
AUDIENCE = "https://oauth2.googleapis.com/token"
"""The ``aud`` of a service account's grant assertion, wherever the token endpoint is."""


@dataclass
class Received:
    at: float
    message: dict[str, Any]
    answered: int | None = None
    answered_at: float | None = None


@dataclass
class FakeGoogle:
    """Both endpoints, in a thread of their own; start with :meth:`start`."""

    port: int = field(default_factory=free_port)
    slow_seconds: float = 3.0
    hang_all: bool = False
    """Never answer any send: a provider that takes a request and then nothing."""
    expires_in: int = 3600
    """The lifetime of the access tokens it issues."""
    refuse_grants: bool = False
    """Answer every token request ``invalid_grant`` (a deleted or disabled key)."""
    received: list[Received] = field(default_factory=list)
    token_fetches: int = 0
    tokens: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.email = f"courier@{PROJECT}.iam.gserviceaccount.com"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account(self) -> str:
        """A service-account JSON key whose token endpoint is this fake."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": uuid.uuid4().hex,
                "private_key": pem,
                "client_email": self.email,
                "client_id": "1234567890",
                "token_uri": self.token_uri,
            }
        )

    def sent(self) -> list[dict[str, Any]]:
        """The messages answered 200, in order."""
        with self._lock:
            return [r.message for r in self.received if r.answered == 200]

    def arrivals(self, token: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.message.get("token") == token]

    def revoke(self) -> None:
        """Forget the access tokens issued so far: their next use is answered 401."""
        with self._lock:
            self.tokens.clear()

    # -- the endpoints ------------------------------------------------------------------------

    async def _token(self, request: Request) -> JSONResponse:
        form = {k: v[0] for k, v in urllib.parse.parse_qs((await request.body()).decode()).items()}
        if self.refuse_grants:
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                status_code=400,
            )
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion")),
                self.key.public_key(),
                algorithms=["RS256"],
                audience=AUDIENCE,
            )
        except jwt.PyJWTError as exc:
            self.problems.append(f"bad assertion: {exc}")
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if claims.get("iss") != self.email or SCOPE not in str(claims.get("scope")):
            self.problems.append(f"bad claims: {claims}")
            return JSONResponse({"error": "invalid_scope"}, status_code=400)
        token = f"ya29.{uuid.uuid4().hex}"
        with self._lock:
            self.token_fetches += 1
            self.tokens.add(token)
        return JSONResponse(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    async def _send(self, request: Request) -> JSONResponse:
        if request.path_params["project"] != PROJECT:
            return _fcm_error(404, "NOT_FOUND", None)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        with self._lock:
            known = bearer in self.tokens
        if not known:
            return _fcm_error(401, "UNAUTHENTICATED", None)
        message = (await request.json())["message"]
        wrong = _shape_problem(message)
        if wrong is not None:
            self.problems.append(f"FCM would refuse {wrong}: {message}")
            return _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", field=wrong)
        record = Received(time.time(), message)
        with self._lock:
            self.received.append(record)
            token = str(message.get("token"))
            self._seen[token] = self._seen.get(token, 0) + 1
            seen = self._seen[token]
        kind = token.split("-", 1)[0]
        if kind == "hang" or self.hang_all:
            await self._server.hold()
        if kind == "slow":
            await asyncio.sleep(self.slow_seconds)
        answer = {
            "gone": lambda: _fcm_error(404, "NOT_FOUND", "UNREGISTERED"),
            "bad": lambda: _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
            "down": lambda: _fcm_error(500, "INTERNAL", "INTERNAL"),
            "badfield": lambda: _fcm_error(
                400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", field="message.android.ttl"
            ),
            "denied": lambda: _fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
            "unavail": lambda: _fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", _http_date(120)),
            "busy": lambda: (
                _fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "2") if seen == 1 else None
            ),
        }.get(kind, lambda: None)()
        if answer is None:
            answer = JSONResponse({"name": f"projects/{PROJECT}/messages/{uuid.uuid4().hex}"})
        with self._lock:
            record.answered, record.answered_at = answer.status_code, time.time()
        return answer

    # -- the server ---------------------------------------------------------------------------

    def start(self) -> FakeGoogle:
        app = Starlette(
            routes=[
                Route("/token", self._token, methods=["POST"]),
                Route("/v1/projects/{project}/messages:send", self._send, methods=["POST"]),
            ]
        )
        self._server = ThreadServer(app, self.port)
        return self

    def stop(self) -> None:
        self._server.stop()


def _http_date(seconds_on: float) -> str:
    return email.utils.formatdate(time.time() + seconds_on, usegmt=True)


def _shape_problem(message: Any) -> str | None:
    """The first field of an FCM v1 message that FCM would refuse, or None."""
    if not isinstance(message, dict) or not isinstance(message.get("token"), str):
        return "message.token"
    for name in set(message) - {"token", "data", "android", "notification"}:
        return f"message.{name}"
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return "message.data"
    android = message.get("android", {})
    if not isinstance(android, dict) or set(android) - {"priority", "collapse_key", "ttl"}:
        return "message.android"
    if android.get("priority", "NORMAL") not in ("NORMAL", "HIGH"):
        return "message.android.priority"
    ttl = android.get("ttl", "0s")
    if not (isinstance(ttl, str) and ttl.endswith("s") and ttl[:-1].isdigit()):
        return "message.android.ttl"
    note = message.get("notification", {})
    if not isinstance(note, dict) or set(note) - {"title", "body", "image"}:
        return "message.notification"
    return None


def _fcm_error(
    status: int,
    state: str,
    error_code: str | None,
    retry_after: str | None = None,
    field: str | None = None,
) -> JSONResponse:
    details: list[dict[str, Any]] = (
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
        if error_code
        else []
    )
    if field is not None:
        violation = {"field": field, "description": f"Invalid value at '{field}'"}
        details.append(
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]}
        )
    body = {
        "error": {"code": status, "message": state.lower(), "status": state, "details": details}
    }
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse(body, status_code=status, headers=headers)
