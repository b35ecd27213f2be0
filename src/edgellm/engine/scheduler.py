"""The scheduler: pure policy over request state, no I/O.

Algorithm (one call to `schedule()` per engine step):

1. Running requests, oldest first, each get the tokens they still lack in the KV cache:
   the rest of their prompt (chunked by the step's token budget) or, once decoding, the
   one token they sampled last step. Prefill chunks and decodes share one batch.
2. Waiting requests are admitted in arrival order while there is a free sequence, token
   budget, and cells for their whole remaining prompt. The prefix cache (`prefix_cache.py`)
   picks the sequence and says how many leading tokens are already resident there; only the
   rest is computed. A finished request's cells stay cached in its sequence. A request whose
   long shared prefix another running request is still computing waits for it instead.
3. Cells: with the split layout each sequence has its own stream of `seq_cells`, which
   admission guarantees is enough, so nothing else is needed. With one shared pool of `n_ctx`
   cells, cached cells count against the pool; when a step needs more cells than are free,
   the least recently used cached sequence is evicted first, and only then is the newest
   running request preempted: it goes back to the front of the queue, its computed cells left
   cached, to be resumed or recomputed later. Running requests' cells are never evicted. The
   oldest request can always make progress because `prompt + max_tokens <= n_ctx`.

Invariants: `cells_used == sum(r.num_computed for r in running)`;
`cache.cells_cached == sum(len(s.cached) for s in free slots)`.
A chunk samples a token exactly when it ends at the request's last known token.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from edgellm.engine.prefix_cache import WAIT_FOR, Placement, PrefixCache
from edgellm.engine.request import Request, RequestStatus
from edgellm.engine.runner import KvOp, ScheduledChunk, SchedulerOutput
from edgellm.errors import ContextOverflow, QueueFull


def tenant_share(max_queue: int) -> int:
    """Waiting places one tenant (API key) may hold: three quarters of the queue, so a burst
    from one key leaves room for the others' requests."""
    return max(1, max_queue * 3 // 4)


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    n_ctx: int  # KV cells in all
    max_running: int  # sequences decoding at once (`--parallel`)
    max_batch_tokens: int  # tokens per step, prefill chunks and decodes together
    max_queue: int  # requests allowed to wait beyond the free running slots
    seq_cells: int | None = None  # cells per sequence (split KV streams); None: one shared pool
    prefix_cache: bool = True  # reuse resident prefixes across requests


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    running: int
    waiting: int
    cells_used: int  # cells of running requests
    cells_cached: int  # cells kept for reuse in free sequences
    cells_evicted: int  # cached cells dropped or overwritten, since start
    n_ctx: int
    prompt_tokens_reused: int  # admitted tokens found resident, since start
    prompt_tokens_computed: int  # admitted tokens that had to be computed, since start

    @property
    def hit_rate(self) -> float | None:
        """Share of admitted prompt tokens that were reused; None before any request."""
        total = self.prompt_tokens_reused + self.prompt_tokens_computed
        return self.prompt_tokens_reused / total if total else None


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cells_used = 0
        self.cache = PrefixCache(config.max_running, enabled=config.prefix_cache)
        self._pooled = config.seq_cells is None  # cached cells compete with running ones
        self._kv_ops: list[KvOp] = []
        self._finished_ids: list[str] = []
        self._by_id: dict[str, Request] = {}
        self._resident: dict[int, int] = {}  # seq_id -> cells of running ones before the batch
        self.tokens_reused = 0
        self.tokens_computed = 0

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
        tenant = request.tenant
        if tenant is not None:
            mine = sum(1 for r in self.waiting if r.tenant == tenant)
            if mine - free_slots >= tenant_share(self.config.max_queue):
                raise QueueFull(
                    f"this key has {mine} requests waiting, its share of the queue; "
                    "try again shortly"
                )
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id}")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._by_id[request.request_id] = request

    def _next_waiting(self) -> Request:
        """The waiting request to admit next, moved to the queue's head: the oldest, unless
        it belongs to a tenant (an API key) while others wait too: then the oldest of the
        tenant with the fewest requests running, so one key's burst cannot hold every
        sequence. A preempted request, or one waiting for a shared prefix, keeps its turn."""
        head = self.waiting[0]
        if head.tenant is None or head.num_preemptions or len(self.waiting) == 1:
            return head
        running = Counter(r.tenant for r in self.running)
        chosen = min(enumerate(self.waiting), key=lambda item: (running[item[1].tenant], item[0]))[
            1
        ]
        if chosen is not head:
            self.waiting.remove(chosen)
            self.waiting.appendleft(chosen)
        return chosen

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
        request.awaiting_token = False

    def drop_cache(self) -> None:
        """Forget every cached prefix (the KV cells cannot be trusted after an engine error)."""
        self._kv_ops += self.cache.drop_all()

    def _release(self, request: Request) -> None:
        """Hand the request's sequence back; its computed cells stay cached."""
        if request.seq_id is None:
            return
        slot = self.cache.slots[request.seq_id]
        resident = request.all_tokens[: request.num_computed]
        self._kv_ops += self.cache.release(slot, resident)
        self.cells_used -= request.num_computed
        request.seq_id = None
        request.num_computed = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self, request: Request, placement: Placement) -> None:
        self.waiting.popleft()
        self._kv_ops += self.cache.claim(placement, request)
        request.seq_id = placement.slot.seq_id
        request.num_computed = placement.keep
        if request.num_preemptions == 0:
            request.num_cached_tokens = placement.keep
            request.admitted_time = time.monotonic()
        self.cells_used += placement.keep
        # its first `keep` cells are in place before this step's batch: a later admission in
        # this step may copy them (the runner applies KV ops in order, copies before the batch)
        self._resident[request.seq_id] = placement.keep
        self.tokens_reused += placement.keep
        self.tokens_computed += request.num_tokens - placement.keep
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # -- the step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        self._resident = {r.seq_id: r.num_computed for r in self.running if r.seq_id is not None}
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
        while self.waiting and budget > 0:
            request = self._next_waiting()
            scope = request.cache_scope
            placement = self.cache.place(request.all_tokens, self._resident, scope=scope)
            if placement is not None and not self._room_to_admit(request, placement):
                # a copied prefix counts twice in a shared pool and spares its source: try
                # the placement that evicts anything but its own slot
                placement = self.cache.place(
                    request.all_tokens, self._resident, copy=False, scope=scope
                )
                if placement is not None and not self._room_to_admit(request, placement):
                    placement = None
            if placement is None or self._should_wait(request, placement):
                break
            self._admit(request, placement)
            n = min(request.num_tokens - request.num_computed, budget)
            chunks.append(self._chunk(request, n))
            budget -= n
        out = SchedulerOutput(chunks, self._kv_ops, self._finished_ids)
        self._kv_ops, self._finished_ids = [], []
        return out

    @property
    def free_cells(self) -> int:
        cached = self.cache.cells_cached if self._pooled else 0  # split: cached in own streams
        return self.config.n_ctx - self.cells_used - cached

    def _make_room(self, n: int, request: Request) -> bool:
        """Evict cached cells, then preempt the newest running requests, until `n` cells are
        free; False if `request` itself was preempted."""
        while self.free_cells < n:
            op = self.cache.evict_lru(spare=set()) if self._pooled else None
            if op is not None:
                self._kv_ops.append(op)
                continue
            # never one whose token is still being chosen (it would be sampled twice)
            victim = next(r for r in reversed(self.running) if not r.awaiting_token or r is request)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _should_wait(self, request: Request, placement: Placement) -> bool:
        """True when a running request is computing a longer shared prefix (prefix_cache.py)."""
        if not self.config.prefix_cache:
            return False
        pending = self.cache.pending(request.all_tokens, self._resident, request.cache_scope)
        return pending - placement.keep >= WAIT_FOR

    def _room_to_admit(self, request: Request, placement: Placement) -> bool:
        """Make room for the request's remaining tokens and its first sampled one, evicting
        other cached sequences if needed; False (evicting nothing) if that cannot be done."""
        need = request.num_tokens - placement.keep + 1
        spare = {placement.slot.seq_id}
        if placement.copy_from is not None:
            spare.add(placement.copy_from.seq_id)
        available = self.free_cells
        if self._pooled:  # the claim turns the target's cached cells into the request's `keep`
            available += len(placement.slot.cached) - placement.keep
        if available >= need:
            return True
        if not self._pooled or available + self.cache.evictable(spare) < need:
            return False
        while available < need:
            before = self.cache.cells_cached
            op = self.cache.evict_lru(spare)
            if op is None:
                return False
            self._kv_ops.append(op)
            available += before - self.cache.cells_cached
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
        sample = request.num_computed == request.num_tokens
        request.awaiting_token = sample
        return ScheduledChunk(
            request_id=request.request_id,
            seq_id=request.seq_id,
            tokens=tokens,
            start_pos=start,
            sample=sample,
            sampling=request.sampling,
        )

    # -- introspection -----------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._kv_ops or self._finished_ids)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            running=len(self.running),
            waiting=len(self.waiting),
            cells_used=self.cells_used,
            cells_cached=self.cache.cells_cached,
            cells_evicted=self.cache.cells_evicted,
            n_ctx=self.config.n_ctx,
            prompt_tokens_reused=self.tokens_reused,
            prompt_tokens_computed=self.tokens_computed,
        )
