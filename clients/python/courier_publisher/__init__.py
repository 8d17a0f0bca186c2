"""Publish events to a Courier notification server from backend code.

    from courier_publisher import Publisher

    courier = Publisher("https://courier.example.com", api_key)
    courier.publish("u1", "block.grabbed", {"block_id": "B9"}, id="grab-B9-u1", ttl=600)

``Publisher`` and ``AsyncPublisher`` use the HTTP API; ``StreamPublisher`` and
``AsyncStreamPublisher`` the Redis ingest stream (the ``redis`` extra). All four retry
under one :class:`RetryPolicy`, and give every event its idempotency key before the first
attempt, so that no retry can record an event twice.
"""

from courier_publisher._events import PublishError, PublishResult, event
from courier_publisher._http import AsyncPublisher, Publisher
from courier_publisher._retry import RETRY_STATUSES, RetryPolicy, retry_after
from courier_publisher._stream import INGEST_STREAM, AsyncStreamPublisher, StreamPublisher

__version__ = "0.1.0"
__all__ = [
    "INGEST_STREAM",
    "RETRY_STATUSES",
    "AsyncPublisher",
    "AsyncStreamPublisher",
    "PublishError",
    "PublishResult",
    "Publisher",
    "RetryPolicy",
    "StreamPublisher",
    "event",
    "retry_after",
]
