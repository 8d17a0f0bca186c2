"""Hostile handshakes and closes against a real server: every token a client can send is
answered 401 (never 500), ``after`` is ASCII digits only, and peers cannot mint metric series."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from models.ledger import migrate
from tests.conftest import assert_graceful_stop
from tests.harness import API_KEY, Device, ServerProcess, token, unique, until

pytestmark = pytest.mark.e2e

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that verifies device tokens with an RSA public key."""
    workdir: Path = tmp_path_factory.mktemp("rsa")
    url = f"sqlite+aiosqlite:///{workdir / 'ledger.db'}"
    migrate(url)
    pem = (
        RSA_KEY.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    proc = ServerProcess(
        url, workdir, env={"COURIER_JWT_SECRET": "", "COURIER_JWT_PUBLIC_KEY": pem}
    ).start()
    yield proc
    assert_graceful_stop(proc)


def _claims(user: str, **extra: Any) -> dict[str, Any]:
    return {"sub": user, "did": "p", "exp": int(time.time()) + 60, **extra}


async def _status(server: ServerProcess, tok: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        await Device.connect(server, "u", "p", tok=tok)
    return info.value.response.status_code, json.loads(info.value.response.body)


async def test_every_foreign_token_gets_401_from_a_public_key_server(
    rsa_server: ServerProcess,
) -> None:
    user = unique()
    good = jwt.encode(_claims(user), RSA_KEY, algorithm="RS256")
    phone = await Device.connect(rsa_server, user, "p", tok=good)
    assert phone.hello["user"] == user
    forged = {
        "es256-on-rsa-key": jwt.encode(_claims(user), EC_KEY, algorithm="ES256"),
        "hs256-key-confusion": jwt.encode(_claims(user), "k" * 40, algorithm="HS256"),
        "exp-1e400": jwt.encode(_claims(user, exp=10**400), RSA_KEY, algorithm="RS256"),
        "exp-string": jwt.encode(
            _claims(user, exp=str(int(time.time()) + 60)), RSA_KEY, algorithm="RS256"
        ),
        "exp-float": jwt.encode(_claims(user, exp=time.time() + 60.5), RSA_KEY, algorithm="RS256"),
        "aud-empty-list": jwt.encode(_claims(user, aud=[]), RSA_KEY, algorithm="RS256"),
    }
    for name, tok in forged.items():
        status, body = await _status(rsa_server, tok)
        assert (status, body["error"]["code"]) == (401, "bad_token"), name
    await phone.close()
    log = rsa_server.log()
    assert "Traceback" not in log and " 500" not in log, log


async def test_after_takes_ascii_digits_only(server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {token(unique(), 'p')}"}
    for after in ("\u0663", "\uff11", "1e3", "+1", " 1"):
        query = httpx.QueryParams({"after": after})
        with pytest.raises(InvalidStatus) as info:
            await connect(f"{server.ws_url}/v1/ws?{query}", additional_headers=headers)
        assert info.value.response.status_code == 400, after
        assert json.loads(info.value.response.body)["error"]["code"] == "bad_after"


async def test_peer_close_codes_do_not_create_metric_series(server: ServerProcess) -> None:
    user = unique()
    codes = [*range(3000, 3040), 4100, 4999, 1000]
    for code in codes:
        phone = await Device.connect(server, user, f"d{code}")
        await phone.ws.close(code)

    async def labels() -> set[str]:
        async with httpx.AsyncClient(base_url=server.url) as http:
            text = (await http.get("/metrics")).text
        return {
            line.split('code="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if line.startswith("courier_disconnects_total{")
        }

    async def counted() -> bool:  # each close is counted once its socket has ended
        text = (await server.get("/metrics", key="")).text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("courier_disconnects_total{")
        )
        return total >= len(codes)

    await until(counted)
    seen = await labels()
    assert "other" in seen and "1000" in seen
    assert not {str(c) for c in codes if c != 1000} & seen


async def test_a_body_that_is_not_utf8_gets_400_and_the_connection_keeps_serving(
    server: ServerProcess,
) -> None:
    user = unique()
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:
        for raw in (
            b'{"user":"u1","kind":"k","data":{"x":"\xff"}}',
            b"\xc3\x28",
            b'"\xed\xa0\x80"',
        ):
            r = await http.post("/v1/events", content=raw)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "bad_json"
            # The same keep-alive connection serves the next request.
            ok = await http.post("/v1/events", json={"user": user, "kind": "k"})
            assert ok.status_code == 201, ok.text
    log = server.log()
    assert "Traceback" not in log and '" 500' not in log, log
