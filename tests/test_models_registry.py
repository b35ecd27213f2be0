"""The model registry on a real SQLite file in a temporary $EDGELLM_HOME, through the real CLI:
add / list / show / tag / rm / gc with retention, set / unset, verify, import-ollama, two
processes adding at once, and bad input (one line each, nothing half-written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from edgellm.cli.main import app
from edgellm.registry import Registry

EDGELLM = [sys.executable, "-m", "edgellm.cli"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "home"
    monkeypatch.setenv("EDGELLM_HOME", str(path))
    monkeypatch.delenv("EDGELLM_MODEL_KEY", raising=False)
    yield path


def tiny_gguf(path: Path, seed: int, *, params: int = 4096, **strings: str) -> Path:
    """A small, well-formed llama GGUF whose weights depend on `seed` (so its hash does)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-{seed}")
    writer.add_context_length(512)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in strings.items():
        writer.add_string(key.replace("__", "."), value)
    weights = np.random.default_rng(seed).standard_normal(params).astype(np.float32)
    writer.add_tensor("token_embd.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cli(*args: str) -> Any:
    """Run `edgellm ARGS` in-process; returns the result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args))


def cli_json(*args: str) -> Any:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: Any, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_add_list_show_tag_rm(home: Path, tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "a.gguf", 1)
    added = cli_json("models", "add", str(model), "--name", "tiny:v1")
    assert added["architecture"] == "llama" and added["parameters"] == 4096
    assert added["file_type"] == "ALL_F32" and added["context_length"] == 512
    blob = Path(added["blob"])
    assert blob.read_bytes() == model.read_bytes() and blob.parent == home / "models" / "blobs"
    assert blob.name == f"sha256-{added['sha256']}" and oct(blob.stat().st_mode)[-3:] == "600"
    cli_json("models", "tag", "tiny:v1", "tiny:prod")
    listed = {row["name"]: row for row in cli_json("models", "list")}
    assert set(listed) == {"tiny:v1", "tiny:prod"}
    assert listed["tiny:prod"]["sha256"] == added["sha256"]
    shown = cli_json("models", "show", "tiny:prod")
    assert shown["tag_pointers"] == {"tiny:prod": added["version"], "tiny:v1": added["version"]}
    assert [m["operation"] for m in shown["tag_history"]] == ["add", "tag"]
    cli_json("models", "rm", "tiny:v1")
    listed = [row["name"] for row in cli_json("models", "list")]
    assert listed == ["tiny:prod"]
    assert blob.exists()  # the version stays (another tag points at it anyway)
    text = cli("models", "show", "tiny:prod")
    assert text.exit_code == 0 and "lineage" in text.stdout and "tag history" in text.stdout


def test_a_tag_moves_and_keeps_its_history(home: Path, tmp_path: Path) -> None:
    first = cli_json("models", "add", str(tiny_gguf(tmp_path / "1.gguf", 1)), "--name", "m")
    second = cli_json("models", "add", str(tiny_gguf(tmp_path / "2.gguf", 2)), "--name", "m")
    assert cli_json("models", "show", "m")["sha256"] == second["sha256"]
    history = cli_json("models", "show", "m:latest")["tag_history"]
    assert [(h["previous"], h["version"]) for h in history] == [
        (None, first["version"]),
        (first["version"], second["version"]),
    ]
    untagged = [row for row in cli_json("models", "list") if row["name"] is None]
    assert [row["sha256"] for row in untagged] == [first["sha256"]]


def test_gc_keeps_tagged_and_the_newest_versions(home: Path, tmp_path: Path) -> None:
    versions = [
        cli_json("models", "add", str(tiny_gguf(tmp_path / f"{i}.gguf", i)), "--name", "m")
        for i in range(5)
    ]
    cli_json("models", "tag", "m", "m:stable")  # the newest: tagged twice
    dry = cli_json("models", "gc", "--keep", "3", "--dry-run")
    assert dry["removed"] == [f"m@{v['version']}" for v in versions[:2]]
    assert all(Path(v["blob"]).exists() for v in versions)
    report = cli_json("models", "gc", "--keep", "3")
    assert report["removed"] == dry["removed"] and report["blobs"] == 2
    assert [Path(v["blob"]).exists() for v in versions] == [False, False, True, True, True]
    left = {row["sha256"] for row in cli_json("models", "list")}
    assert left == {v["sha256"] for v in versions[2:]}
    cli_json("models", "rm", "m:stable")
    cli_json("models", "rm", "m")  # no tag left: every version is only retention now
    assert cli_json("models", "gc", "--keep", "1")["removed"] == [
        f"m@{v['version']}" for v in versions[2:4]
    ]
    assert [Path(v["blob"]).exists() for v in versions] == [False] * 4 + [True]


def test_same_bytes_under_two_names_share_one_blob(home: Path, tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "a.gguf", 7)
    a = cli_json("models", "add", str(model), "--name", "a")
    b = cli_json("models", "add", str(model), "--name", "b", "--link")
    assert a["blob"] == b["blob"]
    cli_json("models", "rm", "a")
    assert cli_json("models", "gc", "--keep", "0")["blobs"] == 0  # b still uses it
    assert Path(b["blob"]).exists()


def test_link_shares_the_inode(home: Path, tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "a.gguf", 3)
    added = cli_json("models", "add", str(model), "--name", "linked", "--link")
    assert Path(added["blob"]).stat().st_ino == model.stat().st_ino


def test_set_and_unset_serving_defaults(home: Path, tmp_path: Path) -> None:
    cli_json("models", "add", str(tiny_gguf(tmp_path / "a.gguf", 1)), "--name", "r1")
    got = cli_json("models", "set", "r1", "temperature=0.6", "top_p=0.95", "system=Be brief.")
    assert got["params"] == {"temperature": 0.6, "top_p": 0.95, "system": "Be brief."}
    got = cli_json("models", "unset", "r1", "top_p")
    assert got["params"] == {"temperature": 0.6, "system": "Be brief."}
    assert cli_json("models", "show", "r1")["params"] == got["params"]


def test_verify_catches_a_changed_blob_and_serve_refuses_it(home: Path, tmp_path: Path) -> None:
    added = cli_json("models", "add", str(tiny_gguf(tmp_path / "a.gguf", 1)), "--name", "bad")
    cli_json("models", "add", str(tiny_gguf(tmp_path / "b.gguf", 2)), "--name", "good")
    assert cli("models", "verify").exit_code == 0
    blob = Path(added["blob"])
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # one weight's byte: still a well-formed GGUF
    blob.write_bytes(bytes(data))
    result = cli("models", "verify", "--json")
    assert result.exit_code == 3
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["good"]["ok"] and not rows["bad"]["ok"]
    assert "changed on disk" in rows["bad"]["problem"]
    served = subprocess.run(
        [*EDGELLM, "serve", "bad", "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert served.returncode == 1, served.stderr
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and "changed on disk" in lines[0], served.stderr


def test_two_add_processes_at_once_both_succeed(home: Path, tmp_path: Path) -> None:
    """Both wait for the write lock another process holds (here: the test, for 1.5 s, as a
    slow `models add` would), then both commit."""
    import sqlite3
    import time

    files = [tiny_gguf(tmp_path / f"{i}.gguf", i, params=1 << 20) for i in range(2)]
    cli_json("models", "list")  # the database exists, migrated
    holder = sqlite3.connect(home / "edgellm.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [*EDGELLM, "models", "add", str(f), "--name", f"m{i}:x"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, f in enumerate(files)
    ]
    time.sleep(1.5)
    holder.execute("COMMIT")
    holder.close()
    outcomes = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outcomes
    assert time.monotonic() - started >= 1.5
    assert sorted(row["name"] for row in cli_json("models", "list")) == ["m0:x", "m1:x"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["models", "show", "nothing"], "no model 'nothing' in the registry"),
        (["models", "show", "m:missing"], "no tag 'm:missing'"),
        (["models", "tag", "m:missing", "m:x"], "no tag 'm:missing'"),
        (["models", "rm", "m:missing"], "no tag 'm:missing'"),
        (["models", "show", "bad name!"], "is not a model name"),
        (["models", "set", "m", "temperature"], "temperature"),
        (["models", "set", "m", "temperature=hot"], "temperature"),
        (["models", "set", "m", "tempr=0.5"], "tempr"),
        (["models", "unset", "m", "tempr"], "tempr"),
        (["models", "gc", "--keep", "-1"], "--keep"),
        (["serve", "nothing:here"], "no model 'nothing'"),
        (["models", "add", "a.gguf", "--name", "bad name!"], "is not a model name"),
        (["models", "add", "a.gguf", "--name", "x", "--key-file", "k"], "add --encrypt"),
        (["models", "encrypt", "nothing"], "no model 'nothing'"),
        (["models", "encrypt", "m"], "EDGELLM_MODEL_KEY"),
        (["models", "import-ollama", "no-such-dir"], "not an Ollama models directory"),
        (["models", "keygen", "--out", "a.gguf"], "already exists"),
        (["convert", "m", "--to", "f16", "-o", "o.gguf", "--register", "bad name!"], "model name"),
    ],
)
def test_bad_input_is_one_line(
    home: Path, tmp_path: Path, args: list[str], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli_json("models", "add", str(tiny_gguf(tmp_path / "a.gguf", 1)), "--name", "m")
    line = one_line_error(cli(*args))
    assert said in line


def test_adding_a_file_that_is_not_a_gguf_stores_nothing(home: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    assert "not a GGUF" in one_line_error(cli("models", "add", str(text), "--name", "x"))
    missing = one_line_error(cli("models", "add", str(tmp_path / "nope.gguf"), "--name", "x"))
    assert "not found" in missing
    with Registry.open() as reg:
        assert reg.tags() == [] and reg.versions() == []
        assert list(reg.blob_dir.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_add_leaves_nothing(
    tiny_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELLM_HOME", str(tiny_disk / "home"))
    small = tiny_gguf(tmp_path / "small.gguf", 1)
    cli_json("models", "add", str(small), "--name", "fits")
    big = tiny_gguf(tmp_path / "big.gguf", 2, params=1 << 20)  # 4 MiB: more than the disk
    line = one_line_error(cli("models", "add", str(big), "--name", "big"))
    assert "full" in line or "free" in line
    # past the free-space check (another writer filled the disk meanwhile): the write fails
    monkeypatch.setattr("edgellm.registry._check_room", lambda directory, needed: None)
    line = one_line_error(cli("models", "add", str(big), "--name", "big"))
    assert "full" in line
    with Registry.open() as reg:
        assert [ref for ref, _ in reg.tags()] == ["fits:latest"]
        names = sorted(p.name for p in reg.blob_dir.iterdir())
    assert names == [f"sha256-{cli_json('models', 'show', 'fits')['sha256']}"]  # no temp file
    assert os.listdir(tiny_disk / "home" / "models" / "partial") == []


def test_lineage_through_convert_quantize_and_eval_gate(
    home: Path, tmp_path: Path, model_path: Path
) -> None:
    """The real default model: add it, convert it to F16 and quantize that to Q8_0, both
    straight into the registry, then gate the Q8_0 against the F16 by their registry names."""
    base = cli_json("models", "add", str(model_path), "--name", "smollm2", "--link")
    f16, q8 = tmp_path / "s.f16.gguf", tmp_path / "s.Q8_0.gguf"
    made = cli("convert", "smollm2", "--to", "f16", "-o", str(f16), "--register", "smollm2:f16")
    assert made.exit_code == 0, made.stderr
    made = cli("quantize", "smollm2:f16", "-t", "Q8_0", "-o", str(q8), "--register",
               "smollm2:q8", "--threads", "2")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    text = Path(__file__).parent / "data" / "eval-text.txt"
    gated = cli("eval", "smollm2:q8", "--ref", "smollm2:f16", "--data", str(text),
                "--ctx", "128", "--chunks", "2", "--gate", "kl_mean<0.5")  # fmt: skip
    assert gated.exit_code == 0, gated.stderr
    assert "recorded on smollm2@" in gated.stderr
    shown = cli_json("models", "show", "smollm2:q8")
    assert shown["operation"] == "quantize" and shown["operation_params"]["type"] == "Q8_0"
    assert shown["file_type"] == "Q8_0"
    chain = [
        (link.get("model"), link.get("operation"), link["sha256"]) for link in shown["lineage"]
    ]
    f16_sha = cli_json("models", "show", "smollm2:f16")["sha256"]
    assert chain == [
        ("smollm2", "quantize", shown["sha256"]),
        ("smollm2", "convert", f16_sha),
        ("smollm2", "external", base["sha256"]),
    ]
    assert len(shown["evals"]) == 1 and shown["evals"][0]["metrics"]["kl_mean"] < 0.5
    assert shown["gates"][0]["passed"] is True and shown["gates"][0]["eval"] == 0
    assert cli_json("models", "show", "smollm2:f16")["evals"] == []  # the reference is not it


def test_encrypted_add_and_encrypt_keep_no_plain_blob_and_one_key(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgellm.registry.crypto import keygen

    keygen(tmp_path / "k1")
    keygen(tmp_path / "k2")
    model = tiny_gguf(tmp_path / "a.gguf", 1)
    plain = cli_json("models", "add", str(model), "--name", "p")
    secret = cli_json("models", "add", str(model), "--name", "s", "--encrypt",
                      "--key-file", str(tmp_path / "k1"))  # fmt: skip
    assert secret["encrypted"] and Path(secret["blob"]).name.endswith(".enc")
    assert Path(plain["blob"]).exists()  # `p` still serves from it
    line = one_line_error(cli("models", "add", str(model), "--name", "t", "--encrypt",
                              "--key-file", str(tmp_path / "k2")))  # fmt: skip
    assert "another model key" in line
    encrypted = cli_json("models", "encrypt", "p", "--key-file", str(tmp_path / "k1"))
    assert encrypted["blob"] == secret["blob"] and not Path(plain["blob"]).exists()
    unkeyed = cli("models", "verify")
    assert unkeyed.exit_code == 3 and "give its key" in unkeyed.stderr
    monkeypatch.setenv("EDGELLM_MODEL_KEY", (tmp_path / "k1").read_text().strip())
    assert cli("models", "verify").exit_code == 0


def test_rekey_rotates_every_encrypted_blob(home: Path, tmp_path: Path) -> None:
    from edgellm.registry.crypto import keygen

    old, new = tmp_path / "old", tmp_path / "new"
    keygen(old)
    keygen(new)
    for i in range(2):
        model = tiny_gguf(tmp_path / f"{i}.gguf", i)
        cli_json(
            "models", "add", str(model), "--name", f"m{i}", "--encrypt", "--key-file", str(old)
        )
    assert (
        len(
            cli_json("models", "rekey", "--key-file", str(old), "--new-key-file", str(new))[
                "rekeyed"
            ]
        )
        == 2
    )
    assert cli("models", "verify", "--key-file", str(new)).exit_code == 0
    stale = cli("models", "verify", "--key-file", str(old))
    assert stale.exit_code == 3 and "wrong key" in stale.stderr
    again = cli_json("models", "rekey", "--key-file", str(old), "--new-key-file", str(new))
    assert again["rekeyed"] == []  # already rotated: a rerun after a cut is harmless


def test_adding_the_bytes_again_repairs_a_changed_blob(home: Path, tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "a.gguf", 1)
    added = cli_json("models", "add", str(model), "--name", "m")
    blob = Path(added["blob"])
    blob.write_bytes(blob.read_bytes()[:-8] + b"12345678")
    assert cli("models", "verify").exit_code == 3
    cli_json("models", "add", str(model), "--name", "m")
    assert blob.read_bytes() == model.read_bytes()
    assert cli("models", "verify").exit_code == 0
    blob.unlink()  # gone altogether: the next add stores it again too
    cli_json("models", "add", str(model), "--name", "other")
    assert cli("models", "verify").exit_code == 0


def test_gc_removes_stray_files_no_version_names(home: Path, tmp_path: Path) -> None:
    cli_json("models", "add", str(tiny_gguf(tmp_path / "a.gguf", 1)), "--name", "m")
    with Registry.open() as reg:
        stray = reg.blob_dir / ("sha256-" + "0" * 64)  # a crash between rename and commit
        stray.write_bytes(b"x" * 100)
        temp = reg.blob_dir / ".sha256-x.tmp"
        temp.write_bytes(b"y" * 10)
        assert reg.gc(stray_age_s=3600).blobs == 0  # young: it may be an add in progress
        report = reg.gc(stray_age_s=0)
        assert (report.blobs, report.bytes, report.versions) == (2, 110, [])
        assert not stray.exists() and not temp.exists()
        assert [v.blob.exists() for v in reg.versions()] == [True]


def test_a_plain_add_of_encrypted_bytes_leaves_no_plain_copy(home: Path, tmp_path: Path) -> None:
    from edgellm.registry.crypto import keygen

    keygen(tmp_path / "k")
    model = tiny_gguf(tmp_path / "a.gguf", 1)
    cli_json(
        "models", "add", str(model), "--name", "s", "--encrypt", "--key-file", str(tmp_path / "k")
    )
    again = cli_json("models", "add", str(model), "--name", "s")  # the version stays encrypted
    assert again["encrypted"]
    with Registry.open() as reg:
        assert [p.name for p in reg.blob_dir.iterdir()] == [Path(again["blob"]).name]


def test_an_encrypted_model_is_not_converted_to_plain(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgellm.registry.crypto import keygen

    keygen(tmp_path / "k")
    monkeypatch.setenv("EDGELLM_MODEL_KEY", (tmp_path / "k").read_text().strip())
    model = tiny_gguf(tmp_path / "a.gguf", 1)
    cli_json(
        "models", "add", str(model), "--name", "s", "--encrypt", "--key-file", str(tmp_path / "k")
    )
    line = one_line_error(cli("convert", "s", "--to", "f16", "-o", str(tmp_path / "o.gguf")))
    assert "stored encrypted" in line and not (tmp_path / "o.gguf").exists()
