"""Publishing over Courier's HTTP API: ``Publisher`` (sync) and ``AsyncPublisher``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from courier_publisher._events import PublishError, PublishResult, event, with_ids
from courier_publisher._retry import RetryPolicy, retry_after

PATH = "/v1/events"


def _retryable(outcome: httpx.Response | httpx.TransportError, policy: RetryPolicy) -> bool:
    return isinstance(outcome, httpx.TransportError) or outcome.status_code in policy.statuses


def _wait_hint(outcome: httpx.Response | httpx.TransportError) -> float | None:
    if isinstance(outcome, httpx.Response):
        return retry_after(outcome.headers.get("retry-after"))
    return None


def _results(outcome: httpx.Response | httpx.TransportError, many: bool) -> list[PublishResult]:
    """The answer of the last attempt as results, or ``PublishError``."""
    if isinstance(outcome, httpx.TransportError):
        raise PublishError(f"courier unreachable: {outcome}") from outcome
    try:
        body = outcome.json()
    except ValueError:
        body = outcome.text
    if outcome.status_code not in (200, 201):
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        raise PublishError(
            f"publish refused with HTTP {outcome.status_code}"
            f"{f' {code}' if code else ''}: {message or body}",
            outcome.status_code,
            body,
        )
    items = body if many else [body]
    return [PublishResult(i["id"], int(i["seq"]), bool(i["duplicate"])) for i in items]


def _client_args(url: str, api_key: str, timeout: float) -> dict[str, Any]:
    return {
        "base_url": url.rstrip("/"),
        "headers": {"Authorization": f"Bearer {api_key}"},
        "timeout": timeout,
    }


class Publisher:
    """Synchronous publisher, for a Flask view or a script. Thread-safe: one per process.

    Every event gets its ``id`` before the first attempt, so retries (connection errors,
    429, 502, 503, 504) are answered as duplicates, never recorded twice.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = httpx.Client(**_client_args(url, api_key, timeout), transport=transport)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(
        self, user: str, kind: str, data: dict[str, Any] | None = None, **options: Any
    ) -> PublishResult:
        """Publish one event (options: ``id``, ``device``, ``ttl``, ``collapse``, ``push``,
        ``push_after``, ``notification``); answers once the server has committed it."""
        return self._post(event(user, kind, data, **options), many=False)[0]

    def publish_many(self, events: list[dict[str, Any]]) -> list[PublishResult]:
        """Publish up to 1,000 events (see :func:`event`) in one request, atomically."""
        return self._post(with_ids(events), many=True)

    def _post(self, body: Any, many: bool) -> list[PublishResult]:
        tries = self.retry.tries()
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._client.post(PATH, json=body)
            except httpx.TransportError as exc:
                outcome = exc
            wait = tries.again(_retryable(outcome, self.retry), _wait_hint(outcome))
            if wait is None:
                return _results(outcome, many)
            self._sleep(wait)


class AsyncPublisher:
    """The asyncio twin of :class:`Publisher`; use ``async with`` or :meth:`aclose`."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = httpx.AsyncClient(**_client_args(url, api_key, timeout), transport=transport)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def publish(
        self, user: str, kind: str, data: dict[str, Any] | None = None, **options: Any
    ) -> PublishResult:
        return (await self._post(event(user, kind, data, **options), many=False))[0]

    async def publish_many(self, events: list[dict[str, Any]]) -> list[PublishResult]:
        return await self._post(with_ids(events), many=True)

    async def _post(self, body: Any, many: bool) -> list[PublishResult]:
        tries = self.retry.tries()
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._client.post(PATH, json=body)
            except httpx.TransportError as exc:
                outcome = exc
            wait = tries.again(_retryable(outcome, self.retry), _wait_hint(outcome))
            if wait is None:
                return _results(outcome, many)
            await self._sleep(wait)
