"""State of one generation: its tokens, sampling parameters and status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no KV cells
    RUNNING = "running"  # owns a sequence id and the KV cells of its computed tokens
    FINISHED_STOPPED = "finished_stopped"  # EOS or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens reached
    FINISHED_ABORTED = "finished_aborted"  # client went away or cancelled
    FINISHED_ERROR = "finished_error"  # the request could not go on (its grammar, its sampler)

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASON


# The one table from a terminal status to the reason clients see.
_FINISH_REASON: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


def finish_reason(status: RequestStatus) -> str | None:
    return _FINISH_REASON.get(status)


# Temperatures below this sample greedily: dividing logits by a smaller one overflows them.
GREEDY_BELOW = 1e-3
# logit_bias values are clamped to this range (OpenAI's); larger ones add nothing but overflow.
MAX_LOGIT_BIAS = 100.0


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Per-request sampling; applied by the backend's sampler chain."""

    temperature: float = 1.0  # below GREEDY_BELOW (0 included) means greedy
    top_p: float = 1.0  # nucleus mass kept; 1 disables
    top_k: int = 0  # tokens kept; 0 disables
    min_p: float = 0.0  # relative probability floor; 0 disables
    seed: int | None = None  # None: a random seed per request
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # 1 disables
    penalty_last_n: int = 64  # tokens of history the penalties look at
    max_tokens: int = 16  # generated tokens, at most
    stop: tuple[str, ...] = ()  # strings that end generation; never shown to the client
    ignore_eos: bool = False
    grammar: str | None = None  # GBNF (root rule "root") the output must follow
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit, |b| <= 100)


@dataclass(slots=True, eq=False)
class Request:
    """One generation. Only the scheduler changes `status`, `seq_id` and `num_computed`."""

    request_id: str
    prompt_tokens: list[int]  # [P] token ids of the rendered prompt
    sampling: SamplingParams
    arrival_time: float = 0.0  # monotonic seconds, for FCFS order and latency stats
    tenant: str | None = None  # who asks (an API key's name), for fair queueing; None: anyone
    cache_scope: str | None = None  # prefix-cache partition: reuse only cells of the same scope
    status: RequestStatus = RequestStatus.WAITING
    output_tokens: list[int] = field(default_factory=list)  # [G] sampled so far
    seq_id: int | None = None  # KV sequence while RUNNING, else None
    num_computed: int = 0  # tokens of `all_tokens` whose KV cells exist in `seq_id`
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found resident at first admission (prefix cache)
    admitted_time: float | None = None  # monotonic seconds: first given a sequence (queue time)
    awaiting_token: bool = False  # its next token is being chosen (possibly over several steps)

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_tokens + self.output_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_tokens) + len(self.output_tokens)

    @property
    def max_total_tokens(self) -> int:
        """Cells this request can ever hold: the admission bound."""
        return len(self.prompt_tokens) + self.sampling.max_tokens
