"""The command line as a new user meets it: token, listen, publish, migrate."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from models.ledger import head_revision
from server import __version__
from server.cli import build_parser, main
from tests.harness import API_KEY, JWT_SECRET, OPS_TOKEN, ROOT, ServerProcess, token, unique

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
    lines = migrated.stderr.splitlines()  # each step and the result; no Alembic chatter
    assert all(line.startswith("Running upgrade ") for line in lines[:-1]), lines
    assert lines[-1] == "courier: ledger schema is at head" and len(lines) >= 4
    again = courier("migrate", env=env)  # idempotent
    assert again.returncode == 0, again.stderr
    server = ServerProcess(url, tmp_path).start()
    server.kill()


def test_stats_and_devices_at_a_terminal(server: ServerProcess) -> None:
    env = cli_env(server)
    user = unique()
    listener = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "listen", "--token", token(user, "phone1")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert json.loads(listener.stdout.readline())["type"] == "hello"
        table = courier("devices", "--user", user, env=env)
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].split()[:2] == ["device", "connected"]
        assert table.stdout.splitlines()[1].split()[:2] == ["phone1", "yes"]
        listed = json.loads(courier("devices", "--user", user, "--json", env=env).stdout)
        assert [(d["device"], d["connected"]) for d in listed["devices"]] == [("phone1", True)]
        stats = json.loads(courier("stats", "--json", env=env).stdout)
        assert stats["connections"] >= 1 and stats["cluster_connections"] >= 1
        text = courier("stats", env=env)
        assert text.returncode == 0 and "cluster:" in text.stdout, text.stderr
    finally:
        listener.kill()
        listener.communicate(timeout=10)  # reaps it and closes its pipe
    nobody = courier("devices", "--user", unique(), env=env)
    assert nobody.returncode == 0 and "has no devices" in nobody.stdout
    refused = courier("stats", "--token", "wrong", env=env)
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_version_and_help_for_every_option() -> None:
    result = courier("--version", env=dict(os.environ))
    assert result.returncode == 0 and result.stdout.strip() == f"courier {__version__}"
    assert version("courier-server") == __version__
    parser = build_parser()
    assert "``" not in (parser.description or "")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert sub.description or commands._choices_actions, name
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"courier {name} {action.option_strings} has no help"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COURIER_LOG_LEVEL": "loud"}, "COURIER_LOG_LEVEL must be one of"),
        ({"DATABASE_URL": "postgres://u:p@127.0.0.1:5432"}, "names no database"),
        ({"WEB_CONCURRENCY": "many"}, "WEB_CONCURRENCY must be a whole number"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    base = {**os.environ, "COURIER_DEV_FILE": str(tmp_path / "d.json")}
    for name in ("COURIER_DATABASE_URL", "DATABASE_URL", "COURIER_LOG_LEVEL", "WEB_CONCURRENCY"):
        base.pop(name, None)
    result = courier("serve", env={**base, **env})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stderr.startswith("courier: configuration error: ")


def test_web_concurrency_without_redis_runs_one_process(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'one.db'}"
    assert courier("migrate", env={**os.environ, "COURIER_DATABASE_URL": url}).returncode == 0
    server = ServerProcess(url, tmp_path, workers=None, env={"WEB_CONCURRENCY": "2"}).start()
    try:
        notes = [line for line in server.log().splitlines() if "WEB_CONCURRENCY" in line]
        assert notes == [
            "courier: WEB_CONCURRENCY=2 ignored: without COURIER_REDIS_URL workers cannot"
            " share events, so this runs one process"
        ]
        assert server.log().count("Started server process") == 1
    finally:
        server.kill()


def test_make_run_installs_the_server_alone_and_quietly(tmp_path: Path) -> None:
    venv = tmp_path / "fresh-venv"
    # Not as a sub-make of `make test`: no "Entering directory" lines, no inherited flags.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    planned = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", f"VENV={venv}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    installs = [line for line in planned.stdout.splitlines() if " install " in line]
    assert installs and all("--quiet --quiet" in line for line in installs), installs
    assert installs[-1].endswith("install -e .")  # no test tools for a server run
    assert not any("dev]" in line or "clients/" in line for line in installs), installs
    steps = planned.stdout.splitlines()
    assert steps[-2:] == [f"{venv}/bin/courier migrate", f"{venv}/bin/courier serve"]


def test_publish_without_the_publisher_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "courier_publisher", None)  # as if not installed
    assert main(["publish", "--user", "u1", "--kind", "k"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "courier: publish needs the publisher package: pip install ./clients/python"
    ]
