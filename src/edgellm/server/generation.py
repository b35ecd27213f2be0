"""One running generation as the APIs see it: answer and reasoning deltas, then a final event
with tool calls, finish reason, counts and timings. Shared by the OpenAI and Ollama routes,
which differ only in how they write these events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from edgellm.engine import RequestOutput, RequestStream
from edgellm.errors import EngineError, OutputConstraintError
from edgellm.reasoning import ReasoningSplitter
from edgellm.server.models import ChatPlan
from edgellm.tools import ToolCall, ToolCallScanner

T = TypeVar("T")


@dataclass(slots=True)
class Piece:
    """New text since the last event; either part may be empty."""

    reasoning: str
    content: str


@dataclass(slots=True)
class Final:
    output: RequestOutput  # the engine's last output: counts and finish reason
    tool_calls: list[ToolCall]
    started: float  # monotonic seconds: submitted, first output, last output
    first_output: float
    ended: float

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's reason: "tool_calls" when the answer was calls."""
        if self.tool_calls and self.output.finish_reason == "stop":
            return "tool_calls"
        return self.output.finish_reason


@dataclass(slots=True)
class Collected:
    reasoning: str
    content: str
    final: Final


@dataclass(slots=True)
class Generation:
    stream: RequestStream
    plan: ChatPlan | None = None  # None: raw text, nothing taken apart
    started: float = field(default_factory=time.monotonic)

    async def events(self) -> AsyncIterator[Piece | Final]:
        plan = self.plan
        splitter = (
            ReasoningSplitter(plan.reasoning, in_reasoning=plan.in_reasoning)
            if plan is not None and plan.reasoning is not None
            else None
        )
        scanner = (
            ToolCallScanner({t.name for t in plan.tools})
            if plan is not None and plan.tools
            else None
        )
        first: float | None = None
        async for output in self.stream:
            if output.error is not None:
                error = output.error
                if isinstance(error, OutputConstraintError) and plan is not None:
                    error.param = error.param or plan.grammar_param
                raise error
            if first is None:
                first = time.monotonic()
            reasoning, content = splitter.push(output.text) if splitter else ("", output.text)
            if output.finished and splitter is not None:
                more_reasoning, more_content = splitter.flush()
                reasoning, content = reasoning + more_reasoning, content + more_content
            if scanner is not None:
                content = scanner.push(content) + (scanner.flush() if output.finished else "")
            if plan is not None and not plan.include_reasoning:
                reasoning = ""
            if reasoning or content:
                yield Piece(reasoning, content)
            if output.finished:
                calls = scanner.calls if scanner is not None else []
                yield Final(output, calls, self.started, first, time.monotonic())

    async def collect(self) -> Collected:
        reasoning: list[str] = []
        content: list[str] = []
        async for event in self.events():
            if isinstance(event, Final):
                return Collected("".join(reasoning), "".join(content), event)
            reasoning.append(event.reasoning)
            content.append(event.content)
        raise EngineError("the request ended without output")  # pragma: no cover
