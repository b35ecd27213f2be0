"""Separating a reasoning model's thinking from its answer, incrementally.

DeepSeek-R1-style models write `<think> ... </think>` before the answer. Some chat templates
open the `<think>` themselves at the end of the prompt, so the generated text starts inside the
reasoning and only `</think>` appears in it. `ReasoningSplitter` takes the generated text in
arbitrary pieces (tokens do not respect tag boundaries) and returns reasoning and answer deltas;
text that could still be the start of a tag is held back until it is known, so reasoning never
leaks into the answer and the answer never into the reasoning.

Whitespace: leading whitespace of both parts and trailing whitespace of the reasoning are
dropped (the newlines around the tags are layout, not text).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(slots=True, frozen=True)
class ReasoningFormat:
    """How one model marks its reasoning."""

    start: str = THINK_START
    end: str = THINK_END


def detect_reasoning(chat_template: str | None, setting: str = "auto") -> ReasoningFormat | None:
    """The model's reasoning format: "on"/"off" force it; "auto" looks for the think tags in
    the chat template (DeepSeek-R1's templates strip or open `<think>` blocks)."""
    if setting == "off":
        return None
    if setting == "on" or (chat_template and THINK_END in chat_template):
        return ReasoningFormat()
    return None


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def opens_reasoning(prompt: str, fmt: ReasoningFormat) -> bool:
    """Whether the rendered prompt ends inside an opened reasoning block."""
    tail = prompt.rstrip()
    return tail.endswith(fmt.start)


class _State(enum.Enum):
    START = "start"  # nothing decided yet: a start tag may come (after whitespace)
    REASONING = "reasoning"
    ANSWER = "answer"


class ReasoningSplitter:
    """Feed generated text with `push`; end with `flush`. Both return (reasoning, answer)."""

    __slots__ = ("_answer_started", "_fmt", "_held", "_reasoning_started", "_state")

    def __init__(self, fmt: ReasoningFormat, *, in_reasoning: bool = False):
        self._fmt = fmt
        self._state = _State.REASONING if in_reasoning else _State.START
        self._held = ""
        self._reasoning_started = False  # leading whitespace is dropped until then
        self._answer_started = False

    @property
    def in_reasoning(self) -> bool:
        return self._state is _State.REASONING

    def push(self, text: str) -> tuple[str, str]:
        self._held += text
        reasoning, answer = "", ""
        while True:
            if self._state is _State.START:
                stripped = self._held.lstrip()
                if stripped.startswith(self._fmt.start):
                    self._held = stripped[len(self._fmt.start) :]
                    self._state = _State.REASONING
                    continue
                if self._fmt.start.startswith(stripped):
                    return reasoning, answer  # still possibly a start tag (or only whitespace)
                self._state = _State.ANSWER
                continue
            if self._state is _State.REASONING:
                cut = self._held.find(self._fmt.end)
                if cut >= 0:
                    reasoning += self._reasoning(self._held[:cut].rstrip())
                    self._held = self._held[cut + len(self._fmt.end) :]
                    self._state = _State.ANSWER
                    continue
                # hold a possible partial end tag and trailing whitespace (it may precede it)
                keep = partial_suffix(self._held, self._fmt.end)
                body = self._held[: len(self._held) - keep]
                safe = body.rstrip()
                reasoning += self._reasoning(safe)
                self._held = self._held[len(safe) :]
                return reasoning, answer
            answer += self._answer(self._held)
            self._held = ""
            return reasoning, answer

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state is _State.REASONING:
            return self._reasoning(held.rstrip()), ""
        return "", self._answer(held)

    def _reasoning(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text

    def _answer(self, text: str) -> str:
        if not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        return text


def split_reasoning(
    text: str, fmt: ReasoningFormat, *, in_reasoning: bool = False
) -> tuple[str, str]:
    """The whole-text form of `ReasoningSplitter`: (reasoning, answer)."""
    splitter = ReasoningSplitter(fmt, in_reasoning=in_reasoning)
    r1, a1 = splitter.push(text)
    r2, a2 = splitter.flush()
    return r1 + r2, a1 + a2
