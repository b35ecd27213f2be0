"""An encrypted registry model served by a real `edgellm serve`: the same temperature-0 text as
its plain twin, the plain GGUF nowhere on disk (the data directory, the temporary directory, the
working directory) and mapped only from a memfd; a wrong key, a flipped byte and a truncated
file each refused with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgellm.registry import Registry
from edgellm.registry.crypto import keygen
from tests.conftest import ServerProcess

EDGELLM = [sys.executable, "-m", "edgellm.cli"]
PROMPT = {"role": "user", "content": "Name three colours."}


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Path]:
    """A data directory holding the default model twice: `plain:q4` and, encrypted,
    `secret:latest`; with private temporary and working directories for the servers."""
    root = tmp_path_factory.mktemp("encrypted")
    for name in ("home", "tmp", "cwd"):
        (root / name).mkdir()
    keygen(root / "model.key")
    key = bytes.fromhex((root / "model.key").read_text().strip())
    with Registry.open(root / "home") as registry:
        registry.add_file(model_path, "plain:q4")
        registry.add_file(model_path, "secret", encrypt_key=key)
    yield root


def env_of(place: Path) -> dict[str, str]:
    return {"EDGELLM_HOME": str(place / "home"), "TMPDIR": str(place / "tmp")}


def answer(server: ServerProcess, model: str) -> tuple[str, str]:
    body = {"model": model, "messages": [PROMPT], "max_tokens": 24, "temperature": 0}
    reply = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60).json()
    return reply["choices"][0]["message"]["content"], reply["model"]


def samples(model_path: Path) -> list[bytes]:
    """The plain file's header and 4 KiB of its tensor data, as a scan looks for them."""
    data = model_path.read_bytes()
    middle = len(data) // 2
    return [data[:4096], data[middle : middle + 4096]]


def files_holding(directories: list[Path], needles: list[bytes]) -> list[str]:
    found = []
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(needle in data for needle in needles):
                    found.append(str(path))
    return found


def test_encrypted_serves_like_plain_and_never_touches_a_disk(
    place: Path, model_path: Path
) -> None:
    plain = ServerProcess("plain:q4", env=env_of(place), cwd=place / "cwd")
    try:
        want, name = answer(plain, "plain:q4")
        cards = httpx.get(plain.base + "/v1/models").json()["data"]
        tags = httpx.get(plain.base + "/api/tags").json()["models"]
    finally:
        plain.stop()
    assert name == "plain:q4"
    sha = _sha(place)
    assert [c["id"] for c in cards] == ["plain:q4"]
    meta = cards[0]["meta"]
    assert meta["digest"] == sha and meta["version"] == sha[:12]
    assert (meta["quantization_level"], meta["family"]) == ("Q4_1", "llama")
    assert meta["size"] == model_path.stat().st_size and meta["parameter_size"]
    (tag,) = tags
    assert (tag["name"], tag["digest"], tag["size"]) == ("plain:q4", sha, meta["size"])
    assert tag["details"]["quantization_level"] == "Q4_1"
    args = ("secret", "--model-key-file", str(place / "model.key"))
    secret = ServerProcess(*args, env=env_of(place), cwd=place / "cwd")
    try:
        got, name = answer(secret, "secret")
        maps = Path(f"/proc/{secret.proc.pid}/maps").read_text()
        scanned = [place / "home", place / "tmp", place / "cwd"]
        leaks = files_holding(scanned, samples(model_path))
    finally:
        secret.stop()
    assert (got, name) == (want, "secret")
    assert leaks == [str(place / "home" / "models" / "blobs" / ("sha256-" + _sha(place)))], (
        "only the plain twin's own blob may hold the plain bytes"
    )
    # llama.cpp maps the weights from the memfd, and from no file: not the plain twin's blob,
    # not the package's GGUF, no other *.gguf
    assert any("/memfd:edgellm-model" in line for line in maps.splitlines())
    files = {line.split()[-1] for line in maps.splitlines() if len(line.split()) == 6}
    assert not [f for f in files if f.endswith(".gguf") or "sha256-" in f or "blobs" in f]
    assert str(model_path) not in maps


def _sha(place: Path) -> str:
    with Registry.open(place / "home") as registry:
        return registry.resolve("plain:q4").sha256


def refusal(place: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*EDGELLM, "serve", "secret", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_of(place), **(env or {})},
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


def test_wrong_key_flipped_byte_and_truncation_are_one_line_each(
    place: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    keygen(other)
    assert "key" in refusal(place, "--model-key-file", str(other))
    assert "EDGELLM_MODEL_KEY" in refusal(place)  # no key at all
    with Registry.open(place / "home") as registry:
        blob = registry.resolve("secret").blob
    original = blob.read_bytes()
    key = ("--model-key-file", str(place / "model.key"))
    try:
        flipped = bytearray(original)
        flipped[len(flipped) // 3] ^= 0x01
        blob.write_bytes(bytes(flipped))
        assert "corrupted" in refusal(place, *key)
        blob.write_bytes(original[: len(original) - 5000])
        assert "truncated" in refusal(place, *key)
    finally:
        blob.write_bytes(original)
