"""Scheduler and Engine tests with a scripted runner: the real objects, no model."""

from __future__ import annotations

import pytest

from edgellm.engine import Engine, KvOp, Request, RequestStatus, SamplingParams, SchedulerConfig
from edgellm.errors import ContextOverflow, QueueFull
from tests.fakes import ScriptedRunner


def make_engine(
    n_ctx: int = 256,
    running: int = 4,
    batch: int = 64,
    queue: int = 8,
    eos_at: int | None = None,
    cache: bool = True,
) -> tuple[Engine, ScriptedRunner]:
    runner = ScriptedRunner(n_ctx=n_ctx, eos_at=eos_at)
    config = SchedulerConfig(
        n_ctx=n_ctx,
        max_running=running,
        max_batch_tokens=batch,
        max_queue=queue,
        prefix_cache=cache,
    )
    return Engine(runner, runner, config), runner


def req(
    rid: str, prompt_len: int, max_tokens: int, stop: tuple[str, ...] = (), start: int = 1
) -> Request:
    prompt = [start + i % 20 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, stop=stop))


def run_all(engine: Engine, limit: int = 1000) -> dict[str, str]:
    texts: dict[str, str] = {}
    for _ in range(limit):
        if not engine.has_work():
            return texts
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    raise AssertionError("engine did not finish")


def test_requests_join_and_leave_mid_batch() -> None:
    engine, runner = make_engine(cache=False)
    engine.add_request(req("a", 4, 6))
    engine.step()  # a: prefill + first token
    engine.step()  # a: decode
    engine.add_request(req("b", 3, 2))
    engine.step()  # b joins while a decodes
    joined = runner.batches[-1]
    assert {c.request_id for c in joined.chunks} == {"a", "b"}
    assert [len(c.tokens) for c in joined.chunks] == [1, 3]
    engine.step()  # b's second token: b finishes and leaves
    assert engine.scheduler.get("b") is None
    engine.step()
    assert [c.request_id for c in runner.batches[-1].chunks] == ["a"]
    assert runner.batches[-1].kv_ops == [KvOp(1, keep=0)]  # b's cells freed at the next step
    run_all(engine)
    assert engine.scheduler.cells_used == 0


def test_chunked_prefill_interleaves_with_decode() -> None:
    engine, runner = make_engine(batch=16)
    engine.add_request(req("short", 2, 50))
    engine.step()
    engine.add_request(req("long", 40, 2))
    for _ in range(3):
        engine.step()
    sizes = [{c.request_id: len(c.tokens) for c in b.chunks} for b in runner.batches[1:4]]
    # every step decodes "short" while "long" prefills in chunks of the remaining budget
    assert sizes == [{"short": 1, "long": 15}, {"short": 1, "long": 15}, {"short": 1, "long": 10}]
    assert [c.sample for c in runner.batches[3].chunks] == [True, True]
    assert [c.sample for c in runner.batches[1].chunks] == [True, False]


def test_output_is_independent_of_batching() -> None:
    alone, _ = make_engine()
    alone.add_request(req("x", 5, 8))
    expected = run_all(alone)["x"]
    engine, _ = make_engine(batch=8)
    for i in range(4):
        engine.add_request(req(f"r{i}", 5 + i, 8))
    engine.add_request(req("x", 5, 8))
    assert run_all(engine)["x"] == expected


def test_queue_limit_rejects_with_queue_full() -> None:
    engine, _ = make_engine(running=2, queue=2)
    for i in range(4):  # 2 fill the free running slots, 2 wait
        engine.add_request(req(f"r{i}", 3, 4))
    with pytest.raises(QueueFull):
        engine.add_request(req("over", 3, 4))
    run_all(engine)
    engine.add_request(req("later", 3, 4))  # room again once the queue drained
    assert run_all(engine)["later"]


def test_running_bound_is_respected() -> None:
    engine, runner = make_engine(running=2, queue=10)
    for i in range(5):
        engine.add_request(req(f"r{i}", 3, 5))
    run_all(engine)
    assert max(len(b.chunks) for b in runner.batches) == 2


def test_abort_frees_cells_at_the_next_step() -> None:
    engine, runner = make_engine(cache=False)
    engine.add_request(req("keep", 4, 20))
    engine.add_request(req("drop", 4, 20))
    engine.step()
    engine.step()
    held = engine.scheduler.cells_used
    engine.abort("drop")
    assert engine.scheduler.stats().running == 1
    assert engine.scheduler.cells_used == held - 5  # 4 prompt + 1 decoded
    engine.step()
    assert runner.batches[-1].kv_ops == [KvOp(1, keep=0)]
    assert 1 not in runner.cells
    assert "drop" in runner.batches[-1].finished_requests
    assert len(run_all(engine)["keep"]) > 0


def test_abort_of_waiting_request() -> None:
    engine, _ = make_engine(running=1)
    engine.add_request(req("a", 3, 3))
    engine.add_request(req("b", 3, 3))
    engine.abort("b")
    assert [r.request_id for r in engine.scheduler.waiting] == ["a"]
    assert set(run_all(engine)) == {"a"}


def test_context_full_admission() -> None:
    engine, _ = make_engine(n_ctx=64)
    with pytest.raises(ContextOverflow) as exc:
        engine.add_request(req("big", 40, 30))
    assert exc.value.param == "max_tokens"
    with pytest.raises(ContextOverflow) as exc:
        engine.add_request(req("huge", 64, 1))
    assert exc.value.param == "prompt"
    engine.add_request(req("fits", 40, 24))  # exactly n_ctx
    assert run_all(engine)["fits"]


def test_split_streams_bound_each_request() -> None:
    runner = ScriptedRunner(n_ctx=64)
    config = SchedulerConfig(
        n_ctx=64, max_running=4, max_batch_tokens=64, max_queue=4, seq_cells=16
    )
    engine = Engine(runner, runner, config)
    with pytest.raises(ContextOverflow, match="16 tokens"):
        engine.add_request(req("big", 10, 10))
    for i in range(4):
        engine.add_request(req(f"r{i}", 8, 8))
    assert all(len(t) == 8 for t in run_all(engine).values())


def test_preemption_when_cells_run_out_recomputes_and_finishes() -> None:
    engine, _ = make_engine(n_ctx=48, running=4, batch=64)
    alone, _ = make_engine(n_ctx=48)
    alone.add_request(req("b", 10, 20, start=5))
    expected = run_all(alone)["b"]
    a, b = req("a", 10, 20), req("b", 10, 20, start=5)
    engine.add_request(a)
    engine.add_request(b)
    texts = run_all(engine)  # 2 x 30 cells > 48: one must be preempted and recomputed
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert texts["b"] == expected
    assert len(texts["a"]) == 20
    assert engine.scheduler.cells_used == 0


def test_eos_and_length_finish_reasons() -> None:
    engine, _ = make_engine(eos_at=4)
    engine.add_request(req("eos", 1, 10))  # prompt [1] -> 2, 3, 4, EOS
    engine.add_request(req("len", 1, 2, start=10))
    outs = {}
    while engine.has_work():
        for out in engine.step():
            outs[out.request_id] = out
    assert (outs["eos"].finish_reason, outs["eos"].completion_tokens) == ("stop", 3)
    assert (outs["len"].finish_reason, outs["len"].completion_tokens) == ("length", 2)


def test_stop_string_is_never_streamed() -> None:
    engine, _ = make_engine()
    # prompt ends at token 1 ("b"); generates c, d, e, f, g ...
    engine.add_request(req("s", 1, 20, stop=("def",)))
    pieces, last = [], None
    while engine.has_work():
        for out in engine.step():
            pieces.append(out.text)
            last = out
    assert "".join(pieces) == "c"
    assert all("d" not in p for p in pieces)
    assert last is not None and last.finish_reason == "stop"
    assert engine.scheduler.get("s") is None


def test_finished_request_status_is_terminal() -> None:
    engine, _ = make_engine()
    r = req("a", 2, 1)
    engine.add_request(r)
    run_all(engine)
    assert r.status is RequestStatus.FINISHED_LENGTH
    assert r.seq_id is None


def keyed(rid: str, tenant: str, max_tokens: int = 4) -> Request:
    request = req(rid, 4, max_tokens)
    request.tenant = tenant
    return request


def test_one_tenants_burst_leaves_room_in_the_queue_for_others() -> None:
    engine, _ = make_engine(running=1, queue=8)
    engine.add_request(keyed("a0", "a"))
    engine.step()  # a0 runs
    for i in range(1, 7):  # three quarters of the queue
        engine.add_request(keyed(f"a{i}", "a"))
    with pytest.raises(QueueFull):
        engine.add_request(keyed("a7", "a"))
    engine.add_request(keyed("b0", "b"))  # the rest is the others'
    anonymous = req("n0", 4, 4)
    engine.add_request(anonymous)  # no tenant: only the whole queue bounds it


def test_a_waiting_tenant_with_nothing_running_goes_first() -> None:
    engine, _ = make_engine(running=2, queue=16)
    for i in range(6):
        engine.add_request(keyed(f"a{i}", "a", max_tokens=3))
    engine.add_request(keyed("b0", "b", max_tokens=3))
    order: list[str] = []
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
        for r in engine.scheduler.running:
            if r.request_id not in order:
                order.append(r.request_id)
    # a0 takes the first sequence; the second goes to b, which has none, before a's others
    assert order[:3] == ["a0", "b0", "a1"]
