"""A fake FCM HTTP v1 endpoint and a fake OAuth2 token endpoint, on a real local port.

They speak the documented formats. The token endpoint takes google-auth's JWT-bearer
grant and checks its assertion: the signature with the service account's public key,
``iss``, ``aud`` (Google's token endpoint, whatever endpoint is used) and ``scope``.
``messages:send`` checks the bearer token and answers by the device token's prefix:

* ``ok-…``: 200 ``{"name": "projects/<p>/messages/<n>"}``
* ``gone-…``: 404 with the FcmError ``UNREGISTERED``
* ``bad-…``: 400 with the FcmError ``INVALID_ARGUMENT``
* ``busy-…``: 429 ``QUOTA_EXCEEDED`` with ``Retry-After: 2`` the first time, then 200
* ``down-…``: 500 ``INTERNAL`` every time
* ``slow-…``: answers 200 after ``slow_seconds``
* ``hang-…``: never answers (until the server stops)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.harness import free_port

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

    # -- the endpoints ------------------------------------------------------------------------

    async def _token(self, request: Request) -> JSONResponse:
        form = {k: v[0] for k, v in urllib.parse.parse_qs((await request.body()).decode()).items()}
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
        return JSONResponse({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    async def _send(self, request: Request) -> JSONResponse:
        if request.path_params["project"] != PROJECT:
            return _fcm_error(404, "NOT_FOUND", None)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in self.tokens:
            return _fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")
        message = (await request.json())["message"]
        record = Received(time.time(), message)
        with self._lock:
            self.received.append(record)
            token = str(message.get("token"))
            self._seen[token] = self._seen.get(token, 0) + 1
            seen = self._seen[token]
        kind = token.split("-", 1)[0]
        if kind == "hang" or self.hang_all:
            await asyncio.Event().wait()
        if kind == "slow":
            await asyncio.sleep(self.slow_seconds)
        answer = {
            "gone": lambda: _fcm_error(404, "NOT_FOUND", "UNREGISTERED"),
            "bad": lambda: _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
            "down": lambda: _fcm_error(500, "INTERNAL", "INTERNAL"),
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
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake FCM server did not start")
            time.sleep(0.01)  # the server thread has no other readiness signal
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True  # hanging requests: do not wait for them
        self._thread.join(10)


def _fcm_error(
    status: int, state: str, error_code: str | None, retry_after: str | None = None
) -> JSONResponse:
    details = (
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
        if error_code
        else []
    )
    body = {
        "error": {"code": status, "message": state.lower(), "status": state, "details": details}
    }
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse(body, status_code=status, headers=headers)
