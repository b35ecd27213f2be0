"""The data directory every part of edgellm keeps its state in (the database, the audit key):
`$EDGELLM_HOME`, else `~/.local/share/edgellm`."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("~/.local/share/edgellm")


def home_dir() -> Path:
    """The data directory, created 0700 when missing (its files hold key hashes and the audit
    log: other local users have no business listing them)."""
    raw = os.environ.get("EDGELLM_HOME")
    path = Path(raw or DEFAULT_HOME).expanduser()
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is masked by the umask: make it exactly 0700
    return path
