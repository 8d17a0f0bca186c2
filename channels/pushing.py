"""The push fallback: events a device has not acked in time go to it as a platform push.

Every node with a sender configured runs a ``PushDispatcher``. Each round it

1. decides the pushes now due (``PushStore.decide``: one row per (event, device), made
   once whatever the number of nodes);
2. claims due decisions for a lease and groups them per device: the events of a device
   due together go as one push that carries the newest (``carried`` says how many);
3. sends each group in a task of its own, at most ``concurrency`` at once, so a slow or
   failing provider delays neither socket delivery (a different path altogether) nor the
   other pushes; then finishes the decisions by the provider's answer.

Right before sending, a decision is checked again: an event acked, expired or superseded
since it was decided is skipped, not pushed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Callable

from channels.metrics import Metrics
from channels.push import MAX_ATTEMPTS, PushMessage, PushOutcome, PushSender, retry_delay
from models.ledger import LedgerUnavailable, now_ms
from models.pushes import Claimed, PushStore

log = logging.getLogger("courier.push")


class PushDispatcher:
    def __init__(
        self,
        store: PushStore,
        sender: PushSender,
        metrics: Metrics,
        *,
        claim_seconds: float = 30.0,
        interval: float = 0.5,
        concurrency: int = 64,
        batch: int = 200,
        high_priority_kinds: frozenset[str] = frozenset(),
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.sender = sender
        self.metrics = metrics
        self.lease_ms = int(claim_seconds * 1000)
        self.interval = interval
        self.batch = batch
        self.high_priority_kinds = high_priority_kinds
        self.clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._sends: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="courier.push")

    async def stop(self) -> None:
        """Stop deciding and claiming; sends under way finish (bounded by the sender's
        timeout). A decision claimed but not finished is claimed again after its lease."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sends:
            await asyncio.wait(self._sends)
        await self.sender.aclose()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                claimed = await self.round()
                if failures:
                    log.info("push decisions resumed")
                failures = 0
            except LedgerUnavailable as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("push decisions paused: %s (failure %d)", exc, failures)
                claimed = 0
            if claimed < self.batch:  # a full batch: more may be due right away
                await asyncio.sleep(self.interval)

    async def round(self) -> int:
        """Decide, claim and start sending; answers how many decisions were claimed."""
        now = self.clock()
        await self.store.decide(now)
        claimed = await self.store.claim(now, self.lease_ms, self.batch)
        groups: dict[tuple[str, str], list[Claimed]] = defaultdict(list)
        for c in claimed:
            groups[(c.user, c.device)].append(c)
        for rows in groups.values():
            await self._slots.acquire()
            task = asyncio.create_task(self._send_guarded(rows))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        return len(claimed)

    async def _send_guarded(self, rows: list[Claimed]) -> None:
        try:
            await self.send(rows)
        except LedgerUnavailable as exc:  # the lease runs out and another round retries it
            log.warning("push of %s/%s not finished: %s", rows[0].user, rows[0].device, exc)
        except Exception:
            log.exception("push of %s/%s failed", rows[0].user, rows[0].device)
        finally:
            self._slots.release()

    async def send(self, rows: list[Claimed]) -> None:
        """Send one device's claimed decisions as one push and finish them."""
        now = self.clock()
        live: list[Claimed] = []
        skipped: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for c in rows:
            reason = _stale(c, now)
            if reason is None:
                live.append(c)
            else:
                skipped[reason].append(c.key)
        for reason, keys in skipped.items():
            self.metrics.pushes_skipped.labels(reason).inc(len(keys))
            await self.store.finish(keys, "skipped", now, reason)
        if not live:
            return
        newest = max(live, key=lambda c: c.seq)
        keys = [c.key for c in live]
        assert newest.provider is not None and newest.token is not None  # _stale checked it
        outcome = await self.sender.send(self._message(newest, len(live)), now)
        done = self.clock()
        if outcome.status == "sent":
            self.metrics.pushes_sent.labels(newest.provider).inc()
            for c in live:
                self.metrics.publish_to_push.observe(max(0.0, (done - c.created_at) / 1000))
            await self.store.finish(keys, "sent", done, outcome.message_id, newest.seq)
            return
        self.metrics.push_failures.labels(outcome.reason).inc()
        attempts = max(c.attempts for c in live)
        if outcome.status == "retry" and attempts < MAX_ATTEMPTS:
            delay = retry_delay(attempts, outcome.retry_after)
            await self.store.retry(keys, done + int(delay * 1000), outcome.reason)
            return
        await self.store.finish(keys, "failed", done, outcome.reason)
        self._log_failure(newest, outcome, attempts)
        removed = outcome.status == "unregistered" and await self.store.unregister(
            newest.user, newest.device, newest.token
        )
        if removed:
            self.metrics.push_registrations_removed.inc()
            log.info(
                "push address of %s/%s removed: the provider answered %s",
                newest.user,
                newest.device,
                outcome.reason,
            )

    def _message(self, c: Claimed, carried: int) -> PushMessage:
        assert c.provider is not None and c.token is not None
        note = json.loads(c.notification) if c.notification else None
        return PushMessage(
            user=c.user,
            device=c.device,
            provider=c.provider,
            token=c.token,
            event_id=c.event_id,
            seq=c.seq,
            kind=c.kind,
            data=c.data,
            created_at=c.created_at,
            expires_at=c.expires_at,
            collapse=c.collapse,
            notification=note,
            high_priority=c.kind in self.high_priority_kinds,
            carried=carried,
        )

    def _log_failure(self, c: Claimed, outcome: PushOutcome, attempts: int) -> None:
        if outcome.status == "retry":
            log.warning(
                "push of %s/%s seq %d given up after %d attempts: %s",
                c.user,
                c.device,
                c.seq,
                attempts,
                outcome.reason,
            )
        elif outcome.status == "failed":
            log.warning("push of %s/%s seq %d refused: %s", c.user, c.device, c.seq, outcome.reason)


def _stale(c: Claimed, now: int) -> str | None:
    """Why a decided push is no longer to be sent, or None."""
    if c.acked_seq >= c.seq:
        return "acked"
    if c.expires_at is not None and c.expires_at <= now:
        return "expired"
    if c.superseded_by is not None:
        return "superseded"
    if c.provider is None or c.token is None:
        return "unregistered"
    return None
