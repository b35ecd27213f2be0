"""How records name a file and a moment: shared by manifests (`edgellm.compress.manifest`) and
evaluation records (`edgellm.evaluate.run`), which must not import each other's packages."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """How a record names a file: where it was, its size and its content hash."""
    return {
        "path": str(path.resolve()),
        "bytes": path.stat().st_size,
        "sha256": sha256 or sha256_file(path),
    }


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
