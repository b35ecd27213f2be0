"""The prefix cache: which KV sequence a request runs in, and how much of it is already computed.

The unit of residency is the sequence (one per `--parallel` slot; with the split layout each
is its own KV stream). A slot is either owned by a running request or free; a free slot keeps
the tokens of its last owner resident until it is claimed again. When a request is admitted:

1. Match its tokens against every slot: free slots against their cached tokens, running slots
   against the tokens computed before this step's batch. `best` is the longest match.
2. Each free slot could serve it in place (keeping its own match, dropping the rest) or, when
   another slot matches at least `COPY_COST` tokens more, by first copying that slot's sequence
   (llama.cpp's `seq_cp`: a buffer copy between split streams, shared cells in one pool) and
   dropping what lies beyond `best`.
3. The slot chosen is, first, one whose cache is not lost (empty, or all but `COPY_COST`
   tokens a prefix of the request) reusing the most (copies discounted by `COPY_COST`); failing
   that, the least recently used. So a conversation's next turn returns to its own slot, a new
   conversation copies the shared system prompt into an empty slot, and when every slot holds
   another conversation the least recently used one is overwritten (evicted).

4. If a running request is still computing a prompt that shares at least `WAIT_FOR` more tokens
   with the new one than can be reused now, the new one waits (first in the queue, so arrival
   order holds) and copies that prefix when it is done: eight conversations opening with the
   same system prompt compute it once, not eight times, and the later ones start sooner.

At least `MIN_COMPUTED` tokens are always left to compute. With the cache off, a released slot
is emptied at once and every request starts from position 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgellm.engine.request import Request
from edgellm.engine.runner import KvOp

# Tokens always left to compute. One would do (its logits give the first sampled token), but
# llama.cpp's CPU attention takes another kernel for a one-row batch over 512+ cells, whose
# rounding differs: two rows keep a fully cached prompt on the same kernel as a fresh one.
MIN_COMPUTED = 2

# Tokens a copy must gain over in-place reuse to be worth a stream copy. A split-layout copy
# moves a whole stream (every layer's K and V); on a CPU that costs about as much as
# computing a few tokens, so 32 leaves a wide margin.
COPY_COST = 32

# Tokens that a prefix still being computed must add over the reusable one for a new request
# to wait for it rather than compute the prefix itself alongside.
WAIT_FOR = 64


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    start = 0
    while start < n:  # compare blocks as slices (fast in C), then find the mismatch inside one
        end = min(start + 256, n)
        if a[start:end] != b[start:end]:
            while a[start] == b[start]:
                start += 1
            return start
        start = end
    return n


@dataclass(slots=True, eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens resident while free, by position
    last_used: int = -1  # release tick, for LRU; -1: never used
    owner: Request | None = None  # the running request holding this sequence
    scope: str | None = None  # the cache scope of `cached` (its last owner's)


@dataclass(slots=True, frozen=True)
class Placement:
    """Where an admitted request runs and how many of its tokens are already computed there."""

    slot: Slot
    keep: int  # tokens resident after the KV ops; computing starts at this position
    copy_from: Slot | None = None  # make `slot` a copy of this sequence first


class PrefixCache:
    """The slots, their resident tokens, and the placement policy (module docstring)."""

    def __init__(self, n_slots: int, enabled: bool = True):
        self.enabled = enabled
        self.slots = [Slot(i) for i in range(n_slots)]
        self.cells_cached = 0  # sum of len(slot.cached) over free slots
        self.cells_evicted = 0  # cached cells dropped to make room or overwritten, since start
        self._ticks = itertools.count()

    def has_free(self) -> bool:
        return any(s.owner is None for s in self.slots)

    def place(
        self,
        tokens: Sequence[int],
        running_resident: Mapping[int, int],
        copy: bool = True,
        scope: str | None = None,
    ) -> Placement | None:
        """Choose a free slot for `tokens`; None when every slot is running. `copy=False` only
        reuses a slot's own cache (a copy's cells count twice in a shared pool). Only cells of
        the same `scope` are reused (one API key never gets another's prompt from the cache).

        `running_resident` maps the seq_id of each running slot to the tokens whose cells will
        exist before this step's batch is decoded (the batch's own cells cannot be copied yet).
        """
        free = [s for s in self.slots if s.owner is None]
        if not free:
            return None
        if not self.enabled:
            return Placement(min(free, key=lambda s: s.seq_id), keep=0)
        limit = max(0, len(tokens) - MIN_COMPUTED)
        own = {
            s.seq_id: min(common_prefix(tokens, s.cached), limit) if s.scope == scope else 0
            for s in free
        }
        source, best = None, 0
        for s in self.slots:
            if s.owner is None:
                match = own[s.seq_id]
            elif s.owner.cache_scope != scope:
                continue
            elif s.seq_id in running_resident:
                resident = running_resident[s.seq_id]
                match = min(common_prefix(tokens, s.owner.all_tokens[:resident]), limit)
            else:
                continue  # not told what is resident: do not copy from it
            if match > best and (copy or s.owner is None):
                source, best = s, match

        def rank(s: Slot) -> tuple[int, int, int, int]:
            reuse = max(own[s.seq_id], best - COPY_COST if copy else 0)
            if len(s.cached) - own[s.seq_id] <= COPY_COST:  # little of its cache is lost
                return (0, -reuse, s.last_used, s.seq_id)
            return (1, s.last_used, -reuse, s.seq_id)

        target = min(free, key=rank)
        if not copy or source is None or best - COPY_COST <= own[target.seq_id]:
            return Placement(target, keep=own[target.seq_id])
        return Placement(target, keep=best, copy_from=source)

    def pending(
        self, tokens: Sequence[int], running_resident: Mapping[int, int], scope: str | None = None
    ) -> int:
        """The longest prefix of `tokens` that a running request of `scope` is still
        computing: the length it will be resident at once that request's prompt is done."""
        limit = max(0, len(tokens) - MIN_COMPUTED)
        longest = 0
        for s in self.slots:
            if s.owner is None or s.seq_id not in running_resident:
                continue
            if s.owner.cache_scope != scope:
                continue
            match = min(common_prefix(tokens, s.owner.prompt_tokens), limit)
            if running_resident[s.seq_id] < match:
                longest = max(longest, match)
        return longest

    def claim(self, placement: Placement, request: Request) -> list[KvOp]:
        """Give the slot to `request`; returns the KV ops that make its cells match."""
        slot = placement.slot
        if placement.copy_from is not None:
            ops = [KvOp(slot.seq_id, placement.keep, copy_from=placement.copy_from.seq_id)]
        elif placement.keep < len(slot.cached):
            ops = [KvOp(slot.seq_id, placement.keep)]
        else:
            ops = []
        self.cells_cached -= len(slot.cached)
        self.cells_evicted += len(slot.cached) - (0 if placement.copy_from else placement.keep)
        slot.cached = []
        slot.owner = request
        slot.scope = request.cache_scope
        return ops

    def release(self, slot: Slot, resident: list[int]) -> list[KvOp]:
        """The owner is done with `slot`; keep `resident` (its computed tokens) cached."""
        slot.owner = None
        slot.last_used = next(self._ticks)
        if self.enabled and resident:
            slot.cached = resident
            self.cells_cached += len(resident)
            return []
        return [KvOp(slot.seq_id, keep=0)]

    def evict_lru(self, spare: set[int]) -> KvOp | None:
        """Empty the least recently used cached slot not in `spare`; None if there is none."""
        cached = [s for s in self.slots if s.owner is None and s.cached and s.seq_id not in spare]
        if not cached:
            return None
        slot = min(cached, key=lambda s: s.last_used)
        self.cells_cached -= len(slot.cached)
        self.cells_evicted += len(slot.cached)
        slot.cached = []
        return KvOp(slot.seq_id, keep=0)

    def evictable(self, spare: set[int]) -> int:
        """Cells that `evict_lru` could free, sparing the slots in `spare`."""
        return sum(len(s.cached) for s in self.slots if s.owner is None and s.seq_id not in spare)

    def drop_all(self) -> list[KvOp]:
        """Forget every cached sequence (after an engine error the cells are not trusted)."""
        ops = []
        while (op := self.evict_lru(set())) is not None:
            ops.append(op)
        return ops
