"""Acks, sent positions and last-seen times, buffered and written in one statement per flush."""

from __future__ import annotations

from models.ledger import Cursor


class CursorBuffer:
    """Latest cursor values per device since the last flush; merging keeps the maximum.

    Devices whose only move is their ``sent`` cursor (events written, no ack yet) are kept
    apart: while events flow, every connected device moves it on every event, and it only
    feeds the informational ``sent`` status, so it is written less often than acks
    (``take(include_sent=False)`` leaves those devices for a later flush).
    """

    def __init__(self) -> None:
        self._moves: dict[tuple[str, str], list[int]] = {}  # acked or seen moved
        self._sent_only: dict[tuple[str, str], list[int]] = {}
        # Taken for a flush whose transaction has not committed yet.
        self._inflight: dict[tuple[str, str], list[int]] = {}

    def __len__(self) -> int:
        return len(self._moves) + len(self._sent_only)

    def _entry(self, user: str, device: str) -> list[int]:
        key = (user, device)
        entry = self._moves.get(key)
        if entry is None:
            entry = self._sent_only.pop(key, None) or [0, 0, 0]
            self._moves[key] = entry
        return entry

    def ack(self, user: str, device: str, seq: int) -> None:
        entry = self._entry(user, device)
        if seq > entry[0]:
            entry[0] = seq

    def sent(self, user: str, device: str, seq: int) -> None:
        key = (user, device)
        entry = self._moves.get(key) or self._sent_only.get(key)
        if entry is None:
            entry = self._sent_only[key] = [0, 0, 0]
        if seq > entry[1]:
            entry[1] = seq

    def seen(self, user: str, device: str, at: int) -> None:
        entry = self._entry(user, device)
        if at > entry[2]:
            entry[2] = at

    def pending_ack(self, user: str, device: str) -> int:
        """An ack not yet committed (0 if none): a reconnect must not go behind it."""
        key = (user, device)
        return max(
            entry[0] for entry in (self._moves.get(key, (0,)), self._inflight.get(key, (0,)))
        )

    def take(self, include_sent: bool = True) -> list[Cursor]:
        """The moves to flush; they count as pending until :meth:`done` or :meth:`restore`.

        ``include_sent=False`` leaves the devices that only moved ``sent`` for later."""
        moves, self._moves = self._moves, {}
        if include_sent:
            moves.update(self._sent_only)
            self._sent_only = {}
        self._inflight = moves
        return [Cursor(u, d, a, s, t) for (u, d), (a, s, t) in moves.items()]

    def done(self) -> None:
        """The flush of the last :meth:`take` committed."""
        self._inflight = {}

    def restore(self, moves: list[Cursor]) -> None:
        """Put back moves whose flush failed, merged with anything newer."""
        self._inflight = {}
        for m in moves:
            self.ack(m.user, m.device, m.acked)
            self.sent(m.user, m.device, m.sent)
            self.seen(m.user, m.device, m.seen)
