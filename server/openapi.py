"""The OpenAPI 3.1 document of the HTTP API, built from the code's own rules.

The patterns and limits come from the same constants the handlers check (``server.auth``,
``server.api``) and the limits come from the running server's settings, so the document
cannot drift from what the server accepts. ``tests/test_openapi.py`` checks that every
HTTP route the app serves is in it, and runs schemathesis against a real server.

``python -m server.openapi`` prints the document for the default settings.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.api import MAX_ID
from server.auth import IDENT, KIND
from server.services import Limits, services_of
from server.settings import Settings

Schema = dict[str, Any]

PATH = "/openapi.json"
API_VERSION = "1"

IDENT_PATTERN = f"^{IDENT.pattern}$"
KIND_PATTERN = f"^{KIND.pattern}$"
KEY_PATTERN = f"^[^\\u0000-\\u001f\\u007f]{{1,{MAX_ID}}}$"
"""An event id or collapse key: 1-200 characters, none of them a control character."""
TIME_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
"""UTC, ISO-8601 with milliseconds, as ``channels.frames.iso_ms`` writes it."""

STATUSES = ("pending", "sent", "pushed", "acked", "expired", "superseded")
PUSH_STATES = ("due", "sending", "sent", "skipped", "failed")
"""A device's state of one event (``models.ledger.delivery_status``)."""

PUBLISHER: list[dict[str, list[str]]] = [{"publisherKey": []}]
OPS: list[dict[str, list[str]]] = [{"opsToken": []}]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """An object with these fields. Open (no ``additionalProperties``): clients ignore
    fields they do not know, so the server may add optional ones (the tests close it)."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str, media: str = "text/plain") -> Schema:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _error(description: str, *codes: str) -> Schema:
    """An error answer: ``{"error": {"code", "message", "field"?}}`` with one of ``codes``."""
    return _json(
        description,
        _obj(
            {
                "error": _obj(
                    {
                        "code": {"type": "string", "enum": list(codes)},
                        "message": {"type": "string"},
                    },
                    {
                        "field": {
                            "type": "string",
                            "description": "the offending input (`user`, `[3].kind`, `$` for "
                            "the whole body)",
                        }
                    },
                )
            }
        ),
    )


UNAUTHORIZED = _error("The publisher key is missing or wrong.", "unauthorized")
LEDGER_DOWN = _error("The ledger cannot be reached; retry with backoff.", "ledger_unavailable")


def _schemas(limits: Limits) -> dict[str, Schema]:
    ident = {"type": "string", "pattern": IDENT_PATTERN}
    key = {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": KEY_PATTERN}
    seq = {"type": "integer", "minimum": 1}
    time = {"type": "string", "pattern": TIME_PATTERN}
    return {
        "NewEvent": {
            "type": "object",
            "description": "One event to publish. Unknown fields are refused (422).",
            "additionalProperties": False,
            "required": ["user", "kind"],
            "properties": {
                "user": {**ident, "description": "the user the event is for"},
                "kind": {"type": "string", "pattern": KIND_PATTERN},
                "data": {
                    "type": ["object", "null"],
                    "description": "the payload, any JSON object (null means {}); at most "
                    f"{limits.max_data_bytes} bytes encoded, else 422 too_large",
                },
                "id": {
                    **key,
                    "type": ["string", "null"],
                    "description": "idempotency key; the server makes `evt-<hex>` if absent",
                },
                "device": {
                    **ident,
                    "type": ["string", "null"],
                    "description": "deliver to this one device of the user only",
                },
                "ttl": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                    "maximum": limits.max_ttl,
                    "description": "seconds until the event is no longer delivered",
                },
                "collapse": {
                    **key,
                    "type": ["string", "null"],
                    "description": "a newer event with this key supersedes older ones",
                },
                "push": {
                    "type": ["boolean", "null"],
                    "description": "false: never send this event as a platform push",
                },
                "push_after": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "maximum": limits.max_ttl,
                    "description": "seconds after which a device that has not acked it gets a"
                    f" push (default {limits.push_after})",
                },
                "notification": {
                    "type": ["object", "null"],
                    "additionalProperties": False,
                    "minProperties": 1,
                    "properties": {
                        "title": {"type": "string", "minLength": 1, "maxLength": 200},
                        "body": {"type": "string", "minLength": 1, "maxLength": 1000},
                    },
                    "description": "a visible notification for the push (else a data message)",
                },
            },
        },
        "Published": _obj(
            {
                "id": key,
                "seq": seq,
                "duplicate": {
                    "type": "boolean",
                    "description": "true: an event with this id and content was recorded "
                    "before, nothing new was",
                },
            }
        ),
        "EventState": _obj(
            {
                "id": key,
                "seq": seq,
                "user": ident,
                "kind": {"type": "string", "pattern": KIND_PATTERN},
                "data": {"type": "object"},
                "device": {**ident, "type": ["string", "null"]},
                "created_at": time,
                "expires_at": {**time, "type": ["string", "null"]},
                "collapse": {**key, "type": ["string", "null"]},
                "superseded_by": {**seq, "type": ["integer", "null"]},
                "deliveries": {
                    "type": "array",
                    "items": _obj(
                        {
                            "device": ident,
                            "status": {"type": "string", "enum": list(STATUSES)},
                            "push": {
                                "oneOf": [{"type": "null"}, _ref("PushState")],
                                "description": "the push fallback's decision for this "
                                "device, if one was made",
                            },
                        }
                    ),
                },
            }
        ),
        "PushState": _obj(
            {
                "state": {"type": "string", "enum": list(PUSH_STATES)},
                "attempts": {"type": "integer", "minimum": 0},
                "reason": {
                    "type": ["string", "null"],
                    "description": "why it was skipped or failed (acked, expired, "
                    "superseded, UNREGISTERED, http_503, ...), the provider's message id "
                    "once sent",
                },
                "decided_at": time,
                "done_at": {**time, "type": ["string", "null"]},
                "carried_by": {
                    **seq,
                    "type": ["integer", "null"],
                    "description": "the seq of the event whose push carried this one",
                },
            }
        ),
        "PushAddress": {
            "type": "object",
            "additionalProperties": False,
            "required": ["provider", "token"],
            "properties": {
                "provider": {"type": "string", "pattern": "^[a-z0-9_.-]{1,32}$"},
                "token": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 4096,
                    "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
                    "description": "the device's push token (an FCM registration token)",
                },
            },
        },
        "PushAddressSet": _obj(
            {
                "user": ident,
                "device": ident,
                "provider": {"type": "string"},
                "token": {"type": "string", "description": "the token's last characters"},
            }
        ),
        "UserDevices": _obj(
            {
                "user": ident,
                "devices": {
                    "type": "array",
                    "items": _obj(
                        {
                            "device": ident,
                            "connected": {"type": "boolean"},
                            "last_seen": time,
                            "acked_seq": {"type": "integer", "minimum": 0},
                            "sent_seq": {"type": "integer", "minimum": 0},
                            "push": {
                                "oneOf": [
                                    {"type": "null"},
                                    _obj(
                                        {
                                            "provider": {"type": "string"},
                                            "token": {"type": "string"},
                                        }
                                    ),
                                ],
                                "description": "the device's push address (the token's "
                                "last characters only), or null",
                            },
                        }
                    ),
                },
            }
        ),
        "Stats": _obj(
            {
                "node": {"type": "string"},
                "connections": {"type": "integer", "minimum": 0},
                "users": {"type": "integer", "minimum": 0},
                "nodes": {
                    "type": "object",
                    "description": "connections per live node",
                    "additionalProperties": {"type": "integer", "minimum": 0},
                },
                "cluster_connections": {"type": "integer", "minimum": 0},
            }
        ),
    }


def _paths(limits: Limits) -> dict[str, Schema]:
    batch = {
        "type": "array",
        "minItems": 1,
        "maxItems": limits.max_batch,
        "items": _ref("NewEvent"),
    }
    published = {"oneOf": [_ref("Published"), {"type": "array", "items": _ref("Published")}]}
    return {
        "/v1/events": {
            "post": {
                "operationId": "publish",
                "summary": "Publish one event, or a list of events in one transaction",
                "security": PUBLISHER,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"oneOf": [_ref("NewEvent"), batch]}}
                    },
                },
                "responses": {
                    "201": _json(
                        "Recorded. A list body gets a list answer, in the same order.", published
                    ),
                    "200": _json(
                        "Every event was a duplicate (same id and content): nothing new recorded.",
                        published,
                    ),
                    "400": _error("The body is not JSON (or not UTF-8).", "bad_json"),
                    "401": UNAUTHORIZED,
                    "408": _error(
                        "The body did not arrive in time (`Connection: close`).", "body_timeout"
                    ),
                    "409": _error(
                        "An id was used before for other content; nothing was recorded.",
                        "id_conflict",
                    ),
                    "413": _error("The body is too large (`Connection: close`).", "too_large"),
                    "422": _error(
                        "An event breaks the rules (`field` names it), the list is too long "
                        "or empty, or the ledger refused the data itself (do not retry).",
                        "invalid",
                        "too_large",
                        "refused",
                    ),
                    "503": LEDGER_DOWN,
                },
            }
        },
        "/v1/events/{id}": {
            "get": {
                "operationId": "getEvent",
                "summary": "An event and each of its devices' delivery status",
                "security": PUBLISHER,
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "description": "the event id (it may contain `/`)",
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": {
                    "200": _json("The event.", _ref("EventState")),
                    "401": UNAUTHORIZED,
                    "404": _error("No event with that id (or it was deleted).", "not_found"),
                    "503": LEDGER_DOWN,
                },
            }
        },
        "/v1/users/{user}/devices": {
            "get": {
                "operationId": "getUserDevices",
                "summary": "A user's devices: connected now, last seen, cursors",
                "security": PUBLISHER,
                "parameters": [
                    {
                        "name": "user",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": IDENT_PATTERN},
                    }
                ],
                "responses": {
                    "200": _json("The devices.", _ref("UserDevices")),
                    "400": _error("The user id breaks the character rules.", "invalid"),
                    "401": UNAUTHORIZED,
                    "503": _error(
                        "The ledger, or the presence view (Redis), cannot be reached.",
                        "ledger_unavailable",
                        "presence_unavailable",
                    ),
                },
            }
        },
        "/v1/users/{user}/devices/{device}/push": {
            "parameters": [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": IDENT_PATTERN},
                }
                for name in ("user", "device")
            ],
            "put": {
                "operationId": "setPushAddress",
                "summary": "Set a device's push address (it replaces the device's previous one)",
                "security": PUBLISHER,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("PushAddress")}},
                },
                "responses": {
                    "200": _json("Stored.", _ref("PushAddressSet")),
                    "400": _error(
                        "The body is not JSON, or an id breaks the character rules.",
                        "bad_json",
                        "invalid",
                    ),
                    "401": UNAUTHORIZED,
                    "422": _error("The address breaks the rules (`field` names it).", "invalid"),
                    "503": LEDGER_DOWN,
                },
            },
            "delete": {
                "operationId": "deletePushAddress",
                "summary": "Remove a device's push address",
                "security": PUBLISHER,
                "responses": {
                    "204": {"description": "Removed."},
                    "400": _error("An id breaks the character rules.", "invalid"),
                    "401": UNAUTHORIZED,
                    "404": _error("The device has no push address.", "not_found"),
                    "503": LEDGER_DOWN,
                },
            },
        },
        "/v1/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "Connections on this node and across the cluster",
                "security": OPS,
                "responses": {
                    "200": _json("The counts.", _ref("Stats")),
                    "401": _error("The ops token is missing or wrong.", "unauthorized"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "The process is alive",
                "security": [],
                "responses": {"200": _text("`ok`")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "ready",
                "summary": "Ledger and bus reachable, node not draining",
                "security": [],
                "responses": {
                    "200": _json("Ready.", _obj({"ready": {"const": True}})),
                    "503": _json(
                        "Not ready; `problems` says what is wrong.",
                        _obj(
                            {
                                "ready": {"const": False},
                                "problems": {
                                    "type": "object",
                                    "minProperties": 1,
                                    "propertyNames": {"enum": ["ledger", "broker", "node"]},
                                    "additionalProperties": {"type": "string"},
                                },
                            }
                        ),
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this node",
                "security": [],
                "responses": {"200": _text("The Prometheus text format.")},
            }
        },
        "/ops": {
            "get": {
                "operationId": "opsPage",
                "summary": "The live ops page; it asks for the ops token and sends it as a header",
                "security": [],
                "responses": {"200": _text("The page.", "text/html")},
            }
        },
        PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json("The OpenAPI document.", {"type": "object"})},
            }
        },
    }


DESCRIPTION = """\
Courier's HTTP API: publish events, read their delivery state, see devices and the
node's health. Devices connect over the WebSocket `GET /v1/ws`, described by the
AsyncAPI document `docs/asyncapi.yaml` and the guide `docs/protocol.md`.

Every error answer is JSON: `{"error": {"code": "...", "message": "...", "field": "..."}}`
(`field` only where one input is to blame). `code` is stable and machine-readable.
Before any routing, and for any path, the transport may answer `400` `bad_request`
(not HTTP/1.1), `408` `head_timeout`, `414` `url_too_long` or `431` `headers_too_large`,
each with `Connection: close`; an unknown path is `404` `not_found` and a method a path
does not serve `405` `method_not_allowed` (with `Allow`).

Objects in answers may gain optional fields: ignore the ones you do not know."""


def document(limits: Limits) -> Schema:
    """The OpenAPI document for a server with these publish limits."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Courier HTTP API",
            "version": API_VERSION,
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": _paths(limits),
        "components": {
            "schemas": _schemas(limits),
            "securitySchemes": {
                "publisherKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a publisher key of `COURIER_API_KEYS`",
                },
                "opsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the ops token `COURIER_OPS_TOKEN`",
                },
            },
        },
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(document(services_of(request).limits))


def routes() -> list[Route]:
    return [Route(PATH, openapi, methods=["GET"])]


if __name__ == "__main__":
    print(json.dumps(document(Limits.of(Settings())), indent=2))
