"""The engine: schedule -> run -> postprocess, and its asyncio front (`AsyncEngine`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgellm.engine.request import Request, RequestStatus, finish_reason
from edgellm.engine.runner import Runner, Tokenizer
from edgellm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerStats
from edgellm.engine.text import TextStream
from edgellm.engine.turns import StepTurns
from edgellm.errors import (
    EdgeLLMError,
    EngineDown,
    EngineError,
    NotReady,
    OutputConstraintError,
)

log = logging.getLogger("edgellm.engine")


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    text: str  # new client-visible text since the previous output (may be "")
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    prompt_tokens: int  # tokens in the prompt
    completion_tokens: int  # tokens generated so far, not counting a final end-of-generation
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache, not computed
    error: EdgeLLMError | None = None  # why the request ended early (finish reason "error")
    queued_s: float | None = None  # arrival to its first admission; None while never admitted


class Engine:
    """Synchronous core; every method runs on the thread that owns the backend."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, config: SchedulerConfig):
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(config)
        self._streams: dict[str, TextStream] = {}

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)
        self._streams[request.request_id] = TextStream(request.sampling.stop)

    def abort(self, request_id: str) -> None:
        if self.scheduler.abort(request_id) is not None:
            del self._streams[request_id]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        work = self.scheduler.schedule()
        result = self.runner.execute(work)
        failed = [self._fail(rid, OutputConstraintError(why)) for rid, why in result.failed.items()]
        return failed + [self._update(rid, token) for rid, token in result.sampled.items()]

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Abort every request after an engine error, telling each client why."""
        outputs = []
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            self.abort(request.request_id)
            outputs.append(self._output(request, "", error=EngineError(message)))
        self.scheduler.drop_cache()
        return outputs

    def _fail(self, request_id: str, error: EdgeLLMError) -> RequestOutput:
        """End one request whose next token cannot be chosen."""
        request = self.scheduler.get(request_id)
        if request is None:
            raise EngineError(f"runner failed unknown request {request_id}")
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
        del self._streams[request_id]
        return self._output(request, "", error=error)

    def _update(self, request_id: str, token: int) -> RequestOutput:
        request = self.scheduler.get(request_id)
        if request is None:
            raise EngineError(f"runner sampled for unknown request {request_id}")
        self.scheduler.append_token(request, token)
        stream = self._streams[request_id]
        status: RequestStatus | None = None
        if self.tokenizer.is_eog(token) and not request.sampling.ignore_eos:
            text, status = stream.flush(), RequestStatus.FINISHED_STOPPED
        else:
            text, hit_stop = stream.push(self.tokenizer.token_to_piece(token))
            if hit_stop:
                status = RequestStatus.FINISHED_STOPPED
            elif len(request.output_tokens) >= request.sampling.max_tokens:
                text, status = text + stream.flush(), RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(request, status)
            del self._streams[request_id]
        return self._output(request, text)

    def _output(
        self, request: Request, text: str, error: EdgeLLMError | None = None
    ) -> RequestOutput:
        generated = len(request.output_tokens)
        if (
            request.status is RequestStatus.FINISHED_STOPPED
            and generated
            and (
                self.tokenizer.is_eog(request.output_tokens[-1]) and not request.sampling.ignore_eos
            )
        ):
            generated -= 1  # the end-of-generation token is not part of the completion
        return RequestOutput(
            request_id=request.request_id,
            text=text,
            finished=request.status.finished,
            finish_reason=finish_reason(request.status),
            prompt_tokens=len(request.prompt_tokens),
            completion_tokens=generated,
            cached_tokens=request.num_cached_tokens,
            error=error,
            queued_s=None
            if request.admitted_time is None
            else request.admitted_time - request.arrival_time,
        )

    def close(self) -> None:
        self.runner.close()


@dataclass(slots=True)
class _Add:
    request: Request
    accepted: concurrent.futures.Future[None]


@dataclass(slots=True)
class _Abort:
    request_id: str


class _Stop:
    pass


_Command = _Add | _Abort | _Stop


class RequestStream:
    """Outputs of one submitted request, in order. `abort()` (or leaving early) cancels it."""

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        out: asyncio.Queue[RequestOutput],
        prompt_tokens: int = 0,
    ):
        self._engine = engine
        self.request_id = request_id
        self._out = out
        self.finished = False
        # the latest output read (its counts go on an interruption's output)
        self._latest = RequestOutput(request_id, "", False, None, prompt_tokens, 0)
        self._interruption: RequestOutput | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        output = await self._out.get()
        if output is self._interruption:
            output = dataclasses.replace(
                self._latest, text="", finished=True, finish_reason="error", error=output.error
            )
        self._latest = output
        if output.finished:
            self.finished = True
            self._engine._forget(self.request_id)
        return output

    def interrupt(self, error: EdgeLLMError) -> None:
        """End the request from outside the engine (a drain that timed out): its reader gets
        the outputs already delivered, then a last one with `error`; the engine drops it."""
        if self.finished or self._interruption is not None:
            return
        self._engine.abort(self.request_id)
        self._interruption = RequestOutput(self.request_id, "", True, "error", 0, 0, error=error)
        self._out.put_nowait(self._interruption)

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._forget(self.request_id)
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Runs an `Engine` in one dedicated thread; asyncio code talks to it through queues.

    The thread builds the engine itself (`load`), so the llama.cpp context is created, used
    and freed on that one thread. There is no lock around requests: the inbox is a thread-safe
    queue drained between steps, and outputs come back with one `call_soon_threadsafe` per step.
    """

    def __init__(
        self,
        load: Callable[[], Engine],
        name: str = "edgellm-engine",
        turns: StepTurns | None = None,
    ):
        self._load = load
        self._turns = turns  # shared with the other engines of the process: steps take turns
        self.loaded_at: float | None = None  # monotonic: when the engine became ready
        self.stopped = False  # shut down (unloaded): it serves nothing any more
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loaded = threading.Event()
        self._engine: Engine | None = None
        self.load_error: BaseException | None = None
        self.failure: str | None = None  # why the engine stopped after it had loaded
        self._admit = threading.Lock()  # a submission and the engine's death do not interleave
        self._stats: SchedulerStats | None = None

    # -- asyncio side ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._loop is not None

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._engine is not None and self._loaded.is_set() and not self.stopped

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReady("the model is still loading")
        return self._engine

    def stats(self) -> SchedulerStats | None:
        return self._stats

    async def submit(self, request: Request) -> RequestStream:
        """Queue a request; raises QueueFull / ContextOverflow at once if it cannot be admitted."""
        if not self.ready:
            raise NotReady("the model is still loading")
        out: asyncio.Queue[RequestOutput] = asyncio.Queue()
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._admit:
            self.check_alive()
            self._queues[request.request_id] = out
            self._inbox.put(_Add(request, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            self._queues.pop(request.request_id, None)
            self._inbox.put(_Abort(request.request_id))  # harmless if it never got in
            raise
        return RequestStream(self, request.request_id, out, len(request.prompt_tokens))

    def check_alive(self) -> None:
        """Raise EngineDown once the engine has stopped after an internal error."""
        if self.failure is not None:
            raise EngineDown(
                f"the engine stopped after an internal error ({self.failure}); "
                "the server must be restarted"
            )

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._inbox.put(_Stop())
            self._thread.join(timeout)

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            q = self._queues.get(output.request_id)
            if q is not None:
                q.put_nowait(output)

    # -- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._engine = self._load()
        except BaseException as exc:  # reported through load_error and /ready
            self.load_error = exc
            log.error("model failed to load: %s", exc)
            self._loaded.set()
            return
        self._stats = self._engine.scheduler.stats()
        self.loaded_at = time.monotonic()
        self._loaded.set()
        try:
            self._serve(self._engine)
        finally:
            self.stopped = True
            self._engine.close()

    def _serve(self, engine: Engine) -> None:
        while True:
            for command in self._drain(block=not engine.has_work()):
                if isinstance(command, _Stop):
                    self._publish(engine.fail_all("the server is shutting down"))
                    return
                self._handle(engine, command)
            self._stats = engine.scheduler.stats()
            if not engine.has_work():
                continue
            try:
                if self._turns is None:
                    outputs = engine.step()
                else:
                    with self._turns.turn():
                        outputs = engine.step()
            except Exception as exc:
                log.exception("engine step failed; the engine stops")
                self._die(engine, f"an engine step raised {type(exc).__name__}")
                return
            self._stats = engine.scheduler.stats()
            self._publish(outputs)

    def _die(self, engine: Engine, reason: str) -> None:
        """Stop for good: every request in the engine and every submission still in the inbox
        ends with an error now, and later submissions are refused (EngineDown)."""
        with self._admit:
            self.failure = reason
            pending = self._drain(block=False)
        self._publish(engine.fail_all("internal engine error"))
        for command in pending:
            if isinstance(command, _Add):
                command.accepted.set_exception(
                    EngineDown("the engine stopped after an internal error")
                )

    def _drain(self, block: bool) -> list[_Command]:
        commands: list[_Command] = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, engine: Engine, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            engine.abort(command.request_id)
            return
        try:
            engine.add_request(command.request)
        except Exception as exc:
            command.accepted.set_exception(exc)
        else:
            command.accepted.set_result(None)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)


def describe(stats: SchedulerStats | None) -> dict[str, Any]:
    if stats is None:
        return {}
    return {
        "running": stats.running,
        "waiting": stats.waiting,
        "kv_cells_used": stats.cells_used,
        "kv_cells_cached": stats.cells_cached,
        "kv_cells_evicted": stats.cells_evicted,
        "kv_cells_total": stats.n_ctx,
        "prompt_tokens_reused": stats.prompt_tokens_reused,
        "prompt_tokens_computed": stats.prompt_tokens_computed,
        "prefix_cache_hit_rate": stats.hit_rate,
    }
