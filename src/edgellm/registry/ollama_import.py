"""`edgellm models import-ollama`: register the GGUF models of an Ollama models directory.

Ollama keeps `manifests/<host>/<namespace>/<model>/<tag>` (an OCI-style JSON manifest whose
layers name blobs by digest) and `blobs/sha256-<hex>`. The layer of media type
`application/vnd.ollama.image.model` is the GGUF; `...image.params` is a JSON object of
Modelfile PARAMETERs, `...image.system` the SYSTEM text, `...image.template` the Go template
(kept as a record: edgellm renders the GGUF's own Jinja template). Names follow Ollama's:
`registry.ollama.ai/library/llama3/8b` is `llama3:8b`, another namespace keeps its prefix
(`user/model:tag`), another host too (`host/ns/model:tag`). Blobs are hard-linked, never
copied; on another filesystem the file is registered where it is.

Nothing in a manifest is trusted: a digest must be `sha256:` and 64 hex digits (else it could
name any file, `../../etc/passwd`), and each blob read is hashed and must be its digest. A
manifest that fails either, or whose layers cannot be read or decoded, is skipped with the
reason; the import goes on. Parameters only fill the keys a version does not have yet, so a
second import keeps what `edgellm models set` changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.registry import Registry, Version
from edgellm.registry.blobs import hash_file
from edgellm.registry.params import check_params

DEFAULT_HOST = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"
PARAMS_LAYER = "application/vnd.ollama.image.params"
SYSTEM_LAYER = "application/vnd.ollama.image.system"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
# Ollama PARAMETER names edgellm serves with, and what `edgellm models set` calls them.
PARAMS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "stop": "stop",
    "num_ctx": "num_ctx", "num_predict": "max_tokens",
}  # fmt: skip
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LAYER_NAMES = {PARAMS_LAYER: "params", SYSTEM_LAYER: "system", TEMPLATE_LAYER: "template"}


@dataclass(slots=True)
class ImportReport:
    imported: list[tuple[str, Version]] = field(default_factory=list)  # (name:tag, version)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name:tag, why)


def default_ollama_dir() -> Path:
    """Where Ollama keeps its models: $OLLAMA_MODELS, else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def import_ollama_models(registry: Registry, directory: Path) -> ImportReport:
    manifests = directory / "manifests"
    if not manifests.is_dir():
        raise ValidationError(
            f"{directory} is not an Ollama models directory (it has no manifests/ folder)"
        )
    report = ImportReport()
    for path in sorted(p for p in manifests.rglob("*") if p.is_file()):
        ref = _ref(path.relative_to(manifests))
        if ref is None:
            continue
        try:
            report.imported.append((ref, _import_one(registry, directory, path, ref)))
        except EdgeLLMError as exc:
            report.skipped.append((ref, exc.message))
    return report


def _ref(relative: Path) -> str | None:
    """`host/namespace/model/tag` as Ollama names it."""
    parts = relative.parts
    if len(parts) < 4:
        return None
    host, *path, model, tag = parts
    if host == DEFAULT_HOST and path == ["library"]:
        return f"{model}:{tag}"
    prefix = "/".join(path if host == DEFAULT_HOST else [host, *path])
    return f"{prefix}/{model}:{tag}"


def _import_one(registry: Registry, directory: Path, manifest: Path, ref: str) -> Version:
    layers = _layers(manifest)
    model = layers.get(MODEL_LAYER)
    if model is None:
        raise ValidationError("its manifest has no GGUF model layer (an adapter or a projector?)")
    blob = _blob(directory, model)
    params = _params(directory, layers)  # the small layers first: the GGUF's hash takes long
    extra: dict[str, Any] = {"ollama_manifest": str(manifest)}
    if TEMPLATE_LAYER in layers:
        extra["ollama_template"] = _text(directory, layers, TEMPLATE_LAYER)
    digest = model.removeprefix("sha256:")
    if hash_file(blob) != digest:  # the registry records what it hashed, never a claim
        raise ValidationError("its blob's bytes do not match its digest")
    version = registry.add_file(
        blob,
        ref,
        link=True,
        in_place=True,
        source=f"ollama://{ref}",
        operation=("import-ollama", extra),
        sha256=digest,  # hashed just above
    )
    if params:  # fills the keys the version lacks: what `models set` changed since stays
        version = registry.set_params(ref, params, only_missing=True)
    return version


def _layers(manifest: Path) -> dict[str, str]:
    """Each layer's media type and digest."""
    try:
        data = json.loads(manifest.read_text())
        return {str(layer["mediaType"]): str(layer["digest"]) for layer in data["layers"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"unreadable manifest {manifest} ({exc})") from exc


def _blob(directory: Path, digest: str) -> Path:
    """The blob a digest names; the digest is checked first, as it becomes a file name."""
    if not _DIGEST.fullmatch(digest):
        shown = digest if len(digest) <= 80 else digest[:80] + "..."
        raise ValidationError(
            f"its manifest names a blob {shown!r}, which is not a sha256 digest "
            "(sha256: and 64 hex digits)"
        )
    path = directory / "blobs" / digest.replace(":", "-")
    if not path.is_file():
        raise ValidationError(f"its blob {path.name} is missing")
    return path


def _text(directory: Path, layers: dict[str, str], media_type: str) -> str:
    """A small layer's text (params, system, template), checked against its digest."""
    what = _LAYER_NAMES[media_type]
    digest = layers[media_type]
    path = _blob(directory, digest)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(
            f"cannot read its {what} layer {path.name}: {exc.strerror or exc}"
        ) from exc
    if hashlib.sha256(data).hexdigest() != digest.removeprefix("sha256:"):
        raise ValidationError(f"its {what} layer's bytes do not match its digest")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"its {what} layer is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from exc


def _params(directory: Path, layers: dict[str, str]) -> dict[str, Any]:
    """The serving defaults in the params and system layers, in `models set`'s names, checked
    as the typed values they are (edgellm.registry.params.check_params). Ollama's
    `repeat_last_n -1` (the whole context) is kept: check_params takes it, and the server
    serves -1 as the whole context too (edgellm.server.models)."""
    raw: Any = {}
    if PARAMS_LAYER in layers:
        try:
            raw = json.loads(_text(directory, layers, PARAMS_LAYER))
        except ValueError as exc:
            raise ValidationError(f"its params layer is not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ValidationError("its params layer is not a JSON object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in PARAMS:
            continue  # a parameter edgellm does not serve with (mirostat, num_gpu, ...)
        if key == "stop" and isinstance(value, str):
            value = [value]  # Ollama writes a list; one string is one stop string
        values[PARAMS[key]] = value
    if SYSTEM_LAYER in layers:
        values["system"] = _text(directory, layers, SYSTEM_LAYER)
    try:
        return check_params(values) if values else {}
    except ValidationError as exc:
        raise ValidationError(f"its parameters: {exc.message}", param=exc.param) from exc
