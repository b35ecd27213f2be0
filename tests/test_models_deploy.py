"""Deployment operations through the real CLI on a real SQLite file in a temporary
$EDGELLM_HOME: promote / rollback (walking back), canary and mirror, fallback, tag gates
(refused with exit 3, --force recorded in the audit log and checked with `audit verify` and
`audit export`), gc keeping what a deployment names, durations, and bad input (one line,
exit 1, nothing in the database changed)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgellm.errors import ValidationError
from edgellm.registry import Registry
from edgellm.registry.deploy import gate_failure, parse_duration
from tests.test_models_registry import cli, cli_json, one_line_error, tiny_gguf


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "home"
    monkeypatch.setenv("EDGELLM_HOME", str(path))
    monkeypatch.delenv("EDGELLM_MODEL_KEY", raising=False)
    yield path


def add(tmp_path: Path, seed: int, ref: str) -> dict[str, Any]:
    return cli_json("models", "add", str(tiny_gguf(tmp_path / f"{seed}.gguf", seed)), "--name", ref)


@pytest.fixture
def four(home: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """m:v1 .. m:v4, and m:prod pointing at v1."""
    versions = [add(tmp_path, i, f"m:v{i}") for i in range(1, 5)]
    cli_json("models", "tag", "m:v1", "m:prod")
    return versions


def target(ref: str = "m:prod") -> str:
    return str(cli_json("models", "show", ref)["version"])


def state(home: Path) -> tuple[Any, ...]:
    """Everything an operation could change: tags, their history, deployments, the audit log."""
    conn = sqlite3.connect(home / "edgellm.db")
    try:
        return tuple(
            conn.execute(f"SELECT * FROM {table}").fetchall()
            for table in ("tags", "tag_history", "deployments", "audit_log", "versions")
        )
    finally:
        conn.close()


def record_eval(
    home: Path, sha256: str, metrics: dict[str, float], gate: str | None = None
) -> None:
    from edgellm.evaluate.gate import parse_gate

    verdict = parse_gate(gate).verdict(metrics) if gate else None
    with Registry.open(home) as reg:
        reg.record_eval(sha256, {"at": "2025-01-01T00:00:00Z", "metrics": metrics}, verdict)


def test_promote_and_rollback_walk_back_over_repeated_rollbacks(four: list[dict[str, Any]]) -> None:
    v1, v2, v3, v4 = (v["version"] for v in four)
    moved = cli_json("models", "promote", "m:prod", "--to", four[1]["sha256"][:8])
    assert (moved["previous"], moved["current"], moved["forced"]) == (v1, v2, False)
    cli_json("models", "promote", "m:prod", "--to", "v3")  # another tag of the model
    cli_json("models", "promote", "m:prod", "--to", "m:v4")  # NAME:TAG
    assert target() == v4
    walked = [cli_json("models", "rollback", "m:prod")["current"] for _ in range(3)]
    assert walked == [v3, v2, v1]
    assert "no earlier version" in one_line_error(cli("models", "rollback", "m:prod"))
    assert target() == v1
    # a move after rollbacks: a rollback undoes it, then goes on where the walk had stopped
    cli_json("models", "promote", "m:prod", "--to", "v3")
    assert cli_json("models", "rollback", "m:prod")["current"] == v1
    history = cli_json("models", "show", "m:prod")["tag_history"]
    ops = [h["operation"] for h in history if h["tag"] == "m:prod"]
    assert ops == ["tag", "promote", "promote", "promote", "rollback", "rollback", "rollback",
                   "promote", "rollback"]  # fmt: skip


def test_promote_ends_the_canary_it_promotes(four: list[dict[str, Any]]) -> None:
    v2 = four[1]["version"]
    started = cli_json("models", "canary", "m:prod", "--to", "v2", "--weight", "5")
    assert (started["candidate"], started["weight"], started["mirror"]) == (v2, 5.0, 0.0)
    moved = cli_json("models", "promote", "m:prod")  # no --to: the canary's candidate
    assert moved["current"] == v2
    deployment = cli_json("models", "show", "m:prod")["deployment"]
    assert deployment["target"] == v2 and deployment["candidate"] is None
    assert deployment["weight"] == 0 and deployment["mirror"] == 0
    # promoting another version ends a canary too
    cli_json("models", "canary", "m:prod", "--to", "v3", "--mirror", "100")
    cli_json("models", "promote", "m:prod", "--to", "v4")
    assert cli_json("models", "show", "m:prod")["deployment"]["candidate"] is None
    assert "no canary running" in one_line_error(cli("models", "promote", "m:prod"))


def test_canary_and_fallback_round_trips(home: Path, four: list[dict[str, Any]]) -> None:
    v1, v2, v3 = (v["version"] for v in four[:3])
    both = cli_json("models", "canary", "m:prod", "--to", "v2", "--weight", "20", "--mirror",
                    "2.5")  # fmt: skip
    assert (both["candidate"], both["weight"], both["mirror"]) == (v2, 20.0, 2.5)
    shown = cli("models", "show", "m:prod")
    assert f"canary {v2}: 20% of conversations, a copy of 2.5% of requests" in shown.stdout
    mirror = cli_json("models", "canary", "m:prod", "--to", "v3", "--mirror", "5")  # replaces
    assert (mirror["candidate"], mirror["weight"], mirror["mirror"]) == (v3, 0.0, 5.0)
    ended = cli_json("models", "canary", "m:prod", "--end")
    assert ended["candidate"] is None and ended["target"] == v1
    assert "no canary running" in one_line_error(cli("models", "canary", "m:prod", "--end"))
    on = cli_json("models", "fallback", "m:prod", "--to", "v2", "--ttft-p99", "800ms")
    assert (on["fallback"], on["ttft_p99_s"], on["window_s"]) == (v2, 0.8, 60.0)
    on = cli_json("models", "fallback", "m:prod", "--to", "v3", "--ttft-p99", "0.5",
                  "--window", "5m")  # fmt: skip
    assert (on["fallback"], on["ttft_p99_s"], on["window_s"]) == (v3, 0.5, 300.0)
    assert "exceeds 0.5s" in cli("models", "show", "m:prod").stdout
    with Registry.open(home) as reg:
        listed = {d.ref: d for d in reg.deployments()}
        assert set(listed) == {"m:prod", "m:v1", "m:v2", "m:v3", "m:v4"}
        assert listed["m:prod"].fallback is not None and listed["m:prod"].fallback.short == v3
        assert listed["m:v1"].fallback is None and listed["m:v1"].gate is None
    off = cli_json("models", "fallback", "m:prod", "--off")
    assert off["fallback"] is None and off["ttft_p99_s"] is None
    assert state(home)[2] == []  # no settings left: no row
    assert "no fallback" in one_line_error(cli("models", "fallback", "m:prod", "--off"))


def test_rollback_onto_the_canary_or_fallback_ends_them(four: list[dict[str, Any]]) -> None:
    v1 = four[0]["version"]
    cli_json("models", "promote", "m:prod", "--to", "v2")
    cli_json("models", "canary", "m:prod", "--to", "v1", "--weight", "10")
    cli_json("models", "fallback", "m:prod", "--to", "v1", "--ttft-p99", "1s")
    assert cli_json("models", "rollback", "m:prod")["current"] == v1
    deployment = cli_json("models", "show", "m:prod")["deployment"]
    assert deployment["candidate"] is None and deployment["fallback"] is None


def test_a_failing_gate_refuses_with_exit_3_and_force_is_audited(
    home: Path, four: list[dict[str, Any]]
) -> None:
    v2 = four[1]
    record_eval(home, v2["sha256"], {"kl_mean": 0.08, "ppl_ratio": 1.01})
    set_gate = cli_json("models", "set", "m:prod", "gate=kl_mean<0.05,ppl_ratio<1.05")
    assert set_gate["gate"] == "kl_mean<0.05,ppl_ratio<1.05"
    before = state(home)
    refused = one_line_error(cli("models", "promote", "m:prod", "--to", "v2"), code=3)
    assert "kl_mean=0.08, needs <0.05" in refused and "--force" in refused
    refused = one_line_error(cli("models", "canary", "m:prod", "--to", "v2", "--weight", "5"),
                             code=3)  # fmt: skip
    assert state(home) == before  # nothing moved, nothing audited
    forced = cli("models", "promote", "m:prod", "--to", "v2", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert "forced" in forced.stderr and "recorded in the audit log" in forced.stderr
    assert target() == v2["version"]

    verified = cli("audit", "verify", "--json")
    assert verified.exit_code == 0, verified.stderr
    assert json.loads(verified.stdout)["intact"] is True
    exported = cli("audit", "export")
    assert exported.exit_code == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(records) == 1
    record = records[0]
    assert (record["route"], record["method"], record["status"]) == ("models promote", "CLI", 200)
    assert (record["model"], record["version"]) == ("m:prod", v2["version"])
    assert record["finish_reason"] == "forced" and record["key_name"] is None
    assert "kl_mean=0.08" in record["error"]

    # v3 has no evaluation: the gate refuses it too; a forced canary chains a second record
    cli_json("models", "canary", "m:prod", "--to", "v3", "--weight", "5", "--force")
    exported = cli("audit", "export")
    routes = [json.loads(line)["route"] for line in exported.stdout.splitlines()]
    assert routes == ["models promote", "models canary"]
    assert json.loads(cli("audit", "verify", "--json").stdout)["checked"] == 2


def test_a_gate_needs_a_recorded_evaluation_and_a_passing_one_is_enough(
    home: Path, four: list[dict[str, Any]]
) -> None:
    v3 = four[2]
    cli_json("models", "set", "m:prod", "gate=kl_mean<0.05")
    refused = one_line_error(cli("models", "canary", "m:prod", "--to", "v3", "--weight", "5"),
                             code=3)  # fmt: skip
    assert "no recorded evaluation" in refused
    cli_json("models", "canary", "m:prod", "--to", "v3", "--weight", "5", "--force")
    record_eval(home, v3["sha256"], {"kl_mean": 0.2})
    record_eval(home, v3["sha256"], {"kl_mean": 0.01})  # a later evaluation passes
    assert cli_json("models", "promote", "m:prod", "--to", "v3")["forced"] is False
    exported = cli("audit", "export")
    assert [json.loads(line)["route"] for line in exported.stdout.splitlines()] == ["models canary"]
    assert json.loads(cli("audit", "verify", "--json").stdout)["intact"] is True
    cli_json("models", "unset", "m:prod", "gate")
    assert cli_json("models", "show", "m:prod")["deployment"]["gate"] is None


def test_without_a_tag_gate_the_versions_own_failed_verdict_refuses(
    home: Path, four: list[dict[str, Any]]
) -> None:
    """`edgellm eval --gate` recorded a failing verdict on the version: promote refuses it."""
    v2 = four[1]
    record_eval(home, v2["sha256"], {"ppl": 30.0}, gate="ppl<20")
    refused = one_line_error(cli("models", "promote", "m:prod", "--to", "v2"), code=3)
    assert "ppl<20" in refused and "failed" in refused
    assert cli_json("models", "promote", "m:prod", "--to", "v2", "--force")["forced"] is True
    record_eval(home, v2["sha256"], {"ppl": 10.0}, gate="ppl<20")  # passes now
    cli_json("models", "rollback", "m:prod")
    assert cli_json("models", "promote", "m:prod", "--to", "v2")["forced"] is False


def test_forced_records_chain_onto_the_servers_records(
    home: Path, four: list[dict[str, Any]]
) -> None:
    """A record the server's writer wrote, then a forced promote: one chain, intact."""
    import time

    from edgellm.audit.key import KEY_FILE, load_or_create_key
    from edgellm.audit.writer import AuditEntry, AuditWriter
    from edgellm.store import open_db

    key, _ = load_or_create_key(home / KEY_FILE)
    writer = AuditWriter(lambda: open_db(home / "edgellm.db"), key)
    writer.start()
    writer.submit(AuditEntry(time=time.time(), request_id="r1", route="/v1/models", method="GET",
                             status=200))  # fmt: skip
    assert writer.flush()
    writer.close()
    cli_json("models", "set", "m:prod", "gate=ppl<1")
    cli_json("models", "promote", "m:prod", "--to", "v2", "--force")
    verified = json.loads(cli("audit", "verify", "--json").stdout)
    assert verified["intact"] is True and verified["checked"] == 2
    # a key that is not the log's: the forced promote is refused, and does not happen
    (home / KEY_FILE).write_bytes(b"x" * 32)
    error = one_line_error(cli("models", "promote", "m:prod", "--to", "v3", "--force"))
    assert "audit key" in error
    assert target() == four[1]["version"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("promote", "m:prod", "--to", "deadbeef00"), "no version or tag 'deadbeef00' of m"),
        (("promote", "m:prod", "--to", "nope"), "no version or tag 'nope' of m"),
        (("promote", "m:prod", "--to", "other:x"), "no model 'other'"),
        (("promote", "m:prod", "--to", "v1"), "points at"),
        (("promote", "m:nope", "--to", "v2"), "no tag 'm:nope'"),
        (("canary", "m:prod", "--to", "v2", "--weight", "0"), "--weight 0"),
        (("canary", "m:prod", "--to", "v2", "--weight", "101"), "--weight 101"),
        (("canary", "m:prod", "--to", "v2", "--weight", "-5"), "--weight -5"),
        (("canary", "m:prod", "--to", "v2", "--weight", "nan"), "--weight nan"),
        (("canary", "m:prod", "--to", "v2", "--mirror", "101"), "--mirror 101"),
        (("canary", "m:prod", "--to", "v2"), "--weight PERCENT or --mirror"),
        (("canary", "m:prod", "--to", "v1", "--weight", "5"), "a canary needs another version"),
        (("canary", "m:prod", "--weight", "5"), "give --to"),
        (("canary", "m:prod", "--end", "--to", "v2"), "--end takes no"),
        (("fallback", "m:prod", "--to", "v1", "--ttft-p99", "800ms"), "fallback to itself"),
        (("fallback", "m:prod", "--to", "m:prod", "--ttft-p99", "1s"), "fallback to itself"),
        (("fallback", "m:prod", "--to", "v2", "--ttft-p99", "fast"), "--ttft-p99: 'fast'"),
        (("fallback", "m:prod", "--to", "v2", "--ttft-p99", "0ms"), "is not a duration"),
        (("fallback", "m:prod", "--to", "v2", "--ttft-p99", "1s", "--window", "-1s"), "--window"),
        (("fallback", "m:prod", "--to", "v2"), "--ttft-p99 DURATION"),
        (("fallback", "m:prod", "--off", "--to", "v2"), "--off takes no"),
        (("set", "m:prod", "gate=kl_mean<<1"), "cannot read gate check"),
        (("set", "m:prod", "gate=speed>1"), "unknown gate metric"),
        (("rollback", "m:v2"), "no earlier version"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    home: Path, four: list[dict[str, Any]], args: tuple[str, ...], says: str
) -> None:
    cli_json("models", "canary", "m:prod", "--to", "v3", "--weight", "5")
    cli_json("models", "fallback", "m:prod", "--to", "v4", "--ttft-p99", "2s")
    cli_json("models", "set", "m:prod", "gate=ppl<100")
    before, shown = state(home), cli_json("models", "show", "m:prod")
    assert says in one_line_error(cli("models", *args))
    assert state(home) == before
    after = cli_json("models", "show", "m:prod")
    assert after["deployment"] == shown["deployment"] and after["sha256"] == shown["sha256"]


def test_promote_to_a_fallback_is_refused(four: list[dict[str, Any]]) -> None:
    cli_json("models", "fallback", "m:prod", "--to", "v2", "--ttft-p99", "1s")
    assert "fallback of m:prod" in one_line_error(cli("models", "promote", "m:prod", "--to", "v2"))


def test_gc_keeps_the_versions_a_deployment_names(home: Path, tmp_path: Path) -> None:
    versions = [add(tmp_path, i, "m") for i in range(1, 6)]  # m:latest at the newest
    cli_json("models", "canary", "m", "--to", versions[0]["sha256"][:10], "--weight", "5")
    cli_json("models", "fallback", "m", "--to", versions[1]["sha256"][:10], "--ttft-p99", "1s")
    report = cli_json("models", "gc", "--keep", "0")
    assert sorted(report["removed"]) == sorted(f"m@{v['version']}" for v in versions[2:4])
    assert all(Path(v["blob"]).exists() for v in versions[:2])
    cli_json("models", "canary", "m", "--end")
    cli_json("models", "fallback", "m", "--off")
    assert cli_json("models", "gc", "--keep", "0")["removed"] == [
        f"m@{v['version']}" for v in versions[:2]
    ]


def test_another_models_version_and_removing_the_tag(home: Path, tmp_path: Path) -> None:
    add(tmp_path, 1, "m:prod")
    other = add(tmp_path, 2, "o:fast")
    cli_json("models", "fallback", "m:prod", "--to", "o:fast", "--ttft-p99", "1s")
    with Registry.open(home) as reg:
        fallback = reg.deployment("m:prod").fallback
        assert fallback is not None and (fallback.model, fallback.sha256) == ("m", other["sha256"])
    cli_json("models", "rm", "m:prod")
    assert state(home)[2] == []  # its settings went with it
    with Registry.open(home) as reg, pytest.raises(Exception, match="no tag 'm:prod'") as caught:
        reg.deployment("m:prod")
    assert getattr(caught.value, "status_code", None) == 404


def test_show_prints_the_deployment(four: list[dict[str, Any]]) -> None:
    cli_json("models", "set", "m:prod", "gate=kl_mean<0.05", "temperature=0.5")
    shown = cli("models", "show", "m:prod")
    assert shown.exit_code == 0, shown.stderr
    assert "gate kl_mean<0.05" in shown.stdout and "canary none" in shown.stdout
    assert cli_json("models", "show", "m:prod")["params"] == {"temperature": 0.5}
    assert cli_json("models", "show", "m:v1")["deployment"]["gate"] is None  # tag-level


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("800ms", 0.8),
        ("0.8s", 0.8),
        ("60s", 60.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2", 2.0),
        (" 1.5 s ", 1.5),
        (".5", 0.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--window") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "5 minutes", "-1s", "0", "1e3s", "5d", "nan", "1s2"])
def test_bad_durations_are_one_clear_error(text: str) -> None:
    with pytest.raises(ValidationError, match="is not a duration: give more than 0 as 800ms") as e:
        parse_duration(text, "--ttft-p99")
    assert e.value.param == "ttft_p99"


def test_gate_failure_reads_every_recorded_evaluation(home: Path, tmp_path: Path) -> None:
    add(tmp_path, 1, "m")
    with Registry.open(home) as reg:
        version = reg.resolve("m")
        assert "no recorded evaluation" in (gate_failure("ppl<5", version) or "")
        reg.record_eval(version.sha256, {"metrics": {"ppl": 9.0}}, None)
        why = gate_failure("ppl<5,kl_mean<0.1", reg.resolve("m"))
        assert why is not None and "newest: ppl=9, needs <5" in why
        reg.record_eval(version.sha256, {"metrics": {"ppl": 4.0}}, None)
        why = gate_failure("ppl<5,kl_mean<0.1", reg.resolve("m"))
        assert why is not None and "kl_mean not measured (evaluate with --ref)" in why
        assert gate_failure("ppl<5", reg.resolve("m")) is None


def test_a_registry_from_before_deployments_is_migrated(home: Path, tmp_path: Path) -> None:
    from edgellm.store import MIGRATIONS, applied_migrations, open_db

    home.mkdir()
    open_db(home / "edgellm.db", migrations=MIGRATIONS[:3]).close()
    add(tmp_path, 1, "m:prod")
    add(tmp_path, 2, "m:v2")
    conn = open_db(home / "edgellm.db")
    try:
        assert applied_migrations(conn)[-1] == "0004_deployments"
    finally:
        conn.close()
    assert cli_json("models", "canary", "m:prod", "--to", "v2", "--weight", "1")["weight"] == 1
