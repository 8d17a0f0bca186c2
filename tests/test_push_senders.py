"""The push senders alone, against real local HTTP servers: a fake FCM HTTP v1 endpoint
with its OAuth2 token endpoint (tests/fake_fcm.py), and a webhook receiver.

No database, no Courier server: each test builds a sender, sends, and reads the outcome
and what the provider received.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from channels.push import (
    MAX_ATTEMPTS,
    FcmSender,
    PushMessage,
    PushOutcome,
    WebhookSender,
    retry_delay,
    verify_webhook,
)
from channels.push.fcm import MAX_DATA_BYTES
from tests.fake_fcm import PROJECT, FakeGoogle
from tests.harness import ThreadServer, free_port, unique

NOW = 1_795_341_481_123
"""2026-11-22T09:58:01.123Z, the "now" of every send that does not need the real clock."""


def message(token: str, **fields: Any) -> PushMessage:
    base: dict[str, Any] = {
        "user": "u1",
        "device": "phone1",
        "provider": "fcm",
        "token": token,
        "event_id": "e-1",
        "seq": 7,
        "kind": "plan.changed",
        "data": '{"plan":"a"}',
        "created_at": NOW - 5_000,
        "expires_at": None,
        "collapse": None,
        "notification": None,
        "high_priority": False,
    }
    return PushMessage(**{**base, **fields})


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    fake = FakeGoogle().start()
    yield fake
    fake.stop()
    assert fake.problems == []


@asynccontextmanager
async def fcm(credentials: str, **options: Any) -> AsyncIterator[FcmSender]:
    sender = FcmSender(credentials, **options)
    try:
        yield sender
    finally:
        await sender.aclose()


def closed_url() -> str:
    """An address where nothing listens: connections to it are refused."""
    return f"http://127.0.0.1:{free_port()}"


# -- FCM: what is sent -----------------------------------------------------------------------


async def test_a_sent_message_has_exactly_the_documented_fields(google: FakeGoogle) -> None:
    grabbed, plain = f"ok-{unique()}", f"ok-{unique()}"
    note = {"title": "Block grabbed", "body": "10:00-12:00"}
    async with fcm(google.service_account(), endpoint=google.url) as sender:
        first = await sender.send(
            message(
                grabbed,
                kind="block.grabbed",
                high_priority=True,  # the dispatcher's choice for a listed kind
                data='{"block_id":"B9"}',
                collapse="blocks",
                expires_at=NOW + 42_500,
                notification=note,
                carried=3,
            ),
            NOW,
        )
        second = await sender.send(message(plain), NOW)
    assert first.status == second.status == "sent" and first.reason == "ok"
    assert first.message_id is not None
    assert first.message_id.startswith(f"projects/{PROJECT}/messages/")
    [got] = google.arrivals(grabbed)
    assert got.message == {
        "token": grabbed,
        "data": {
            "id": "e-1",
            "seq": "7",
            "kind": "block.grabbed",
            "data": '{"block_id":"B9"}',
            "collapse": "blocks",
            "carried": "3",
        },
        "android": {"priority": "HIGH", "collapse_key": "blocks", "ttl": "42s"},
        "notification": note,
    }
    [got] = google.arrivals(plain)
    assert got.message == {
        "token": plain,
        "data": {"id": "e-1", "seq": "7", "kind": "plan.changed", "data": '{"plan":"a"}'}
        | {"carried": "1"},
        "android": {"priority": "NORMAL"},
    }


async def test_data_over_4_kb_is_left_out_and_the_event_still_named(google: FakeGoogle) -> None:
    big, fits = f"ok-{unique()}", f"ok-{unique()}"
    large = json.dumps({"blob": "x" * MAX_DATA_BYTES})
    small = json.dumps({"blob": "x" * 3000})
    async with fcm(google.service_account(), endpoint=google.url) as sender:
        outcomes = [
            await sender.send(message(big, data=large, collapse="plan"), NOW),
            await sender.send(message(fits, data=small), NOW),
        ]
    assert [o.status for o in outcomes] == ["sent", "sent"]
    [got] = google.arrivals(big)
    assert got.message["data"] == {
        "id": "e-1",
        "seq": "7",
        "kind": "plan.changed",
        "collapse": "plan",
        "carried": "1",
    }
    [got] = google.arrivals(fits)
    assert got.message["data"]["data"] == small
    assert len(json.dumps(got.message["data"], separators=(",", ":")).encode()) <= 4096


async def test_an_expired_event_is_not_sent(google: FakeGoogle) -> None:
    token = f"ok-{unique()}"
    async with fcm(google.service_account(), endpoint=google.url) as sender:
        outcome = await sender.send(message(token, expires_at=NOW - 1), NOW)
    assert outcome == PushOutcome("failed", "expired")
    assert google.arrivals(token) == [] and google.token_fetches == 0


async def test_credentials_from_a_file_the_token_uri_override_and_the_project(
    google: FakeGoogle, tmp_path: Path
) -> None:
    """The key's own token_uri is used unless one is given; the project is the key's
    project_id unless one is given (a wrong one is a failure, and no token is removed)."""
    key = json.loads(google.service_account())
    key["token_uri"] = f"{closed_url()}/token"
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))
    token = f"ok-{unique()}"
    async with fcm(str(path), endpoint=google.url, token_uri=google.token_uri) as sender:
        assert sender.project == PROJECT
        assert (await sender.send(message(token), NOW)).status == "sent"
    async with fcm(google.service_account(), endpoint=google.url, project="someone-else") as sender:
        assert await sender.send(message(token), NOW) == PushOutcome("failed", "NOT_FOUND")
    assert len(google.arrivals(token)) == 1


# -- FCM: the access token -------------------------------------------------------------------


async def test_the_access_token_is_fetched_once_reused_and_refreshed_before_expiry(
    google: FakeGoogle,
) -> None:
    google.expires_in = 400  # fresh while more than 300 s are left
    now = [time.time()]
    async with fcm(google.service_account(), endpoint=google.url, clock=lambda: now[0]) as sender:
        tokens = [f"ok-{unique()}" for _ in range(10)]
        first = await asyncio.gather(*(sender.send(message(t), NOW) for t in tokens))
        assert {o.status for o in first} == {"sent"}
        assert google.token_fetches == 1  # ten sends at once, one token exchange
        now[0] += 50
        assert (await sender.send(message(f"ok-{unique()}"), NOW)).status == "sent"
        assert google.token_fetches == 1
        now[0] += 51  # under 300 s left: a new token before the old one runs out
        assert (await sender.send(message(f"ok-{unique()}"), NOW)).status == "sent"
        assert google.token_fetches == sender.token_fetches == 2


async def test_a_401_drops_the_cached_token_and_the_next_send_fetches_one(
    google: FakeGoogle,
) -> None:
    async with fcm(google.service_account(), endpoint=google.url) as sender:
        assert (await sender.send(message(f"ok-{unique()}"), NOW)).status == "sent"
        google.revoke()
        assert await sender.send(message(f"ok-{unique()}"), NOW) == PushOutcome(
            "failed", "UNAUTHENTICATED"
        )
        assert google.token_fetches == 1
        assert (await sender.send(message(f"ok-{unique()}"), NOW)).status == "sent"
        assert google.token_fetches == 2


async def test_a_refused_token_exchange_is_a_retry_not_an_exception(google: FakeGoogle) -> None:
    token = f"ok-{unique()}"
    google.refuse_grants = True
    async with fcm(google.service_account(), endpoint=google.url) as sender:
        assert await sender.send(message(token), NOW) == PushOutcome("retry", "oauth_error")
        assert google.arrivals(token) == []
        google.refuse_grants = False
        assert (await sender.send(message(token), NOW)).status == "sent"


# -- FCM: answers ----------------------------------------------------------------------------


async def test_each_fcm_answer_maps_to_its_outcome(google: FakeGoogle) -> None:
    async with fcm(google.service_account(), endpoint=google.url) as sender:

        async def send(prefix: str) -> PushOutcome:
            return await sender.send(message(f"{prefix}-{unique()}"), NOW)

        ok = await send("ok")
        assert (ok.status, ok.reason, ok.retry_after) == ("sent", "ok", None) and ok.message_id
        assert await send("gone") == PushOutcome("unregistered", "UNREGISTERED")
        assert await send("bad") == PushOutcome("unregistered", "INVALID_ARGUMENT")
        # INVALID_ARGUMENT naming a payload field is not the token's fault: keep the token.
        assert await send("badfield") == PushOutcome("failed", "INVALID_ARGUMENT")
        assert await send("busy") == PushOutcome("retry", "QUOTA_EXCEEDED", retry_after=2.0)
        unavailable = await send("unavail")  # Retry-After as an HTTP date, 120 s on
        assert (unavailable.status, unavailable.reason) == ("retry", "UNAVAILABLE")
        assert unavailable.retry_after is not None and 110 <= unavailable.retry_after <= 120
        assert await send("down") == PushOutcome("retry", "INTERNAL")
        assert await send("denied") == PushOutcome("failed", "SENDER_ID_MISMATCH")
        assert await sender.send(message("ok-1", provider="apns"), NOW) == PushOutcome(
            "failed", "unsupported_provider"
        )
    async with fcm(google.service_account(), endpoint=closed_url()) as sender:
        assert await sender.send(message(f"ok-{unique()}"), NOW) == PushOutcome(
            "retry", "connect_error"
        )


async def test_a_slow_provider_times_out_without_holding_up_other_sends(
    google: FakeGoogle,
) -> None:
    """Twenty sends at once, one to a device whose request FCM never answers: the other
    nineteen are all answered while that one is still waiting, and it ends as a retry
    when its own timeout runs out (the sender's timeout, not the given client's)."""
    tokens = [f"ok-{unique()}" for _ in range(20)]
    tokens[7] = f"hang-{unique()}"
    finished: list[int] = []
    others_done = asyncio.Event()
    outcomes: dict[int, PushOutcome] = {}
    client = httpx.AsyncClient(timeout=600)
    async with fcm(
        google.service_account(), endpoint=google.url, timeout=2.0, client=client
    ) as sender:

        async def one(i: int) -> None:
            outcomes[i] = await sender.send(message(tokens[i]), NOW)
            finished.append(i)
            if len([j for j in finished if j != 7]) == 19:
                others_done.set()

        tasks = [asyncio.create_task(one(i)) for i in range(20)]
        await others_done.wait()
        assert not tasks[7].done()  # the slow one is still waiting on its answer
        await asyncio.gather(*tasks)
    assert finished[-1] == 7
    assert outcomes[7] == PushOutcome("retry", "timeout")
    assert {outcomes[i].status for i in range(20) if i != 7} == {"sent"}
    [hung] = google.arrivals(tokens[7])
    assert hung.answered is None


# -- the retry rule --------------------------------------------------------------------------


def test_retry_delay_is_jittered_backoff_with_retry_after_as_a_floor_and_a_cap() -> None:
    assert MAX_ATTEMPTS == 5
    for attempt in range(1, MAX_ATTEMPTS + 1):
        delays = [retry_delay(attempt, None) for _ in range(300)]
        assert all(0 <= d <= 2.0**attempt for d in delays)
        assert max(delays) > 2.0**attempt / 2 and min(delays) < 2.0**attempt / 2  # spread
    assert all(retry_delay(1, 30.0) >= 30.0 for _ in range(50))  # Retry-After: at least
    assert all(retry_delay(3, 2.0) >= 2.0 for _ in range(50))
    assert all(retry_delay(30, None) <= 300.0 for _ in range(50))  # capped
    assert retry_delay(1, 10_000.0) == 300.0


# -- the webhook -----------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on a real port: records every request, answers by its path."""

    ANSWERS = {
        "hang": 204,
        "ok": 204,
        "gone": 410,
        "busy": 429,
        "unavail": 503,
        "down": 500,
        "bad": 400,
    }

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        app = Starlette(routes=[Route("/{answer}", self.hook, methods=["POST"])])
        self.server = ThreadServer(app)

    async def hook(self, request: Request) -> Response:
        answer = request.path_params["answer"]
        self.got.append((answer, dict(request.headers), await request.body()))
        if answer == "hang":
            await self.server.hold()
        headers = {"Retry-After": "7"} if answer == "busy" else None
        return Response(status_code=self.ANSWERS[answer], headers=headers)

    def url(self, answer: str) -> str:
        return f"{self.server.url}/{answer}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.server.stop()


def receiver_from_the_docs(secret: str, headers: dict[str, str], body: bytes, now: float) -> bool:
    """docs/push.md's steps, written without Courier's code."""
    timestamp = headers["courier-timestamp"]
    if not timestamp.isdigit() or abs(now - int(timestamp)) > 300:
        return False
    signed = timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest("v1=" + digest, headers["courier-signature"])


async def test_the_webhook_body_and_headers_and_a_receiver_from_the_docs(
    receiver: Receiver,
) -> None:
    secret = "whsec-" + unique()
    sender = WebhookSender(receiver.url("ok"), secret)
    push = message(
        "apns-token-1",
        provider="apns",
        kind="block.grabbed",
        data='{"block_id":"B9","slot":{"from":"10:00"}}',
        created_at=NOW,
        expires_at=1_795_345_081_000,
        collapse="blocks",
        notification={"title": "Block grabbed"},
        high_priority=True,
        carried=2,
    )
    sent_at = time.time()
    outcome = await sender.send(push, int(sent_at * 1000))
    await sender.aclose()
    assert outcome == PushOutcome("sent", "ok")
    [(_, headers, body)] = receiver.got
    assert headers["content-type"] == "application/json"
    assert abs(int(headers["courier-timestamp"]) - sent_at) <= 1
    assert receiver_from_the_docs(secret, headers, body, time.time())
    assert json.loads(body) == {
        "type": "courier.push",
        "user": "u1",
        "device": "phone1",
        "provider": "apns",
        "token": "apns-token-1",
        "event": {
            "id": "e-1",
            "seq": 7,
            "kind": "block.grabbed",
            "data": {"block_id": "B9", "slot": {"from": "10:00"}},
            "created_at": "2026-11-22T09:58:01.123Z",
            "expires_at": "2026-11-22T10:58:01.000Z",
            "collapse": "blocks",
        },
        "notification": {"title": "Block grabbed"},
        "high_priority": True,
        "carried": 2,
    }
    timestamp, signature = headers["courier-timestamp"], headers["courier-signature"]
    now = time.time()
    assert verify_webhook(secret, timestamp, signature, body, now)
    assert not verify_webhook(secret, timestamp, signature, body.replace(b"B9", b"B8"), now)
    flipped = signature[:-1] + ("1" if signature[-1] != "1" else "2")
    assert not verify_webhook(secret, timestamp, flipped, body, now)
    assert not verify_webhook("not-the-secret", timestamp, signature, body, now)
    assert not verify_webhook(secret, timestamp, signature, body, now + 301)  # a replay
    assert not verify_webhook(secret, timestamp, signature, body, now - 301)  # from ahead
    assert not receiver_from_the_docs(secret, headers, body, now + 301)
    assert not verify_webhook(secret, "-1", signature, body, now)


async def test_each_webhook_answer_maps_to_its_outcome(receiver: Receiver) -> None:
    async def send(url: str, push: PushMessage | None = None) -> PushOutcome:
        sender = WebhookSender(url, "secret", timeout=1.0)
        try:
            return await sender.send(push or message("t"), int(time.time() * 1000))
        finally:
            await sender.aclose()

    assert await send(receiver.url("ok")) == PushOutcome("sent", "ok")
    assert await send(receiver.url("gone")) == PushOutcome("unregistered", "http_410")
    assert await send(receiver.url("busy")) == PushOutcome("retry", "http_429", retry_after=7.0)
    assert await send(receiver.url("unavail")) == PushOutcome("retry", "http_503")
    assert await send(receiver.url("down")) == PushOutcome("retry", "http_500")
    assert await send(receiver.url("bad")) == PushOutcome("failed", "http_400")
    assert await send(receiver.url("hang")) == PushOutcome("retry", "timeout")
    assert await send(closed_url()) == PushOutcome("retry", "connect_error")
    assert await send(receiver.url("ok"), message("t", data="not json")) == PushOutcome(
        "failed", "invalid_data"
    )
    assert len(receiver.got) == 7  # the last was never sent
