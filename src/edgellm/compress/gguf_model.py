"""A llama-architecture GGUF as numpy: its hyperparameters and its tensors in float32.

This is the numpy half of the torch bridge (`edgellm.compress.torch_bridge`): no torch here, so
the checks (is it a GGUF, is it a llama, does the bridge know every tensor) run without it.

Layout facts the bridge relies on:
- A GGUF tensor's shape is ggml's (ne0 = the row length first); numpy's is reversed, so a
  weight `blk.N.attn_q.weight` reads as [out, in], exactly what `torch.nn.Linear` holds.
- llama.cpp's HF converter permutes attn_q / attn_k rows so that llama.cpp's "normal" rope,
  which rotates adjacent pairs (x[2i], x[2i+1]), equals HF's rotate-half rope. Reading the GGUF
  as it is and rotating adjacent pairs gives llama.cpp's numbers: nothing is un-permuted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.errors import ValidationError
from edgellm.modelfile import inspect_gguf

ARCH = "llama"
SUPPORTED = "SmolLM2, DeepSeek-R1-Distill-Llama"
# Per block: the tensors a llama block has (weights) and may have (biases); names as in GGUF.
BLOCK_WEIGHTS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)
BLOCK_BIASES = ("attn_q", "attn_k", "attn_v", "attn_output")
GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")
TORCH_MISSING = (
    "edgellm prune/distill/export needs PyTorch: pip install 'edgellm[train]' (torch==2.13.0)"
)
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(slots=True)
class LlamaConfig:
    """A llama GGUF's hyperparameters, from its metadata (`llama.*` keys)."""

    n_layer: int  # blocks (llama.block_count)
    n_embd: int  # residual width D
    n_head: int  # query heads
    n_head_kv: int  # key/value heads (grouped-query attention when < n_head)
    n_ff: int  # feed-forward hidden width
    n_vocab: int  # tokens; rows of token_embd
    rope_theta: float  # rope frequency base
    rms_eps: float  # RMSNorm epsilon
    n_ctx_train: int  # trained context length
    tied_embeddings: bool  # no output.weight: the head is token_embd's transpose
    rope_scaling: float = 1.0  # linear rope scaling factor: positions are divided by it
    head_dim: int = 0  # per-head width (llama.attention.key_length; n_embd / n_head)
    rope_dim: int = 0  # leading dims of a head that rope rotates (llama.rope.dimension_count)
    attn_scale: float = 0.0  # softmax scale of q.k (llama.attention.scale; 1/sqrt(head_dim))
    has_rope_freqs: bool = False  # a rope_freqs.weight tensor divides the frequencies (llama 3)


def check_llama(path: Path) -> Any:
    """The `gguf` reader of `path` once it is known to be a complete llama GGUF; one line
    (ModelFileError / ValidationError) otherwise."""
    info = inspect_gguf(path)  # not a GGUF, truncated: ModelFileError
    if info.architecture != ARCH:
        raise ValidationError(
            f"{path.name} is a {info.architecture} model; edgellm's torch bridge reads "
            f"llama-architecture GGUFs ({SUPPORTED})",
            param="model",
        )
    return gguf.GGUFReader(path, "r")


def read_config(reader: Any, path: Path) -> LlamaConfig:
    """The hyperparameters; ValidationError for llama variants the bridge does not compute."""

    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(f"{ARCH}.{key}")
        if field is None:
            if default is None:
                raise ValidationError(f"{path.name} has no {ARCH}.{key} in its metadata")
            return default
        return field.contents()

    if get("expert_count", 0):
        raise ValidationError(
            f"{path.name} is a mixture-of-experts llama; the bridge is dense only"
        )
    scaling = str(get("rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        raise ValidationError(f"{path.name} uses {scaling} rope scaling; the bridge does linear")
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    per_layer = [get("attention.head_count_kv", n_head), get("feed_forward_length")]
    if any(isinstance(v, list) and len(set(v)) > 1 for v in per_layer):
        raise ValidationError(f"{path.name} varies head or FFN width by layer; the bridge does not")
    n_head_kv, n_ff = (int(v[0]) if isinstance(v, list) else int(v) for v in per_layer)
    return LlamaConfig(
        n_layer=int(get("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=int(embd.shape[1]),  # ggml order: [n_embd, n_vocab]
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        n_ctx_train=int(get("context_length", 2048)),
        tied_embeddings="output.weight" not in names,
        rope_scaling=float(get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        head_dim=head_dim,
        rope_dim=int(get("rope.dimension_count", head_dim)),
        attn_scale=float(get("attention.scale", 0.0)) or head_dim**-0.5,
        has_rope_freqs="rope_freqs.weight" in names,
    )


def check_tensor_names(reader: Any, config: LlamaConfig, path: Path) -> None:
    """Every tensor is one the bridge computes with, and every block has its weights."""
    seen: set[tuple[int, str]] = set()
    for tensor in reader.tensors:
        name = tensor.name
        match = _BLOCK_NAME.fullmatch(name)
        if name in GLOBAL_TENSORS:
            continue
        known = match is not None and (
            (match[3] == "weight" and match[2] in BLOCK_WEIGHTS)
            or (match[3] == "bias" and match[2] in BLOCK_BIASES)
        )
        if match is None or not known or int(match[1]) >= config.n_layer:
            raise ValidationError(
                f"{path.name} holds a tensor {name} the torch bridge does not know"
            )
        if match[3] == "weight":
            seen.add((int(match[1]), match[2]))
    missing = [
        f"blk.{i}.{w}.weight"
        for i in range(config.n_layer)
        for w in BLOCK_WEIGHTS
        if (i, w) not in seen
    ]
    if missing:
        raise ValidationError(f"{path.name} lacks {missing[0]} (and {len(missing) - 1} more)")


def dequantize(tensor: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    """One GGUF tensor as float32 in numpy layout (outermost dimension first)."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    if not values.flags.writeable:  # an F32 tensor is a view of the read-only memory map
        values = values.copy()
    return values.reshape([int(n) for n in reversed(tensor.shape)])


def read_llama(path: Path) -> tuple[LlamaConfig, dict[str, np.ndarray[Any, Any]]]:
    """The config and every tensor of a llama GGUF, by GGUF name, dequantized to float32:
    `token_embd.weight` [n_vocab, D], `blk.N.attn_q.weight` [H * head_dim, D], norms [D]."""
    reader = check_llama(path)
    config = read_config(reader, path)
    check_tensor_names(reader, config, path)
    return config, {t.name: dequantize(t) for t in reader.tensors}


def per_layer_fields(reader: Any, n_layer: int) -> list[str]:
    """Metadata arrays with one entry per block (e.g. head_count_kv in some converters):
    save_gguf keeps the entries of the blocks it writes."""
    return [
        field.name
        for field in reader.fields.values()
        if field.name.startswith(f"{ARCH}.")
        and field.types[0] == gguf.GGUFValueType.ARRAY
        and len(field.data) == n_layer
    ]


def need_torch() -> None:
    """The one-line ValidationError when PyTorch is not installed; call it before importing
    `edgellm.compress.torch_bridge` where a command must fail before doing any work."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ValidationError(TORCH_MISSING)
