"""The local registry: which connections of which users live in this process.

The hub never sees Redis or the ledger; ``channels.node`` joins them.
"""

from __future__ import annotations

from collections.abc import Iterator

from channels.client import Client


class Hub:
    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, Client]] = {}
        self._by_device: dict[tuple[str, str], Client] = {}
        self._count = 0  # kept, not summed: every handshake reads it (the connection cap)
        # Users whose connections changed since ``take_changed``, once someone tracks them.
        self._changed: set[str] | None = None

    def add(self, client: Client) -> Client | None:
        """Register ``client``; answers the connection of the same device it displaces."""
        conns = self._by_user.setdefault(client.user, {})
        if client.conn_id not in conns:
            self._count += 1
        if self._changed is not None:
            self._changed.add(client.user)
        conns[client.conn_id] = client
        key = (client.user, client.device)
        previous = self._by_device.get(key)
        self._by_device[key] = client
        return previous

    def remove(self, client: Client) -> bool:
        """Unregister ``client``; False if it was not registered."""
        conns = self._by_user.get(client.user)
        if conns is None or conns.pop(client.conn_id, None) is None:
            return False
        self._count -= 1
        if self._changed is not None:
            self._changed.add(client.user)
        key = (client.user, client.device)
        if self._by_device.get(key) is client:
            del self._by_device[key]
        if not conns:
            del self._by_user[client.user]
        return True

    def clients(self, user: str) -> tuple[Client, ...]:
        """A snapshot (callers may close connections while iterating)."""
        conns = self._by_user.get(user)
        return tuple(conns.values()) if conns else ()

    def has(self, user: str) -> bool:
        """Whether ``user`` has a connection here."""
        return user in self._by_user

    def device(self, user: str, device: str) -> Client | None:
        return self._by_device.get((user, device))

    def users(self) -> list[str]:
        return list(self._by_user)

    def all(self) -> Iterator[Client]:
        for conns in list(self._by_user.values()):
            yield from list(conns.values())

    def track_changes(self) -> None:
        """From now on, note every user whose connections change (see ``take_changed``)."""
        if self._changed is None:
            self._changed = set()

    def take_changed(self) -> set[str]:
        """The users whose connections changed since the last call (once tracked)."""
        changed, self._changed = self._changed or set(), set()
        return changed

    def __len__(self) -> int:
        return self._count

    @property
    def connections(self) -> int:
        return len(self)
