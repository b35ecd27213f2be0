"""Defaults for the fields a client leaves out of a generation request.

Each field a client omits is taken from the first layer that has it, once the model resolved:

    1. the served version's parameters (`edgellm models set`, ServedModel.params)
    2. the GGUF's own `general.sampling.*` metadata: what the model's makers recommend
       (llama.cpp's server reads them the same way, as defaults for what its user left unset)
    3. the API's defaults: llama.cpp's server on /v1 and in `edgellm chat` (LLAMA_SERVER),
       Ollama's on /api (OLLAMA).

Without layers 1 and 2, /v1 used to sample the whole distribution at temperature 1; on the
default model the README's example then rambled for 2,000 tokens. llama.cpp's defaults cut
the tail (top_k 40, top_p 0.95, min_p 0.05) and cool it (0.8).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgellm.engine import SamplingParams
from edgellm.errors import ValidationError
from edgellm.registry.params import check_params

# llama.cpp's `common_params_sampling` (common/common.h; llama-server's defaults for a request
# that sets nothing): temp 0.80, top_k 40, top_p 0.95, min_p 0.05, penalty_last_n 64,
# penalty_repeat 1.00, penalty_freq 0.00, penalty_present 0.00; n_predict -1 (until the end of
# the context or of the answer). Its typical_p, XTC, DRY and mirostat are off by default and
# edgellm has none of them.
LLAMA_SERVER = SamplingParams(
    temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, penalty_last_n=64
)
# Ollama's documented defaults (docs/modelfile.md, api.md): temperature 0.8, top_k 40,
# top_p 0.9, min_p 0.0, repeat_penalty 1.1 over repeat_last_n 64.
OLLAMA = SamplingParams(
    temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1, penalty_last_n=64
)

# the GGUF keys (gguf.Keys.General.SAMPLING_*) -> the parameter each is a default of
GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "repeat_last_n",
}
# SamplingParams fields that a version or a GGUF may give a default for -> the parameter
LAYERED = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "penalty_last_n": "repeat_last_n",
}


@dataclass(slots=True, frozen=True)
class GivenSampling:
    """The sampling fields a client sent; None where it sent nothing (a default fills it)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    penalty_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None  # already modulo 2^32
    ignore_eos: bool | None = None
    stop: tuple[str, ...] | None = None  # None: none given (an empty list is none too)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)


def gguf_defaults(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a GGUF's general.sampling.* fields recommend; values out of the
    parameters' limits (or of the wrong type) are left out, as if absent."""
    found: dict[str, Any] = {}
    for key, name in GGUF_SAMPLING.items():
        value = metadata.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                found.update(check_params({name: value}))
            except ValidationError:
                continue
    return found


def model_defaults(params: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Layers 1 and 2 merged: a version's parameters (checked when they were set) over its
    GGUF's recommendations, by parameter name (edgellm.registry.params)."""
    return {**gguf_defaults(metadata), **params}


def settle_sampling(
    given: GivenSampling, defaults: Mapping[str, Any], api: SamplingParams
) -> SamplingParams:
    """The sampling a request runs with: each field the client's, else the model's default
    (`model_defaults`), else the API's; stop strings the client's, else the version's."""
    values: dict[str, Any] = {}
    for field, name in LAYERED.items():
        value = getattr(given, field)
        values[field] = value if value is not None else defaults.get(name, getattr(api, field))
    for field in ("presence_penalty", "frequency_penalty", "ignore_eos"):
        value = getattr(given, field)
        if value is not None:
            values[field] = value
    stop = given.stop if given.stop is not None else tuple(defaults.get("stop", ()))
    return dataclasses.replace(
        api, **values, seed=given.seed, stop=stop, logit_bias=given.logit_bias
    )
