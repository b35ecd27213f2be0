"""The audit log's chain, on a real SQLite file written by the real writer: any change to any
field of any record, a deletion, an insertion or a swap is found and the record named; an end
cut off shows against an anchor; without the key nothing is said to pass. And the CLI's
verify, export and tail on such a file."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgellm.audit.chain import COLUMNS, FIELDS, GENESIS, Verification, mac_of, rows, verify
from edgellm.audit.key import KEY_FILE, load_or_create_key
from edgellm.audit.writer import AuditEntry, AuditWriter
from edgellm.cli.main import app
from edgellm.store import open_db
from tests.conftest import EDGELLM

N = 8  # records in each test log
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def entry(i: int) -> AuditEntry:
    return AuditEntry(
        time=T0 + i,
        request_id=f"req-{i}",
        route="/v1/chat/completions",
        method="POST",
        status=200,
        key_name="alice",
        role="user",
        client="127.0.0.1:5000",
        api="openai",
        model="m",
        version="0123456789ab",
        finish_reason="stop",
        prompt_tokens=10 + i,
        cached_tokens=0,
        completion_tokens=5,
        ttft_s=0.125,
        e2e_s=0.5 + i / 10,
        input_sha256="ab" * 32,
        input_kind="prompt",
        output_sha256="cd" * 32,
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def log(home: Path) -> Iterator[tuple[sqlite3.Connection, bytes]]:
    """A database holding records 1..N, and the key that wrote them."""
    key, made = load_or_create_key(home / KEY_FILE)
    assert made
    writer = AuditWriter(lambda: open_db(home / "edgellm.db"), key)
    for i in range(1, N + 1):
        writer.submit(entry(i))
    writer.start()
    assert writer.close() == 0
    conn = sqlite3.connect(home / "edgellm.db", isolation_level=None)
    yield conn, key
    conn.close()


def check(log: tuple[sqlite3.Connection, bytes], **options: object) -> Verification:
    conn, key = log
    return verify(conn, key, **options)  # type: ignore[arg-type]


def test_an_untouched_log_is_intact_and_chained(log: tuple[sqlite3.Connection, bytes]) -> None:
    conn, key = log
    result = check(log)
    assert (result.intact, result.first, result.last, result.count) == (True, 1, N, N)
    records = list(rows(conn))
    assert [r["seq"] for r in records] == list(range(1, N + 1))
    assert [r["request_id"] for r in records] == [f"req-{i}" for i in range(1, N + 1)]
    assert records[0]["prev_mac"] == GENESIS
    for before, record in itertools.pairwise(records):
        assert record["prev_mac"] == before["mac"]
        assert record["mac"] == mac_of(key, before["mac"], record)
    assert records[0]["time"] == "2025-06-15T15:06:41.000000Z"
    assert result.last_mac == records[-1]["mac"]


# a value each column did not have, of the column's type and of another one
CHANGES = [(name, value) for name in (*FIELDS[1:], "prev_mac", "mac") for value in ("x", 7)]


@pytest.mark.parametrize("seq", [1, N // 2, N])
@pytest.mark.parametrize(("column", "value"), CHANGES)
def test_changing_any_field_of_any_record_is_found_there(
    log: tuple[sqlite3.Connection, bytes], seq: int, column: str, value: object
) -> None:
    conn, _ = log
    conn.execute(f"UPDATE audit_log SET {column} = ? WHERE seq = ?", (value, seq))
    problem = check(log).problem
    assert problem is not None and problem.seq == seq, problem
    assert problem.kind == "changed"
    assert problem.detail.startswith(f"record {seq} (request ")


@pytest.mark.parametrize("seq", [1, N // 2, N])
def test_setting_a_field_to_null_or_a_blob_is_found(
    log: tuple[sqlite3.Connection, bytes], seq: int
) -> None:
    conn, _ = log
    conn.execute("UPDATE audit_log SET model = NULL, key_name = x'00ff' WHERE seq = ?", (seq,))
    problem = check(log).problem
    assert problem is not None and (problem.seq, problem.kind) == (seq, "changed")


@pytest.mark.parametrize("seq", [1, N // 2, N - 1])
def test_deleting_a_record_is_found_and_named(
    log: tuple[sqlite3.Connection, bytes], seq: int
) -> None:
    conn, _ = log
    conn.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))
    problem = check(log).problem
    assert problem is not None and (problem.seq, problem.kind) == (seq, "deleted"), problem
    assert f"record {seq} deleted" in problem.detail


def test_deleting_records_and_renumbering_the_rest_is_found(
    log: tuple[sqlite3.Connection, bytes],
) -> None:
    conn, _ = log
    conn.execute("DELETE FROM audit_log WHERE seq IN (3, 4)")
    conn.execute("UPDATE audit_log SET seq = seq - 2 WHERE seq > 4")
    problem = check(log).problem
    assert problem is not None and (problem.seq, problem.kind) == (3, "deleted"), problem
    assert "it was record 5" in problem.detail


def test_a_cut_off_end_passes_alone_and_fails_against_an_anchor(
    log: tuple[sqlite3.Connection, bytes],
) -> None:
    conn, _ = log
    anchor = (N, check(log).last_mac or "")
    conn.execute("DELETE FROM audit_log WHERE seq >= ?", (N - 1,))
    assert check(log).intact  # the shorter chain is a valid chain: why anchors exist
    problem = check(log, anchor=anchor).problem
    assert problem is not None and (problem.seq, problem.kind) == (N, "deleted")
    assert f"the log ends at record {N - 2}" in problem.detail


def test_an_anchor_that_differs_is_found(log: tuple[sqlite3.Connection, bytes]) -> None:
    problem = check(log, anchor=(3, "0" * 64)).problem
    assert problem is not None and problem.seq == 3 and "not the anchor" in problem.detail


def test_inserting_a_copy_at_the_end_is_found(log: tuple[sqlite3.Connection, bytes]) -> None:
    conn, _ = log
    others = ", ".join(c for c in COLUMNS if c != "seq")
    conn.execute(
        f"INSERT INTO audit_log (seq, {others}) SELECT 99, {others} FROM audit_log WHERE seq = 2"
    )
    problem = check(log).problem
    assert problem is not None and (problem.seq, problem.kind) == (99, "inserted"), problem
    assert "a copy of record 2" in problem.detail


@pytest.mark.parametrize("where", [1, N // 2])
def test_inserting_a_forged_record_in_the_middle_is_found(
    log: tuple[sqlite3.Connection, bytes], where: int
) -> None:
    conn, _ = log
    conn.execute("UPDATE audit_log SET seq = -seq WHERE seq >= ?", (where,))  # make room
    conn.execute("UPDATE audit_log SET seq = 1 - seq WHERE seq < 0")
    forged = dict(next(rows(conn, "seq = ?", (where + 1,))))
    forged.update(seq=where, request_id="forged", mac="ee" * 32)
    conn.execute(
        f"INSERT INTO audit_log ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        [forged[c] for c in COLUMNS],
    )
    problem = check(log).problem
    assert problem is not None and (problem.seq, problem.kind) == (where, "inserted"), problem
    assert "request forged" in problem.detail


def test_a_record_put_before_the_first_is_found(log: tuple[sqlite3.Connection, bytes]) -> None:
    conn, _ = log
    others = ", ".join(c for c in COLUMNS if c != "seq")
    conn.execute(
        f"INSERT INTO audit_log (seq, {others}) SELECT 0, {others} FROM audit_log WHERE seq = 5"
    )
    problem = check(log).problem
    assert problem is not None and problem.seq == 0 and problem.kind == "inserted", problem


@pytest.mark.parametrize(("a", "b"), [(1, 2), (3, 4), (2, N - 1), (1, N)])
def test_swapping_two_records_is_found_at_the_first(
    log: tuple[sqlite3.Connection, bytes], a: int, b: int
) -> None:
    conn, _ = log
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = ?", (a,))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (a, b))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = -1", (b,))
    problem = check(log).problem
    assert problem is not None and (problem.seq, problem.kind) == (a, "reordered"), problem
    assert f"is record {b} moved here" in problem.detail


def test_swapping_contents_but_not_numbers_is_found(log: tuple[sqlite3.Connection, bytes]) -> None:
    conn, _ = log
    first, second = (dict(r) for r in rows(conn, "seq IN (4, 6)"))
    for row, other in ((first, second), (second, first)):
        sets = ", ".join(f"{c} = ?" for c in COLUMNS if c != "seq")
        values = [other[c] for c in COLUMNS if c != "seq"]
        conn.execute(f"UPDATE audit_log SET {sets} WHERE seq = ?", (*values, row["seq"]))
    problem = check(log).problem
    assert problem is not None and problem.seq == 4 and problem.kind == "reordered", problem


def test_another_key_does_not_verify(log: tuple[sqlite3.Connection, bytes]) -> None:
    conn, _ = log
    problem = verify(conn, b"k" * 32).problem
    assert problem is not None and problem.seq == 1


def test_a_check_since_a_record_starts_there(log: tuple[sqlite3.Connection, bytes]) -> None:
    conn, _ = log
    conn.execute("UPDATE audit_log SET status = 500 WHERE seq = 2")
    assert check(log, since_seq=3).intact
    assert check(log, since_seq=3).count == N - 2
    problem = check(log, since_seq=1).problem
    assert problem is not None and problem.seq == 2


# the CLI, on the same kind of file


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", *args])
    return result.exit_code, result.output


def test_verify_cli_passes_names_the_record_and_prints_an_anchor(
    log: tuple[sqlite3.Connection, bytes],
) -> None:
    conn, _ = log
    code, out = cli("verify")
    assert code == 0, out
    last_mac = check(log).last_mac
    assert out.strip() == f"audit log intact: records 1 to {N} ({N}); anchor: {N}:{last_mac}"
    assert cli("verify", "--anchor", f"{N}:{last_mac}")[0] == 0
    conn.execute("UPDATE audit_log SET completion_tokens = 6 WHERE seq = 3")
    code, out = cli("verify")
    assert code == 3
    assert out.startswith("audit log NOT intact: record 3 (request req-3, 2025-06-15T15:06:43")
    code, out = cli("verify", "--json")
    assert code == 3 and json.loads(out)["problem"]["seq"] == 3
    assert cli("verify", "--since", "2025-06-15T15:06:44Z")[0] == 0


def test_verify_without_the_key_cannot_check_and_does_not_pass(
    log: tuple[sqlite3.Connection, bytes], home: Path
) -> None:
    (home / KEY_FILE).unlink()
    code, out = cli("verify")
    assert code == 1
    assert "cannot check the audit log: the audit key" in out and "missing" in out
    assert len(out.strip().splitlines()) == 1


def test_verify_without_a_log_says_so(home: Path) -> None:
    code, out = cli("verify")
    assert code == 1 and "no audit log" in out and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("verify", "--since", "yesterday"), "--since: 'yesterday' is not a time"),
        (("verify", "--anchor", "12"), "--anchor: '12' is not SEQ:MAC"),
        (("export", "--until", "2025-13-01"), "--until: '2025-13-01' is not a time"),
    ],
)
def test_bad_input_is_one_line(
    log: tuple[sqlite3.Connection, bytes], args: tuple[str, ...], said: str
) -> None:
    code, out = cli(*args)
    assert code == 2 and said in out and len(out.strip().splitlines()) == 1, out


def test_export_jsonl_and_csv_between_times(log: tuple[sqlite3.Connection, bytes]) -> None:
    code, out = cli("export", "--since", "2025-06-15T15:06:43Z", "--until", "2025-06-15T15:06:46Z")
    assert code == 0, out
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in records] == [3, 4, 5]
    assert list(records[0]) == list(COLUMNS)
    code, out = cli("export", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(table) == N and table[0]["request_id"] == "req-1"
    assert cli("export", "--since", "1h")[1] == ""  # nothing arrived in the last hour


def test_tail_prints_the_last_records(log: tuple[sqlite3.Connection, bytes]) -> None:
    code, out = cli("tail", "-n", "2")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{N - 1} 2025-06-15T15:06:47.000000Z 200 stop")
    assert "key=alice model=m tokens=17/5" in lines[0] and lines[1].endswith(f"id=req-{N}")
    code, out = cli("tail", "-n", "1", "--json")
    assert json.loads(out)["seq"] == N


def test_the_key_is_made_private_once(home: Path) -> None:
    path = home / KEY_FILE
    key, made = load_or_create_key(path)
    again, made_again = load_or_create_key(path)
    assert made and not made_again and key == again and len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in home.iterdir()] == [KEY_FILE]  # no temporary file left


def test_tail_follow_prints_new_records_as_they_come(
    log: tuple[sqlite3.Connection, bytes], home: Path
) -> None:
    follower = subprocess.Popen(
        [*EDGELLM, "audit", "tail", "-n", "1", "--follow"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "EDGELLM_HOME": str(home)},
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().startswith(f"{N} ")
        _, key = log
        writer = AuditWriter(lambda: open_db(home / "edgellm.db"), key, linger_s=0)
        writer.start()
        writer.submit(entry(N + 1))
        assert writer.close() == 0
        assert follower.stdout.readline().startswith(f"{N + 1} ")  # within its 0.5 s poll
    finally:
        follower.kill()
        follower.wait()
        if follower.stdout is not None:
            follower.stdout.close()
