"""Loading and closing the default model again and again in one process frees every backend:
nothing outlives its owner (the piece cache was once an `lru_cache` on the bound method, whose
cache held every backend for the life of the process), and resident memory does not grow by
anything like a model per cycle."""

from __future__ import annotations

import functools
import gc
import os
import weakref
from pathlib import Path

import pytest

from edgellm.backends import load_backend
from edgellm.backends.llama_cpp import core
from edgellm.engine import Request, SamplingParams
from edgellm.serving import load_engine
from edgellm.settings import EngineSettings

CYCLES = 5
SETTINGS = EngineSettings(ctx=256, parallel=1, batch=32, threads=1)
TEXT = "The kettle boiled while the radio talked about rain."


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _backend_cycle(path: Path) -> weakref.ref[object]:
    """Load, use every part (tokenizer and its piece cache, runner, an embedder), close."""
    backend = load_backend(path, SETTINGS)
    tokens = backend.tokenizer.tokenize(TEXT, add_special=True, parse_special=False)
    assert b"".join(backend.tokenizer.token_to_piece(t) for t in tokens).strip()
    assert len(backend.embedder("mean", 1).embed(tokens)) > 0
    runner = weakref.ref(backend.runner)
    backend.close()
    return runner


def _engine_cycle(path: Path) -> weakref.ref[object]:
    """The engine as serving builds it, with one short greedy generation."""
    engine = load_engine(path, SETTINGS)
    tokens = engine.tokenizer.tokenize(TEXT, add_special=True, parse_special=False)
    engine.add_request(Request("r", tokens, SamplingParams(temperature=0.0, max_tokens=4)))
    while engine.has_work():
        engine.step()
    runner = weakref.ref(engine.runner)
    engine.close()
    return runner


def test_closed_backends_are_freed(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GGUF check before each load reads the whole vocabulary in Python (~5 s of CPU for
    # the default model on a 2-core box); it holds nothing, so check the file once.
    monkeypatch.setattr(core, "inspect_gguf", functools.cache(core.inspect_gguf))
    model_bytes = model_path.stat().st_size
    resident = []
    for _ in range(CYCLES):
        for cycle in (_backend_cycle, _engine_cycle):
            runner = cycle(model_path)
            gc.collect()
            # With the old lru_cache on token_to_piece, its cache still held the runner here.
            assert runner() is None, f"{cycle.__name__}: the closed backend is still alive"
        resident.append(_resident_bytes())
    # The first cycle warms up allocator arenas and libraries; after it, each cycle loads the
    # weights twice (mapped, all touched by a decode), so a backend whose memory was kept would
    # add about 2 x model_bytes per cycle.
    growth = (resident[-1] - resident[0]) / (CYCLES - 1)
    assert growth < model_bytes / 2, f"resident memory grew {growth / 2**20:.1f} MiB per cycle"
