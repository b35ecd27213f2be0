"""Chat templates from model files, rendered in jinja's sandboxed immutable environment.

A template is code shipped inside a model file, so it runs with no access to Python internals:
attribute access to dunders, mutation of lists and dicts, and unsafe callables raise
`SecurityError`. `ChatTemplate.load` renders a sample conversation once, so a template that
cannot render (or tries to escape) is refused when the model loads, not on a client's request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.errors import ModelFileError, ValidationError

# Used only when the model file carries no template (ChatML, the commonest format).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SAMPLE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "How are you?"},
]


class TemplateRaised(Exception):
    """The template called raise_exception(): the messages break the template's rules."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ModelFileError(f"the model's chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        # variables the template reads from its context, e.g. "tools", "enable_thinking"
        self.variables = frozenset(meta.find_undeclared_variables(env.parse(source)))

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders tool definitions itself."""
        return "tools" in self.variables

    @classmethod
    def load(cls, source: str | None, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """Build and trial-render a template; a failing one is a ModelFileError."""
        template = cls(source or CHATML_TEMPLATE, bos_token=bos_token, eos_token=eos_token)
        try:
            template._render(_SAMPLE, add_generation_prompt=True)
        except SecurityError as exc:
            raise ModelFileError(
                f"the model's chat template was refused: it tried an unsafe operation ({exc})"
            ) from exc
        except (jinja2.TemplateError, TemplateRaised, TypeError, ValueError) as exc:
            raise ModelFileError(f"the model's chat template cannot render a chat: {exc}") from exc
        return template

    def render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render messages to the prompt text; template errors are the client's 400. `extra`
        goes to the template's context (tools, enable_thinking)."""
        try:
            return self._render(messages, add_generation_prompt=add_generation_prompt, **extra)
        except TemplateRaised as exc:
            raise ValidationError(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
        except SecurityError as exc:
            raise ValidationError(
                "the model's chat template attempted an unsafe operation", param="messages"
            ) from exc
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise ValidationError(
                f"the chat template could not render these messages: {exc}", param="messages"
            ) from exc

    def _render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool, **extra: Any
    ) -> str:
        return self._template.render(
            **extra,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
