"""`edgellm bench` statistics against hand-computed cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from edgellm.bench.stats import (
    RequestRecord,
    Summary,
    meets_slo,
    parse_slo,
    percentile,
    tpot,
)
from edgellm.bench.workloads import LengthRange, chat_workload, file_workload, random_workload
from edgellm.errors import ValidationError


def test_percentile_by_hand() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4; rank = 3 q / 100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5  # rank 1.5: halfway between 2 and 3
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_agrees_with_numpy() -> None:
    rng = random.Random(3)
    for n in (1, 2, 5, 17, 100):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (1, 50, 90, 99):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_tpot_by_hand() -> None:
    # 11 tokens: the first at 0.2 s, the last at 1.2 s -> 10 gaps of 0.1 s
    assert tpot(1.2, 0.2, 11) == pytest.approx(0.1)
    assert tpot(1.2, 0.2, 1) is None  # one token: no time per output token
    assert tpot(None, 0.2, 11) is None


def record(ttft: float, e2e: float, out: int, error: str | None = None) -> RequestRecord:
    if error:
        return RequestRecord(index=0, start=0.0, error=error)
    return RequestRecord(index=0, start=0.0, ttft=ttft, e2e=e2e, output_tokens=out, input_tokens=10)


def test_summary_by_hand() -> None:
    records = [
        record(0.1, 1.1, 11),  # tpot 0.1
        record(0.3, 2.3, 21),  # tpot 0.1
        record(0.2, 0.2, 1),  # no tpot
        record(0, 0, 0, error="http_503"),
        record(0, 0, 0, error="http_503"),
        record(0, 0, 0, error="connect"),
    ]
    records[0].itls = [0.1] * 10
    s = Summary.of(records, duration=4.0, slo={"ttft": 0.25})
    assert (s.requests, s.completed, s.failed) == (6, 3, 3)
    assert s.errors == {"http_503": 2, "connect": 1}
    assert s.output_tokens == 33 and s.input_tokens == 30
    assert s.request_throughput == pytest.approx(0.75)
    assert s.output_throughput == pytest.approx(33 / 4)
    assert s.total_token_throughput == pytest.approx(63 / 4)
    assert s.goodput == pytest.approx(2 / 4)  # ttft 0.1 and 0.2 meet 250 ms; 0.3 does not
    # ttft sorted 0.1 0.2 0.3: p90 at rank 1.8 -> 0.28, p99 at rank 1.98 -> 0.298
    assert (s.ttft.mean, s.ttft.p50, s.ttft.p90, s.ttft.p99) == pytest.approx(
        (0.2, 0.2, 0.28, 0.298)
    )
    assert s.tpot.mean == pytest.approx(0.1) and s.decode_tokens_per_s == pytest.approx(10.0)
    assert s.itl.p99 == pytest.approx(0.1)
    assert Summary.of([], 0.0).request_throughput == 0.0


def test_goodput_counts_every_target() -> None:
    fast = record(0.1, 1.1, 11)  # tpot 0.1
    slow_decode = record(0.1, 5.1, 11)  # tpot 0.5
    assert meets_slo(fast, {"ttft": 0.2, "tpot": 0.2, "e2e": 2.0})
    assert not meets_slo(slow_decode, {"ttft": 0.2, "tpot": 0.2})
    assert not meets_slo(slow_decode, {"e2e": 2.0})
    assert meets_slo(record(0.1, 0.1, 1), {"tpot": 0.01})  # no tpot to miss
    assert not meets_slo(record(0, 0, 0, error="timeout"), {"ttft": 10.0})


def test_parse_slo() -> None:
    assert parse_slo("ttft=500ms, tpot=50, e2e=2s") == {
        "ttft": 0.5,
        "tpot": pytest.approx(0.05),
        "e2e": 2.0,
    }
    for bad in ("ttft", "latency=5ms", "ttft=fast", "ttft=-5ms", "ttft=0", "tpot=infs"):
        with pytest.raises(ValidationError, match="bad SLO"):
            parse_slo(bad)


def test_length_ranges() -> None:
    assert LengthRange.parse("128", "input_len") == LengthRange(128, 128)
    assert LengthRange.parse("64:256", "input_len") == LengthRange(64, 256)
    for bad in ("0", "x", "10:5", "5:x", ""):
        with pytest.raises(ValidationError, match="input_len"):
            LengthRange.parse(bad, "input_len")


def test_workloads_are_reproducible_from_the_seed() -> None:
    a = random_workload(5, LengthRange(10, 20), LengthRange(4, 8), seed=1, text=None)
    b = random_workload(5, LengthRange(10, 20), LengthRange(4, 8), seed=1, text=None)
    c = random_workload(5, LengthRange(10, 20), LengthRange(4, 8), seed=2, text=None)
    assert a == b and a != c
    assert all(10 <= len(conv.user_turns[0].split()) <= 20 for conv in a.conversations)
    assert all(4 <= conv.max_tokens[0] <= 8 for conv in a.conversations)
    chat = chat_workload(3, 4, 50, LengthRange(5, 5), LengthRange(7, 7), seed=0, text=None)
    assert chat.requests == 12
    systems = {conv.system for conv in chat.conversations}
    assert len(systems) == 1 and len(next(iter(systems)).split()) == 50  # type: ignore[union-attr]


def test_file_workload(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "top_k": 3}\n\n'
        '{"messages": [{"role": "user", "content": "yo"}], "stream": false}\n'
    )
    w = file_workload(path, requests=3, default_max_tokens=9)
    assert w.requests == 3 and w.endpoint == "chat/completions"
    assert [c.max_tokens for c in w.conversations] == [[5], [9], [5]]
    assert w.conversations[0].body == {"messages": [{"role": "user", "content": "hi"}], "top_k": 3}
    assert "stream" not in (w.conversations[1].body or {})
    for text, message in (
        ("not json\n", ":1: not JSON"),
        ("[1]\n", "expected a JSON object"),
        ('{"x": 1}\n', "needs 'messages'"),
        ('{"prompt": "a", "max_tokens": 0}\n', "max_tokens must be"),
        ('{"prompt": "a"}\n{"messages": []}\n', "mixes"),
        ("\n", "holds no requests"),
    ):
        path.write_text(text)
        with pytest.raises(ValidationError, match=message):
            file_workload(path, None, 9)
    with pytest.raises(ValidationError, match="cannot read"):
        file_workload(tmp_path / "missing.jsonl", None, 9)
