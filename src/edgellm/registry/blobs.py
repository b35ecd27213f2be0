"""Blobs: the registry's model files, each named by the SHA-256 of its plain content.

`blobs/sha256-<hex>` holds a plain GGUF, `blobs/sha256-<hex>.enc` the same bytes encrypted
(edgellm.registry.crypto). A blob is written under a temporary name in the blob directory,
fsynced and renamed, so a crash, a full disk or Ctrl-C never leaves a blob with the final name
and part of the bytes; two processes adding the same file race only to rename equal bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from edgellm.errors import EdgeLLMError

CHUNK = 1 << 20  # bytes read or written at a time
Advance = Callable[[int], None]  # told how many more bytes were done, for a progress bar


class BlobError(EdgeLLMError):
    """A blob cannot be written or read: disk full, permissions, another filesystem."""


def blob_name(sha256: str, encrypted: bool) -> str:
    return f"sha256-{sha256}" + (".enc" if encrypted else "")


def hash_file(path: Path, advance: Advance | None = None) -> str:
    """The SHA-256 of `path`'s bytes, as hex."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
                if advance is not None:
                    advance(len(block))
    except OSError as exc:
        raise BlobError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


@contextlib.contextmanager
def staged(final: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A temporary file beside `final`, open for writing; on a clean exit it is fsynced and
    renamed to `final`, on any error removed. Disk full becomes one BlobError line."""
    try:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    except OSError as exc:
        raise BlobError(_write_failure(final, exc)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BlobError(_write_failure(final, exc)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_into(src: Path, final: Path, advance: Advance | None = None) -> None:
    """Copy `src` to the blob `final` (staged: all or nothing)."""
    with staged(final) as (out, _tmp):
        try:
            source = src.open("rb")
        except OSError as exc:
            raise BlobError(f"cannot read {src}: {exc.strerror or exc}") from exc
        with source:
            while block := _read(source, src):
                out.write(block)
                if advance is not None:
                    advance(len(block))


def _read(source: BinaryIO, src: Path) -> bytes:
    """The next block of `src`; a read error is said as one, not as a failed write."""
    try:
        return source.read(CHUNK)
    except OSError as exc:
        raise BlobError(f"cannot read {src}: {exc.strerror or exc}") from exc


def link_into(src: Path, final: Path) -> bool:
    """Hard-link `src` as the blob `final`; False when the filesystem does not allow it
    (another device, no hard links), so the caller copies instead."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.link")
    remove(tmp)  # a stale one from a run that was killed
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return False
        raise BlobError(f"cannot link {src} into the registry: {exc.strerror or exc}") from exc
    try:
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        remove(tmp)
        raise BlobError(_write_failure(final, exc)) from exc
    return True


def move_into(src: Path, final: Path) -> bool:
    """Rename `src` (a file the registry itself downloaded) to the blob `final`; False when it
    lies on another filesystem."""
    try:
        os.chmod(src, 0o600)
        os.replace(src, final)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise BlobError(f"cannot move {src} into the registry: {exc.strerror or exc}") from exc
    _fsync_dir(final.parent)
    return True


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    _fsync_dir(directory)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _write_failure(final: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"the disk holding {final.parent} is full: nothing was added (free some space)"
    return f"cannot write {final.parent}: {exc.strerror or exc}"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
