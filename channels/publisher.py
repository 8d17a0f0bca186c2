"""Publish events from backend code: ``Publisher`` (sync, e.g. a Flask view) and
``AsyncPublisher`` (asyncio), over the HTTP API; ``StreamPublisher`` and
``AsyncStreamPublisher`` over the Redis ingest stream (``XADD courier:ingest``).

Every event gets an ``id`` before its first attempt, so a retry after a timeout
or a 503 can never record it twice: the server answers the retry as a duplicate
with the first event's ``seq``.

    from channels.publisher import Publisher
    courier = Publisher("https://courier.example.com", api_key)
    result = courier.publish("u1", "block.grabbed", {"block_id": "B9"}, id="grab-B9-u1")
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUSES = frozenset({502, 503, 504})


class PublishError(Exception):
    """The server refused the event (``status`` 4xx) or could not be reached after retries."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def code(self) -> str | None:
        """The server's error code (``id_conflict``, ``invalid``, ...), if it sent one."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        return code if isinstance(code, str) else None


@dataclass(frozen=True, slots=True)
class PublishResult:
    id: str
    seq: int
    duplicate: bool


def event(
    user: str,
    kind: str,
    data: dict[str, Any] | None = None,
    *,
    id: str | None = None,
    device: str | None = None,
    ttl: int | None = None,
    collapse: str | None = None,
) -> dict[str, Any]:
    """One event object as the API takes it, with an idempotency key."""
    body: dict[str, Any] = {
        "user": user,
        "kind": kind,
        "data": data or {},
        "id": id or f"evt-{uuid.uuid4().hex}",
    }
    if device is not None:
        body["device"] = device
    if ttl is not None:
        body["ttl"] = ttl
    if collapse is not None:
        body["collapse"] = collapse
    return body


def _results(response: httpx.Response, many: bool) -> list[PublishResult]:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if response.status_code not in (200, 201):
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        raise PublishError(
            f"publish refused with HTTP {response.status_code}"
            f"{f' {code}' if code else ''}: {message or body}",
            response.status_code,
            body,
        )
    items = body if many else [body]
    return [PublishResult(i["id"], i["seq"], i["duplicate"]) for i in items]


def _backoff(attempt: int) -> float:
    return float(min(5.0, 0.1 * 2**attempt) * (0.5 + random.random()))


class Publisher:
    """Synchronous publisher (thread-safe; one per process is enough)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        retries: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )
        self.retries = retries

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(
        self, user: str, kind: str, data: dict[str, Any] | None = None, **options: Any
    ) -> PublishResult:
        return self._post(event(user, kind, data, **options), many=False)[0]

    def publish_many(self, events: list[dict[str, Any]]) -> list[PublishResult]:
        """Publish up to 1000 events (see :func:`event`) in one request."""
        return self._post(
            [dict(e, id=e.get("id") or f"evt-{uuid.uuid4().hex}") for e in events], many=True
        )

    def _post(self, body: Any, many: bool) -> list[PublishResult]:
        for attempt in range(self.retries + 1):
            try:
                response = self._client.post("/v1/events", json=body)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise PublishError(f"courier unreachable: {exc}") from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return _results(response, many)
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")


class AsyncPublisher:
    """Asyncio publisher; use ``async with`` or call :meth:`aclose`."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        retries: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )
        self.retries = retries

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
        return await self._post(
            [dict(e, id=e.get("id") or f"evt-{uuid.uuid4().hex}") for e in events], many=True
        )

    async def _post(self, body: Any, many: bool) -> list[PublishResult]:
        for attempt in range(self.retries + 1):
            try:
                response = await self._client.post("/v1/events", json=body)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise PublishError(f"courier unreachable: {exc}") from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return _results(response, many)
            await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")


# -- stream mode ---------------------------------------------------------------------------------

INGEST_STREAM = "courier:ingest"


def _stream_fields(body: dict[str, Any]) -> dict[str, str]:
    return {"event": json.dumps(body, separators=(",", ":"))}


class StreamPublisher:
    """Synchronous publisher over the Redis ingest stream (``XADD courier:ingest``).

    For backend services already on Redis: the event is durable in Redis when
    ``publish`` returns and recorded by a Courier node shortly after. The ``id``
    is set before the first attempt, so a retried XADD can never record twice.
    Answers the event id (the ``seq`` is allocated later, by the node).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        stream: str = INGEST_STREAM,
        timeout: float = 5.0,
        retries: int = 4,
        maxlen: int | None = None,
    ) -> None:
        import redis

        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.stream = stream
        self.retries = retries
        self.maxlen = maxlen

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> StreamPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(
        self, user: str, kind: str, data: dict[str, Any] | None = None, **options: Any
    ) -> str:
        body = event(user, kind, data, **options)
        self._xadd(body)
        return str(body["id"])

    def _xadd(self, body: dict[str, Any]) -> None:
        import redis

        fields = _stream_fields(body)
        for attempt in range(self.retries + 1):
            try:
                self._redis.xadd(
                    self.stream,
                    fields,  # type: ignore[arg-type]
                    maxlen=self.maxlen,
                    approximate=True,
                )
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt == self.retries:
                    raise PublishError(f"redis unreachable: {exc}") from exc
            time.sleep(_backoff(attempt))


class AsyncStreamPublisher:
    """Asyncio publisher over the Redis ingest stream; use ``async with`` or :meth:`aclose`."""

    def __init__(
        self,
        redis_url: str,
        *,
        stream: str = INGEST_STREAM,
        timeout: float = 5.0,
        retries: int = 4,
        maxlen: int | None = None,
    ) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.stream = stream
        self.retries = retries
        self.maxlen = maxlen

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> AsyncStreamPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def publish(
        self, user: str, kind: str, data: dict[str, Any] | None = None, **options: Any
    ) -> str:
        body = event(user, kind, data, **options)
        await self._xadd(body)
        return str(body["id"])

    async def _xadd(self, body: dict[str, Any]) -> None:
        import redis

        fields = _stream_fields(body)
        for attempt in range(self.retries + 1):
            try:
                await self._redis.xadd(
                    self.stream,
                    fields,  # type: ignore[arg-type]
                    maxlen=self.maxlen,
                    approximate=True,
                )
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt == self.retries:
                    raise PublishError(f"redis unreachable: {exc}") from exc
            await asyncio.sleep(_backoff(attempt))
