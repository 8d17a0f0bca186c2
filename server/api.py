"""The publisher API: publish events, read delivery state and device presence."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple, cast

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from channels.frames import iso_ms
from models.ledger import (
    IdConflict,
    LedgerRefused,
    LedgerUnavailable,
    NewEvent,
    content_digest,
    delivery_status,
    now_ms,
)
from models.pushes import PushState, push_address_problem, token_hint
from server.auth import IDENT, KIND
from server.services import Limits, Services, services_of

log = logging.getLogger("courier.api")

_EVENT_FIELDS = frozenset(
    {
        "user",
        "kind",
        "data",
        "id",
        "device",
        "ttl",
        "collapse",
        "push",
        "push_after",
        "notification",
    }
)
MAX_TITLE = 200
MAX_BODY = 1000
MAX_ID = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _key_ok(value: object) -> bool:
    """An idempotency or collapse key: 1-200 characters, none of them a control character."""
    return isinstance(value, str) and 1 <= len(value) <= MAX_ID and not _CONTROL.search(value)


class InputError(Exception):
    def __init__(self, field: str, message: str, code: str = "invalid", status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code
        self.status = status


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON body of every refusal: ``{"error": {"code", "message", "field"?}}``."""
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return {"error": body}


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(code, message, field), status_code=status, headers=headers)


UNAUTHORIZED = "a valid publisher key is required (Authorization: Bearer)"


def unauthorized() -> JSONResponse:
    return error_response(401, "unauthorized", UNAUTHORIZED)


def unavailable_message(exc: Exception) -> str:
    return f"the ledger is unreachable: {exc}"


def unavailable(exc: Exception) -> JSONResponse:
    return error_response(503, "ledger_unavailable", unavailable_message(exc))


def parse_event(obj: Any, path: str, limits: Limits) -> NewEvent:
    """Validate one published event; ``InputError`` names the offending field."""
    if not isinstance(obj, dict):
        raise InputError(path or "$", "each event must be a JSON object")
    unknown = sorted(set(obj) - _EVENT_FIELDS)
    if unknown:
        raise InputError(f"{path}{unknown[0]}", f"unknown field {unknown[0]!r}")

    def ident(name: str, required: bool) -> str | None:
        value = obj.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not IDENT.fullmatch(value):
            raise InputError(
                f"{path}{name}",
                f"{name} is required and must be 1-128 characters of [A-Za-z0-9_.:-]"
                if required
                else f"{name} must be null or 1-128 characters of [A-Za-z0-9_.:-]",
            )
        return value

    user = ident("user", True)
    assert user is not None
    kind = obj.get("kind")
    if not isinstance(kind, str) or not KIND.fullmatch(kind):
        raise InputError(f"{path}kind", "kind is required and must match [a-z0-9_.-]{1,64}")
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}data", "data must be a JSON object")
    encoded = msgspec.json.encode(data)
    if len(encoded) > limits.max_data_bytes:
        raise InputError(
            f"{path}data",
            f"data is {len(encoded)} bytes encoded; the limit is {limits.max_data_bytes}",
            code="too_large",
        )
    event_id = obj.get("id")
    if event_id is None:
        event_id = "evt-" + uuid.uuid4().hex
    elif not _key_ok(event_id):
        raise InputError(
            f"{path}id", f"id must be a string of 1-{MAX_ID} characters, no control characters"
        )
    ttl = _whole(obj.get("ttl"))
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= limits.max_ttl
    ):
        raise InputError(
            f"{path}ttl", f"ttl must be null or whole seconds from 1 to {limits.max_ttl}"
        )
    collapse = obj.get("collapse")
    if collapse is not None and not _key_ok(collapse):
        raise InputError(
            f"{path}collapse",
            f"collapse must be null or 1-{MAX_ID} characters, no control characters",
        )
    device = ident("device", False)
    given, push_after, notification = _push_fields(obj, path, limits)
    return NewEvent(
        id=event_id,
        user=user,
        kind=kind,
        data=encoded.decode(),
        device=device,
        ttl=ttl,
        collapse=collapse,
        # Key order inside data does not make another event: a retry may reorder keys.
        digest=content_digest(
            user, kind, msgspec.json.encode(data, order="sorted"), device, ttl, collapse, given
        ),
        push_after=push_after,
        notification=notification,
    )


def _whole(value: Any) -> Any:
    """600.0 is whole seconds too (JSON has one kind of number)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _push_fields(
    obj: dict[str, Any], path: str, limits: Limits
) -> tuple[dict[str, Any] | None, int | None, str | None]:
    """``push`` (false: never push), ``push_after`` (seconds) and ``notification``
    (``{"title", "body"}``): the fields as given (for the digest), the resolved delay
    (None: never) and the notification as JSON text."""
    push = obj.get("push", True)
    if push is None:
        push = True
    if not isinstance(push, bool):
        raise InputError(f"{path}push", "push must be true, false or null")
    after = _whole(obj.get("push_after"))
    if after is not None and (
        isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= limits.max_ttl
    ):
        raise InputError(
            f"{path}push_after",
            f"push_after must be null or whole seconds from 0 to {limits.max_ttl}",
        )
    note = obj.get("notification")
    text: str | None = None
    if note is not None:
        fields = {"title": MAX_TITLE, "body": MAX_BODY}
        if (
            not isinstance(note, dict)
            or not note
            or set(note) - set(fields)
            or any(not isinstance(v, str) or not 1 <= len(v) <= fields[k] for k, v in note.items())
        ):
            raise InputError(
                f"{path}notification",
                f"notification must be null or an object with title (1-{MAX_TITLE} characters)"
                f" and/or body (1-{MAX_BODY} characters)",
            )
        text = msgspec.json.encode(note, order="sorted").decode()
    given = None
    if push is False or after is not None or note is not None:
        given = {"push": push, "push_after": after, "notification": text}
    return given, (None if not push else limits.push_after if after is None else after), text


def parse_body(raw: bytes, limits: Limits) -> tuple[list[NewEvent], bool]:
    """The events of a publish body and whether it was a list."""
    try:
        body = msgspec.json.decode(raw)
    except RecursionError:
        raise InputError(
            "$", "the body is nested too deeply", code="bad_json", status=400
        ) from None
    except msgspec.DecodeError as exc:
        raise InputError(
            "$", f"the body is not valid JSON: {exc}", code="bad_json", status=400
        ) from None
    except UnicodeDecodeError as exc:
        raise InputError(
            "$", f"the body is not valid UTF-8: {exc}", code="bad_json", status=400
        ) from None
    if isinstance(body, list):
        if not body:
            raise InputError("$", "the list of events is empty")
        if len(body) > limits.max_batch:
            raise InputError(
                "$",
                f"at most {limits.max_batch} events per request, got {len(body)}",
                code="too_large",
            )
        return [parse_event(item, f"[{i}].", limits) for i, item in enumerate(body)], True
    return [parse_event(body, "", limits)], False


async def read_body(
    chunks: AsyncIterator[bytes], declared: str | None, limit: int, seconds: float
) -> bytes:
    """The body, at most ``limit`` bytes (else 413), in full within ``seconds`` (else 408).
    ``declared``: its Content-Length header, if any."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError("$", f"the body is over {limit} bytes", code="too_large", status=413)
    parts, size = [], 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise InputError(
                        "$", f"the body is over {limit} bytes", code="too_large", status=413
                    )
                parts.append(chunk)
    except TimeoutError:
        raise InputError(
            "$", f"the body did not arrive within {seconds:g}s", code="body_timeout", status=408
        ) from None
    return b"".join(parts)


class _Disconnected(Exception):
    """The publisher hung up before its body arrived: there is nobody to answer."""


async def _receive_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class Answer(NamedTuple):
    status: int
    body: Any
    """JSON-encodable."""
    close: bool = False
    """Say ``Connection: close`` and end the connection after the answer."""


def _error(status: int, code: str, message: str, field: str | None = None) -> Answer:
    return Answer(status, error_body(code, message, field), close=status in (408, 413, 500))


class Publish:
    """``POST /v1/events``, the publish path, as a bare ASGI app.

    Publishing is the request a backend makes most, so it skips what the other endpoints
    are built with (Starlette's request and response objects, its router and exception
    middlewares: a seventh of the server's CPU per publish): the app hands it the
    request directly (``CourierApp``), and under a ``root_path`` the router does. It
    answers every error itself: a JSON body as everywhere else, and for a bug one ERROR
    with the traceback and a 500 that closes the connection.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = await _publish(scope, receive)
        except _Disconnected:
            return
        except Exception:
            log.exception("POST %s failed", scope.get("path", "/v1/events"))
            answer = _error(500, "internal", "internal error; it has been logged")
        body = msgspec.json.encode(answer.body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if answer.close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _publish(scope: Scope, receive: Receive) -> Answer:
    svc = cast(Services, scope["app"].state.services)
    authorization = declared = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"content-length":
            declared = value.decode("latin-1")
    if not svc.auth.is_publisher(authorization):
        return _error(401, "unauthorized", UNAUTHORIZED)
    limits = svc.limits
    try:
        raw = await read_body(
            _receive_body(receive),
            declared,
            limits.max_batch * (limits.max_data_bytes + 2048) + 4096,
            limits.body_timeout,
        )
        batch, is_list = parse_body(raw, limits)
    except InputError as exc:
        return _error(exc.status, exc.code, exc.message, exc.field)
    try:
        answers = await svc.node.publish(batch)
    except LedgerUnavailable as exc:
        return _error(503, "ledger_unavailable", unavailable_message(exc))
    except IdConflict as exc:
        first = exc.indexes[0]
        return _error(
            409,
            "id_conflict",
            f"id {batch[first].id!r} was already used for an event with other content;"
            " nothing was recorded (use a new id for new content)",
            f"[{first}].id" if is_list else "id",
        )
    except LedgerRefused as exc:
        return _error(422, "refused", f"the ledger refused the events: {exc}")
    items = [{"id": a.id, "seq": a.seq, "duplicate": a.duplicate} for a in answers]
    status = 200 if all(a.duplicate for a in answers) else 201
    return Answer(status, items if is_list else items[0])


PUBLISH_PATH = "/v1/events"
publish = Publish()


async def event_state(request: Request) -> Response:
    svc = services_of(request)
    if not svc.auth.is_publisher(request.headers.get("authorization")):
        return unauthorized()
    event_id = request.path_params["id"]
    if not _key_ok(event_id):
        return error_response(404, "not_found", "no event with that id", "id")
    try:
        ev = await svc.node.ledger.get_event(event_id)
        if ev is None:
            return error_response(404, "not_found", f"no event with id {event_id!r}", "id")
        devices = await svc.node.ledger.devices(ev.user)
        skipped = await svc.node.ledger.skipped_devices(ev.user, ev.seq) if ev.collapse else set()
        pushes = await svc.pushes.states(ev.user, ev.seq)
    except LedgerUnavailable as exc:
        return unavailable(exc)
    now = now_ms()
    return JSONResponse(
        {
            "id": ev.id,
            "seq": ev.seq,
            "user": ev.user,
            "kind": ev.kind,
            "data": msgspec.json.decode(ev.data),
            "device": ev.device,
            "created_at": iso_ms(ev.created_at),
            "expires_at": None if ev.expires_at is None else iso_ms(ev.expires_at),
            "collapse": ev.collapse,
            "superseded_by": ev.superseded_by,
            "deliveries": [
                {
                    "device": d.device,
                    "status": delivery_status(
                        ev,
                        d,
                        now,
                        d.device in skipped,
                        d.device in pushes and pushes[d.device].state == "sent",
                    ),
                    "push": _push_view(pushes.get(d.device)),
                }
                for d in devices
                if ev.device is None or d.device == ev.device
            ],
        }
    )


def _push_view(state: PushState | None) -> dict[str, Any] | None:
    """A device's push of one event: ``due``, ``sending``, ``sent``, ``skipped`` or
    ``failed``, with the attempts and the reason (the provider's message id once sent)."""
    if state is None:
        return None
    return {
        "state": state.state,
        "attempts": state.attempts,
        "reason": state.reason,
        "decided_at": iso_ms(state.decided_at),
        "done_at": None if state.done_at is None else iso_ms(state.done_at),
        "carried_by": state.carried_by,
    }


async def push_address(request: Request) -> Response:
    """``PUT`` or ``DELETE /v1/users/{user}/devices/{device}/push``: a device's push address,
    set by the publisher (the device may set it itself over its connection)."""
    svc = services_of(request)
    if not svc.auth.is_publisher(request.headers.get("authorization")):
        return unauthorized()
    user, device = request.path_params["user"], request.path_params["device"]
    for name, value in (("user", user), ("device", device)):
        if not IDENT.fullmatch(value):
            return error_response(
                400, "invalid", f"{name} must be 1-128 characters of [A-Za-z0-9_.:-]", name
            )
    try:
        if request.method == "DELETE":
            if not await svc.pushes.unregister(user, device):
                return error_response(404, "not_found", "this device has no push address")
            return Response(status_code=204)
        try:
            body = msgspec.json.decode(await request.body())
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            return error_response(400, "bad_json", "the body is not valid JSON", "$")
        if not isinstance(body, dict):
            return error_response(422, "invalid", "the body must be a JSON object", "$")
        unknown = sorted(set(body) - {"provider", "token"})
        if unknown:
            return error_response(422, "invalid", f"unknown field {unknown[0]!r}", unknown[0])
        problem = push_address_problem(body.get("provider"), body.get("token"))
        if problem is not None:
            field = problem.split(" ", 1)[0]
            return error_response(422, "invalid", problem, field)
        await svc.pushes.register(user, device, body["provider"], body["token"], now_ms())
    except LedgerUnavailable as exc:
        return unavailable(exc)
    log.info("push address of %s/%s set by a publisher (%s)", user, device, body["provider"])
    return JSONResponse(
        {
            "user": user,
            "device": device,
            "provider": body["provider"],
            "token": token_hint(body["token"]),
        }
    )


async def user_devices(request: Request) -> Response:
    svc = services_of(request)
    if not svc.auth.is_publisher(request.headers.get("authorization")):
        return unauthorized()
    user = request.path_params["user"]
    if not IDENT.fullmatch(user):
        return error_response(
            400, "invalid", "user must be 1-128 characters of [A-Za-z0-9_.:-]", "user"
        )
    try:
        devices = await svc.node.ledger.devices(user)
        addresses = await svc.pushes.registrations(user)
    except LedgerUnavailable as exc:
        return unavailable(exc)
    try:
        connected = await svc.presence.connected_devices(user)
    except Exception as exc:  # the cluster view (Redis) is down; the ledger part is fine
        return error_response(503, "presence_unavailable", f"presence is unavailable: {exc}")
    return JSONResponse(
        {
            "user": user,
            "devices": [
                {
                    "device": d.device,
                    "connected": d.device in connected,
                    "last_seen": iso_ms(d.last_seen),
                    "acked_seq": d.acked_seq,
                    "sent_seq": d.sent_seq,
                    "push": None
                    if d.device not in addresses
                    else {
                        "provider": addresses[d.device][0],
                        "token": token_hint(addresses[d.device][1]),
                    },
                }
                for d in devices
            ],
        }
    )


def routes() -> list[Route]:
    return [
        Route(PUBLISH_PATH, publish, methods=["POST"]),
        Route("/v1/events/{id:path}", event_state, methods=["GET"]),
        Route("/v1/users/{user}/devices", user_devices, methods=["GET"]),
        Route("/v1/users/{user}/devices/{device}/push", push_address, methods=["PUT", "DELETE"]),
    ]
