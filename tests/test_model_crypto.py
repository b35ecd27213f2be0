"""Encrypted model blobs (edgellm.registry.crypto) on the real default model: the roundtrip into
a memfd that the GGUF checks accept, and one clear error for each way a blob can be wrong
(wrong key, a flipped byte, truncated, chunks reordered, a chunk or a whole blob from another
version); keys: keygen's 0600 file that is never overwritten, and load_key's errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from edgellm.errors import ModelFileError
from edgellm.modelfile import default_model_path, inspect_gguf
from edgellm.registry import crypto
from edgellm.registry.crypto import ModelKeyError

# The format, as the module docstring draws it: these offsets are the file format.
HEADER = 64 + 12 + 16
LABEL = 16  # index u64 + version prefix
RECORD = LABEL + 12 + crypto.CHUNK_SIZE + 16  # a full chunk's record


class Plain:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()


@pytest.fixture(scope="module")
def plain() -> Plain:
    return Plain(default_model_path())


@pytest.fixture(scope="module")
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture(scope="module")
def blob(plain: Plain, key: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crypto") / f"sha256-{plain.sha256}.enc"
    crypto.encrypt_file(plain.path, out, key, plain.sha256)
    return out


def tampered(blob: Path, tmp_path: Path, edit: Callable[[bytearray], bytes | None]) -> Path:
    data = bytearray(blob.read_bytes())
    result = edit(data)
    out = tmp_path / "tampered.enc"
    out.write_bytes(data if result is None else result)
    return out


def open_fds() -> list[str]:
    targets = []
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, now closed
            targets.append(os.readlink(f"/proc/self/fd/{n}"))
    return targets


def decrypt_error(path: Path, key: bytes, version_id: str) -> str:
    """The one-line message of a failing decrypt, which must leave no memfd open."""
    with pytest.raises(ModelFileError) as caught:
        crypto.decrypt_to_memory(path, key, version_id).close()
    assert not any("memfd:edgellm-model" in fd for fd in open_fds())
    assert "\n" not in caught.value.message
    return caught.value.message


# ---- roundtrip ----------------------------------------------------------------------------


def test_roundtrip_into_a_sealed_memfd_that_the_gguf_checks_accept(
    plain: Plain, key: bytes, blob: Path
) -> None:
    with crypto.decrypt_to_memory(blob, key, plain.sha256) as model:
        assert (model.sha256, model.size) == (plain.sha256, len(plain.data))
        assert model.path == Path(f"/proc/self/fd/{model.fd}")
        assert os.readlink(model.path).startswith("/memfd:edgellm-model")
        assert not os.get_inheritable(model.fd)  # MFD_CLOEXEC: no child process inherits it
        assert (
            os.pread(model.fd, 4096, len(plain.data) // 2)
            == plain.data[len(plain.data) // 2 : len(plain.data) // 2 + 4096]
        )
        info = inspect_gguf(model.path)  # the checks llama.cpp's input gets, on the memfd
        assert (info.architecture, info.n_tensors, info.size_bytes) == ("llama", 272, model.size)
        with pytest.raises(PermissionError):  # sealed: verified bytes cannot change
            os.pwrite(model.fd, b"x", 0)
        fd = model.fd
    assert model.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    model.close()  # a second close is harmless


def test_the_blob_holds_no_plaintext(plain: Plain, blob: Path) -> None:
    data = blob.read_bytes()
    header = crypto.read_header(blob)
    assert crypto.is_encrypted(blob) and not crypto.is_encrypted(plain.path)
    assert not crypto.is_encrypted(blob.parent / "missing")
    assert b"GGUF" not in data[:4096] and b"tokenizer.ggml" not in data
    middle = len(plain.data) // 2
    assert plain.data[middle : middle + 4096] not in data
    assert len(data) == header.file_size
    assert header.chunks == -(-len(plain.data) // crypto.CHUNK_SIZE)
    assert (header.version_id, header.plaintext_size) == (plain.sha256, len(plain.data))
    assert [p.name for p in blob.parent.iterdir()] == [blob.name]  # no temporary left


def test_verify_and_reencrypt_under_a_new_key(
    plain: Plain, key: bytes, blob: Path, tmp_path: Path
) -> None:
    assert crypto.verify_encrypted(blob, key, plain.sha256) == plain.sha256
    new_key = secrets.token_bytes(32)
    rotated = tmp_path / "rotated.enc"
    crypto.reencrypt_file(blob, rotated, key, new_key, plain.sha256, progress=True)
    assert crypto.read_header(rotated).key_id == crypto.key_id(new_key) != crypto.key_id(key)
    assert crypto.verify_encrypted(rotated, new_key, plain.sha256) == plain.sha256
    assert "wrong key" in decrypt_error(rotated, key, plain.sha256)


# ---- what a wrong blob says ---------------------------------------------------------------


def test_wrong_key(plain: Plain, blob: Path) -> None:
    message = decrypt_error(blob, secrets.token_bytes(32), plain.sha256)
    assert message.startswith(f"wrong key for {blob}: it was encrypted with key id ")


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (16, "its header is corrupted"),  # the plaintext size field
        (HEADER + 3 * RECORD + 5, "chunk 3 is corrupted (its label was changed)"),
        (HEADER + 3 * RECORD + LABEL + 2, "chunk 3 of 94 failed authentication"),  # nonce
        (HEADER + 40 * RECORD + 1000, "chunk 40 of 94 failed authentication"),  # ciphertext
        (-1, "chunk 93 of 94 failed authentication"),  # the last tag's last byte
    ],
)
def test_one_flipped_byte(
    plain: Plain, key: bytes, blob: Path, tmp_path: Path, offset: int, expected: str
) -> None:
    def flip(data: bytearray) -> None:
        data[offset] ^= 0x01

    assert expected in decrypt_error(tampered(blob, tmp_path, flip), key, plain.sha256)


@pytest.mark.parametrize("cut", [1000, RECORD, RECORD * 10 + 7])
def test_truncated(plain: Plain, key: bytes, blob: Path, tmp_path: Path, cut: int) -> None:
    path = tampered(blob, tmp_path, lambda data: bytes(data[:-cut]))
    size = blob.stat().st_size
    assert decrypt_error(path, key, plain.sha256) == (
        f"{path} is truncated: {size - cut} bytes of the {size} its header says"
    )
    header_only = tampered(blob, tmp_path, lambda data: bytes(data[:50]))
    assert "its header is cut off" in decrypt_error(header_only, key, plain.sha256)


def test_trailing_bytes(plain: Plain, key: bytes, blob: Path, tmp_path: Path) -> None:
    path = tampered(blob, tmp_path, lambda data: bytes(data) + b"\0" * 9)
    assert "has 9 bytes after its last chunk" in decrypt_error(path, key, plain.sha256)


def test_two_chunks_swapped(plain: Plain, key: bytes, blob: Path, tmp_path: Path) -> None:
    def swap(data: bytearray) -> None:
        one, two = HEADER + RECORD, HEADER + 2 * RECORD
        data[one:two], data[two : two + RECORD] = data[two : two + RECORD], data[one:two]

    message = decrypt_error(tampered(blob, tmp_path, swap), key, plain.sha256)
    assert message.endswith("chunk 1 of 94 is chunk 2: the chunks were reordered")


def test_a_chunk_or_a_blob_from_another_version(
    plain: Plain, key: bytes, blob: Path, tmp_path: Path
) -> None:
    other = bytearray(plain.data)
    other[len(other) // 2] ^= 0xFF  # another version: same length, one weight byte changed
    other_plain = tmp_path / "other.gguf"
    other_plain.write_bytes(other)
    other_sha = hashlib.sha256(other).hexdigest()
    other_blob = tmp_path / "other.enc"
    crypto.encrypt_file(other_plain, other_blob, key, other_sha)
    record = other_blob.read_bytes()[HEADER + 5 * RECORD : HEADER + 6 * RECORD]

    def substitute(data: bytearray) -> None:
        data[HEADER + 5 * RECORD : HEADER + 6 * RECORD] = record

    message = decrypt_error(tampered(blob, tmp_path, substitute), key, plain.sha256)
    assert message.endswith(
        f"chunk 5 of 94 comes from another version ({other_sha[:16]}...): substituted"
    )
    whole = decrypt_error(other_blob, key, plain.sha256)
    assert whole == (
        f"{other_blob} holds version {other_sha[:12]}, not {plain.sha256[:12]}: "
        "another version's blob is in its place"
    )


def test_not_an_encrypted_blob(plain: Plain, key: bytes, tmp_path: Path) -> None:
    assert "is not an encrypted edgellm model" in decrypt_error(plain.path, key, plain.sha256)
    missing = tmp_path / "missing.enc"
    assert decrypt_error(missing, key, plain.sha256) == (
        f"the encrypted model {missing} does not exist"
    )


def test_encrypt_checks_the_version_id_and_leaves_nothing(
    plain: Plain, key: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "out.enc"
    with pytest.raises(ModelFileError, match=f"sha256 is {plain.sha256}, not the version 0+$"):
        crypto.encrypt_file(plain.path, out, key, "0" * 64)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ModelFileError, match="cannot read"):
        crypto.encrypt_file(tmp_path / "missing.gguf", out, key, plain.sha256)
    with pytest.raises(ModelKeyError, match="a model key is 32 bytes, not 16"):
        crypto.encrypt_file(plain.path, out, key[:16], plain.sha256)
    assert list(tmp_path.iterdir()) == []


# ---- keys ---------------------------------------------------------------------------------


def test_keygen_writes_a_0600_key_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "model.key"
    crypto.keygen(out)
    text = out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(text) == 65 and text.endswith("\n") and bytes.fromhex(text.strip())
    assert crypto.load_key(out, env={}) == bytes.fromhex(text)
    with pytest.raises(ModelKeyError, match="already exists: not overwriting a key"):
        crypto.keygen(out)
    assert out.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["model.key"]
    with pytest.raises(ModelKeyError, match="cannot write the key file"):
        crypto.keygen(tmp_path / "no-such-dir" / "model.key")


def test_load_key_sources_and_errors(tmp_path: Path) -> None:
    file_key, env_key = secrets.token_bytes(32), secrets.token_bytes(32)
    path = tmp_path / "k"
    path.write_text(file_key.hex().upper() + "\n")
    path.chmod(0o600)
    env = {crypto.KEY_ENV: env_key.hex()}
    assert crypto.load_key(path, env=env) == file_key  # --key-file beats the variable
    assert crypto.load_key(None, env=env) == env_key

    def error(key_file: Path | None, env: dict[str, str]) -> str:
        with pytest.raises(ModelKeyError) as caught:
            crypto.load_key(key_file, env=env)
        return caught.value.message

    assert error(None, {}).startswith(f"no model key: give --key-file FILE or set {crypto.KEY_ENV}")
    assert error(None, {crypto.KEY_ENV: "abc"}) == (
        f"{crypto.KEY_ENV} must hold a 256-bit key as 64 hex characters (it holds 3 characters)"
    )
    assert "not all hex" in error(None, {crypto.KEY_ENV: "g" * 64})
    assert error(tmp_path / "nope", {}) == f"the key file {tmp_path / 'nope'} does not exist"
    for mode in (0o644, 0o640, 0o604):
        path.chmod(mode)
        assert error(path, env) == (
            f"the key file {path} is open to others (mode {mode:04o}): run chmod 600 {path}"
        )
    path.chmod(0o600)
    path.write_bytes(b"\xff" * 64)
    assert "does not hold 64 hex characters" in error(path, env)
    path.write_text(file_key.hex()[:-1])
    assert "(it holds 63 characters)" in error(path, env)
