"""The scheduler: pure policy over request state, no I/O.

Algorithm (one call to `schedule()` per engine step):

1. Running requests, oldest first, each get the tokens they still lack in the KV cache:
   the rest of their prompt (chunked by the step's token budget) or, once decoding, the
   one token they sampled last step. Prefill chunks and decodes share one batch.
2. KV cells are one pool of `n_ctx` shared by all sequences. A request takes cells only as its
   tokens are computed. When a step needs more cells than are free, the newest running request
   is preempted: its cells are dropped and it goes back to the front of the queue, to be
   recomputed (prompt + what it generated) later. The oldest request can always make progress
   because admission guarantees `prompt + max_tokens <= n_ctx`.
3. Waiting requests are admitted in arrival order while there is a free sequence id
   (`max_running`), token budget, and free cells for their whole remaining prompt.

Invariant: `cells_used == sum(r.num_computed for r in running)`.
A chunk samples a token exactly when it ends at the request's last known token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from edgellm.engine.request import Request, RequestStatus
from edgellm.engine.runner import ScheduledChunk, SchedulerOutput
from edgellm.errors import ContextOverflow, QueueFull


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    n_ctx: int  # KV cells shared by all sequences
    max_running: int  # sequences decoding at once (`--parallel`)
    max_batch_tokens: int  # tokens per step, prefill chunks and decodes together
    max_queue: int  # requests allowed to wait beyond the free running slots
    seq_cells: int | None = None  # cells one sequence may hold (split KV streams); None: n_ctx


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    running: int
    waiting: int
    cells_used: int
    n_ctx: int


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cells_used = 0
        # Lowest ids first, so a lone request always decodes in sequence 0.
        self._free_seqs = list(range(config.max_running - 1, -1, -1))
        self._cleared_seqs: list[int] = []
        self._finished_ids: list[str] = []
        self._by_id: dict[str, Request] = {}

    # -- admission ---------------------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ContextOverflow if a request of this size could never run."""
        n_ctx = min(self.config.n_ctx, self.config.seq_cells or self.config.n_ctx)
        if prompt_len < 1:
            raise ContextOverflow("the prompt is empty", param="prompt")
        if prompt_len >= n_ctx:
            raise ContextOverflow(
                f"the prompt is {prompt_len} tokens; this server's context is {n_ctx} tokens",
                param="prompt",
            )
        if prompt_len + max_tokens > n_ctx:
            raise ContextOverflow(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"of {n_ctx} tokens; ask for at most {n_ctx - prompt_len} tokens"
            )

    def add(self, request: Request) -> None:
        self.check_fits(len(request.prompt_tokens), request.sampling.max_tokens)
        free_slots = self.config.max_running - len(self.running)
        if len(self.waiting) - free_slots >= self.config.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again shortly")
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id}")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._by_id[request.request_id] = request

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    # -- status changes ----------------------------------------------------------------------

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Move a request to a terminal status and release what it holds."""
        if request.status.finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self._finished_ids.append(request.request_id)
        del self._by_id[request.request_id]

    def abort(self, request_id: str) -> Request | None:
        request = self._by_id.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def append_token(self, request: Request, token: int) -> None:
        request.output_tokens.append(token)

    def _release(self, request: Request) -> None:
        if request.seq_id is None:
            return
        self.cells_used -= request.num_computed
        self._cleared_seqs.append(request.seq_id)
        self._free_seqs.append(request.seq_id)
        self._free_seqs.sort(reverse=True)
        request.seq_id = None
        request.num_computed = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self, request: Request) -> None:
        self.waiting.popleft()
        request.seq_id = self._free_seqs.pop()
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # -- the step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop to make room
            n = min(request.num_tokens - request.num_computed, budget)
            if n == 0 or not self._make_room(n, request):
                continue
            chunks.append(self._chunk(request, n))
            budget -= n
        while self.waiting and budget > 0 and self._free_seqs:
            request = self.waiting[0]
            remaining = request.num_tokens - request.num_computed
            if self.free_cells < remaining + 1:
                break
            self._admit(request)
            n = min(remaining, budget)
            chunks.append(self._chunk(request, n))
            budget -= n
        out = SchedulerOutput(chunks, self._cleared_seqs, self._finished_ids)
        self._cleared_seqs, self._finished_ids = [], []
        return out

    @property
    def free_cells(self) -> int:
        return self.config.n_ctx - self.cells_used

    def _make_room(self, n: int, request: Request) -> bool:
        """Preempt the newest running requests until `n` cells are free; False if `request` went."""
        while self.free_cells < n:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        start = request.num_computed
        prompt_len = len(request.prompt_tokens)
        if start >= prompt_len:  # decoding: no copy of the prompt
            tokens = request.output_tokens[start - prompt_len : start - prompt_len + n]
        elif start + n <= prompt_len:
            tokens = request.prompt_tokens[start : start + n]
        else:  # recomputing after preemption: prompt tail + generated tokens
            tokens = request.all_tokens[start : start + n]
        request.num_computed += n
        self.cells_used += n
        assert request.seq_id is not None  # invariant: RUNNING requests hold a sequence
        return ScheduledChunk(
            request_id=request.request_id,
            seq_id=request.seq_id,
            tokens=tokens,
            start_pos=start,
            sample=request.num_computed == request.num_tokens,
            sampling=request.sampling,
        )

    # -- introspection -----------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._cleared_seqs or self._finished_ids)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            running=len(self.running),
            waiting=len(self.waiting),
            cells_used=self.cells_used,
            n_ctx=self.config.n_ctx,
        )
