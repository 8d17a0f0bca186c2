"""The command line as a new user meets it: token, listen, publish, migrate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.ledger import head_revision
from tests.harness import API_KEY, JWT_SECRET, OPS_TOKEN, ROOT, ServerProcess, unique

pytestmark = pytest.mark.e2e


def courier(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env(server: ServerProcess) -> dict[str, str]:
    return {
        **os.environ,
        "COURIER_ENV": "production",
        "COURIER_JWT_SECRET": JWT_SECRET,
        "COURIER_API_KEYS": API_KEY,
        "COURIER_OPS_TOKEN": OPS_TOKEN,
        "COURIER_URL": server.url,
    }


def test_token_listen_and_publish(server: ServerProcess) -> None:
    env = cli_env(server)
    user = unique()
    minted = courier("token", "--user", user, "--device", "cli", env=env)
    assert minted.returncode == 0, minted.stderr
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "listen",
            "--token",
            minted.stdout.strip(),
            "--count",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        hello = json.loads(listener.stdout.readline())  # connected: now publish
        assert hello["type"] == "hello" and hello["user"] == user
        first = courier(
            "publish",
            "--user",
            user,
            "--kind",
            "block.grabbed",
            "--data",
            '{"block_id": "B9"}',
            "--id",
            f"grab-{user}",
            env=env,
        )
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["duplicate"] is False
        grab = ("publish", "--user", user, "--kind", "block.grabbed", "--id", f"grab-{user}")
        again = courier(*grab, "--data", '{"block_id": "B9"}', env=env)
        assert json.loads(again.stdout)["duplicate"] is True, again.stderr
        clash = courier(*grab, "--data", '{"block_id": "B10"}', env=env)
        assert clash.returncode != 0 and "id_conflict" in clash.stderr, clash.stderr
        assert len(clash.stderr.strip().splitlines()) == 1
        courier("publish", "--user", user, "--kind", "plan.changed", env=env)
        out, err = listener.communicate(timeout=30)
    finally:
        listener.kill()
    frames = [json.loads(line) for line in out.splitlines()]
    assert [f["kind"] for f in frames] == ["block.grabbed", "plan.changed"], err
    assert frames[0]["data"] == {"block_id": "B9"}
    assert listener.returncode == 0


def test_cli_errors_are_one_line(server: ServerProcess) -> None:
    env = cli_env(server)
    bad_data = courier("publish", "--user", "u", "--kind", "k", "--data", "{nope", env=env)
    assert bad_data.returncode == 2 and "--data is not JSON" in bad_data.stderr
    refused = courier("publish", "--user", "bad user", "--kind", "k", env=env)
    assert refused.returncode == 1 and "HTTP 422" in refused.stderr and "user" in refused.stderr
    bad_token = courier("listen", "--token", "garbage", env=env)
    assert bad_token.returncode == 1 and "HTTP 401" in bad_token.stderr
    for result in (bad_data, refused, bad_token):
        assert "Traceback" not in result.stderr


def test_migrate_then_serve_refuses_an_unmigrated_ledger(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    env = {**os.environ, "COURIER_DATABASE_URL": url, "COURIER_DEV_FILE": str(tmp_path / "d.json")}
    refused = courier("serve", env=env)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "courier: cannot start: the ledger schema is at revision none, this server needs"
        f" {head_revision()}: run `courier migrate` first"
    )
    migrated = courier("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    again = courier("migrate", env=env)  # idempotent
    assert again.returncode == 0, again.stderr
    server = ServerProcess(url, tmp_path).start()
    server.kill()
