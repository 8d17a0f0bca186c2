"""Publishing over Courier's HTTP API: ``Publisher`` (sync) and ``AsyncPublisher``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import httpx

from courier_publisher._events import PublishError, PublishResult, event, with_ids
from courier_publisher._retry import RetryPolicy

PATH = "/v1/events"
ERRORS = (httpx.TransportError,)
"""Connection errors and timeouts: no answer, always worth another attempt."""


def _again(policy: RetryPolicy) -> Callable[[httpx.Response], float | None]:
    """Whether an answer is worth another attempt, and the least wait it asks for."""

    def again(response: httpx.Response) -> float | None:
        if response.status_code not in policy.statuses:
            return None
        return policy.retry_after(response.headers.get("retry-after"))

    return again


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
    ) -> None:
        self._client = httpx.Client(**_client_args(url, api_key, timeout), transport=transport)
        self.retry = retry or RetryPolicy()

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
        post = self.retry.call(
            partial(self._client.post, PATH, json=body), _again(self.retry), ERRORS
        )
        return _results(post, many)


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
    ) -> None:
        self._client = httpx.AsyncClient(**_client_args(url, api_key, timeout), transport=transport)
        self.retry = retry or RetryPolicy()

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
        post = self.retry.acall(
            partial(self._client.post, PATH, json=body), _again(self.retry), ERRORS
        )
        return _results(await post, many)
