"""What the benchmark sends: random prompts, multi-turn chats, or requests from a JSONL file.

Lengths are in words of common English (or of `--text-file`), which most BPE tokenizers
encode as about one token each; the report gives the token counts the server actually
counted (its `usage`), so no tokenizer is needed on the client side.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import ValidationError

# Short, frequent words: one token each in the vocabularies of SmolLM2, Llama, Qwen and GPT.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or had not but have one their they all has been when who more also there can "
    "after first other new two time would about into some over only most made up out year "
    "city many may people these world state such then well school war part between under "
    "while both her each three back long great later life during same team film well water "
    "house day music work place end land home body line light road game night book power "
    "story river black white green small large early still found against since name known"
)
_WORDS = _WORD_TEXT.split()


@dataclass(slots=True, frozen=True)
class LengthRange:
    """An inclusive range of lengths, parsed from `128` or `64:256`."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, param: str) -> LengthRange:
        low_text, _, high_text = text.partition(":")
        try:
            low = int(low_text)
            high = int(high_text) if high_text else low
        except ValueError:
            raise ValidationError(
                f"bad {param} {text!r}: give N or LOW:HIGH, e.g. 128 or 64:256", param=param
            ) from None
        if low < 1 or high < low:
            raise ValidationError(
                f"bad {param} {text!r}: need 1 <= LOW <= HIGH", param=param
            ) from None
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class TextSource:
    """Draws word sequences from a seed: random common words, or slices of a text file."""

    def __init__(self, rng: random.Random, text_file: Path | None = None):
        self._rng = rng
        self._words: list[str] = list(_WORDS)
        self._contiguous = False
        if text_file is not None:
            try:
                words = text_file.read_text(encoding="utf-8", errors="replace").split()
            except OSError as exc:
                raise ValidationError(
                    f"cannot read text file {text_file}: {exc.strerror}", param="text_file"
                ) from None
            if len(words) < 16:
                raise ValidationError(
                    f"text file {text_file} has {len(words)} words; need at least 16",
                    param="text_file",
                )
            self._words, self._contiguous = words, True

    def words(self, n: int) -> str:
        if self._contiguous:  # a slice of real text, wrapping around the end
            start = self._rng.randrange(len(self._words))
            picked = [self._words[(start + i) % len(self._words)] for i in range(n)]
        else:
            picked = self._rng.choices(self._words, k=n)
        return " ".join(picked)


@dataclass(slots=True)
class Conversation:
    """A chat: a system prompt and user turns; each turn resends the whole history."""

    system: str | None
    user_turns: list[str]
    max_tokens: list[int]  # per turn; its length is the number of requests
    body: dict[str, Any] | None = None  # file workload: the request as given (one turn)


@dataclass(slots=True)
class Workload:
    """A list of conversations; a single request is a one-turn conversation."""

    name: str
    conversations: list[Conversation]
    endpoint: str = "chat/completions"  # or "completions" for prompt requests

    @property
    def requests(self) -> int:
        return sum(len(c.max_tokens) for c in self.conversations)


def random_workload(
    requests: int, input_len: LengthRange, output_len: LengthRange, seed: int, text: Path | None
) -> Workload:
    rng = random.Random(seed)
    source = TextSource(rng, text)
    return Workload(
        "random",
        [
            Conversation(None, [source.words(input_len.draw(rng))], [output_len.draw(rng)])
            for _ in range(requests)
        ],
    )


def chat_workload(
    conversations: int,
    turns: int,
    system_len: int,
    input_len: LengthRange,
    output_len: LengthRange,
    seed: int,
    text: Path | None,
) -> Workload:
    """Conversations sharing one system prompt (as a deployment's would), each `turns` long."""
    rng = random.Random(seed)
    source = TextSource(rng, text)
    system = source.words(system_len) if system_len > 0 else None
    return Workload(
        "chat",
        [
            Conversation(
                system,
                [source.words(input_len.draw(rng)) for _ in range(turns)],
                [output_len.draw(rng) for _ in range(turns)],
            )
            for _ in range(conversations)
        ],
    )


def file_workload(path: Path, requests: int | None, default_max_tokens: int) -> Workload:
    """JSONL, one request per line: {"messages": [...]} or {"prompt": "..."}, plus any fields
    of the request body ("max_tokens", "temperature", ...). Lines are reused in order to reach
    `requests`; all lines must be of one kind."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}", param="file") from None
    bodies = [_file_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not bodies:
        raise ValidationError(f"{path} holds no requests", param="file")
    kinds = {"messages" in b for b in bodies}
    if len(kinds) > 1:
        raise ValidationError(
            f"{path} mixes chat ('messages') and completion ('prompt') lines", param="file"
        )
    count = requests or len(bodies)
    conversations = []
    for i in range(count):
        body = dict(bodies[i % len(bodies)])
        max_tokens = int(body.pop("max_tokens", default_max_tokens))
        conversations.append(Conversation(None, [], [max_tokens], body=body))
    return Workload("file", conversations, "chat/completions" if True in kinds else "completions")


def _file_line(path: Path, number: int, line: str) -> dict[str, Any]:
    where = f"{path}:{number}"
    try:
        body = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{where}: not JSON ({exc.msg})", param="file") from None
    if not isinstance(body, dict):
        raise ValidationError(f"{where}: expected a JSON object", param="file")
    if not isinstance(body.get("messages"), list) and not isinstance(body.get("prompt"), str):
        raise ValidationError(
            f"{where}: needs 'messages' (a list) or 'prompt' (a string)", param="file"
        )
    max_tokens = body.get("max_tokens", 1)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValidationError(f"{where}: max_tokens must be a positive integer", param="file")
    body.pop("stream", None)  # the benchmark always streams
    return body
