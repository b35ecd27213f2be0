"""llama.cpp sampler chains built from `SamplingParams`: the in-process chain of a request
without a grammar, and the chain a grammar sandbox runs after its grammar (grammar_worker)."""

from __future__ import annotations

import functools
import random
from typing import Any

import llama_cpp as ll

from edgellm.engine.request import GREEDY_BELOW, MAX_LOGIT_BIAS, SamplingParams


def build_chain(n_vocab: int, s: SamplingParams) -> Any:
    """A sampler chain: logit bias, penalties, then greedy or top-k / top-p / min-p /
    temperature / seeded draw. No grammar: that is applied before it, in a sandbox."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    add = functools.partial(ll.llama_sampler_chain_add, chain)
    if s.logit_bias:
        bias = [(t, max(-MAX_LOGIT_BIAS, min(b, MAX_LOGIT_BIAS))) for t, b in s.logit_bias]
        biases = (ll.llama_logit_bias * len(bias))(*(ll.llama_logit_bias(t, b) for t, b in bias))
        add(ll.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), biases))
    if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        add(
            ll.llama_sampler_init_penalties(
                n_vocab,
                s.penalty_last_n,
                s.repeat_penalty,
                s.frequency_penalty,
                s.presence_penalty,
            )
        )
    # Dividing logits by a temperature near zero overflows them to infinity, and the draw then
    # has no valid distribution: such temperatures mean greedy.
    if s.temperature < GREEDY_BELOW:
        add(ll.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(ll.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(ll.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0.0:
        add(ll.llama_sampler_init_min_p(s.min_p, 1))
    add(ll.llama_sampler_init_temp(s.temperature))
    seed = s.seed if s.seed is not None else random.getrandbits(32)
    add(ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
