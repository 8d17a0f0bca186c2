"""All configuration, read once from the environment into one frozen object.

Every default lives here. ``Settings.from_env`` raises ``SettingsError`` with a
message that names the variable for any bad value; the CLI turns that into a
one-line error and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///courier.db"
DEFAULT_DEV_FILE = ".courier-dev.json"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class SettingsError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True)
class Settings:
    """Process configuration. Build with :meth:`from_env`; tests use :func:`dataclasses.replace`."""

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    redis_tls_verify: str = "full"
    redis_ca_cert: str | None = None
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    api_keys: tuple[str, ...] = ()
    ops_token: str | None = None
    environment: str = "development"
    dev_mode: bool = False
    dev_file: str = DEFAULT_DEV_FILE
    host: str = "127.0.0.1"
    port: int = 8000
    log_format: str = "text"
    log_level: str = "info"
    web_concurrency: int | None = None
    node_id: str = field(default_factory=lambda: _node_id(None))
    # Device connections.
    heartbeat_seconds: float = 25.0
    send_queue_size: int = 1024
    max_frame_bytes: int = 64 * 1024
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 200
    ws_per_message_deflate: bool = False
    backfill_page: int = 500
    # The transport (server/transport.py).
    handshake_timeout: float = 10.0
    max_url_bytes: int = 8192
    max_header_bytes: int = 16 * 1024
    max_output_bytes: int = 1024 * 1024
    # Abuse limits (server/guard.py and the device limit of the ledger).
    max_connections: int = 19_000
    max_devices_per_user: int = 10
    device_limit_policy: str = "refuse"
    handshake_rate: float = 20.0
    handshake_burst: int = 500
    auth_fail_rate: float = 1.0
    auth_fail_burst: int = 30
    reconnect_rate: float = 0.5
    reconnect_burst: int = 10
    allowed_origins: tuple[str, ...] = ()
    # Publishing and the ledger.
    max_data_bytes: int = 16 * 1024
    max_batch: int = 1000
    retention_seconds: int = 24 * 3600
    ack_flush_seconds: float = 0.05
    reconcile_seconds: float = 5.0
    # Redis: the ingest stream and cluster presence.
    ingest_claim_seconds: float = 30.0
    presence_seconds: float = 2.0
    # Push fallback (channels/push): FCM or a webhook, for devices that are not connected.
    push_after_seconds: int = 10
    push_claim_seconds: float = 30.0
    fcm_credentials: str | None = None
    fcm_project: str | None = None
    fcm_endpoint: str = "https://fcm.googleapis.com"
    fcm_token_uri: str | None = None
    push_high_priority_kinds: frozenset[str] = frozenset()
    push_webhook_url: str | None = None
    push_webhook_secret: str | None = None
    # Shutdown.
    drain_seconds: float = 10.0
    drain_batch: int = 500

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def dedup_window_seconds(self) -> int:
        """Events are kept for the retention period, so an ``id`` dedups for as long."""
        return self.retention_seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        r = _Reader(env)
        settings = cls(
            database_url=normalize_database_url(
                r.text("COURIER_DATABASE_URL") or r.text("DATABASE_URL") or DEFAULT_DATABASE_URL,
                "COURIER_DATABASE_URL",
            ),
            redis_url=_check_redis_url(r.text("COURIER_REDIS_URL") or r.text("REDIS_URL")),
            redis_tls_verify=r.choice("COURIER_REDIS_TLS_VERIFY", ("full", "ca", "none"), "full"),
            redis_ca_cert=_ca_cert(r.text("COURIER_REDIS_CA_CERT")),
            jwt_secret=r.text("COURIER_JWT_SECRET"),
            jwt_public_key=r.text("COURIER_JWT_PUBLIC_KEY"),
            api_keys=tuple(
                k.strip() for k in (r.text("COURIER_API_KEYS") or "").split(",") if k.strip()
            ),
            ops_token=r.text("COURIER_OPS_TOKEN"),
            environment=r.choice("COURIER_ENV", ("development", "production"), "development"),
            dev_file=r.text("COURIER_DEV_FILE") or DEFAULT_DEV_FILE,
            host=r.text("COURIER_HOST") or "127.0.0.1",
            port=r.integer("COURIER_PORT", r.integer("PORT", 8000, 1, 65535), 1, 65535),
            log_format=r.choice("COURIER_LOG_FORMAT", ("text", "json"), "text"),
            log_level=r.choice("COURIER_LOG_LEVEL", LOG_LEVELS, "info"),
            web_concurrency=r.integer("WEB_CONCURRENCY", 0, 1, 64) or None,
            node_id=r.text("COURIER_NODE_ID") or _node_id(r.text("DYNO")),
            heartbeat_seconds=r.number("COURIER_HEARTBEAT_SECONDS", 25.0, 1.0, 3600.0),
            send_queue_size=r.integer("COURIER_SEND_QUEUE", 1024, 1, 1_000_000),
            max_frame_bytes=r.integer("COURIER_MAX_FRAME_BYTES", 64 * 1024, 256, 16 * 1024 * 1024),
            rate_limit_per_second=r.number("COURIER_RATE_LIMIT", 50.0, 0.1, 1e6),
            rate_limit_burst=r.integer("COURIER_RATE_BURST", 200, 1, 1_000_000),
            ws_per_message_deflate=r.flag("COURIER_WS_DEFLATE", False),
            backfill_page=r.integer("COURIER_BACKFILL_PAGE", 500, 1, 100_000),
            handshake_timeout=r.number("COURIER_HANDSHAKE_TIMEOUT", 10.0, 0.1, 600.0),
            max_url_bytes=r.integer("COURIER_MAX_URL_BYTES", 8192, 256, 1024 * 1024),
            max_header_bytes=r.integer("COURIER_MAX_HEADER_BYTES", 16 * 1024, 1024, 1024 * 1024),
            max_output_bytes=r.integer(
                "COURIER_MAX_OUTPUT_BYTES", 1024 * 1024, 64 * 1024, 1024 * 1024 * 1024
            ),
            max_connections=r.integer("COURIER_MAX_CONNECTIONS", 19_000, 1, 10_000_000),
            max_devices_per_user=r.integer("COURIER_MAX_DEVICES_PER_USER", 10, 0, 1_000_000),
            device_limit_policy=r.choice(
                "COURIER_DEVICE_LIMIT_POLICY", ("refuse", "evict"), "refuse"
            ),
            handshake_rate=r.number("COURIER_HANDSHAKE_RATE", 20.0, 0.01, 1e6),
            handshake_burst=r.integer("COURIER_HANDSHAKE_BURST", 500, 1, 10_000_000),
            auth_fail_rate=r.number("COURIER_AUTH_FAIL_RATE", 1.0, 0.001, 1e6),
            auth_fail_burst=r.integer("COURIER_AUTH_FAIL_BURST", 30, 1, 10_000_000),
            reconnect_rate=r.number("COURIER_RECONNECT_RATE", 0.5, 0.001, 1e6),
            reconnect_burst=r.integer("COURIER_RECONNECT_BURST", 10, 1, 10_000_000),
            allowed_origins=_origins(r.text("COURIER_ALLOWED_ORIGINS")),
            max_data_bytes=r.integer("COURIER_MAX_DATA_BYTES", 16 * 1024, 2, 1024 * 1024),
            max_batch=r.integer("COURIER_MAX_BATCH", 1000, 1, 10_000),
            retention_seconds=r.integer("COURIER_RETENTION_SECONDS", 86400, 60, 365 * 86400),
            ack_flush_seconds=r.number("COURIER_ACK_FLUSH_SECONDS", 0.05, 0.001, 60.0),
            reconcile_seconds=r.number("COURIER_RECONCILE_SECONDS", 5.0, 0.05, 3600.0),
            ingest_claim_seconds=r.number("COURIER_INGEST_CLAIM_SECONDS", 30.0, 0.01, 86400.0),
            presence_seconds=r.number("COURIER_PRESENCE_SECONDS", 2.0, 0.05, 60.0),
            push_after_seconds=r.integer("COURIER_PUSH_AFTER_SECONDS", 10, 0, 7 * 86400),
            push_claim_seconds=r.number("COURIER_PUSH_CLAIM_SECONDS", 30.0, 0.5, 3600.0),
            fcm_credentials=_fcm_credentials(r.text("COURIER_FCM_CREDENTIALS")),
            fcm_project=r.text("COURIER_FCM_PROJECT"),
            fcm_endpoint=(r.text("COURIER_FCM_ENDPOINT") or "https://fcm.googleapis.com").rstrip(
                "/"
            ),
            fcm_token_uri=r.text("COURIER_FCM_TOKEN_URI"),
            push_high_priority_kinds=frozenset(
                k.strip()
                for k in (r.text("COURIER_PUSH_HIGH_PRIORITY_KINDS") or "").split(",")
                if k.strip()
            ),
            push_webhook_url=_http_url(r.text("COURIER_PUSH_WEBHOOK_URL")),
            push_webhook_secret=r.text("COURIER_PUSH_WEBHOOK_SECRET"),
            drain_seconds=r.number("COURIER_DRAIN_SECONDS", 10.0, 0.0, 600.0),
            drain_batch=r.integer("COURIER_DRAIN_BATCH", 500, 1, 1_000_000),
        )
        return settings.with_secrets()

    def with_secrets(self) -> Settings:
        """Resolve secrets: production requires them; development generates missing ones."""
        if self.push_webhook_url and not self.push_webhook_secret:
            raise SettingsError(
                "COURIER_PUSH_WEBHOOK_URL needs COURIER_PUSH_WEBHOOK_SECRET (the HMAC key that"
                " signs each webhook body)"
            )
        if self.push_webhook_url and self.fcm_credentials:
            raise SettingsError(
                "set only one of COURIER_FCM_CREDENTIALS and COURIER_PUSH_WEBHOOK_URL"
            )
        if self.jwt_secret and self.jwt_public_key:
            raise SettingsError("set only one of COURIER_JWT_SECRET and COURIER_JWT_PUBLIC_KEY")
        if self.jwt_secret is not None and len(self.jwt_secret) < 32:
            raise SettingsError("COURIER_JWT_SECRET must be at least 32 characters (HS256 key)")
        if self.jwt_public_key:
            from server.auth import public_key

            try:
                public_key(self.jwt_public_key)
            except ValueError as exc:
                raise SettingsError(
                    f"COURIER_JWT_PUBLIC_KEY must be a PEM public key: {exc}"
                ) from None
        has_token_key = bool(self.jwt_secret or self.jwt_public_key)
        if self.environment == "production":
            missing = [
                name
                for name, ok in (
                    ("COURIER_JWT_SECRET or COURIER_JWT_PUBLIC_KEY", has_token_key),
                    ("COURIER_API_KEYS", bool(self.api_keys)),
                    ("COURIER_OPS_TOKEN", bool(self.ops_token)),
                )
                if not ok
            ]
            if missing:
                raise SettingsError(
                    "COURIER_ENV=production requires " + ", ".join(missing) + " to be set"
                )
            return self
        if has_token_key and self.api_keys and self.ops_token:
            return self
        dev = load_dev_secrets(Path(self.dev_file))
        return replace(
            self,
            dev_mode=True,
            jwt_secret=self.jwt_secret or (None if self.jwt_public_key else dev["jwt_secret"]),
            api_keys=self.api_keys or (dev["api_key"],),
            ops_token=self.ops_token or dev["ops_token"],
        )


def load_dev_secrets(path: Path) -> dict[str, str]:
    """Development secrets, generated once and kept in ``path`` (mode 0600)."""
    keys = ("jwt_secret", "api_key", "ops_token")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(data.get(k), str) for k in keys):
            return {k: data[k] for k in keys}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the dev secrets file {path}: {exc}") from exc
    data = {
        "jwt_secret": secrets.token_urlsafe(32),
        "api_key": "dev-" + secrets.token_urlsafe(24),
        "ops_token": "ops-" + secrets.token_urlsafe(24),
    }
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it first: use theirs
        return load_dev_secrets(path)
    except OSError as exc:
        raise SettingsError(f"cannot write the dev secrets file {path}: {exc}") from exc
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    return data


def normalize_database_url(raw: str, name: str = "COURIER_DATABASE_URL") -> str:
    """Map the URL onto an async driver; ``postgres://`` (Heroku) means asyncpg."""
    try:
        url: URL = make_url(raw)
    except ArgumentError as exc:
        raise SettingsError(f"{name} is not a database URL: {raw!r}") from exc
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        if driver not in ("", "asyncpg"):
            raise SettingsError(f"{name}: PostgreSQL is used through asyncpg, not {driver!r}")
        if not url.database:
            raise SettingsError(
                f"{name}: the PostgreSQL URL names no database"
                " (postgresql://user:password@host:5432/DATABASE)"
            )
        url = url.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        if driver not in ("", "aiosqlite"):
            raise SettingsError(f"{name}: SQLite is used through aiosqlite, not {driver!r}")
        if not url.database or url.database == ":memory:":
            raise SettingsError(f"{name}: SQLite needs a file path (sqlite+aiosqlite:///file.db)")
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        raise SettingsError(f"{name}: unsupported database {backend!r} (use postgresql or sqlite)")
    return url.render_as_string(hide_password=False)


def _node_id(dyno: str | None) -> str:
    """``web.1-3f9a0c2e`` on Heroku (``DYNO``), else the host name: a readable prefix and a
    random part, so that each process of a dyno or host (``--workers``) is its own node."""
    return f"{dyno or socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _ca_cert(raw: str | None) -> str | None:
    """``COURIER_REDIS_CA_CERT``: a PEM file's path or the PEM text itself."""
    if raw is None or "-----BEGIN CERTIFICATE-----" in raw:
        return raw
    if not Path(raw).is_file():
        raise SettingsError(
            "COURIER_REDIS_CA_CERT must be a PEM certificate or the path of one;"
            f" no file at {raw!r}"
        )
    return raw


def _origins(raw: str | None) -> tuple[str, ...]:
    """``https://app.example.com,https://ops.example.com``: exact origins, no paths."""
    if raw is None:
        return ()
    found = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        scheme, sep, rest = item.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            raise SettingsError(
                "COURIER_ALLOWED_ORIGINS must be comma-separated origins such as"
                f" https://app.example.com (scheme and host, no path), got {item!r}"
            )
        found.append(item)
    return tuple(found)


def _fcm_credentials(raw: str | None) -> str | None:
    """``COURIER_FCM_CREDENTIALS``: a service-account JSON key, its text or its path."""
    if raw is None:
        return None
    from channels.push.fcm import load_credentials

    try:
        info = load_credentials(raw)
    except (OSError, ValueError) as exc:
        raise SettingsError(
            f"COURIER_FCM_CREDENTIALS must be a service-account JSON key or its path: {exc}"
        ) from None
    for name in ("client_email", "private_key", "token_uri"):
        if not isinstance(info.get(name), str):
            raise SettingsError(f"COURIER_FCM_CREDENTIALS: the key has no {name}")
    return raw


def _http_url(raw: str | None) -> str | None:
    if raw is not None and not raw.startswith(("http://", "https://")):
        raise SettingsError(f"COURIER_PUSH_WEBHOOK_URL must be an http(s) URL, got {raw!r}")
    return raw


def _check_redis_url(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(
            f"COURIER_REDIS_URL must start with redis://, rediss:// or unix://: {raw!r}"
        )
    return raw


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        if raw not in options:
            raise SettingsError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return raw
