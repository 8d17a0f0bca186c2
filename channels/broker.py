"""The fan-out bus between nodes.

A ``Broker`` moves opaque payloads on named channels, with at-most-once delivery:
a message published while a node is disconnected from the bus is lost *for the
bus*, never for devices, because every event is in the ledger first and nodes
catch up from it (see ``channels.node``). The broker never sees a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

MessageHandler = Callable[[str, bytes], None]
"""Called on the event loop for each message: ``(channel, payload)``. Must not block."""

ReconnectHandler = Callable[[], None]
"""Called after the bus reconnected and re-subscribed: messages may have been lost."""


def user_channel(user: str) -> str:
    # Braces make the user the Redis Cluster hash tag (sharded pub/sub keeps a user on one shard).
    return f"courier:u:{{{user}}}"


class BrokerUnavailable(Exception):
    """The bus could not be reached."""


class Broker(Protocol):
    async def start(self, on_message: MessageHandler, on_reconnect: ReconnectHandler) -> None:
        """Connect and start delivering messages to ``on_message``."""

    async def subscribe(self, channels: Iterable[str]) -> None:
        """Return once messages on ``channels`` are delivered. Idempotent."""

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop delivering ``channels``. Idempotent."""

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Send each ``(channel, payload)`` to every node subscribed to the channel, in order."""

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` if the bus cannot be reached."""

    async def close(self) -> None:
        """Stop delivering and release connections."""


class MemoryBroker:
    """In-process broker: the embedded default, single process only."""

    def __init__(self) -> None:
        self._channels: set[str] = set()
        self._on_message: MessageHandler | None = None

    async def start(self, on_message: MessageHandler, on_reconnect: ReconnectHandler) -> None:
        self._on_message = on_message

    async def subscribe(self, channels: Iterable[str]) -> None:
        self._channels.update(channels)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._channels.difference_update(channels)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for channel, payload in messages:
            if self._on_message is not None and channel in self._channels:
                self._on_message(channel, payload)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._on_message = None
        self._channels.clear()

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)
