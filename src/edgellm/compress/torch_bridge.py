"""The torch bridge: a llama GGUF as a `torch.nn.Module`, and a module written back to GGUF.

The module computes what llama.cpp's llama graph computes, on the GGUF's own layout (see
`edgellm.compress.gguf_model`): RMSNorm, grouped-query attention with adjacent-pair ("normal")
rope, a SwiGLU feed-forward, a tied or separate output head. Parameter names are the GGUF names
with `blk.N.` spelled `layers.N.`, so a state dict maps onto the file one name to one name.

PyTorch is an extra (`edgellm[train]`): this module imports it at the top, so import the module
lazily, from the commands that need it (`need_torch()` says what to install).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np

from edgellm.compress.convert import copy_metadata
from edgellm.compress.gguf_model import (
    ARCH,
    BLOCK_BIASES,
    TORCH_MISSING,
    LlamaConfig,
    check_llama,
    per_layer_fields,
    read_llama,
)
from edgellm.compress.qtypes import FLOAT_TYPES
from edgellm.errors import ValidationError

try:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
except ImportError as exc:  # pragma: no cover - the [train] extra is missing
    raise ValidationError(TORCH_MISSING) from exc


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # llama.cpp's rms_norm then mul: in float32 whatever the weights' dtype
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class LlamaBlock(nn.Module):
    """One llama block; `source_index` is its number in the GGUF it was read from."""

    def __init__(self, config: LlamaConfig, source_index: int, biases: Sequence[str] = ()):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.config = config
        self.source_index = source_index
        self.attn_norm = RMSNorm(d, config.rms_eps)
        self.attn_q = nn.Linear(d, config.n_head * hd, bias="attn_q" in biases)
        self.attn_k = nn.Linear(d, config.n_head_kv * hd, bias="attn_k" in biases)
        self.attn_v = nn.Linear(d, config.n_head_kv * hd, bias="attn_v" in biases)
        self.attn_output = nn.Linear(config.n_head * hd, d, bias="attn_output" in biases)
        self.ffn_norm = RMSNorm(d, config.rms_eps)
        self.ffn_gate = nn.Linear(d, config.n_ff, bias=False)
        self.ffn_up = nn.Linear(d, config.n_ff, bias=False)
        self.ffn_down = nn.Linear(config.n_ff, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x: [B, T, D]; cos, sin: [T, 1, rope_dim / 2]
        x = x + self._attention(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        out: Tensor = x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))
        return out

    def _attention(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        c = self.config
        b, t = x.shape[0], x.shape[1]
        q = _rope(self.attn_q(x).view(b, t, c.n_head, c.head_dim), cos, sin)  # [B, T, H, hd]
        k = _rope(self.attn_k(x).view(b, t, c.n_head_kv, c.head_dim), cos, sin)
        v = self.attn_v(x).view(b, t, c.n_head_kv, c.head_dim)
        group = c.n_head // c.n_head_kv  # query head h reads kv head h // group, as llama.cpp
        k = k.repeat_interleave(group, dim=2) if group > 1 else k
        v = v.repeat_interleave(group, dim=2) if group > 1 else v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=c.attn_scale,
        )  # fmt: skip
        merged: Tensor = self.attn_output(out.transpose(1, 2).reshape(b, t, c.n_head * c.head_dim))
        return merged


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """llama.cpp's normal rope: pairs (x[2i], x[2i+1]) of a head's first rope_dim dims rotated
    by pos * theta_i. x: [B, T, H, hd]."""
    n = cos.shape[-1] * 2
    x0, x1 = x[..., 0:n:2].float(), x[..., 1:n:2].float()  # [B, T, H, n / 2] each
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., n:]), dim=-1)


class LlamaModule(nn.Module):
    """A llama GGUF as torch: tokens [B, T] int64 -> logits [B, T, V] float32, all positions,
    no KV cache (each call computes the whole window)."""

    config: LlamaConfig
    layers: nn.ModuleList  # LlamaBlock each, in order
    rope_freqs: Tensor | None  # [rope_dim / 2] float32, llama 3 only

    def __init__(self, config: LlamaConfig, biases: Sequence[str] = ()):
        super().__init__()
        self.config = config
        self.token_embd = nn.Embedding(config.n_vocab, config.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(config, i, biases) for i in range(config.n_layer))
        self.output_norm = RMSNorm(config.n_embd, config.rms_eps)
        self.output: nn.Linear | None = None
        if not config.tied_embeddings:
            self.output = nn.Linear(config.n_embd, config.n_vocab, bias=False)
        # 1-D, F32 in the GGUF: divides the rope frequencies (llama 3's long-context factors)
        freqs = torch.ones(config.rope_dim // 2) if config.has_rope_freqs else None
        self.register_buffer("rope_freqs", freqs)  # None: not in the state dict
        half = np.arange(config.rope_dim // 2, dtype=np.float64)
        # theta_i = base^(-2i / rope_dim), in float64 then float32 (ggml: float32 powers)
        self._inv_freq = (config.rope_theta ** (-2 * half / config.rope_dim)).astype(np.float32)

    def forward(
        self, tokens: Tensor, *, hidden: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        # tokens: [B, T] int64 -> logits [B, T, V]; hidden: also the residual stream entering
        # each block and the last block's output, n_layer + 1 tensors [B, T, D]
        cos, sin = self.rope_tables(tokens.shape[1])
        x = self.token_embd(tokens)
        states = [x]
        for block in self.layers:
            x = block(x, cos, sin)
            states.append(x)
        head = self.token_embd.weight if self.output is None else self.output.weight
        normed = self.output_norm(x)
        if torch.is_autocast_enabled("cpu"):
            # bfloat16 logits of 15-25 are rounded to steps of 0.125, noise the size of the KL
            # a distillation is trying to shrink: the head runs in float32
            with torch.autocast("cpu", enabled=False):
                logits = F.linear(normed.float(), head.float())
        else:
            logits = F.linear(normed, head).float()
        return (logits, states) if hidden else logits

    def rope_tables(self, n_tokens: int) -> tuple[Tensor, Tensor]:
        """cos, sin of pos * theta_i for positions 0..n_tokens-1: [T, 1, rope_dim / 2]."""
        device = self.token_embd.weight.device
        inv_freq = torch.from_numpy(self._inv_freq).to(device)
        if self.rope_freqs is not None:
            inv_freq = inv_freq / self.rope_freqs.float()
        pos = torch.arange(n_tokens, device=device, dtype=torch.float32)
        angles = (pos / self.config.rope_scaling)[:, None] * inv_freq[None, :]
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    @property
    def source_layers(self) -> list[int]:
        """For each block, its number in the GGUF the module was read from."""
        return [cast(LlamaBlock, block).source_index for block in self.layers]


def gguf_name(key: str) -> str:
    """State-dict key -> GGUF tensor name: `layers.3.attn_q.weight` -> `blk.3.attn_q.weight`,
    the `rope_freqs` buffer -> `rope_freqs.weight`."""
    if key == "rope_freqs":
        return "rope_freqs.weight"
    return "blk." + key.removeprefix("layers.") if key.startswith("layers.") else key


def load_module(path: Path, *, dtype: torch.dtype = torch.float32) -> LlamaModule:
    """A llama GGUF (any weight type: quantized ones are dequantized) as a LlamaModule with
    `dtype` parameters, in eval mode on the CPU. Buffers (rope_freqs) stay float32."""
    config, tensors = read_llama(Path(path))
    biases = sorted({n.split(".")[2] for n in tensors if n.endswith(".bias")} & set(BLOCK_BIASES))
    with torch.device("meta"):  # no random init of weights about to be replaced
        module = LlamaModule(config, biases)
    state = {}
    for key in module.state_dict():
        values = torch.from_numpy(tensors.pop(gguf_name(key)))
        state[key] = values if key == "rope_freqs" else values.to(dtype)
    module.load_state_dict(state, assign=True, strict=True)
    return module.eval()


def remove_layers(module: LlamaModule, layers: Sequence[int]) -> None:
    """Drop the blocks at positions `layers` (0-based, of the module as it is now) in place;
    the rest keep their order and are renumbered 0..n-1. Each keeps its `source_index`."""
    n = len(module.layers)
    drop = set(layers)
    if len(drop) != len(layers) or not drop <= set(range(n)):
        raise ValidationError(f"layers to remove must be distinct numbers in 0..{n - 1}")
    if len(drop) >= n:
        raise ValidationError(f"the model has {n} layers; at least one must stay")
    module.layers = nn.ModuleList(b for i, b in enumerate(module.layers) if i not in drop)
    module.config.n_layer = len(module.layers)


def save_gguf(module: LlamaModule, source: Path, dest: Path, *, ftype: str = "f16") -> None:
    """Write `module` as a GGUF: metadata, tokenizer and chat template copied from `source`
    (the GGUF it came from), block_count and per-layer metadata arrays cut to the module's
    blocks, matrices in `ftype` (f16 or f32), 1-D tensors F32 as llama.cpp keeps them.
    Atomic: a temporary file in dest's directory, renamed at the end."""
    if ftype not in ("f16", "f32"):
        raise ValidationError(f"save_gguf writes f16 or f32, not {ftype!r}", param="ftype")
    source, dest = Path(source), Path(dest)
    if not dest.parent.is_dir():
        raise ValidationError(f"the directory of {dest} does not exist", param="output")
    if dest.is_dir():
        raise ValidationError(f"{dest} is a directory, not a file to write", param="output")
    reader = check_llama(source)
    n_source = int(reader.fields[f"{ARCH}.block_count"].contents())
    origins = module.source_layers
    if max(origins) >= n_source:
        raise ValidationError(f"the module has block {max(origins)}; {source.name} has {n_source}")
    replace: dict[str, Any] = {
        f"{ARCH}.block_count": len(origins),
        gguf.Keys.General.FILE_TYPE: FLOAT_TYPES[ftype][0],
    }
    for name in per_layer_fields(reader, n_source):
        values = reader.fields[name].contents()
        replace[name] = [values[i] for i in origins]
    tensors = _tensors_in_file_order(module, reader)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    os.close(fd)
    try:
        _write(Path(tmp), reader, replace, tensors, FLOAT_TYPES[ftype][1])
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tensors_in_file_order(module: LlamaModule, reader: Any) -> list[tuple[str, Tensor]]:
    """(GGUF name, tensor) of every module tensor, in the source file's order (module block N
    where the source had block source_index), then any the source lacks."""
    renumber = {old: new for new, old in enumerate(module.source_layers)}
    state = {gguf_name(k): v for k, v in module.state_dict().items()}
    order: list[str] = []
    for tensor in reader.tensors:
        parts = tensor.name.split(".", 2)
        name = tensor.name
        if parts[0] == "blk":
            new = renumber.get(int(parts[1]))
            if new is None:
                continue  # a removed block
            name = f"blk.{new}.{parts[2]}"
        if name in state:
            order.append(name)
    order += sorted(set(state) - set(order))
    return [(name, state[name]) for name in order]


def _write(
    path: Path,
    reader: Any,
    replace: dict[str, Any],
    tensors: list[tuple[str, Tensor]],
    matrix_type: gguf.GGMLQuantizationType,
) -> None:
    """One tensor converted at a time: the file is never held in memory twice."""
    writer = gguf.GGUFWriter(path, ARCH)
    copy_metadata(reader, writer, replace)
    if gguf.Keys.General.FILE_TYPE not in reader.fields:
        writer.add_file_type(replace[gguf.Keys.General.FILE_TYPE])
    kinds = [matrix_type if t.dim() >= 2 else gguf.GGMLQuantizationType.F32 for _, t in tensors]
    for (name, values), kind in zip(tensors, kinds, strict=True):
        n_bytes = values.numel() * (2 if kind == gguf.GGMLQuantizationType.F16 else 4)
        shape = list(values.shape)  # numpy order; the writer reverses it into ggml's
        writer.add_tensor_info(name, shape, np.dtype(np.float32), n_bytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (_, values), kind in zip(tensors, kinds, strict=True):
        data = values.detach().to("cpu", torch.float32).numpy()
        writer.write_tensor_data(
            data.astype(np.float16) if kind != gguf.GGMLQuantizationType.F32 else data
        )
    writer.close()
