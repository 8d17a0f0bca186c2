"""A TLS Redis (``rediss://``) as Heroku Redis serves it: a self-signed certificate.

The test makes its own certificate and runs its own ``redis-server --tls-port`` on
loopback; the server under test must refuse it by default (verification stays on), and
work with ``COURIER_REDIS_TLS_VERIFY=none`` or with the certificate given to trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import IN_CI
from tests.harness import OPS_TOKEN, Device, ServerProcess, free_port, unique, until

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


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


@pytest.fixture(scope="module")
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


def _ready(server: ServerProcess) -> int:
    return httpx.get(f"{server.url}/readyz", timeout=2).status_code


async def test_an_untrusted_certificate_is_refused_with_a_hint(
    postgres_url: str, tls_redis: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = tls_redis
    server = ServerProcess(postgres_url, tmp_path, redis_url=url)
    with pytest.raises(RuntimeError, match="server exited with 2"):
        server.start()
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("courier: configuration error: the Redis certificate")
    assert "self-signed certificate" in lines[0] and "COURIER_REDIS_TLS_VERIFY=none" in lines[0]


@pytest.mark.parametrize("trust", ["verify_none", "ca_file", "ca_pem"])
async def test_a_self_signed_tls_redis_carries_events(
    postgres_url: str, tls_redis: tuple[str, Path], tmp_path: Path, trust: str
) -> None:
    url, cert = tls_redis
    env = {
        "verify_none": {"COURIER_REDIS_TLS_VERIFY": "none"},
        "ca_file": {"COURIER_REDIS_CA_CERT": str(cert)},
        "ca_pem": {"COURIER_REDIS_CA_CERT": cert.read_text()},
    }[trust] | {"COURIER_RECONCILE_SECONDS": "3600"}  # the bus alone must carry the event
    # Two nodes on the one TLS Redis: an event published on one reaches a device on the other.
    first = ServerProcess(postgres_url, tmp_path, redis_url=url, env=env).start()
    second = ServerProcess(postgres_url, tmp_path, redis_url=url, env=env).start()
    try:
        assert _ready(first) == _ready(second) == 200
        user = unique()
        phone = await Device.connect(second, user, "p")

        async def present() -> bool:
            stats = (await first.get("/v1/stats", key=OPS_TOKEN)).json()
            return bool(stats.get("cluster_connections", 0) >= 1)

        await until(present, timeout=10)
        published = await first.publish(user)
        assert (await phone.event(timeout=5))["seq"] == published["seq"]
        await phone.close()
    finally:
        first.stop()
        second.stop()
