"""Memory arithmetic and roofline speed estimates (pure functions, no I/O).

Memory = weights + KV cache + runtime overhead. The KV cache holds, for every token of every
sequence, K and V of every layer: ctx x concurrency x layers x 2 x kv_heads x head_dim x bytes.
The overhead is llama.cpp's compute buffers (logits for one ubatch and the activations of the
widest layer) plus a fixed runtime base.

Speed, from the two rooflines, each scaled by an efficiency factor (`--here` measures them):
  prefill:  e_c x compute / (2 x weights multiplied per token) tokens/s (compute-bound);
  decode:   a step streams every weight it multiplies once (and each sequence's KV cache, ctx/2
            on average), and does 2 x weights FLOPs per sequence. The time is the sum
              bytes / (e_b x bandwidth) + C x 2 x weights / (e_c x compute)
            for C sequences per step: on a GPU the first term dominates and this is the
            bandwidth roofline; on a small CPU the arithmetic adds a measurable share
            (the two do not fully overlap), which a pure max() roofline misses.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.plan.arch import Architecture
from edgellm.plan.catalog import Device

UBATCH = 512  # llama.cpp's default micro-batch: the compute buffers scale with it
RUNTIME_BASE = {"cpu": 256 * 2**20, "soc": 512 * 2**20, "gpu": 512 * 2**20}  # libs, context
HEADROOM = 0.10  # a plan recommends types that leave this share of usable memory free
FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True, slots=True)
class Efficiency:
    decode: float  # e_b: share of peak bandwidth a decode step achieves
    prefill: float  # e_c: share of peak compute the matrix products achieve
    source: str  # "default for gpu", or the calibration file it came from


DEFAULT_EFFICIENCY = {
    "cpu": Efficiency(0.6, 0.5, "default for cpu"),
    "soc": Efficiency(0.6, 0.4, "default for soc"),
    "gpu": Efficiency(0.75, 0.5, "default for gpu"),
}


@dataclass(frozen=True, slots=True)
class Workload:
    ctx: int  # context per sequence, tokens
    concurrency: int  # sequences decoding together
    cache_type: str  # KV cache element type: f16, q8_0, q4_0


@dataclass(frozen=True, slots=True)
class Estimate:
    qtype: str  # weight type
    weights_bytes: float  # tensor bytes of the model in this type
    weights_exact: bool  # measured from the file / llama.cpp's dry run, not from NOMINAL_BPW
    kv_bytes: float  # KV cache for ctx x concurrency
    overhead_bytes: float  # compute buffers and runtime
    fits: bool  # total <= the device's usable memory
    decode_tps: float  # one stream, tokens/s
    aggregate_tps: float  # all `concurrency` streams together, tokens/s
    prefill_tps: float  # prompt tokens/s

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes


def overhead_bytes(arch: Architecture, device: Device) -> float:
    """Runtime base plus compute buffers: logits [ubatch, vocab] and the widest activations
    [ubatch, ~4 x embd + ffn-sized intermediates], float32."""
    activations = UBATCH * (arch.vocab + 16 * arch.embd) * 4
    return RUNTIME_BASE[device.kind] + activations


def kv_bytes(arch: Architecture, load: Workload) -> float:
    return load.ctx * load.concurrency * arch.kv_bytes_per_token(load.cache_type)


def estimate(
    arch: Architecture,
    device: Device,
    qtype: str,
    weights_bytes: float,
    weights_exact: bool,
    load: Workload,
    efficiency: Efficiency,
) -> Estimate:
    kv = kv_bytes(arch, load)
    overhead = overhead_bytes(arch, device)
    bandwidth = device.bandwidth_gbs * 1e9
    compute = (device.f16_tflops if qtype in FLOAT_TYPES else device.int8_tops) * 1e12
    streamed, kv_read, flops = _per_token(arch, weights_bytes, load)
    memory_rate = efficiency.decode * bandwidth  # bytes/s a decode step streams
    compute_rate = efficiency.prefill * compute  # FLOP/s the matrix products reach
    c = load.concurrency
    step = (streamed + c * kv_read) / memory_rate + c * flops / compute_rate
    return Estimate(
        qtype=qtype,
        weights_bytes=weights_bytes,
        weights_exact=weights_exact,
        kv_bytes=kv,
        overhead_bytes=overhead,
        fits=weights_bytes + kv + overhead <= device.usable_bytes,
        decode_tps=1 / (streamed / memory_rate + kv_read / memory_rate + flops / compute_rate),
        aggregate_tps=c / step,
        prefill_tps=compute_rate / flops,
    )


def _per_token(arch: Architecture, weights_bytes: float, load: Workload) -> tuple[float, ...]:
    """Bytes of weights streamed, bytes of KV cache read, FLOPs: per decoded token."""
    # every weight multiplied is read; of an untied embedding table only one row
    streamed = weights_bytes * arch.matmul_params / arch.params
    kv_read = arch.kv_bytes_per_token(load.cache_type) * load.ctx / 2  # context half full
    return streamed, kv_read, 2.0 * arch.matmul_params


def rooflines(
    arch: Architecture, device: Device, qtype: str, weights_bytes: float, load: Workload
) -> tuple[float, float]:
    """The pure rooflines, one stream: decode = bandwidth / bytes per token (as if arithmetic
    were free), prefill = compute / FLOPs per token."""
    streamed, kv_read, flops = _per_token(arch, weights_bytes, load)
    compute = (device.f16_tflops if qtype in FLOAT_TYPES else device.int8_tops) * 1e12
    return device.bandwidth_gbs * 1e9 / (streamed + kv_read), compute / flops


def calibrate(
    arch: Architecture,
    device: Device,
    qtype: str,
    weights_bytes: float,
    load: Workload,
    decode_tps: float,
    prefill_tps: float,
    source: str,
) -> Efficiency:
    """The efficiency factors that make `estimate` reproduce measured speeds: e_c from the
    prefill, then e_b from what is left of a decoded token's time after its arithmetic."""
    decode_roof, prefill_roof = rooflines(arch, device, qtype, weights_bytes, load)
    e_c = prefill_tps / prefill_roof
    memory_time = max(1 / decode_tps - 1 / prefill_tps, 0.1 / decode_tps)
    e_b = (1 / decode_roof) / memory_time
    return Efficiency(decode=e_b, prefill=e_c, source=source)


def recommend(estimates: list[Estimate], device: Device) -> Estimate | None:
    """The first (best-quality: callers order by quality) type that fits with headroom."""
    budget = device.usable_bytes * (1 - HEADROOM)
    return next((e for e in estimates if e.total_bytes <= budget), None)


def largest_ctx(arch: Architecture, device: Device, chosen: Estimate, load: Workload) -> int:
    """Most context per sequence at `load.concurrency` that still fits with headroom."""
    free = device.usable_bytes * (1 - HEADROOM) - chosen.weights_bytes - chosen.overhead_bytes
    per_token = load.concurrency * arch.kv_bytes_per_token(load.cache_type)
    return max(0, min(arch.context, int(free // per_token)))


def largest_concurrency(
    arch: Architecture, device: Device, chosen: Estimate, load: Workload
) -> int:
    """Most sequences of `load.ctx` tokens that still fit with headroom."""
    free = device.usable_bytes * (1 - HEADROOM) - chosen.weights_bytes - chosen.overhead_bytes
    return max(0, int(free // (load.ctx * arch.kv_bytes_per_token(load.cache_type))))
