"""Publishing over the Redis ingest stream (``XADD courier:ingest``), for backends that
already use Redis: ``StreamPublisher`` (sync) and ``AsyncStreamPublisher``. Needs the
``redis`` extra (``pip install 'courier-publisher[redis]'``).

The event is durable in Redis when ``publish`` returns; a Courier node records it shortly
after (and acknowledges the entry only once it is committed). The ``id`` is set before the
first attempt, so a retried XADD cannot record the event twice. ``publish`` answers the
event's id: its ``seq`` is given later, by the node.
"""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING, Any

from courier_publisher._events import PublishError, event
from courier_publisher._retry import RetryPolicy, final

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

INGEST_STREAM = "courier:ingest"


def _fields(body: Any) -> dict[FieldT, EncodableT]:
    return {"event": json.dumps(body, separators=(",", ":"))}


def _raise_if_error(outcome: object) -> None:
    if isinstance(outcome, Exception):
        raise PublishError(f"redis unreachable: {outcome}") from outcome


def _redis_errors() -> tuple[type[Exception], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


class StreamPublisher:
    """Synchronous stream publisher: ``publish`` returns once Redis has the entry."""

    def __init__(
        self,
        redis_url: str,
        *,
        stream: str = INGEST_STREAM,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        maxlen: int | None = None,
    ) -> None:
        import redis

        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.stream = stream
        self.retry = retry or RetryPolicy()
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
        add = partial(self._redis.xadd, self.stream, _fields(body), maxlen=self.maxlen)
        _raise_if_error(self.retry.call(add, final, _redis_errors()))
        return str(body["id"])


class AsyncStreamPublisher:
    """The asyncio twin of :class:`StreamPublisher`; use ``async with`` or :meth:`aclose`."""

    def __init__(
        self,
        redis_url: str,
        *,
        stream: str = INGEST_STREAM,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        maxlen: int | None = None,
    ) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.stream = stream
        self.retry = retry or RetryPolicy()
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
        add = partial(self._redis.xadd, self.stream, _fields(body), maxlen=self.maxlen)
        _raise_if_error(await self.retry.acall(add, final, _redis_errors()))
        return str(body["id"])
