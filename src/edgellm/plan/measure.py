"""`edgellm plan --here`: measure this machine and a short real run of the model.

Bandwidth is measured STREAM-style (copy of arrays far larger than the caches, one slice per
core in parallel, bytes read + written per second, best of several); compute as float32 GEMM
throughput. The model run is a timed prefill of one window and a timed greedy decode, each
best of three. A calibration file keeps the machine's numbers and the efficiency factors
(measured / roofline), so later estimates on this machine use them without re-measuring.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ValidationError
from edgellm.plan.catalog import Device
from edgellm.plan.estimate import Efficiency

COPY_BYTES = 512 * 2**20  # per array: far beyond any last-level cache
PREFILL_TOKENS = 256
DECODE_PROMPT, DECODE_TOKENS = 32, 64
MEASURED_CTX = 128  # context the decode measurement reaches (prompt + tokens, rounded)


def memory_bandwidth_gbs(threads: int, repeats: int = 5) -> float:
    """STREAM 'copy' bandwidth: 2 x bytes per second (one read, one write), best of `repeats`."""
    n = COPY_BYTES // 8
    src, dst = np.ones(n), np.empty(n)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def copy(s: slice) -> None:
        np.copyto(dst[s], src[s])  # numpy releases the GIL: slices copy in parallel

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(copy, slices))
            best = max(best, 2 * COPY_BYTES / (time.perf_counter() - started))
    return best / 1e9


def gemm_tflops(size: int = 1024, repeats: int = 5) -> float:
    a = np.ones((size, size), dtype=np.float32)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        a @ a
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best / 1e12


def this_machine(threads: int) -> Device:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    tflops = gemm_tflops()
    return Device(
        key="here",
        name=f"this machine ({os.cpu_count()} cores, {threads} threads)",
        kind="cpu",
        memory_gib=memory / 2**30,
        usable_fraction=0.8,
        bandwidth_gbs=memory_bandwidth_gbs(threads),
        f16_tflops=tflops,  # float32 GEMM: the CPU's arithmetic as numpy reaches it
        int8_tops=tflops,
        power_w=0.0,
        source="measured by edgellm plan --here",
        measured=True,
    )


@dataclass(frozen=True, slots=True)
class ModelRun:
    decode_tps: float  # greedy, one stream, ~MEASURED_CTX context
    prefill_tps: float  # one window of PREFILL_TOKENS


def run_model(path: Path, threads: int) -> ModelRun:
    from edgellm.backends import load_scorer

    scorer = load_scorer(path, PREFILL_TOKENS, threads)
    try:
        tokens = [scorer.bos if scorer.add_bos else 1, *list(range(100, 100 + PREFILL_TOKENS - 1))]
        prefill = 0.0
        for _ in range(3):
            started = time.perf_counter()
            scorer.window_logits(tokens, PREFILL_TOKENS - 1)
            prefill = max(prefill, PREFILL_TOKENS / (time.perf_counter() - started))
        decode = max(scorer.decode_speed(tokens[:DECODE_PROMPT], DECODE_TOKENS) for _ in range(3))
    finally:
        scorer.close()
    return ModelRun(decode_tps=decode, prefill_tps=prefill)


def save_calibration(
    path: Path, machine: Device, efficiency: Efficiency, model: Path, qtype: str, run: ModelRun
) -> None:
    body = {
        "machine": asdict(machine),
        "efficiency": {
            "bandwidth": efficiency.bandwidth,
            "decode": efficiency.decode,
            "prefill": efficiency.prefill,
        },
        "calibrated_with": {"model": str(model.resolve()), "type": qtype} | asdict(run),
    }
    path.write_text(json.dumps(body, indent=2) + "\n")


def load_calibration(path: Path) -> tuple[Device, Efficiency]:
    try:
        body: dict[str, Any] = json.loads(path.read_text())
        machine = Device(**body["machine"])
        eff = body["efficiency"]
        efficiency = Efficiency(
            float(eff["bandwidth"]), float(eff["decode"]), float(eff["prefill"]), str(path)
        )
    except FileNotFoundError:
        raise ValidationError(f"calibration file not found: {path}", param="calibration") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValidationError(
            f"{path} is not an edgellm calibration file ({exc})", param="calibration"
        ) from exc
    return machine, efficiency
