"""The Procfile and app.json as Heroku runs them: the release phase, then the web process
on ``$PORT`` with ``WEB_CONCURRENCY=2``, a ``postgres://`` ``DATABASE_URL`` and a TLS
Redis with a self-signed certificate, configured only by what app.json sets."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import fresh_postgres
from tests.harness import ROOT, Device, free_port, token, unique, until

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.e2e]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def app_json_env() -> dict[str, str]:
    """The config vars a Heroku Button deploy sets: values as given, generated secrets."""
    manifest = json.loads((ROOT / "app.json").read_text())
    plans = {addon["plan"] for addon in manifest["addons"]}
    assert {"heroku-postgresql", "heroku-redis"} <= plans
    env: dict[str, str] = {}
    for name, spec in manifest["env"].items():
        assert spec["description"], name
        env[name] = secrets.token_hex(32) if spec.get("generator") == "secret" else spec["value"]
    return env


def test_app_json_generates_every_secret_production_needs() -> None:
    manifest = json.loads((ROOT / "app.json").read_text())
    generated = {k for k, v in manifest["env"].items() if v.get("generator") == "secret"}
    assert {"COURIER_JWT_SECRET", "COURIER_API_KEYS", "COURIER_OPS_TOKEN"} <= generated
    assert manifest["env"]["COURIER_ENV"]["value"] == "production"
    assert set(procfile()) == {"release", "web"}


def test_release_then_web_with_two_workers_and_tls_redis(
    tls_redis: tuple[str, Path], tmp_path: Path
) -> None:
    rediss, _ = tls_redis
    port = free_port()
    with fresh_postgres("courier_heroku") as (url, _name):
        # Heroku's DATABASE_URL: postgres://, no driver.
        database = url.replace("postgresql+asyncpg://", "postgres://")
        config = app_json_env()
        env = {
            **os.environ,
            **config,
            "DATABASE_URL": database,
            "REDIS_URL": rediss,
            "PORT": str(port),
            "WEB_CONCURRENCY": "2",
            "DYNO": "web.1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for name in [k for k in env if k.startswith("COURIER_") and k not in config]:
            del env[name]
        processes = procfile()
        release = subprocess.run(
            shlex.split(processes["release"]), env=env, cwd=tmp_path, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert release.returncode == 0, release.stderr
        log_path = tmp_path / "web.log"
        with log_path.open("wb") as log:
            web = subprocess.Popen(
                shlex.split(processes["web"]), env=env, cwd=tmp_path, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            asyncio.run(_serves_events(web, log_path, port, config))
            web.send_signal(signal.SIGTERM)
            assert web.wait(30) == 0, log_path.read_text()
        finally:
            if web.poll() is None:
                os.killpg(web.pid, signal.SIGKILL)
                web.wait(10)


class _Dyno:
    """What ``Device.connect`` needs of a server: its WebSocket URL."""

    def __init__(self, port: int) -> None:
        self.ws_url = f"ws://127.0.0.1:{port}"


async def _serves_events(
    web: subprocess.Popen[bytes], log_path: Path, port: int, config: dict[str, str]
) -> None:
    ops = {"Authorization": f"Bearer {config['COURIER_OPS_TOKEN']}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

        async def both_workers_ready() -> bool:
            if web.poll() is not None:
                raise AssertionError(f"the web process exited: see {log_path}")
            try:
                stats = (await http.get("/v1/stats", headers=ops)).json()
            except httpx.TransportError:
                return False
            return len(stats.get("nodes", {})) == 2

        await until(both_workers_ready, timeout=30)
        stats = (await http.get("/v1/stats", headers=ops)).json()
        assert all(node.startswith("web.1-") for node in stats["nodes"]), stats
        user = unique()
        tok = token(user, "p", secret=config["COURIER_JWT_SECRET"])
        phone = await Device.connect(_Dyno(port), user, "p", tok=tok)  # type: ignore[arg-type]
        answer = await http.post(
            "/v1/events",
            json={"user": user, "kind": "block.grabbed", "data": {"block_id": "B9"}},
            headers={"Authorization": f"Bearer {config['COURIER_API_KEYS']}"},
        )
        assert answer.status_code == 201, answer.text
        assert (await phone.event())["seq"] == answer.json()["seq"]
        await phone.close()
