"""Unit tests of the evaluation arithmetic and the gate language (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgellm.errors import ValidationError
from edgellm.evaluate.gate import parse_gate
from edgellm.evaluate.run import split_windows
from edgellm.evaluate.scores import TokenScores, log_softmax


def test_log_softmax_is_normalised_and_shift_invariant() -> None:
    logits = np.random.default_rng(0).normal(size=(5, 100)).astype(np.float32) * 20
    logp = log_softmax(logits)
    assert np.allclose(np.exp(logp).sum(axis=1), 1.0)
    assert np.allclose(log_softmax(logits + 1000.0), logp, atol=1e-4)


def test_scores_against_hand_computed_values() -> None:
    # two positions over a 3-token vocabulary; targets 0 and 2
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))
    model = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    scores = TokenScores()
    scores.add(model, np.array([0, 2]), ref)
    m = scores.summary(ref_nll=-(math.log(0.5) + math.log(0.6)) / 2)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)
    kl1 = 0.2 * math.log(2.0) * 2 + 0.6 * math.log(0.6 / 0.8)
    assert m["kl_mean"] == pytest.approx((kl0 + kl1) / 2)
    assert m["top1"] == pytest.approx(0.5)  # position 0's argmax moved from 0 to 1
    assert m["dp_mean"] == pytest.approx(((0.25 - 0.5) + (0.8 - 0.6)) / 2)
    nll = -(math.log(0.25) + math.log(0.8)) / 2
    assert m["ppl"] == pytest.approx(math.exp(nll))
    assert m["ppl_ratio"] == pytest.approx(math.exp(nll + (math.log(0.5) + math.log(0.6)) / 2))


def test_identical_distributions_have_zero_divergence() -> None:
    logits = np.random.default_rng(1).normal(size=(200, 1000)).astype(np.float32)
    scores = TokenScores()
    scores.add(logits, np.arange(200) % 1000, logits.copy())
    m = scores.summary()
    assert m["kl_mean"] == 0.0 and m["kl_p99"] == 0.0 and m["top1"] == 1.0
    assert m["dp_p99"] == 0.0


def test_windows_follow_llama_perplexity() -> None:
    tokens = list(range(100, 135))
    windows = split_windows(tokens, 8, None, bos=1)
    assert len(windows) == 4  # 35 // 8; the tail is not scored
    assert [int(w[0]) for w in windows] == [1, 1, 1, 1]  # BOS replaces each first token
    assert windows[1].tolist()[1:] == list(range(109, 116))
    assert len(split_windows(tokens, 8, 2, bos=None)) == 2
    assert split_windows(tokens, 8, 2, bos=None)[1].tolist() == list(range(108, 116))
    with pytest.raises(ValidationError, match="fewer than one window") as info:
        split_windows(tokens[:7], 8, None, bos=None)
    assert info.value.param == "data"


def test_gate_parse_and_verdict() -> None:
    gate = parse_gate("kl_mean<0.05, ppl_ratio <= 1.05,top1>=0.9")
    assert gate.needs_ref
    ok = gate.verdict({"kl_mean": 0.01, "ppl_ratio": 1.05, "top1": 0.95})
    assert ok["passed"] and all(c["passed"] for c in ok["checks"])
    bad = gate.verdict({"kl_mean": 0.2, "ppl_ratio": 1.01, "top1": 0.95})
    assert not bad["passed"]
    assert [c["metric"] for c in bad["checks"] if not c["passed"]] == ["kl_mean"]
    assert not parse_gate("ppl<30").needs_ref


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("kl_mean<", "cannot read"),
        ("kl_mean=0.1", "cannot read"),
        ("loss<1", "unknown gate metric"),
        ("kl_mean<0.1,,", "cannot read"),
        ("kl_mean<1e", "not a number"),
    ],
)
def test_bad_gates_are_named(expr: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        parse_gate(expr)
    assert info.value.param == "gate"
