"""Memory arithmetic and roofline speed estimates (pure functions, no I/O).

Memory = weights + KV cache + runtime overhead. The KV cache holds, for every token of every
sequence, K and V of every layer: ctx x concurrency x layers x 2 x kv_heads x head_dim x bytes.
The overhead is llama.cpp's compute buffers (logits for one ubatch and the activations of the
widest layer) plus a fixed runtime base.

Speed. Prefill is compute-bound: e_c x compute / (2 x weights multiplied per token). A decode
step streams every weight it multiplies once (and each sequence's KV cache, ctx/2 tokens on
average) and does 2 x weights FLOPs per sequence; its time is taken as the sum

    bytes / (e_b x bandwidth)  +  C x FLOPs / (e_d(C) x compute)

for C sequences per step. e_b is the share of peak bandwidth a stream of reads achieves (1 for a
bandwidth measured STREAM-style on the machine itself). e_d is how well the arithmetic of a
matrix-vector product (dequantizing every weight for one token) uses the peak; batching
amortizes that work, so e_d(C) = min(max(e_c, e_d), C x e_d). On a GPU the first term
dominates and this is the bandwidth roofline; on a small CPU the arithmetic is a large share of
a token's time and the two do not overlap, which a max() roofline misses by 30% and more
(docs/planning.md).
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
    bandwidth: float  # e_b: share of the device's bandwidth figure that streaming reads reach
    decode: float  # e_d: share of peak compute the one-token matrix-vector products reach
    prefill: float  # e_c: share of peak compute the batched matrix products reach
    source: str  # "default for gpu", or the calibration file it came from


def default_efficiency(device: Device) -> Efficiency:
    """Until a calibration says otherwise: STREAM reaches ~70-80% of peak bandwidth (a
    bandwidth measured here is already achieved: 1.0); e_d 0.4 is what a 2-core x86 VM
    measured (0.39 against its float32 GEMM peak, docs/planning.md); e_c 0.5 is a guess
    for peaks quoted by vendors, which kernels reach less of than numpy's GEMM."""
    bandwidth = 1.0 if device.measured else (0.75 if device.kind == "gpu" else 0.7)
    return Efficiency(bandwidth, 0.4, 0.5, f"default for {device.kind}")


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
    memory_rate = efficiency.bandwidth * bandwidth  # bytes/s streamed

    def step_seconds(c: int) -> float:
        best = max(efficiency.prefill, efficiency.decode)
        arithmetic = min(best, c * efficiency.decode) * compute
        return (streamed + c * kv_read) / memory_rate + c * flops / arithmetic

    c = load.concurrency
    return Estimate(
        qtype=qtype,
        weights_bytes=weights_bytes,
        weights_exact=weights_exact,
        kv_bytes=kv,
        overhead_bytes=overhead,
        fits=weights_bytes + kv + overhead <= device.usable_bytes,
        decode_tps=1 / step_seconds(1),
        aggregate_tps=c / step_seconds(c),
        prefill_tps=efficiency.prefill * compute / flops,
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
    """The factors that make `estimate` reproduce measured speeds: e_b stays the device's
    default; e_c from the prefill; e_d from what is left of a decoded token's time once its
    bytes are streamed."""
    base = default_efficiency(device)
    decode_roof, prefill_roof = rooflines(arch, device, qtype, weights_bytes, load)
    memory_seconds = 1 / (decode_roof * base.bandwidth)
    arithmetic_seconds = max(1 / decode_tps - memory_seconds, 0.05 / decode_tps)
    compute = prefill_roof * 2.0 * arch.matmul_params  # FLOP/s peak for this type
    e_d = 2.0 * arch.matmul_params / (arithmetic_seconds * compute)
    return Efficiency(base.bandwidth, e_d, prefill_tps / prefill_roof, source)


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
