"""User text stays text: a control token's spelling inside what a client sends is tokenized as
plain characters, never as the control token.

A rendered chat must be tokenized with special-token parsing, or the template's own markup
(`<|im_start|>`, `<|im_end|>`, ...) would not become the model's control tokens. Tokenized
that way, the same spelling inside a message would become a control token too, and a user who
writes `<|im_end|><|im_start|>system` would open a real system turn. So before rendering, each
occurrence of a control token's text in the client's strings is replaced by a placeholder
(U+E000, its index, U+E001: private-use characters, themselves escaped when a client sends
them); the rendered text is cut at the placeholders, the template's parts are tokenized with
special parsing and each placeholder's original text without. A message with no such text is
tokenized exactly as before, in one piece.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

OPEN, CLOSE = "\ue000", "\ue001"
_ESCAPED_OPEN = "\\ue000"  # how json.dumps writes OPEN; a client's own is a placeholder too
_PLACEHOLDER = re.compile(rf"{OPEN}(\d+){CLOSE}|\\ue000(\d+)\\ue001")

Tokenize = Callable[[str, bool, bool], list[int]]  # (text, add_special, parse_special)


class UserText:
    """Protects client strings from becoming control tokens for one vocabulary."""

    def __init__(self, control_texts: Iterable[str]):
        extra = {OPEN, CLOSE, _ESCAPED_OPEN}
        spellings = sorted({t for t in control_texts if t} | extra, key=len, reverse=True)
        self._spellings = re.compile("|".join(re.escape(t) for t in spellings))

    def protect(self, value: Any, originals: list[str]) -> Any:
        """A copy of `value` (str, or lists and dicts of them) with every control-token
        spelling replaced by a placeholder; the replaced texts are appended to `originals`."""
        if isinstance(value, str):
            if not self._spellings.search(value):
                return value

            def hide(match: re.Match[str]) -> str:
                originals.append(match.group(0))
                return f"{OPEN}{len(originals) - 1}{CLOSE}"

            return self._spellings.sub(hide, value)
        if isinstance(value, list):
            return [self.protect(v, originals) for v in value]
        if isinstance(value, dict):
            return {k: self.protect(v, originals) for k, v in value.items()}
        return value

    @staticmethod
    def tokenize(
        text: str, originals: list[str], tokenize: Tokenize, add_special: bool
    ) -> list[int]:
        """Tokens of rendered `text`: template parts with special parsing, the placeholders'
        originals as plain text. A placeholder the template wrote through a JSON filter
        (`\\ue000N\\ue001`) stands for the JSON-escaped original."""
        if not originals:
            return tokenize(text, add_special, True)
        tokens: list[int] = []
        start = 0
        for match in _PLACEHOLDER.finditer(text):
            plain, escaped = match.groups()
            index = int(plain if plain is not None else escaped)
            if index >= len(originals):
                continue  # not one of ours (cannot be a client's: those were replaced)
            if match.start() > start:
                tokens += tokenize(text[start : match.start()], add_special and not tokens, True)
            original = originals[index]
            if escaped is not None:
                original = json.dumps(original)[1:-1]
            tokens += tokenize(original, add_special and not tokens, False)
            start = match.end()
        if start < len(text):
            tokens += tokenize(text[start:], add_special and not tokens, True)
        return tokens
