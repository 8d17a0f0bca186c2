"""Firebase Cloud Messaging, HTTP v1: ``POST {endpoint}/v1/projects/{project}/messages:send``
with an OAuth2 access token of a service account (google-auth makes the token exchange)."""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from channels.push.message import PushMessage, PushOutcome, network_outcome, retry_after_header

log = logging.getLogger("courier.push")

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
MAX_DATA_BYTES = 4096
"""FCM's limit on a message's data payload."""
REFRESH_MARGIN = 300.0
"""Seconds before an access token's expiry when a new one is fetched."""


def load_credentials(credentials: str) -> dict[str, Any]:
    """A service-account JSON given as its text or as the path of its file."""
    text = credentials if credentials.lstrip().startswith("{") else Path(credentials).read_text()
    info = json.loads(text)
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ValueError("not a service-account JSON key (its type is not service_account)")
    return info


def fcm_error(body: Any) -> tuple[str | None, str | None]:
    """``(errorCode of the FcmError detail, status)`` of an FCM v1 error answer."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    status = error.get("status") if isinstance(error.get("status"), str) else None
    for detail in _details(error, "FcmError"):
        code = detail.get("errorCode")
        return (code if isinstance(code, str) else None), status
    return None, status


def refused_fields(body: Any) -> set[str]:
    """The message fields named by the ``google.rpc.BadRequest`` detail of an error answer."""
    error = body.get("error") if isinstance(body, dict) else None
    fields: set[str] = set()
    for detail in _details(error, "BadRequest"):
        for violation in detail.get("fieldViolations") or []:
            if isinstance(violation, dict) and isinstance(violation.get("field"), str):
                fields.add(violation["field"])
    return fields


def _details(error: Any, kind: str) -> list[dict[str, Any]]:
    details = error.get("details") if isinstance(error, dict) else None
    return [
        d
        for d in (details if isinstance(details, list) else [])
        if isinstance(d, dict) and str(d.get("@type", "")).endswith(f".{kind}")
    ]


class FcmSender:
    name = "fcm"

    def __init__(
        self,
        credentials: str,
        *,
        project: str | None = None,
        endpoint: str = "https://fcm.googleapis.com",
        token_uri: str | None = None,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``timeout`` bounds each request to FCM (an injected ``client`` too); ``clock``
        (Unix seconds) decides when the cached access token is due for a refresh."""
        from google.oauth2 import service_account

        info = load_credentials(credentials)
        if token_uri:
            info = {**info, "token_uri": token_uri}
        self.project = project or info.get("project_id")
        if not self.project:
            raise ValueError("no FCM project: set COURIER_FCM_PROJECT (the key has no project_id)")
        self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[SCOPE]
        )
        self.url = f"{endpoint.rstrip('/')}/v1/projects/{self.project}/messages:send"
        self._timeout = timeout
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._token: str | None = None
        self._token_expires = 0.0
        self._refreshing = asyncio.Lock()
        self._clock = clock
        self.token_fetches = 0

    async def _access_token(self) -> str:
        if self._fresh():
            assert self._token is not None
            return self._token
        async with self._refreshing:  # one exchange at a time; the others wait for it
            if not self._fresh():
                await asyncio.to_thread(self._refresh)
            assert self._token is not None
            return self._token

    def _fresh(self) -> bool:
        return self._token is not None and self._clock() < self._token_expires - REFRESH_MARGIN

    def _refresh(self) -> None:
        import google.auth.transport.requests
        import requests

        with requests.Session() as session:
            request = google.auth.transport.requests.Request(session)
            self._credentials.refresh(request)
        self.token_fetches += 1
        self._token = str(self._credentials.token)
        expiry = self._credentials.expiry  # a naive datetime in UTC
        self._token_expires = (
            float(calendar.timegm(expiry.timetuple())) if expiry else self._clock() + 3600
        )

    def payload(self, message: PushMessage, now_ms: int) -> dict[str, Any] | None:
        """The FCM message, or None when the event has expired."""
        data = {"id": message.event_id, "seq": str(message.seq), "kind": message.kind}
        if message.collapse is not None:
            data["collapse"] = message.collapse
        data["carried"] = str(message.carried)
        full = {**data, "data": message.data}
        if len(json.dumps(full, separators=(",", ":")).encode()) <= MAX_DATA_BYTES:
            data = full  # else the app fetches the event over its socket
        android: dict[str, Any] = {"priority": "HIGH" if message.high_priority else "NORMAL"}
        if message.collapse is not None:
            android["collapse_key"] = message.collapse
        if message.expires_at is not None:
            left = (message.expires_at - now_ms) // 1000
            if left <= 0:
                return None
            android["ttl"] = f"{left}s"
        body: dict[str, Any] = {"token": message.token, "data": data, "android": android}
        if message.notification:
            body["notification"] = dict(message.notification)
        return {"message": body}

    async def send(self, message: PushMessage, now_ms: int) -> PushOutcome:
        if message.provider != "fcm":
            return PushOutcome("failed", "unsupported_provider")
        payload = self.payload(message, now_ms)
        if payload is None:
            return PushOutcome("failed", "expired")
        try:
            token = await self._access_token()
        except Exception as exc:  # google-auth raises its own errors, and requests' ones
            log.warning("FCM access token not had: %s: %s", type(exc).__name__, exc)
            return PushOutcome("retry", "oauth_error")
        try:
            response = await self._client.post(
                self.url,
                json=payload,
                headers={"Authorization": f"Bearer {token}"},
                timeout=self._timeout,
            )
        except httpx.HTTPError as exc:
            return network_outcome(exc)
        return self._outcome(response)

    def _outcome(self, response: httpx.Response) -> PushOutcome:
        code = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if code == 200:
            name = body.get("name") if isinstance(body, dict) else None
            return PushOutcome("sent", "ok", message_id=name if isinstance(name, str) else None)
        error_code, status = fcm_error(body)
        reason = error_code or status or f"http_{code}"
        if reason == "INVALID_ARGUMENT" and refused_fields(body) - {"message.token"}:
            return PushOutcome("failed", reason)  # the payload, not the token: keep it
        if error_code in ("UNREGISTERED", "INVALID_ARGUMENT"):
            # Only FCM's own errorCode removes a registration: a bare 404 or 400 (a wrong
            # project or endpoint, a proxy) says nothing about the device's token.
            return PushOutcome("unregistered", reason)
        if code in (429, 503):
            return PushOutcome("retry", reason, retry_after_header(response))
        if code >= 500:
            return PushOutcome("retry", reason)
        if code == 401:
            self._token = None  # maybe expired early: the next send fetches a new one
        return PushOutcome("failed", reason)

    async def aclose(self) -> None:
        await self._client.aclose()
