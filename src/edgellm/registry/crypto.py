"""Model weights encrypted at rest: AES-256-GCM in fixed-size chunks, decrypted only into memory.

An encrypted blob (little-endian integers):

    header    magic "EDGELLME" | format u16 (1) | reserved u16 (0) | chunk_size u32
              | plaintext_size u64 | version id (the plaintext's SHA-256, 32 bytes)
              | key id (8 bytes)                                                     64 bytes
              | nonce (12) | tag (16): GCM over no plaintext with those 64 bytes as AAD  28 bytes
    chunk i   label: index u64 | version id's first 8 bytes                          16 bytes
    (0..n-1)  nonce (12, random) | ciphertext (chunk_size; the last one shorter) | tag (16)

    AAD of chunk i = the 64 header bytes | i (u64) | 1 if i is the last chunk else 0 (u8)

So each chunk's tag binds the header (format, chunk size, plaintext size, version id, key id),
its own position and whether it is the last: a chunk moved, taken from another version or
another file, a header edited, or chunks cut off the end all fail. There are
n = max(1, ceil(plaintext_size / chunk_size)) chunks, so the file's length follows from the
header and a truncation is named before any chunk is decrypted. The labels are not trusted
(the AAD is computed from the position, not read from them): they only let a failure say what
it most likely was (reordered, substituted) rather than just "corrupted". The key id
(HMAC-SHA256 of a fixed label under the key, 8 bytes) tells a wrong key apart from a damaged
file before any decryption. Decryption writes into a sealed memfd, never to a file; the
plaintext's SHA-256 is computed on the way and must equal the version id.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgellm.errors import EdgeLLMError, ModelFileError

KEY_ENV = "EDGELLM_MODEL_KEY"
KEY_BYTES = 32
CHUNK_SIZE = 1 << 20  # 1 MiB: 44 bytes of overhead each (0.004%), and a bounded buffer
MAGIC = b"EDGELLME"
FORMAT = 1

_HEADER = struct.Struct("<8sHHIQ32s8s")  # the authenticated header fields, 64 bytes
_NONCE = 12
_TAG = 16
_HEADER_SIZE = _HEADER.size + _NONCE + _TAG
_LABEL = struct.Struct("<Q8s")  # index, version id prefix
_CHUNK_OVERHEAD = _LABEL.size + _NONCE + _TAG
_POSITION = struct.Struct("<QB")  # chunk index, last-chunk flag: appended to the AAD
_KEY_ID_LABEL = b"edgellm model key id v1"
_MIN_CHUNK, _MAX_CHUNK = 4096, 64 << 20  # what a reader accepts from a header


class ModelKeyError(EdgeLLMError):
    """The model key is missing, malformed, too open, or cannot be written."""


@dataclass(slots=True, frozen=True)
class EncryptedHeader:
    """What an encrypted blob's header says, readable without the key."""

    chunk_size: int  # bytes of plaintext per chunk (the last one may be shorter)
    plaintext_size: int  # bytes of the decrypted GGUF
    version_id: str  # the plaintext's SHA-256, hex
    key_id: str  # which key encrypted it: key_id(key), 16 hex characters
    raw: bytes = field(repr=False)  # the 64 authenticated bytes, the AAD's first part
    seal: bytes = field(repr=False, default=b"")  # the header's nonce and tag (28 bytes)

    @property
    def chunks(self) -> int:
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def file_size(self) -> int:
        """The length the encrypted file must have."""
        return _HEADER_SIZE + self.chunks * _CHUNK_OVERHEAD + self.plaintext_size


@dataclass(slots=True)
class MemoryModel:
    """A decrypted model in anonymous memory (a sealed memfd): hand `path` to llama.cpp; it
    stays readable until `close()`. Nothing of it is on a disk (but see swap, docs/security.md).
    """

    fd: int  # the memfd, close-on-exec, sealed against writes, resizes
    path: Path  # /proc/self/fd/<fd>: valid in this process only
    sha256: str  # of the decrypted bytes, hex (equal to the version id)
    size: int  # bytes
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __enter__(self) -> MemoryModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# ---- keys ---------------------------------------------------------------------------------


def keygen(out: Path) -> None:
    """Write a new 256-bit key to `out` as 64 hex characters and a newline, mode 0600 from its
    creation. Refuses to overwrite a file: a key replaced is every blob under it lost."""
    if out.exists() or out.is_symlink():
        raise ModelKeyError(f"{out} already exists: not overwriting a key (choose another path)")
    temporary = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ModelKeyError(f"cannot write the key file {out}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(KEY_BYTES).hex().encode() + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, out)  # fails when `out` appeared meanwhile: never replaces it
    except FileExistsError:
        raise ModelKeyError(f"{out} already exists: not overwriting a key") from None
    except OSError as exc:
        raise ModelKeyError(f"cannot write the key file {out}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def load_key(key_file: Path | None, env: Mapping[str, str] = os.environ) -> bytes:
    """The model key from `key_file` (which wins) or the EDGELLM_MODEL_KEY variable: 64 hex
    characters. A missing, malformed or group/other-accessible key is one line."""
    if key_file is not None:
        return _parse_key(_read_key_file(key_file), f"the key file {key_file}")
    text = env.get(KEY_ENV)
    if text is None or not text.strip():
        raise ModelKeyError(
            f"no model key: give --key-file FILE or set {KEY_ENV} "
            "(make one with `edgellm models keygen --out FILE`)"
        )
    return _parse_key(text, KEY_ENV)


def key_id(key: bytes) -> str:
    """A short public name for a key (16 hex characters): which key a blob needs, no secret."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:8].hex()


def _read_key_file(path: Path) -> str:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ModelKeyError(
                f"the key file {path} is open to others (mode {mode:04o}): run chmod 600 {path}"
            )
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ModelKeyError(f"the key file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ModelKeyError(f"the key file {path} does not hold 64 hex characters") from None
    except OSError as exc:
        raise ModelKeyError(f"cannot read the key file {path}: {exc.strerror}") from None


def _parse_key(text: str, where: str) -> bytes:
    text = text.strip()
    if len(text) != 2 * KEY_BYTES or not _is_hex(text):
        raise ModelKeyError(
            f"{where} must hold a 256-bit key as 64 hex characters "
            f"(it holds {len(text)} characters{'' if _is_hex(text) else ', not all hex'})"
        )
    return bytes.fromhex(text)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# ---- encryption ---------------------------------------------------------------------------


def is_encrypted(path: Path) -> bool:
    """Whether `path` starts with the encrypted blob's magic (False when it cannot be read:
    the GGUF checks then say why)."""
    try:
        with path.open("rb") as file:
            return file.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def encrypt_file(
    src: Path,
    dst: Path,
    key: bytes,
    version_id: str,
    *,
    progress: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> None:
    """Encrypt the plain file `src` into `dst` (temporary name beside it, fsync, rename).
    `version_id` must be `src`'s SHA-256 (hex): it is checked while encrypting, and nothing is
    left at `dst` when it differs. No plaintext is written anywhere."""
    try:
        source = src.open("rb")
    except OSError as exc:
        raise ModelFileError(f"cannot read {src}: {exc.strerror}") from None
    with source:
        size = os.fstat(source.fileno()).st_size
        chunks = _read_chunks(source, src, size, chunk_size)
        _write_encrypted(chunks, size, dst, key, version_id, chunk_size, progress, src.name)


def reencrypt_file(
    src: Path,
    dst: Path,
    old_key: bytes,
    new_key: bytes,
    version_id: str,
    *,
    progress: bool = False,
) -> None:
    """Rotate a blob's key: decrypt `src` chunk by chunk (every tag checked) and encrypt each
    chunk under `new_key` into `dst`, with fresh nonces; the plaintext never leaves memory."""
    with _open_encrypted(src) as (source, header):
        _check_header(source, header, src, old_key, version_id)
        chunks = _decrypt_chunks(source, header, src, AESGCM(old_key))
        _write_encrypted(
            chunks,
            header.plaintext_size,
            dst,
            new_key,
            version_id,
            header.chunk_size,
            progress,
            src.name,
        )


def _read_chunks(source: BinaryIO, src: Path, size: int, chunk_size: int) -> Iterator[bytes]:
    """`size` bytes of `source` in chunks; a file that shrinks or grows meanwhile is an error."""
    left = size
    while True:
        chunk = source.read(min(chunk_size, left))
        if len(chunk) < min(chunk_size, left):
            raise ModelFileError(f"{src} shrank while it was being encrypted")
        left -= len(chunk)
        yield chunk
        if left == 0:
            break
    if source.read(1):
        raise ModelFileError(f"{src} grew while it was being encrypted")


def _write_encrypted(
    chunks: Iterator[bytes],
    size: int,
    dst: Path,
    key: bytes,
    version_id: str,
    chunk_size: int,
    progress: bool,
    label: str,
) -> None:
    aead = AESGCM(_checked_key(key))
    header = _new_header(key, version_id, size, chunk_size)
    temporary = dst.with_name(f".{dst.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ModelFileError(f"cannot write {dst}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out, _progress_bar(progress, f"encrypt {label}", size) as bar:
            digest = _encrypt_chunks(chunks, header, aead, out, bar)
            if digest != version_id:
                raise ModelFileError(f"{label}'s sha256 is {digest}, not the version {version_id}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, dst)
        _fsync_directory(dst.parent)
    except OSError as exc:
        raise ModelFileError(f"cannot write {dst}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _encrypt_chunks(
    chunks: Iterator[bytes],
    header: EncryptedHeader,
    aead: AESGCM,
    out: BinaryIO,
    advance: Callable[[int], None],
) -> str:
    """Write the header and every chunk; return the plaintext's SHA-256 (hex)."""
    nonce = secrets.token_bytes(_NONCE)
    out.write(header.raw + nonce + aead.encrypt(nonce, b"", header.raw))
    label = bytes.fromhex(header.version_id)[:8]
    digest = hashlib.sha256()
    for index, chunk in enumerate(chunks):
        digest.update(chunk)
        nonce = secrets.token_bytes(_NONCE)
        aad = _chunk_aad(header, index)
        out.write(_LABEL.pack(index, label) + nonce + aead.encrypt(nonce, chunk, aad))
        advance(len(chunk))
    return digest.hexdigest()


def _new_header(key: bytes, version_id: str, size: int, chunk_size: int) -> EncryptedHeader:
    if not _MIN_CHUNK <= chunk_size <= _MAX_CHUNK:
        raise ValueError(f"chunk_size {chunk_size} is outside {_MIN_CHUNK}..{_MAX_CHUNK}")
    version = _version_bytes(version_id)
    raw = _HEADER.pack(
        MAGIC, FORMAT, 0, chunk_size, size, version, bytes.fromhex(key_id(_checked_key(key)))
    )
    return EncryptedHeader(chunk_size, size, version.hex(), key_id(key), raw)


def _chunk_aad(header: EncryptedHeader, index: int) -> bytes:
    return header.raw + _POSITION.pack(index, index == header.chunks - 1)


def _checked_key(key: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise ModelKeyError(f"a model key is {KEY_BYTES} bytes, not {len(key)}")
    return key


def _version_bytes(version_id: str) -> bytes:
    if len(version_id) != 64 or not _is_hex(version_id):
        raise ValueError(f"a version id is a SHA-256 in hex, not {version_id[:80]!r}")
    return bytes.fromhex(version_id)


# ---- decryption ---------------------------------------------------------------------------


def read_header(path: Path) -> EncryptedHeader:
    """The header of the encrypted blob `path`, read without the key (not yet authenticated)."""
    with _open_encrypted(path) as (_, header):
        return header


def decrypt_to_memory(path: Path, key: bytes, version_id: str) -> MemoryModel:
    """Decrypt the blob `path` into a new memfd, checking every chunk's tag, the total length
    and the SHA-256 against `version_id`. Any failure closes the memfd and raises
    ModelFileError with one line saying what was found: wrong key, another version's blob,
    truncated, chunks reordered or taken from another version, a corrupted chunk."""
    fd = os.memfd_create("edgellm-model", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size, digest = _decrypt_into(path, key, version_id, fd)
        # Sealed: the verified bytes cannot change (nor grow or shrink) while llama.cpp reads.
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return MemoryModel(fd, Path(f"/proc/self/fd/{fd}"), digest, size)


def verify_encrypted(path: Path, key: bytes, version_id: str) -> str:
    """Check every chunk of the blob `path` and return its plaintext's SHA-256 (hex), holding
    one chunk in memory at a time; the errors are decrypt_to_memory's."""
    with _open_encrypted(path) as (source, header):
        _check_header(source, header, path, key, version_id)
        digest = hashlib.sha256()
        for chunk in _decrypt_chunks(source, header, path, AESGCM(key)):
            digest.update(chunk)
    return _checked_digest(digest.hexdigest(), path, version_id)


def _decrypt_into(path: Path, key: bytes, version_id: str, fd: int) -> tuple[int, str]:
    with _open_encrypted(path) as (source, header):
        _check_header(source, header, path, key, version_id)
        digest = hashlib.sha256()
        for chunk in _decrypt_chunks(source, header, path, AESGCM(key)):
            digest.update(chunk)
            _write_all(fd, chunk, header.plaintext_size)
    if os.fstat(fd).st_size != header.plaintext_size:  # the chunks' lengths add up to it
        raise ModelFileError(f"{path} decrypted to {os.fstat(fd).st_size} bytes, not the header's")
    return header.plaintext_size, _checked_digest(digest.hexdigest(), path, version_id)


@contextlib.contextmanager
def _open_encrypted(path: Path) -> Iterator[tuple[BinaryIO, EncryptedHeader]]:
    try:
        source = path.open("rb")
    except FileNotFoundError:
        raise ModelFileError(f"the encrypted model {path} does not exist") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read the encrypted model {path}: {exc.strerror}") from None
    with source:
        yield source, _parse_header(source.read(_HEADER_SIZE), path)


def _parse_header(data: bytes, path: Path) -> EncryptedHeader:
    if data[: len(MAGIC)] != MAGIC:
        raise ModelFileError(f"{path} is not an encrypted edgellm model (bad magic bytes)")
    if len(data) < _HEADER_SIZE:
        raise ModelFileError(f"{path} is truncated: its header is cut off")
    raw = data[: _HEADER.size]
    _, form, _, chunk_size, size, version, kid = _HEADER.unpack(raw)
    if form != FORMAT:
        raise ModelFileError(f"{path}: unsupported encrypted format {form} (this reads {FORMAT})")
    if not _MIN_CHUNK <= chunk_size <= _MAX_CHUNK:
        raise ModelFileError(f"{path}: its header is corrupted (chunk size {chunk_size})")
    return EncryptedHeader(chunk_size, size, version.hex(), kid.hex(), raw, data[_HEADER.size :])


def _check_header(
    source: BinaryIO, header: EncryptedHeader, path: Path, key: bytes, version_id: str
) -> None:
    """Key, header tag, version and file length, before any chunk is decrypted."""
    if header.key_id != key_id(_checked_key(key)):
        raise ModelFileError(
            f"wrong key for {path}: it was encrypted with key id {header.key_id}, "
            f"this key's id is {key_id(key)}"
        )
    try:
        AESGCM(key).decrypt(header.seal[:_NONCE], header.seal[_NONCE:], header.raw)
    except InvalidTag:
        raise ModelFileError(f"{path}: its header is corrupted (authentication failed)") from None
    if header.version_id != version_id:
        raise ModelFileError(
            f"{path} holds version {header.version_id[:12]}, not {version_id[:12]}: "
            "another version's blob is in its place"
        )
    actual = os.fstat(source.fileno()).st_size
    if actual < header.file_size:
        raise ModelFileError(
            f"{path} is truncated: {actual} bytes of the {header.file_size} its header says"
        )
    if actual > header.file_size:
        raise ModelFileError(
            f"{path} has {actual - header.file_size} bytes after its last chunk (corrupted)"
        )


def _decrypt_chunks(
    source: BinaryIO, header: EncryptedHeader, path: Path, aead: AESGCM
) -> Iterator[bytes]:
    """The plaintext chunks in order, each one's tag checked (its position in the AAD)."""
    source.seek(_HEADER_SIZE)
    left = header.plaintext_size
    for index in range(header.chunks):
        length = min(header.chunk_size, left)
        record = source.read(_CHUNK_OVERHEAD + length)
        if len(record) < _CHUNK_OVERHEAD + length:
            raise ModelFileError(f"{path} is truncated: chunk {index} of {header.chunks} is cut")
        yield _open_chunk(record, index, header, path, aead)
        left -= length


def _open_chunk(
    record: bytes, index: int, header: EncryptedHeader, path: Path, aead: AESGCM
) -> bytes:
    label_index, label_version = _LABEL.unpack_from(record)
    nonce = record[_LABEL.size : _LABEL.size + _NONCE]
    sealed = record[_LABEL.size + _NONCE :]
    try:
        plain = aead.decrypt(nonce, sealed, _chunk_aad(header, index))
    except InvalidTag:
        raise ModelFileError(_chunk_failure(record, index, header, path, aead)) from None
    if label_index != index or label_version != bytes.fromhex(header.version_id)[:8]:
        raise ModelFileError(f"{path}: chunk {index} is corrupted (its label was changed)")
    return plain


def _chunk_failure(
    record: bytes, index: int, header: EncryptedHeader, path: Path, aead: AESGCM
) -> str:
    """What a chunk whose tag fails most likely is, from its (untrusted) label: the label names
    where the chunk came from, and a tag that verifies at the position it names proves it."""
    label_index, label_version = _LABEL.unpack_from(record)
    where = f"{path}: chunk {index} of {header.chunks}"
    if label_version != bytes.fromhex(header.version_id)[:8]:
        return f"{where} comes from another version ({label_version.hex()}...): substituted"
    if label_index != index and 0 <= label_index < header.chunks:
        nonce = record[_LABEL.size : _LABEL.size + _NONCE]
        with contextlib.suppress(InvalidTag):
            aead.decrypt(nonce, record[_LABEL.size + _NONCE :], _chunk_aad(header, label_index))
            return f"{where} is chunk {label_index}: the chunks were reordered"
    return f"{where} failed authentication: the file is corrupted"


def _checked_digest(digest: str, path: Path, version_id: str) -> str:
    if digest != version_id:  # every tag held, so only a wrong version id at encryption
        raise ModelFileError(f"{path} decrypts to sha256 {digest[:12]}, not {version_id[:12]}")
    return digest


def _write_all(fd: int, data: bytes, total: int) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:  # ENOMEM / ENOSPC: the memory cgroup or the machine is full
        raise ModelFileError(
            f"not enough memory for the decrypted model ({total} bytes): {exc.strerror}"
        ) from None


# ---- plumbing -----------------------------------------------------------------------------


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on stderr with bytes, rate and time left; a no-op when not `enabled`."""
    if not enabled:
        yield lambda _: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from edgellm.cli.console import err  # imported here: the CLI's console, not a dependency

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bars:
        task = bars.add_task(description, total=total)
        yield lambda n: bars.advance(task, n)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
