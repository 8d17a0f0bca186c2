"""``GET /v1/ws``: the device connection (handshake auth, resume; the ASGI task reads, a
writer task runs while there is something to write)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from typing import cast

import msgspec
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.types import Scope
from starlette.websockets import WebSocket

from channels import deadlines
from channels.broker import BrokerUnavailable
from channels.client import Client, FastWriter
from channels.deadlines import Deadline
from channels.disconnect import (
    INTERNAL,
    RATE_LIMITED,
    TOKEN_EXPIRED,
    TOKEN_REFUSED,
    TRY_AGAIN,
    Disconnect,
    code_label,
)
from channels.frames import PONG, PUSH_OK, InFrame, auth_ok_frame, error_frame, in_frame_decoder
from channels.limits import SCOPE_KEY, TokenBucket
from channels.node import DeviceRefused, Node
from models.ledger import LedgerUnavailable, now_ms
from models.pushes import PushStore, push_address_problem, token_hint
from server.auth import Auth, AuthError, DeviceIdentity, bearer
from server.guard import Refusal
from server.services import Services, services_of
from server.transport import FAST_KEY

log = logging.getLogger("courier.ws")

_AFTER = re.compile(r"[0-9]{1,18}")
"""``after=``: ASCII digits only (``str.isdigit`` would take ``٣`` as 3)."""


def _refusal(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _parse_after(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not _AFTER.fullmatch(raw):
        raise ValueError("after must be a non-negative whole number (a seq)")
    return int(raw)


def _deny(refusal: Refusal) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": refusal.code, "message": refusal.message}},
        status_code=refusal.status,
        headers=refusal.headers(),
    )


def _header(scope: Scope, name: bytes) -> str | None:
    """A request header read from the scope itself (Starlette's ``websocket.headers``
    would keep a parsed copy for the connection's whole life)."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def device_socket(websocket: WebSocket) -> None:
    svc = services_of(websocket)
    admitted = await _admit(websocket, svc)
    if admitted is not None:
        await _serve(websocket, svc, *admitted)


async def _admit(
    websocket: WebSocket, svc: Services
) -> tuple[Client, FastWriter | None, _Expiry] | None:
    """The handshake: checks, registration, ``accept``. Answers the open connection, or
    None when it was refused (the refusal is answered here). Nothing of the request
    (headers, query string, token) outlives this call."""
    node, metrics, guard = svc.node, svc.metrics, svc.guard
    scope = websocket.scope
    if node.draining:
        metrics.handshake_refusals.labels("draining").inc()
        await websocket.send_denial_response(
            _refusal(503, "draining", "this node is shutting down; connect again")
        )
        return None
    address = scope["client"][0] if scope.get("client") else "unknown"
    refusal = guard.before_auth(address, _header(scope, b"origin"), node.hub.connections)
    if refusal is not None:
        await websocket.send_denial_response(_deny(refusal))
        return None
    query = QueryParams(scope["query_string"])
    header = bearer(_header(scope, b"authorization"))
    token = header.decode() if header else query.get("token")
    try:
        identity = svc.auth.verify_device_token(token)
        after = _parse_after(query.get("after"))
    except AuthError as exc:
        guard.auth_failed(address)
        metrics.handshake_refusals.labels(exc.code).inc()
        await websocket.send_denial_response(_refusal(401, exc.code, exc.message))
        return None
    except ValueError as exc:
        metrics.handshake_refusals.labels("bad_after").inc()
        await websocket.send_denial_response(_refusal(400, "bad_after", str(exc)))
        return None
    refusal = guard.reconnect(identity.user, identity.device, address)
    if refusal is not None:
        await websocket.send_denial_response(_deny(refusal))
        return None

    # Registered before the upgrade, so that a device past the device limit is refused
    # with an HTTP answer; frames queued meanwhile (hello, backfill) go out once accepted.
    extensions = scope.get("extensions") or {}
    budget = extensions.get(SCOPE_KEY)
    # Only under ``courier serve`` (the key is this server's own); else the plain ASGI path.
    fast = cast(FastWriter | None, extensions.get(FAST_KEY))
    client = node.new_client(
        websocket,
        identity.user,
        identity.device,
        budget if isinstance(budget, TokenBucket) else None,
        fast,
    )
    try:
        await node.connect(client, after)
    except DeviceRefused:
        metrics.device_limit.labels("refused").inc()
        log.warning(
            "device limit: user %s has %d devices already; new device %s refused",
            identity.user,
            svc.settings.max_devices_per_user,
            identity.device,
        )
        refusal = guard.refuse(
            Refusal(403, "device_limit", "this user has the most devices allowed"),
            f"{address} ({identity.user}/{identity.device})",
        )
        await websocket.send_denial_response(_deny(refusal))
        return None
    except (LedgerUnavailable, BrokerUnavailable) as exc:
        log.warning("connection of %s/%s refused: %s", identity.user, identity.device, exc)
        metrics.disconnects.labels(code_label(TRY_AGAIN.code)).inc()
        await websocket.accept()
        await websocket.close(TRY_AGAIN.code, TRY_AGAIN.reason)
        return None
    try:
        await websocket.accept()
    except BaseException:
        node.disconnect(client)
        raise
    # The connection's scope lives as long as it does: let the request's part go.
    scope["headers"] = ()
    scope["query_string"] = b""
    return client, fast, _Expiry(svc.auth, identity, client)


async def _serve(
    websocket: WebSocket, svc: Services, client: Client, fast: FastWriter | None, expiry: _Expiry
) -> None:
    """The open connection, in the ASGI task itself: it reads the device's frames until
    the peer is gone; the client's writer task exists only while there is something to
    write. Everything the connection registered is let go when it ends."""
    node = svc.node
    if fast is not None:
        fast.on_text = functools.partial(node.ack_frame, client)  # acks never reach _read
    task = client.owner = asyncio.current_task()
    client.start()
    peer_code: int | None = None
    try:
        peer_code = await _read(websocket, client, node, expiry, svc.pushes)
    except asyncio.CancelledError:
        if not client.aborted or task is None:
            raise
        task.uncancel()  # our own drop of a peer that stopped reading: a normal end
    except Exception:
        # A bug, not the device's fault: never leave a half-dead connection behind.
        log.exception("reader of %s failed", client.conn_id)
        client.close(INTERNAL)
        if client.writer_task is not None:
            await asyncio.wait({client.writer_task})  # the close frame (the abort bounds it)
    finally:
        client.owner = None
        if fast is not None:
            fast.on_text = None
        expiry.cancel()
        writer = client.writer_task
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        node.disconnect(client)
        # Ours when we closed first, else the peer's (1006 when it just went away).
        code = peer_code if client.disconnect is None and peer_code is not None else None
        svc.metrics.disconnects.labels(code_label(code or _code(client.disconnect))).inc()


class _Expiry:
    """A connection's token expiry: closes it with 4001 when the token expires, unless the
    device sent a fresh token of the same identity in band (``auth``) before then."""

    __slots__ = ("_auth", "_client", "_identity", "_timer")

    def __init__(self, auth: Auth, identity: DeviceIdentity, client: Client) -> None:
        self._auth = auth
        self._identity = identity
        self._client = client
        self._timer = self._arm(identity.expires_at)

    def _arm(self, expires_at: float) -> Deadline:
        return deadlines.for_loop().call_later(expires_at - time.time(), self._expired)

    def _expired(self) -> None:
        self._client.close(TOKEN_EXPIRED)

    def refresh(self, token: str | None) -> None:
        """Check an in-band token: ``auth_ok`` and a moved expiry, or a close with 4001."""
        client = self._client
        try:
            fresh = self._auth.verify_device_token(token)
        except AuthError as exc:
            log.info("token refresh of %s/%s refused: %s", client.user, client.device, exc.code)
            client.close(TOKEN_REFUSED)
            return
        if (fresh.user, fresh.device) != (self._identity.user, self._identity.device):
            log.info(
                "token refresh of %s/%s refused: the token is for %s/%s",
                client.user,
                client.device,
                fresh.user,
                fresh.device,
            )
            client.close(TOKEN_REFUSED)
            return
        self._timer.cancel()
        self._identity = fresh
        self._timer = self._arm(fresh.expires_at)
        client.send(auth_ok_frame(fresh.expires_at))

    def cancel(self) -> None:
        self._timer.cancel()


def _code(disconnect: Disconnect | None) -> int:
    return 1006 if disconnect is None else disconnect.code


async def _read(
    websocket: WebSocket, client: Client, node: Node, expiry: _Expiry, pushes: PushStore
) -> int | None:
    """Handle frames from the device. Answers the peer's close code.

    Once the server decided to close, frames are still read (and dropped) until the
    close completes: a peer blocked on sending to a socket nobody reads would never
    read our close frame either.
    """
    metrics = node.metrics
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            code = int(message.get("code", 1005))
            client.closed = True  # the peer is gone: nothing more to write
            return code
        if client.closed:
            continue
        text = message.get("text")
        if text is None:
            metrics.bad_frames.inc()
            if _allowed(client):
                client.send(
                    error_frame("bad_frame", "binary frames are not accepted; send JSON text")
                )
            continue
        try:
            frame = in_frame_decoder.decode(text)
        except msgspec.ValidationError as exc:
            metrics.bad_frames.inc()
            if _allowed(client):
                client.send(error_frame("bad_frame", f"bad frame: {exc}"))
            continue
        except (msgspec.DecodeError, RecursionError):
            metrics.bad_frames.inc()
            if _allowed(client):
                client.send(error_frame("bad_frame", "the frame is not valid JSON"))
            continue
        if frame.type == "ack" and frame.seq is not None and frame.seq >= 0:
            node.ack(client, frame.seq)  # acks are never rate limited: no I/O, one dict update
        elif not _allowed(client):
            continue
        elif frame.type == "ping":
            client.send(PONG)
        elif frame.type == "auth":
            expiry.refresh(frame.token)
        elif frame.type == "push":
            client.send(await _register_push(pushes, client, frame))
        elif frame.type == "ack":
            metrics.bad_frames.inc()
            client.send(error_frame("bad_frame", "ack needs a non-negative integer seq"))
        else:
            metrics.bad_frames.inc()
            client.send(error_frame("bad_frame", f"unknown frame type {frame.type!r}"))


async def _register_push(pushes: PushStore, client: Client, frame: InFrame) -> str:
    """``push``: store the device's push address; answers the frame to send back."""
    problem = push_address_problem(frame.provider, frame.token)
    if problem is not None:
        return error_frame("bad_frame", problem)
    assert frame.provider is not None and frame.token is not None
    try:
        await pushes.register(client.user, client.device, frame.provider, frame.token, now_ms())
    except LedgerUnavailable as exc:
        log.warning("push address of %s/%s not stored: %s", client.user, client.device, exc)
        return error_frame("push_unavailable", "the push address could not be stored; send again")
    log.info(
        "push address of %s/%s set (%s, %s)",
        client.user,
        client.device,
        frame.provider,
        token_hint(frame.token),
    )
    return PUSH_OK


def _allowed(client: Client) -> bool:
    """Charge one frame to the device's rate limit; closes with 4029 when it is spent."""
    if client.allow_frame():
        return True
    client.close(RATE_LIMITED)
    return False


PATH = "/v1/ws"


def routes() -> list[WebSocketRoute]:
    return [WebSocketRoute(PATH, device_socket)]
