"""`edgellm models import-ollama`: register the GGUF models of an Ollama models directory.

Ollama keeps `manifests/<host>/<namespace>/<model>/<tag>` (an OCI-style JSON manifest whose
layers name blobs by digest) and `blobs/sha256-<hex>`. The layer of media type
`application/vnd.ollama.image.model` is the GGUF; `...image.params` is a JSON object of
Modelfile PARAMETERs, `...image.system` the SYSTEM text, `...image.template` the Go template
(kept as a record: edgellm renders the GGUF's own Jinja template). Names follow Ollama's:
`registry.ollama.ai/library/llama3/8b` is `llama3:8b`, another namespace keeps its prefix
(`user/model:tag`), another host too (`host/ns/model:tag`). Blobs are hard-linked, never
copied; on another filesystem the file is registered where it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.registry import Registry, Version

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
    params = _params(directory, layers)
    extra: dict[str, Any] = {"ollama_manifest": str(manifest)}
    if TEMPLATE_LAYER in layers:
        extra["ollama_template"] = _blob(directory, layers[TEMPLATE_LAYER]).read_text()
    version = registry.add_file(
        blob,
        ref,
        link=True,
        in_place=True,
        source=f"ollama://{ref}",
        operation=("import-ollama", extra),
        sha256=model.removeprefix("sha256:"),  # Ollama names each blob by its content's hash
    )
    if params:
        version = registry.set_params(ref, params)
    return version


def _layers(manifest: Path) -> dict[str, str]:
    """Each layer's media type and digest."""
    try:
        data = json.loads(manifest.read_text())
        return {str(layer["mediaType"]): str(layer["digest"]) for layer in data["layers"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"unreadable manifest {manifest} ({exc})") from exc


def _blob(directory: Path, digest: str) -> Path:
    path = directory / "blobs" / digest.replace(":", "-")
    if not path.is_file():
        raise ValidationError(f"its blob {path.name} is missing")
    return path


def _params(directory: Path, layers: dict[str, str]) -> dict[str, Any]:
    """The serving defaults in the params and system layers, in `models set`'s names."""
    from edgellm.registry.params import parse_assignments

    raw: dict[str, Any] = {}
    if PARAMS_LAYER in layers:
        try:
            raw = dict(json.loads(_blob(directory, layers[PARAMS_LAYER]).read_text()))
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"its params layer is not a JSON object ({exc})") from exc
    pairs = [f"{PARAMS[k]}={json.dumps(v)}" for k, v in raw.items() if k in PARAMS]
    if SYSTEM_LAYER in layers:
        pairs.append("system=" + _blob(directory, layers[SYSTEM_LAYER]).read_text())
    return parse_assignments(pairs) if pairs else {}
