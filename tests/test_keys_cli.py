"""`edgellm keys` as a user runs it: the real command on a real data directory, one clear line
for every mistake."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgellm.cli.main import app
from edgellm.store import MIGRATIONS, Migration, open_db
from tests.conftest import EDGELLM


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def keys_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `edgellm keys` command, in its own process, on the data directory `home`."""
    env = {**os.environ, "EDGELLM_HOME": str(home)}
    return subprocess.run(
        [*EDGELLM, "keys", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_the_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    made = keys_cli(tmp_path, "create", "--name", "alice", "--role", "user", "--models",
                    "m1,m2", "--rpm", "60", "--tpm", "1000", "--max-concurrent", "2",
                    "--expires", "2999-12-31")  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("edg-") and len(key) == 47
    assert "only time" in made.stderr and made.stdout == key + "\n"
    as_json = keys_cli(tmp_path, "create", "--name", "ops", "--role", "metrics", "--json")
    ops = json.loads(as_json.stdout)
    assert ops["key"].startswith("edg-") and ops["role"] == "metrics" and ops["state"] == "active"
    assert keys_cli(tmp_path, "revoke", "ops").returncode == 0
    listed = json.loads(keys_cli(tmp_path, "list", "--json").stdout)
    assert [(k["name"], k["state"]) for k in listed] == [("alice", "active"), ("ops", "revoked")]
    assert listed[0] == {
        **listed[0],
        "models": ["m1", "m2"],
        "rpm": 60,
        "tpm": 1000,
        "max_concurrent": 2,
        "expires": "2999-12-31",
        "prefix": key[:12],
    }
    table = keys_cli(tmp_path, "list")
    assert "alice" in table.stdout and "revoked" in table.stdout
    everything = table.stdout + json.dumps(listed)
    assert key not in everything and key[12:] not in everything and ops["key"] not in everything
    db = tmp_path / "edgellm.db"
    assert mode(db) == 0o600 and mode(tmp_path) == 0o700


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["create", "--role", "user"], 2, "--name is required"),
        (["create", "--name", "a"], 2, "--role is required"),
        (["create", "--name", "a", "--role", "root"], 2, "--role: Input should be"),
        (["create", "--name", "a", "--role", "user", "--rpm", "x"], 2, "--rpm: "),
        (["create", "--name", "a", "--role", "user", "--max-concurrent", "0"], 2,
         "--max-concurrent: "),
        (["create", "--name", "a", "--role", "admin", "--models", "m"], 2, "--models: "),
        (["create", "--name", "a", "--role", "user", "--expires", "tomorrow"], 2, "YYYY-MM-DD"),
        (["create", "--name", "dup", "--role", "user"], 1, "exists already"),
        (["revoke"], 2, "NAME is required"),
        (["revoke", "nobody"], 1, "no key named 'nobody'"),
    ],
)  # fmt: skip
def test_the_cli_says_what_is_wrong_in_one_line(
    tmp_path: Path, args: list[str], code: int, says: str
) -> None:
    runner, env = CliRunner(), {"EDGELLM_HOME": str(tmp_path)}
    runner.invoke(app, ["keys", "create", "--name", "dup", "--role", "user"], env=env)
    result = runner.invoke(app, ["keys", *args], env=env)  # in-process: the same command, faster
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and says in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_the_cli_refuses_a_database_from_a_newer_edgellm(tmp_path: Path) -> None:
    newer = (*MIGRATIONS, Migration("0099_future", "CREATE TABLE future (x);"))
    open_db(tmp_path / "edgellm.db", migrations=newer).close()
    result = keys_cli(tmp_path, "list")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "0099_future" in result.stderr and "upgrade edgellm" in result.stderr


def test_an_expired_date_is_taken_with_a_warning(tmp_path: Path) -> None:
    result = keys_cli(tmp_path, "create", "--name", "old", "--role", "user", "--expires",
                      "2000-01-01")  # fmt: skip
    assert result.returncode == 0 and "expired on 2000-01-01" in result.stderr
