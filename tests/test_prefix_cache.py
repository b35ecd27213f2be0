"""Prefix cache tests on the real Scheduler/Engine with a scripted runner whose "model" hashes the
whole resident sequence: any wrong reused cell changes the output or trips its position check."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.engine import Engine, Request, SamplingParams, SchedulerConfig
from edgellm.engine.prefix_cache import COPY_COST, MIN_COMPUTED, WAIT_FOR, common_prefix
from tests.fakes import ScriptedRunner

SYSTEM = [3 + i % 19 for i in range(80)]  # a shared "system prompt", longer than COPY_COST


def make_engine(
    cache: bool, running: int = 4, n_ctx: int = 512, split: bool = False, batch: int = 32
) -> tuple[Engine, ScriptedRunner]:
    seq_cells = n_ctx // running if split else None
    runner = ScriptedRunner(n_ctx=n_ctx, rule="context", seq_cells=seq_cells)
    config = SchedulerConfig(
        n_ctx=n_ctx,
        max_running=running,
        max_batch_tokens=batch,
        max_queue=64,
        seq_cells=seq_cells,
        prefix_cache=cache,
    )
    return Engine(runner, runner, config), runner


def greedy(rid: str, prompt: list[int], max_tokens: int = 6) -> Request:
    return Request(rid, list(prompt), SamplingParams(temperature=0, max_tokens=max_tokens))


def run(engine: Engine, requests: list[Request], abort: dict[str, int] | None = None) -> list[str]:
    """Submit all and step until they finish (aborting `abort[rid]` after that many steps)."""
    for r in requests:
        engine.add_request(r)
    return step_until_done(engine, requests, abort)


def step_until_done(
    engine: Engine, requests: list[Request], abort: dict[str, int] | None = None
) -> list[str]:
    texts = {r.request_id: "" for r in requests}
    for step in range(10_000):
        if all(r.status.finished for r in requests):
            return [texts[r.request_id] for r in requests]
        for rid, at in (abort or {}).items():
            if at == step:
                engine.abort(rid)
        for out in engine.step():
            if out.request_id in texts:
                texts[out.request_id] += out.text
    raise AssertionError("engine did not finish")


def tokens(text: str) -> list[int]:
    return [ord(c) - ord("a") for c in text]


def chat(engine: Engine, questions: list[list[int]], prefix: str = "") -> list[Request]:
    """One conversation, turn by turn: each prompt resends the history with the real replies."""
    history = list(SYSTEM)
    done = []
    for i, question in enumerate(questions):
        history += question
        request = greedy(f"{prefix}t{i}", history)
        (reply,) = run(engine, [request])
        history += [*tokens(reply), 1]  # like a template's end-of-turn marker
        done.append(request)
    return done


def test_common_prefix_blocks_and_edges() -> None:
    a = list(range(1000))
    assert common_prefix(a, a) == 1000
    assert common_prefix(a, a[:300]) == 300
    assert common_prefix(a, [*a[:700], -1]) == 700
    assert common_prefix([], a) == 0
    assert common_prefix([5], [6]) == 0


@given(st.lists(st.integers(0, 3), max_size=600), st.lists(st.integers(0, 3), max_size=600))
def test_common_prefix_matches_a_plain_loop(a: list[int], b: list[int]) -> None:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix(a, b) == n


def test_multi_turn_chat_reuses_history_and_output_is_unchanged() -> None:
    questions = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    on, _ = make_engine(cache=True)
    off, _ = make_engine(cache=False)
    with_cache, without = chat(on, questions), chat(off, questions)
    assert [r.output_tokens for r in with_cache] == [r.output_tokens for r in without]
    for previous, turn in itertools.pairwise(with_cache):
        # everything computed last turn is resident: prompt + all but the last sampled token
        assert turn.num_cached_tokens == previous.num_tokens - 1
    assert all(r.num_cached_tokens == 0 for r in without)
    stats = on.scheduler.stats()
    assert stats.prompt_tokens_reused == sum(r.num_cached_tokens for r in with_cache)
    prompts = sum(len(r.prompt_tokens) for r in with_cache)
    assert stats.prompt_tokens_computed == prompts - stats.prompt_tokens_reused
    assert stats.hit_rate == stats.prompt_tokens_reused / prompts
    assert off.scheduler.stats().hit_rate == 0.0


def test_new_conversation_copies_the_system_prompt_and_keeps_the_other_cached() -> None:
    engine, runner = make_engine(cache=True)
    question = [2 + i % 24 for i in range(COPY_COST + 8)]  # losing it would cost > a copy
    (first,) = chat(engine, [question], prefix="a")
    b = greedy("b", [*SYSTEM, 9, 9])
    run(engine, [b])
    (copy,) = [op for batch in runner.batches for op in batch.kv_ops if op.copy_from is not None]
    assert (copy.copy_from, copy.seq_id, copy.keep) == (0, 1, len(SYSTEM))
    assert b.num_cached_tokens == len(SYSTEM)
    # conversation a's cache survived: its next turn reuses all of it
    a2 = greedy("a2", [*first.all_tokens[:-1], first.output_tokens[-1], 1, 4])
    run(engine, [a2])
    assert a2.num_cached_tokens == first.num_tokens - 1


def test_identical_prompt_keeps_two_tokens_to_compute() -> None:
    engine, _runner = make_engine(cache=True)
    prompt = [*SYSTEM, 4, 5]
    first, second = greedy("x", prompt), greedy("y", prompt)
    run(engine, [first])
    run(engine, [second])
    assert second.num_cached_tokens == len(prompt) - MIN_COMPUTED
    assert second.output_tokens == first.output_tokens


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    split=st.booleans(),
    running=st.integers(1, 4),
    n_ctx=st.sampled_from([160, 256, 512]),
)
def test_prefixes_cut_anywhere_give_the_same_output_as_no_cache(
    seed: int, split: bool, running: int, n_ctx: int
) -> None:
    """Requests sharing prefixes cut at random positions, several at once, under a small cell
    budget (evictions, copies from running sequences, preemption in the pool): same output."""
    rng = random.Random(seed)
    base = [rng.randrange(2, 26) for _ in range(120)]
    cap = (n_ctx // running if split else n_ctx) - 8
    waves = []
    for w in range(3):
        wave = []
        for i in range(rng.randint(1, 5)):
            cut = rng.randint(0, min(len(base), cap - 8))
            suffix = [rng.randrange(2, 26) for _ in range(rng.randint(1, 6))]
            prompt = (base[:cut] + suffix)[: cap - 6]
            wave.append((f"w{w}r{i}", prompt))
        waves.append(wave)
    outputs = {}
    for cache in (True, False):
        engine, _ = make_engine(cache, running=running, n_ctx=n_ctx, split=split, batch=24)
        outputs[cache] = [run(engine, [greedy(rid, p) for rid, p in wave]) for wave in waves]
    assert outputs[True] == outputs[False]


def test_a_running_sequence_is_never_evicted() -> None:
    """A small pool: a long generation runs while many others come and go; the cache evicts
    finished sequences' cells but never the running one's (the runner checks every position)."""
    engine, runner = make_engine(cache=True, running=3, n_ctx=180, batch=64)
    long = greedy("long", [*SYSTEM[:40], 2], max_tokens=100)
    engine.add_request(long)
    engine.step()
    held = long.seq_id
    for wave in range(6):
        others = [greedy(f"o{wave}{i}", [wave + 2] * 10 + [i + 2] * 10, 4) for i in range(2)]
        run(engine, others)
        assert long.status.name == "RUNNING"
        assert long.num_preemptions == 0
    touched = {op.seq_id for batch in runner.batches[1:] for op in batch.kv_ops}
    assert held not in touched
    evictions = [op for batch in runner.batches for op in batch.kv_ops if op.keep == 0]
    assert evictions, "the budget was meant to force evictions"
    assert engine.scheduler.stats().cells_evicted >= sum(len(b.kv_ops) for b in runner.batches[1:])
    step_until_done(engine, [long])
    alone, _ = make_engine(cache=False, running=3, n_ctx=180)
    expected = greedy("long", long.prompt_tokens, max_tokens=100)
    run(alone, [expected])
    assert long.output_tokens == expected.output_tokens


def test_abort_of_a_request_sharing_a_prefix_leaves_the_others_correct() -> None:
    def scenario(cache: bool) -> tuple[list[str], Engine]:
        engine, _ = make_engine(cache=cache, batch=128)
        run(engine, [greedy("warm", [*SYSTEM, 2], 3)])  # SYSTEM is now cached
        a, b = greedy("a", [*SYSTEM, 4, 4], 30), greedy("b", [*SYSTEM, 5], 30)
        texts = run(engine, [a, b], abort={"a": 4})
        after = greedy("c", [*SYSTEM, 4, 4, 7], 8)  # matches what the aborted one computed
        return [*texts, *run(engine, [after])], engine

    with_cache, engine = scenario(True)
    without, _ = scenario(False)
    assert with_cache[1:] == without[1:]
    assert len(with_cache[0]) < 30  # "a" really was cut short
    assert engine.scheduler.stats().prompt_tokens_reused >= 3 * len(SYSTEM)


def test_cache_off_never_copies_or_reuses() -> None:
    engine, runner = make_engine(cache=False)
    chat(engine, [[5], [6], [7]])
    run(engine, [greedy("x", [*SYSTEM, 5])])
    ops = [op for batch in runner.batches for op in batch.kv_ops]
    assert all(op.copy_from is None and op.keep == 0 for op in ops)
    assert engine.scheduler.stats().prompt_tokens_reused == 0
    assert engine.scheduler.stats().cells_cached == 0


def test_short_shared_prefix_is_not_worth_a_copy() -> None:
    engine, runner = make_engine(cache=True)
    run(engine, [greedy("a", [*SYSTEM[: COPY_COST - 2], 2, 2, 2])])
    b = greedy("b", [*SYSTEM[: COPY_COST - 2], 9])
    run(engine, [b])
    assert all(op.copy_from is None for batch in runner.batches for op in batch.kv_ops)


def test_engine_error_drops_every_cached_sequence() -> None:
    engine, _runner = make_engine(cache=True)
    run(engine, [greedy("a", [*SYSTEM, 2]), greedy("b", [*SYSTEM[:10], 3])])
    assert engine.scheduler.stats().cells_cached > 0
    engine.fail_all("boom")
    assert engine.scheduler.stats().cells_cached == 0
    c = greedy("c", [*SYSTEM, 2])
    run(engine, [c])
    assert c.num_cached_tokens == 0


def test_requests_arriving_together_compute_a_shared_prefix_once() -> None:
    def together(cache: bool) -> tuple[list[str], Engine, ScriptedRunner]:
        engine, runner = make_engine(cache=cache, batch=128)  # room to admit two at once
        texts = run(engine, [greedy(f"r{i}", [*SYSTEM, 2 + i, 3]) for i in range(4)])
        return texts, engine, runner

    with_cache, engine, runner = together(True)
    without, _, _ = together(False)
    assert with_cache == without
    stats = engine.scheduler.stats()
    # the first computes the system prompt; the others wait for it, then copy it
    assert stats.prompt_tokens_reused == 3 * len(SYSTEM)
    copies = [op for batch in runner.batches for op in batch.kv_ops if op.copy_from is not None]
    assert len(copies) == 3 and all(op.keep == len(SYSTEM) for op in copies)


def test_a_request_waits_only_for_a_prefix_worth_it() -> None:
    engine, _ = make_engine(cache=True, batch=128)
    short = SYSTEM[: WAIT_FOR - 8]
    requests = [greedy(f"r{i}", [*short, 2 + i, 3]) for i in range(2)]
    for r in requests:
        engine.add_request(r)
    engine.step()
    assert all(r.status.name == "RUNNING" for r in requests)  # both admitted in one step


def test_one_scope_never_reuses_another_scopes_cells() -> None:
    """An API key must not learn from cached_tokens that another key sent a prompt."""
    engine, runner = make_engine(cache=True)
    a = greedy("a", [*SYSTEM, 5, 6])
    a.cache_scope = "key-a"
    run(engine, [a])
    b = greedy("b", [*SYSTEM, 7, 8])
    b.cache_scope = "key-b"
    run(engine, [b])
    assert b.num_cached_tokens == 0
    assert not any(op.copy_from is not None for batch in runner.batches for op in batch.kv_ops)
    a2 = greedy("a2", [*SYSTEM, 9, 9])
    a2.cache_scope = "key-a"
    run(engine, [a2])
    assert a2.num_cached_tokens == len(SYSTEM)  # its own key's cells still serve it


def test_a_scope_does_not_wait_for_another_scopes_prefix() -> None:
    engine, _ = make_engine(cache=True, batch=16)
    long = [*SYSTEM, *SYSTEM]
    first = greedy("a", [*long, 1])
    first.cache_scope = "key-a"
    engine.add_request(first)
    engine.step()  # a's prompt is being computed
    cache, resident = engine.scheduler.cache, {first.seq_id: first.num_computed}
    assert cache.pending([*long, 2], resident, "key-a") > WAIT_FOR  # its own key would wait
    assert cache.pending([*long, 2], resident, "key-b") == 0  # another key computes its own
