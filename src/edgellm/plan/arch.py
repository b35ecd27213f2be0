"""The numbers of a model that memory and speed depend on: from a GGUF, or a known size."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgellm.errors import ValidationError

# Average bits per weight of whole 7B-class models in each llama.cpp type: the block sizes
# (Q8_0 34 B / 32 weights = 8.5; Q6_K 210 B / 256 = 6.5625; Q4_K 144 / 256 = 4.5; Q2_K 84 / 256
# = 2.625; IQ4_XS 136 / 256 = 4.25; ...) raised by the mixes' higher-precision tensors
# (output, attn_v, half of ffn_down). Used only when there is no GGUF to measure.
NOMINAL_BPW = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0,
    "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.5,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.0,
    "IQ4_XS": 4.25, "IQ4_NL": 4.5, "IQ3_M": 3.66, "IQ3_S": 3.44, "IQ3_XXS": 3.06,
    "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56,
}  # fmt: skip
# KV cache element sizes by llama.cpp cache type (bytes per element, block overhead included).
CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True, slots=True)
class Architecture:
    name: str  # model id or known-size name
    layers: int  # transformer blocks
    embd: int  # hidden size
    heads: int  # attention (query) heads
    kv_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # dimension per head
    vocab: int  # tokens
    params: int  # all parameters
    tied: bool  # output projection shares the token embedding
    context: int  # trained context length

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.embd

    @property
    def matmul_params(self) -> int:
        """Weights multiplied per token: all but the embedding table, unless it is tied (then
        it is the output projection too)."""
        return self.params if self.tied else self.params - self.embedding_params

    def kv_bytes_per_token(self, cache_type: str = "f16") -> float:
        """K and V of every layer for one token: layers x 2 x kv_heads x head_dim x bytes."""
        return self.layers * 2 * self.kv_heads * self.head_dim * CACHE_BYTES[cache_type]


def known_sizes() -> dict[str, Architecture]:
    text = resources.files("edgellm.plan").joinpath("models.toml").read_text()
    return {
        name: Architecture(
            name=name,
            layers=m["layers"],
            embd=m["embd"],
            heads=m["heads"],
            kv_heads=m["kv_heads"],
            head_dim=m["head_dim"],
            vocab=m["vocab"],
            params=m["params"],
            tied=m["tied"],
            context=m["context"],
        )
        for name, m in tomllib.loads(text)["models"].items()
    }


def known_size(name: str) -> Architecture:
    sizes = known_sizes()
    key = name.strip().lower()
    if key in sizes:
        return sizes[key]
    close = difflib.get_close_matches(key, list(sizes), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValidationError(
        f"unknown model {name!r}: not a file, and not a known size{hint} "
        f"(known: {', '.join(sizes)})",
        param="model",
    )


def from_gguf(path: Path) -> tuple[Architecture, int, str]:
    """The architecture in a GGUF's metadata, its tensor bytes, and its type name."""
    import gguf

    from edgellm.modelfile import inspect_gguf

    info = inspect_gguf(path)
    meta, arch = info.metadata, info.architecture
    reader = gguf.GGUFReader(path, "r")
    names = {t.name for t in reader.tensors}

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if not isinstance(value, int):
            raise ValidationError(f"{path.name} has no {arch}.{key}; cannot plan it", param="model")
        return value

    heads = number("attention.head_count")
    embd = number("embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    architecture = Architecture(
        name=info.model_id,
        layers=number("block_count"),
        embd=embd,
        heads=heads,
        kv_heads=number("attention.head_count_kv", heads),
        head_dim=number("attention.key_length", embd // heads),
        vocab=len(tokens.data) if tokens is not None else 0,
        params=sum(int(t.n_elements) for t in reader.tensors),
        tied="output.weight" not in names,
        context=number("context_length", 4096),
    )
    ftype = meta.get("general.file_type")
    kind = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else "?"
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    return architecture, tensor_bytes, kind.replace("ALL_F32", "F32")
