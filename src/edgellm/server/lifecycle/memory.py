"""What a loaded model costs in memory: estimated before it loads, measured after.

The estimate is `edgellm plan`'s arithmetic for one model in a process that already runs: the
weights (the GGUF's tensor bytes, mapped from the file), the KV cache (`ctx` cells of the
model's K and V rows, f16), the compute buffers (llama.cpp's micro-batch of logits and
activations) and a small per-context base. The libraries themselves are loaded once per
process, so they are not charged to each model. Once a model is ready its resident size is
measured (the process's RSS before and after the load) and the larger of the two figures is
what the budget is charged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import ValidationError

if TYPE_CHECKING:
    from edgellm.modelfile import ModelInfo

CONTEXT_BASE = 32 * 2**20  # per llama.cpp context: graph, scheduler, sampler state
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str, param: str = "max_memory") -> int:
    """Bytes of "8G", "7.5GiB", "800M", "800MB", "1073741824" (K/M/G/T are powers of 1024,
    as memory is counted)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValidationError(
            f"{param}: '{text}' is not a size; write e.g. 8G, 7.5GiB or 800M", param=param
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def estimate_bytes(info: ModelInfo, ctx: int) -> int:
    """Weights + KV cache of `ctx` cells + compute buffers of a model, from its header: the
    file's bytes stand for the weights (the header is a few MB of them)."""
    from edgellm.plan.estimate import UBATCH

    meta, arch = info.metadata, info.architecture

    def number(key: str, default: int) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return value if isinstance(value, int) else default

    embd = number("embedding_length", 4096)
    heads = number("attention.head_count", 32)
    kv_heads = number("attention.head_count_kv", heads)
    head_dim = number("attention.key_length", embd // max(1, heads))
    kv = ctx * number("block_count", 32) * 2 * kv_heads * head_dim * 2  # K and V, f16
    activations = UBATCH * (info.n_vocab + 16 * embd) * 4
    return int(info.size_bytes + kv + activations + CONTEXT_BASE)


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
