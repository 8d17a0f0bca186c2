"""Health, readiness, Prometheus metrics, cluster stats and the live ops page."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from channels.broker import BrokerUnavailable
from models.ledger import LedgerUnavailable
from server.api import error_response
from server.services import services_of

READY_TIMEOUT = 2.0
_OPS_PAGE = Path(__file__).with_name("ops.html")


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    svc = services_of(request)
    problems: dict[str, str] = {}
    try:
        await asyncio.wait_for(svc.node.ledger.ping(), READY_TIMEOUT)
    except (LedgerUnavailable, TimeoutError) as exc:
        problems["ledger"] = str(exc) or f"no answer within {READY_TIMEOUT:g}s"
    try:
        await asyncio.wait_for(svc.node.broker.ping(), READY_TIMEOUT)
    except (BrokerUnavailable, TimeoutError) as exc:
        problems["broker"] = str(exc) or f"no answer within {READY_TIMEOUT:g}s"
    if svc.node.draining:
        problems["node"] = "draining"
    if problems:
        return JSONResponse({"ready": False, "problems": problems}, status_code=503)
    return JSONResponse({"ready": True})


async def metrics(request: Request) -> Response:
    svc = services_of(request)
    svc.node.count_acks()  # acks are counted in bulk: bring the count up to date
    registry = svc.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _ops_allowed(request: Request) -> bool:
    # Only the Authorization header: a token in a URL ends up in logs and browser history.
    return services_of(request).auth.is_ops(request.headers.get("authorization"))


async def stats(request: Request) -> Response:
    if not _ops_allowed(request):
        return error_response(
            401, "unauthorized", "the ops token is required (Authorization: Bearer)"
        )
    svc = services_of(request)
    nodes = await svc.presence.nodes()
    return JSONResponse(
        {
            "node": svc.settings.node_id,
            "connections": len(svc.node.hub),
            "users": len(svc.node.hub.users()),
            "nodes": nodes,
            "cluster_connections": sum(nodes.values()),
        }
    )


async def ops_page(request: Request) -> Response:
    """The page itself holds no data: it asks for the ops token and sends it as a header."""
    return HTMLResponse(_OPS_PAGE.read_text(), headers={"Cache-Control": "no-store"})


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/v1/stats", stats),
        Route("/ops", ops_page),
    ]
