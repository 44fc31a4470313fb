"""``kgdx apikey``: create prints the key once as the last line; list and revoke; errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from service.apikey_cli import app
from service.apikeys import ApiKeyStore
from service.db import ServiceDatabase

runner = CliRunner()


def verify(key: str) -> Any:
    with ServiceDatabase() as db:
        return ApiKeyStore(db).verify(key)


def test_create_prints_the_key_last_and_it_verifies(tmp_home: Path) -> None:
    result = runner.invoke(app, ["create", "--name", "orthanc", "--scope", "ingest"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("kgdx_")
    got = verify(key)
    assert got is not None and got.name == "orthanc" and got.scopes == ("ingest",)
    assert result.stdout.count(key) == 1  # shown once


def test_create_json_and_repeated_scopes(tmp_home: Path) -> None:
    result = runner.invoke(
        app, ["create", "-n", "ci", "--scope", "predict", "--scope", "admin", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["scopes"] == ["predict", "admin"] and data["revoked"] is False
    assert verify(data["key"]) is not None


def test_list_shows_ids_never_secrets(tmp_home: Path) -> None:
    created = json.loads(
        runner.invoke(app, ["create", "--name", "viewer", "--scope", "predict", "--json"]).stdout
    )
    secret = created["key"].split("_", 2)[2]
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert created["key_id"] in result.stdout and "viewer" in result.stdout
    assert secret not in result.stdout
    listed = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    assert [k["key_id"] for k in listed["keys"]] == [created["key_id"]]
    assert secret not in json.dumps(listed)


def test_list_empty(tmp_home: Path) -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "no API keys" in result.stdout


def test_revoke_by_name_then_key_fails(tmp_home: Path) -> None:
    created = json.loads(
        runner.invoke(app, ["create", "--name", "old", "--scope", "predict", "--json"]).stdout
    )
    result = runner.invoke(app, ["revoke", "old"])
    assert result.exit_code == 0, result.output
    assert created["key_id"] in result.stdout
    assert verify(created["key"]) is None
    again = runner.invoke(app, ["revoke", created["key_id"], "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["revoked"] is True
    listed = runner.invoke(app, ["list"]).stdout
    assert "(revoked)" in listed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--name", "x", "--scope", "write"], "unknown scope 'write'"),
        (["create", "--name", " ", "--scope", "predict"], "name must be a non-empty"),
        (["revoke", "nobody"], "no API key with id 'nobody'"),
    ],
)
def test_errors_exit_1(tmp_home: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert "Traceback" not in result.output


def test_duplicate_name_exits_1(tmp_home: Path) -> None:
    assert runner.invoke(app, ["create", "--name", "a", "--scope", "predict"]).exit_code == 0
    result = runner.invoke(app, ["create", "--name", "a", "--scope", "predict"])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert "kgdx_" not in result.output


def test_missing_scope_is_a_usage_error(tmp_home: Path) -> None:
    assert runner.invoke(app, ["create", "--name", "a"]).exit_code == 2


def test_uses_kgdx_db_url(tmp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("KGDX_DB_URL", url)
    result = runner.invoke(app, ["create", "--name", "a", "--scope", "predict"])
    assert result.exit_code == 0
    assert (tmp_path / "elsewhere.db").exists()
    with ServiceDatabase(url) as db:
        assert ApiKeyStore(db).verify(result.stdout.splitlines()[-1]) is not None


@pytest.mark.parametrize("name", ["create", "list", "revoke"])
def test_every_command_has_help_with_example(name: str) -> None:
    cmd: Any = get_command(app).commands[name]  # type: ignore[attr-defined]
    assert cmd.help and "Example: kgdx apikey " in cmd.help
    assert runner.invoke(app, [name, "--help"]).exit_code == 0


def test_mounted_under_kgdx(tmp_home: Path) -> None:
    from service.cli import app as root

    result = runner.invoke(root, ["apikey", "create", "--name", "r", "--scope", "predict"])
    assert result.exit_code == 0, result.output
    assert verify(result.stdout.splitlines()[-1]) is not None
