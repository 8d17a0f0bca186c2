from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings, SettingsError, normalize_database_url

PROD = {
    "COURIER_ENV": "production",
    "COURIER_JWT_SECRET": "s" * 32,
    "COURIER_API_KEYS": "k1, k2,",
    "COURIER_OPS_TOKEN": "o",
}


def test_defaults_are_embedded_and_dev_mode(tmp_path: Path) -> None:
    dev = tmp_path / "dev.json"
    s = Settings.from_env({"COURIER_DEV_FILE": str(dev)})
    assert s.database_url == "sqlite+aiosqlite:///courier.db"
    assert s.redis_url is None
    assert s.dev_mode
    assert s.port == 8000
    stored = json.loads(dev.read_text())
    assert s.jwt_secret == stored["jwt_secret"]
    assert s.api_keys == (stored["api_key"],)
    assert s.ops_token == stored["ops_token"]
    assert dev.stat().st_mode & 0o777 == 0o600
    # The same secrets on the next start: tokens minted before stay valid.
    assert Settings.from_env({"COURIER_DEV_FILE": str(dev)}).jwt_secret == s.jwt_secret


def test_production_reads_every_secret() -> None:
    s = Settings.from_env({**PROD, "PORT": "9000", "DATABASE_URL": "postgres://u:p@db:5432/x"})
    assert not s.dev_mode
    assert s.api_keys == ("k1", "k2")
    assert s.port == 9000
    assert s.database_url == "postgresql+asyncpg://u:p@db:5432/x"


def test_courier_variables_win_over_generic_ones() -> None:
    s = Settings.from_env(
        {
            **PROD,
            "PORT": "9000",
            "COURIER_PORT": "9001",
            "DATABASE_URL": "postgres://a/x",
            "COURIER_DATABASE_URL": "postgresql://b/y",
            "REDIS_URL": "redis://a",
            "COURIER_REDIS_URL": "redis://b:6380/1",
        }
    )
    assert s.port == 9001
    assert s.database_url == "postgresql+asyncpg://b/y"
    assert s.redis_url == "redis://b:6380/1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COURIER_ENV": "production"}, "COURIER_ENV=production requires"),
        ({**PROD, "COURIER_API_KEYS": ""}, "COURIER_API_KEYS"),
        ({**PROD, "COURIER_ENV": "staging"}, "COURIER_ENV must be one of"),
        ({**PROD, "PORT": "eighty"}, "PORT must be a whole number"),
        ({**PROD, "COURIER_PORT": "70000"}, "COURIER_PORT must be between"),
        ({**PROD, "COURIER_DATABASE_URL": "not a url"}, "is not a database URL"),
        ({**PROD, "COURIER_DATABASE_URL": "mysql://x/y"}, "unsupported database"),
        ({**PROD, "COURIER_DATABASE_URL": "postgresql+psycopg2://x/y"}, "through asyncpg"),
        ({**PROD, "COURIER_DATABASE_URL": "sqlite://"}, "needs a file path"),
        ({**PROD, "DATABASE_URL": "postgres://u:p@db:5432"}, "names no database"),
        ({**PROD, "DATABASE_URL": "postgres://u:p@db:5432/"}, "names no database"),
        ({**PROD, "COURIER_LOG_LEVEL": "loud"}, "COURIER_LOG_LEVEL must be one of"),
        ({**PROD, "WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY must be a whole number"),
        ({**PROD, "COURIER_REDIS_TLS_VERIFY": "off"}, "COURIER_REDIS_TLS_VERIFY must be one"),
        ({**PROD, "COURIER_REDIS_CA_CERT": "/nonexistent/ca.pem"}, "no file at"),
        ({**PROD, "COURIER_FCM_CREDENTIALS": "/nonexistent/key.json"}, "service-account JSON"),
        ({**PROD, "COURIER_FCM_CREDENTIALS": '{"type": "user"}'}, "service-account JSON"),
        ({**PROD, "COURIER_FCM_CREDENTIALS": '{"type": "service_account"}'}, "no client_email"),
        ({**PROD, "COURIER_PUSH_WEBHOOK_URL": "ftp://x"}, "must be an http"),
        ({**PROD, "COURIER_PUSH_WEBHOOK_URL": "http://x"}, "needs COURIER_PUSH_WEBHOOK_SECRET"),
        ({**PROD, "COURIER_REDIS_URL": "http://x"}, "COURIER_REDIS_URL must start"),
        ({**PROD, "COURIER_WS_DEFLATE": "maybe"}, "must be true or false"),
        ({**PROD, "COURIER_JWT_SECRET": "short"}, "at least 32 characters"),
        ({**PROD, "COURIER_JWT_PUBLIC_KEY": "abc"}, "only one of"),
        ({**PROD, "COURIER_JWT_SECRET": "", "COURIER_JWT_PUBLIC_KEY": "abc"}, "PEM public key"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_heroku_variables() -> None:
    s = Settings.from_env({**PROD, "DYNO": "web.1", "WEB_CONCURRENCY": "2"})
    assert s.node_id.startswith("web.1-") and s.web_concurrency == 2
    assert Settings.from_env(PROD).web_concurrency is None
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    tls = Settings.from_env({**PROD, "COURIER_REDIS_CA_CERT": pem})
    assert tls.redis_ca_cert == pem.strip() and tls.redis_tls_verify == "full"


def test_sqlite_url_gets_the_async_driver() -> None:
    assert normalize_database_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"


def test_cli_exits_non_zero_with_one_line_for_bad_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "token", "--user", "u", "--device", "d"],
        env={"COURIER_ENV": "production", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("courier: configuration error: COURIER_ENV=production requires")
    assert "Traceback" not in result.stderr


def test_workers_without_redis_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--workers", "2"],
        env={**PROD, "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--workers > 1 needs COURIER_REDIS_URL" in result.stderr
