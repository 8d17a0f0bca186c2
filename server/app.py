"""The application factory: routes plus a lifespan that builds and closes ledger, broker, node."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from channels.broker import Broker, MemoryBroker
from channels.metrics import Metrics
from channels.node import Node, NodeConfig
from channels.presence import LocalPresence, Presence
from channels.pushing import PushDispatcher
from models.ledger import DeviceLimit, Ledger, LedgerUnavailable, head_revision
from models.pushes import PushStore
from server import api, openapi, ops, transport, websocket
from server.api import error_response
from server.auth import Auth
from server.drain import DrainOnTerm
from server.guard import Guard
from server.services import Limits, Services
from server.settings import Settings

log = logging.getLogger("courier")


class StartupError(RuntimeError):
    """The server cannot start; the message says why and what to do."""


def node_config(settings: Settings) -> NodeConfig:
    return NodeConfig(
        node_id=settings.node_id,
        send_queue_size=settings.send_queue_size,
        backfill_page=settings.backfill_page,
        heartbeat_seconds=settings.heartbeat_seconds,
        ack_flush_seconds=settings.ack_flush_seconds,
        reconcile_seconds=settings.reconcile_seconds,
        retention_seconds=settings.retention_seconds,
        rate_limit_per_second=settings.rate_limit_per_second,
        rate_limit_burst=settings.rate_limit_burst,
        device_limit=(
            DeviceLimit(settings.max_devices_per_user, settings.device_limit_policy == "evict")
            if settings.max_devices_per_user
            else None
        ),
    )


async def check_schema(ledger: Ledger, url: str) -> None:
    try:
        current = await ledger.schema_revision()
    except LedgerUnavailable as exc:
        raise StartupError(f"cannot reach the ledger ({_safe(url)}): {exc}") from exc
    wanted = head_revision()
    if current != wanted:
        raise StartupError(
            f"the ledger schema is at revision {current or 'none'}, this server needs {wanted}:"
            " run `courier migrate` first"
        )


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def redis_tls(settings: Settings) -> dict[str, Any]:
    """The TLS options of the configured ``rediss://`` Redis (none for ``redis://``)."""
    from channels.redis import tls_options

    assert settings.redis_url is not None
    return tls_options(settings.redis_url, settings.redis_tls_verify, settings.redis_ca_cert)


def build_broker(settings: Settings) -> Broker:
    if settings.redis_url is None:
        return MemoryBroker()
    from channels.redis import RedisBroker

    return RedisBroker(
        settings.redis_url, tls=redis_tls(settings), name=f"courier:{settings.node_id}"
    )


def build_presence(settings: Settings, node: Node) -> Presence:
    if settings.redis_url is None:
        return LocalPresence(settings.node_id, node.hub)
    from channels.redis import RedisPresence, redis_client

    return RedisPresence(
        redis_client(
            settings.redis_url,
            tls=redis_tls(settings),
            name=f"courier:{settings.node_id}:presence",
        ),
        settings.node_id,
        node.hub,
        interval=settings.presence_seconds,
        ttl=max(5 * settings.presence_seconds, 2.0),
    )


async def start_redis_services(
    settings: Settings, node: Node, presence: Presence, limits: Limits
) -> list[Callable[[], Awaitable[None]]]:
    """With Redis: start the presence heartbeat and the ingest stream consumer.

    Answers the stop functions, to be awaited in order at shutdown.
    """
    if settings.redis_url is None:
        return []
    from channels.ingest import StreamConsumer
    from channels.redis import RedisPresence, redis_client

    stops: list[Callable[[], Awaitable[None]]] = []
    if isinstance(presence, RedisPresence):
        try:
            await presence.start()
        except Exception as exc:  # Redis down at start: the heartbeat loop keeps trying
            log.error("presence: first heartbeat failed (%s); retrying in the background", exc)
            presence.start_beating()

        async def stop_presence() -> None:
            await presence.stop()
            await presence.client.aclose()

        stops.append(stop_presence)
    # No command retries: a blocking XREADGROUP must never be re-sent blindly (see
    # channels.ingest); after an error the consumer re-reads its own pending entries.
    client = redis_client(
        settings.redis_url,
        tls=redis_tls(settings),
        name=f"courier:{settings.node_id}:ingest",
        retries=0,
    )
    consumer = StreamConsumer(
        client, node, limits, consumer=settings.node_id, claim_seconds=settings.ingest_claim_seconds
    )
    consumer.start()

    async def stop_consumer() -> None:
        await consumer.stop()
        await client.aclose()

    stops.insert(0, stop_consumer)
    return stops


def build_dispatcher(
    settings: Settings, store: PushStore, metrics: Metrics
) -> PushDispatcher | None:
    """The push fallback, when a provider is configured (FCM or a webhook)."""
    from channels.push import FcmSender, PushSender, WebhookSender

    sender: PushSender
    if settings.fcm_credentials:
        sender = FcmSender(
            settings.fcm_credentials,
            project=settings.fcm_project,
            endpoint=settings.fcm_endpoint,
            token_uri=settings.fcm_token_uri,
        )
    elif settings.push_webhook_url and settings.push_webhook_secret:
        sender = WebhookSender(settings.push_webhook_url, settings.push_webhook_secret)
    else:
        return None
    log.info("push fallback on: %s, after %ds", sender.name, settings.push_after_seconds)
    return PushDispatcher(
        store,
        sender,
        metrics,
        claim_seconds=settings.push_claim_seconds,
        high_priority_kinds=settings.push_high_priority_kinds,
    )


def create_app(settings: Settings) -> Starlette:
    auth = Auth(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ledger = Ledger.from_url(settings.database_url)
        try:
            await check_schema(ledger, settings.database_url)
            metrics = Metrics()
            node = Node(node_config(settings), ledger, build_broker(settings), metrics)
            await node.start()
        except BaseException:
            await ledger.close()
            raise
        limits = Limits.of(settings)
        for reason in transport.REASONS:
            metrics.transport_refusals.labels(reason)
        transport.count_refusals(lambda reason: metrics.transport_refusals.labels(reason).inc())
        presence = build_presence(settings, node)
        redis_stops = await start_redis_services(settings, node, presence, limits)
        app.state.services = Services(
            settings=settings,
            auth=auth,
            node=node,
            presence=presence,
            metrics=metrics,
            limits=limits,
            guard=Guard(settings, metrics),
            pushes=PushStore(ledger),
        )
        dispatcher = build_dispatcher(settings, app.state.services.pushes, metrics)
        if dispatcher is not None:
            dispatcher.start()

        drain = DrainOnTerm(node, settings.drain_batch, settings.drain_seconds)
        drain.install()
        if settings.dev_mode:
            log.warning(
                "DEV MODE: secrets are generated and kept in %s; in production set COURIER_ENV="
                "production, COURIER_JWT_SECRET, COURIER_API_KEYS and COURIER_OPS_TOKEN",
                settings.dev_file,
            )
        log.info(
            "node %s ready (ledger %s, broker %s)",
            settings.node_id,
            _safe(settings.database_url),
            "redis" if settings.redis_url else "in-process",
        )
        # What startup made (modules, the app, pools) lives as long as the process: the
        # collector stops scanning it, so a full collection walks only what connections
        # and requests made since, and its pause shrinks by as much.
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(YOUNG_COLLECTION_AFTER, *thresholds[1:])
        try:
            yield
        finally:
            drain.uninstall()
            if dispatcher is not None:
                await bounded_step("the push dispatcher's stop", dispatcher.stop())
            for stop in redis_stops:  # the ingest consumer first: nothing new while draining
                await bounded_step(stop.__name__, stop())
            await node.drain(seconds=min(settings.drain_seconds, 2.0))
            await bounded_step("the node's stop", node.stop(), seconds=8.0)
            await bounded_step("closing the ledger's pool", ledger.close())
            transport.count_refusals(None)
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            log.info("node %s stopped", settings.node_id)

    return CourierApp(
        routes=[*websocket.routes(), *api.routes(), *ops.routes(), *openapi.routes()],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )


YOUNG_COLLECTION_AFTER = 10_000
"""New container objects (net of those freed) before the collector runs (CPython's
default: 700). Handling a batch (500 backfill rows, 1,000 registrations) makes thousands
of objects at once that reference counting frees a moment later; at 700 each batch set
off collections that found nothing, every tenth of them also a collection of the middle
generation, and every few of those a full one that walks every connection: at 10,000
reconnecting devices 2,746 / 249 / 5 collections and 1.1 s of the storm's CPU, 246 / 22 /
3 and 0.2 s at this threshold (docs/benchmarks.md, fifth round). Connections leave no
reference cycles behind (the upgrade's HTTP protocol is let go, ``server/transport.py``),
so nothing of theirs waits for it."""

SHUTDOWN_STEP_SECONDS = 5.0


async def bounded_step(
    step: str, work: Awaitable[None], seconds: float = SHUTDOWN_STEP_SECONDS
) -> None:
    """One step of the shutdown, given ``seconds``: a step that hangs (a peer that never
    answers, a bug) must not keep the process from exiting, and the log says which step
    it was and where it waited."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        task.result()  # its failure is the shutdown's, as it was without the bound
        return
    where = io.StringIO()
    task.print_stack(file=where)
    log.error(
        "shutdown: %s did not finish within %gs; going on without it. It waited at:\n%s",
        step,
        seconds,
        where.getvalue().rstrip(),
    )
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)


class CourierApp(Starlette):
    """Starlette, with device connections and publishes handed to their endpoints directly.

    A device connection lives for hours; through the router and the exception
    middlewares it would hold their coroutine frames (about 4 KiB) all that time. A
    publish is the most frequent request, and the router and middlewares were a seventh
    of its CPU. Both endpoints handle every error of their own (a refusal is an HTTP
    answer, a fault a close code or a logged 500), so they need neither. Any other path,
    these two under a ``root_path`` too, goes the usual way to the same endpoints.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if path == api.PUBLISH_PATH and scope["type"] == "http" and scope["method"] == "POST":
            scope["app"] = self
            await api.publish(scope, receive, send)
            return
        if path == websocket.PATH and scope["type"] == "websocket":
            scope["app"] = self
            await websocket.device_socket(WebSocket(scope, receive, send))
            return
        await super().__call__(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    """A request no route takes (404) or a method its route does not serve (405): the same
    JSON error body as every other refusal, with the router's headers (``Allow``)."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, exc.detail, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug, never the client's input: one ERROR with the traceback, a JSON 500, and the
    connection closed (its state is unknown) with ``Connection: close`` said to the client."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "internal", "internal error; it has been logged", headers={"Connection": "close"}
    )
