"""Fixtures for the real services (PostgreSQL, Redis) and real server processes.

Outside CI a missing service skips its tests with a loud reason; with CI=true a
missing service fails them: the suite must never pass in CI without really
using PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from models.ledger import Ledger, migrate
from tests import harness
from tests.harness import ServerProcess, free_port

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_DSN = os.environ.get("COURIER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("COURIER_TEST_REDIS", "redis://127.0.0.1:6379/0")


def missing(service: str, why: BaseException) -> None:
    message = f"{service} is not reachable ({type(why).__name__}: {why})"
    if IN_CI:
        pytest.fail(f"CI=true and {message}: real-service tests must not skip in CI")
    pytest.skip(f"!!! SKIPPED: {message}; start it to run these tests")


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_postgres(prefix: str) -> Iterator[tuple[str, str]]:
    """A new, migrated PostgreSQL database (URL and name), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        missing("PostgreSQL", exc)
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    try:
        migrate(url)
        yield url, name
    finally:
        asyncio.run(_pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    with fresh_postgres("courier_test") as (url, _name):
        yield url


def fresh_redis_db(redis_url: str, db: int) -> str:
    """``redis_url`` on database ``db``, emptied (pub/sub channels are global anyway)."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite ledger, made once, for tests to copy."""
    path = tmp_path_factory.mktemp("sqlite") / "ledger.db"
    migrate(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated SQLite ledger of this test's own. SQLite has one writer: a connection
    that a test left in a write transaction (a task cancelled mid-statement at teardown)
    would lock every later test of a shared file out."""
    path = tmp_path / "ledger.db"
    for suffix in ("", "-wal"):
        source = sqlite_template.with_name(sqlite_template.name + suffix)
        if source.exists():
            shutil.copyfile(source, path.with_name(path.name + suffix))
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        missing("Redis", exc)
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs on both ledgers (the contract suite)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    ledger = Ledger.from_url(database_url)
    yield ledger
    await ledger.close()


@pytest.fixture(
    scope="module",
    params=[("sqlite", "courier"), ("postgres", "courier"), ("postgres", "websockets-sansio")],
    ids=["sqlite-fast", "postgres-fast", "postgres-plain"],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A real server process per module, ledger and send path, shared by tests using unique
    users. ``fast``: ``courier serve``'s own WebSocket protocol, which writes pre-encoded
    event frames straight to the socket; ``plain``: uvicorn's protocol as it is, the path
    the app takes under any ASGI server."""
    ledger, ws = request.param
    workdir = tmp_path_factory.mktemp("server")
    if ledger == "sqlite":
        url = f"sqlite+aiosqlite:///{workdir / 'ledger.db'}"
        migrate(url)
    else:
        url = request.getfixturevalue("postgres_url")
    proc = ServerProcess(
        url, workdir, env={"COURIER_RECONCILE_SECONDS": "0.5"}, args=["--ws", ws]
    ).start()
    yield proc
    assert_graceful_stop(proc)


def assert_graceful_stop(proc: ServerProcess) -> None:
    """SIGTERM, then: the server finished its shutdown and logged no traceback.

    (uvicorn re-raises the signal after a graceful shutdown, so the exit status is -15.)
    """
    code = proc.stop()
    log = proc.log()
    assert code in (0, -15), f"server exited with {code}:\n{log}"
    assert "Application shutdown complete" in log, log
    assert "Traceback" not in log, log


@pytest.fixture(autouse=True)
def frames_match_the_contract() -> Iterator[None]:
    """Fail a test in which a device got a frame that breaks docs/asyncapi.yaml, even if
    the test caught the error raised where the frame was read."""
    harness.BREACHES.clear()
    yield
    breaches, harness.BREACHES[:] = list(harness.BREACHES), []
    if breaches:
        pytest.fail("frames that break the contract:\n" + "\n".join(map(str, breaches)))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "courier-test-redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``rediss://`` URL of a TLS-only redis-server on loopback, and its certificate."""
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("CI=true and redis-server is not installed: the TLS tests must run")
        pytest.skip("!!! SKIPPED: redis-server is not installed; install it to run these tests")
    directory = tmp_path_factory.mktemp("tls-redis")
    cert, key = self_signed(directory)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0"
    probe = redis.Redis.from_url(url, ssl_ca_certs=str(cert))
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server --tls-port did not start (exit {proc.poll()})")
                time.sleep(0.05)  # polling a process that has no other readiness signal
        yield url, cert
    finally:
        probe.close()
        proc.terminate()
        proc.wait(10)
