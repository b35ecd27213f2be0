"""The manifest beside a model file: where it came from, how it was made, how it measured.

`<model>.manifest.json` holds the artifact's SHA-256, its parent's SHA-256, the method and its
parameters, every evaluation and every gate verdict, newest last. It is the record the model
registry keeps for a version; its promote step reads the last gate verdict. Written atomically
(temporary file + rename), so a crash never leaves half a manifest.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgellm import __version__
from edgellm.errors import ValidationError
from edgellm.records import file_record, now, sha256_file

FORMAT = 1


def manifest_path(model: Path) -> Path:
    return model.with_name(model.name + ".manifest.json")


def new_manifest(
    model: Path, *, method: str, parent: dict[str, Any] | None, params: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "artifact": file_record(model),
        "method": method,  # quantize, convert, or external (a file edgellm did not make)
        "parent": parent,
        "params": params,
        "created": now(),
        "edgellm_version": __version__,
        "evals": [],
        "gates": [],
    }


def load_manifest(model: Path, sha256: str) -> dict[str, Any]:
    """The manifest of `model` whose content hash is `sha256`; a fresh `external` one when
    there is none. A manifest that describes other content is an error (the file changed)."""
    path = manifest_path(model)
    if not path.exists():
        return new_manifest(model, method="external", parent=None, params={}) | {
            "artifact": file_record(model, sha256)
        }
    try:
        data = json.loads(path.read_text())
        recorded = data["artifact"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"{path} is not a readable edgellm manifest ({exc})") from exc
    if recorded != sha256:
        raise ValidationError(
            f"{path} describes another file (sha256 {recorded[:12]}..., the model is "
            f"{sha256[:12]}...): the model changed after its manifest was written"
        )
    return dict(data)


def save_manifest(model: Path, manifest: dict[str, Any]) -> Path:
    path = manifest_path(model)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a manifest is as public as its model
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def record_eval(model: Path, evaluation: dict[str, Any], verdict: dict[str, Any] | None) -> Path:
    """Append an evaluation (and the gate verdict on it) to the model's manifest."""
    manifest = load_manifest(model, sha256_file(model))
    manifest.setdefault("evals", []).append(evaluation)
    if verdict is not None:
        index = len(manifest["evals"]) - 1
        manifest.setdefault("gates", []).append(verdict | {"eval": index, "at": now()})
    return save_manifest(model, manifest)
