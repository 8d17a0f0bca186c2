"""The ``courier`` command: serve, migrate, token, publish, listen, stats, devices."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
from typing import Any

from server import __version__
from server.settings import LOG_LEVELS, Settings, SettingsError

log = logging.getLogger("courier.cli")

WS_IMPLEMENTATIONS = {
    "courier": "server.transport:CourierWebSocketProtocol",
    "websockets-sansio": "websockets-sansio",
    "websockets": "websockets",
    "wsproto": "wsproto",
}
"""``--ws``: Courier's hardened protocol (the default), or one of uvicorn's as they are
(for comparison; those come with uvicorn's plain HTTP protocol too)."""
HTTP_PROTOCOL = "server.transport:CourierHttpProtocol"


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"courier: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _base_url(settings: Settings, url: str | None) -> str:
    return (url or os.environ.get("COURIER_URL") or f"http://127.0.0.1:{settings.port}").rstrip("/")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    workers: int = args.workers or settings.web_concurrency or 1
    if workers > 1 and not settings.redis_url:
        if args.workers:
            print(
                "courier: --workers > 1 needs COURIER_REDIS_URL: without Redis each worker would"
                " be its own island (events published to one would not reach devices on another)",
                file=sys.stderr,
            )
            return 2
        # Heroku's Python buildpack sets WEB_CONCURRENCY by itself: not a reason to fail.
        print(
            f"courier: WEB_CONCURRENCY={workers} ignored: without COURIER_REDIS_URL workers"
            " cannot share events, so this runs one process",
            file=sys.stderr,
        )
        workers = 1
    log_level: str = args.log_level or settings.log_level
    host = args.host or settings.host
    port = args.port or settings.port
    problem = asyncio.run(_preflight(settings))
    if problem:
        print(f"courier: cannot start: {problem}", file=sys.stderr)
        return 1
    untrusted = asyncio.run(_untrusted_redis(settings))
    if untrusted:
        print(f"courier: configuration error: {untrusted}", file=sys.stderr)
        return 2
    if settings.dev_mode:
        _print_dev_banner(settings, host, port)
    from server.logs import log_config

    config = uvicorn.Config(
        "asgi:app",
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=HTTP_PROTOCOL if args.ws == "courier" else "httptools",
        ws=WS_IMPLEMENTATIONS[args.ws],
        log_config=log_config(log_level, settings.log_format),
        ws_per_message_deflate=settings.ws_per_message_deflate,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.heartbeat_seconds,
        ws_ping_timeout=settings.heartbeat_seconds,
        lifespan="on",
        proxy_headers=True,
        forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
        backlog=4096,
        timeout_graceful_shutdown=int(settings.drain_seconds) + 5,
        log_level=log_level,
        access_log=args.access_log,
    )
    server = uvicorn.Server(config)
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()
    return 0 if server.started or workers > 1 else 1


async def _preflight(settings: Settings) -> str | None:
    """The ledger is reachable and migrated (the same check the app makes, without a traceback)."""
    from models.ledger import Ledger
    from server.app import StartupError, check_schema

    ledger = Ledger.from_url(settings.database_url)
    try:
        await check_schema(ledger, settings.database_url)
    except StartupError as exc:
        return str(exc)
    finally:
        await ledger.close()
    return None


async def _untrusted_redis(settings: Settings) -> str | None:
    """A ``rediss://`` Redis whose certificate fails verification: a configuration error,
    not an outage, so the server does not start and retry it forever. Any other Redis
    fault is left to the server, which starts and keeps retrying."""
    if not (settings.redis_url or "").startswith("rediss://"):
        return None
    import ssl

    from channels.redis import redis_client
    from server.app import redis_tls

    client = redis_client(settings.redis_url or "", tls=redis_tls(settings), retries=0)
    try:
        await client.ping()
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            return (
                f"the Redis certificate was not trusted ({cause.verify_message}): set"
                " COURIER_REDIS_CA_CERT to the certificate to trust, or"
                " COURIER_REDIS_TLS_VERIFY=none for a provider with self-signed certificates"
                " (Heroku Redis)"
            )
    finally:
        await client.aclose()
    return None


def _print_dev_banner(settings: Settings, host: str, port: int) -> None:
    key = settings.api_keys[0]
    url = f"http://{host}:{port}"
    print(
        f"""
  Courier is running in DEV MODE: secrets were generated and are kept in {settings.dev_file}
  (in production set COURIER_JWT_SECRET, COURIER_API_KEYS, COURIER_OPS_TOKEN
   and COURIER_ENV=production)

    publisher key:  {key}
    ops page:       {url}/ops  (ops token: {settings.dev_file})

  In another terminal:
    .venv/bin/courier token --user u1 --device phone1     # mint a device token
    .venv/bin/courier listen --token <token>              # a device: prints and acks events
    curl -X POST {url}/v1/events -H 'Authorization: Bearer {key}' \\
         -H 'Content-Type: application/json' \\
         -d '{{"user": "u1", "kind": "block.grabbed", "data": {{"block_id": "B9"}}}}'
""",
        flush=True,
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    from models.ledger import migrate

    settings = _settings()
    # Each step applied, one line each; not Alembic's plugin and context chatter.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("alembic.runtime.migration").setLevel(logging.INFO)
    logging.getLogger("alembic.runtime.migration").addFilter(
        lambda record: record.getMessage().startswith("Running ")
    )
    try:
        migrate(settings.database_url, args.revision)
    except Exception as exc:
        print(f"courier: migration failed: {exc}", file=sys.stderr)
        return 1
    print(f"courier: ledger schema is at {args.revision}", file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from server.auth import Auth, AuthError

    settings = _settings()
    try:
        print(Auth(settings).mint_device_token(args.user, args.device, args.ttl))
    except AuthError as exc:
        print(f"courier: {exc.message}", file=sys.stderr)
        return 2
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        from courier_publisher import Publisher, PublishError, RetryPolicy
    except ImportError:
        print(
            "courier: publish needs the publisher package: pip install ./clients/python",
            file=sys.stderr,
        )
        return 2

    settings = _settings()
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        print(f"courier: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    key = args.key or settings.api_keys[0]
    retry = RetryPolicy(retries=args.retries)
    with Publisher(_base_url(settings, args.url), key, retry=retry) as publisher:
        try:
            result = publisher.publish(
                args.user,
                args.kind,
                data,
                id=args.id,
                device=args.device,
                ttl=args.ttl,
                collapse=args.collapse,
            )
        except PublishError as exc:
            print(f"courier: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"id": result.id, "seq": result.seq, "duplicate": result.duplicate}))
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    settings = _settings()
    url = _base_url(settings, args.url).replace("http://", "ws://").replace("https://", "wss://")
    try:
        return asyncio.run(listen(url, args.token, args.after, args.count))
    except KeyboardInterrupt:
        return 0


async def listen(url: str, token: str, after: int | None, count: int | None) -> int:
    """A reference device: print events, ack each, reconnect with backoff and jitter."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    last = after
    received = 0
    attempt = 0
    loop = asyncio.get_running_loop()
    while True:
        opened = loop.time()
        query = f"?after={last}" if last is not None else ""
        try:
            async with connect(
                f"{url}/v1/ws{query}", additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                attempt = 0
                async for raw in ws:
                    frame: dict[str, Any] = json.loads(raw)
                    print(json.dumps(frame), flush=True)
                    if frame.get("type") == "event":
                        seq = int(frame["seq"])
                        if last is None or seq > last:
                            last = seq
                        await ws.send(json.dumps({"type": "ack", "seq": seq}))
                        received += 1
                        if count is not None and received >= count:
                            return 0
        except InvalidStatus as exc:
            print(
                f"courier: connection refused: HTTP {exc.response.status_code} "
                f"{exc.response.body.decode(errors='replace')}",
                file=sys.stderr,
            )
            if exc.response.status_code in (400, 401, 403):
                return 1
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            print(f"courier: connection closed ({code})", file=sys.stderr)
            if code in (4001, 4009):
                return 1
        except OSError as exc:
            print(f"courier: cannot connect: {exc}", file=sys.stderr)
        if loop.time() - opened > 30:
            attempt = 0  # the connection was healthy for a while: start the backoff afresh
        delay = random.uniform(0, min(30.0, 0.5 * 2**attempt))  # full jitter
        attempt += 1
        print(f"courier: reconnecting in {delay:.1f}s", file=sys.stderr)
        await asyncio.sleep(delay)


def cmd_stats(args: argparse.Namespace) -> int:
    settings = _settings()
    body = _get(settings, args.url, "/v1/stats", args.token or settings.ops_token)
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body))
        return 0
    print(f"node {body['node']}: {body['connections']} connections, {body['users']} users")
    print(f"cluster: {body['cluster_connections']} connections on {len(body['nodes'])} nodes")
    for node, count in sorted(body["nodes"].items()):
        print(f"  {node:<40} {count:>8}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    settings = _settings()
    key = args.key or (settings.api_keys[0] if settings.api_keys else None)
    body = _get(settings, args.url, f"/v1/users/{args.user}/devices", key)
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body))
        return 0
    print(f"{'device':<24} {'connected':<9} {'acked_seq':>10} {'sent_seq':>10}  last_seen")
    for d in body["devices"]:
        print(
            f"{d['device']:<24} {'yes' if d['connected'] else 'no':<9}"
            f" {d['acked_seq']:>10} {d['sent_seq']:>10}  {d['last_seen']}"
        )
    if not body["devices"]:
        print(f"(user {args.user} has no devices)")
    return 0


def _get(settings: Settings, url: str | None, path: str, secret: str | None) -> Any:
    """GET ``path`` of the server as JSON; prints one line and answers None on failure."""
    import httpx

    target = _base_url(settings, url) + path
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        response = httpx.get(target, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        print(f"courier: cannot reach {target}: {exc}", file=sys.stderr)
        return None
    if response.status_code != 200:
        print(f"courier: {target}: HTTP {response.status_code} {response.text}", file=sys.stderr)
        return None
    return response.json()


_URL_HELP = "server URL (default: COURIER_URL, else http://127.0.0.1:PORT)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="courier",
        description="Courier: a real-time WebSocket notification server.",
        epilog="Configuration comes from COURIER_* environment variables (docs/deployment.md).",
    )
    parser.add_argument("--version", action="version", version=f"courier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the server (uvicorn)")
    p.add_argument("--host", default=None, help="listen address (COURIER_HOST, default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=None, help="listen port (COURIER_PORT, else PORT, else 8000)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: WEB_CONCURRENCY, else 1); more than one needs"
        " COURIER_REDIS_URL",
    )
    p.add_argument(
        "--ws",
        choices=list(WS_IMPLEMENTATIONS),
        default="courier",
        help="WebSocket implementation: courier (hardened websockets-sansio, the default)"
        " or one of uvicorn's own, for comparison",
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=LOG_LEVELS,
        help="log level (default: COURIER_LOG_LEVEL, else info)",
    )
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="bring the ledger schema up to date (Alembic)")
    p.add_argument("--revision", default="head", help="schema revision (default: head)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("token", help="mint a device token (needs the HS256 secret)")
    p.add_argument("--user", required=True, help="the user id (JWT sub)")
    p.add_argument("--device", required=True, help="the device id (JWT did)")
    p.add_argument("--ttl", type=int, default=24 * 3600, help="seconds (default one day)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("publish", help="publish one event over the HTTP API")
    p.add_argument("--user", required=True, help="the user the event is for")
    p.add_argument("--kind", required=True, help="event kind, e.g. block.grabbed")
    p.add_argument("--data", default="{}", help="the payload, a JSON object (default {})")
    p.add_argument("--id", default=None, help="idempotency key (default: generated)")
    p.add_argument("--device", default=None, help="deliver to this device only")
    p.add_argument("--ttl", type=int, default=None, help="seconds until it expires (default never)")
    p.add_argument(
        "--collapse", default=None, help="collapse key: a newer event of the key replaces it"
    )
    p.add_argument("--url", default=None, help=_URL_HELP)
    p.add_argument("--key", default=None, help="publisher key (default: first of COURIER_API_KEYS)")
    p.add_argument("--retries", type=int, default=4, help="retries on 429/502/503/504 (default 4)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("listen", help="connect as a device, print events and ack them")
    p.add_argument("--token", required=True, help="the device token (JWT)")
    p.add_argument("--url", default=None, help=_URL_HELP)
    p.add_argument("--after", type=int, default=None, help="resume after this seq")
    p.add_argument("--count", type=int, default=None, help="exit after this many events")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("stats", help="connections of this node and of the cluster")
    p.add_argument("--url", default=None, help=_URL_HELP)
    p.add_argument("--token", default=None, help="ops token (default: COURIER_OPS_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the JSON answer as it is")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("devices", help="a user's devices: connected, cursors, last seen")
    p.add_argument("--user", required=True, help="the user id")
    p.add_argument("--url", default=None, help=_URL_HELP)
    p.add_argument("--key", default=None, help="publisher key (default: first of COURIER_API_KEYS)")
    p.add_argument("--json", action="store_true", help="print the JSON answer as it is")
    p.set_defaults(func=cmd_devices)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
