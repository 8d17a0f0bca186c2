"""Which devices are connected now, and how many connections each node holds."""

from __future__ import annotations

from typing import Protocol

from channels.hub import Hub


class Presence(Protocol):
    async def connected_devices(self, user: str) -> set[str]: ...

    async def nodes(self) -> dict[str, int]:
        """Connections per live node id."""
        ...


class LocalPresence:
    """Presence of this process only (the embedded default: one process is the cluster)."""

    def __init__(self, node_id: str, hub: Hub) -> None:
        self.node_id = node_id
        self.hub = hub

    async def connected_devices(self, user: str) -> set[str]:
        return {c.device for c in self.hub.clients(user) if not c.closed}

    async def nodes(self) -> dict[str, int]:
        return {self.node_id: len(self.hub)}
