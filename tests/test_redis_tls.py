"""A TLS Redis (``rediss://``) as Heroku Redis serves it: a self-signed certificate.

The test makes its own certificate and runs its own ``redis-server --tls-port`` on
loopback; the server under test must refuse it by default (verification stays on), and
work with ``COURIER_REDIS_TLS_VERIFY=none`` or with the certificate given to trust.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.harness import OPS_TOKEN, Device, ServerProcess, unique, until

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


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
