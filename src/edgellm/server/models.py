"""The models a server instance serves, and turning wire requests into engine requests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from edgellm.chat_template import ChatTemplate
from edgellm.engine import AsyncEngine, Request, SamplingParams, Tokenizer
from edgellm.errors import ContextOverflow, ModelNotFound, NotReady, ValidationError
from edgellm.modelfile import ModelInfo
from edgellm.server.wire import ChatCompletionRequest, CompletionRequest


@dataclass(slots=True)
class ServedModel:
    model_id: str  # the name clients send as `model`
    info: ModelInfo
    template: ChatTemplate
    engine: AsyncEngine
    max_tokens_default: int | None = None  # when a request omits max_tokens; None: rest of ctx
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.engine.tokenizer

    @property
    def n_ctx(self) -> int:
        return self.engine.engine.scheduler.config.n_ctx

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        messages = [
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": m.text(),
                **({"name": m.name} if m.name else {}),
            }
            for m in body.messages
        ]
        text = self.template.render(messages, add_generation_prompt=True)
        bos = self.template.bos_token
        return self.tokenizer.tokenize(
            text, add_special=not (bos and text.startswith(bos)), parse_special=True
        )

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt: object = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = [t for t in prompt if isinstance(t, int)]
            bad = next((t for t in tokens if not 0 <= t < self.tokenizer.n_vocab), None)
            if bad is not None:
                raise ValidationError(f"token id {bad} is outside the vocabulary", param="prompt")
            return tokens
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValidationError("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ValidationError("the prompt is empty", param="prompt")
        return self.tokenizer.tokenize(prompt, add_special=True, parse_special=True)

    def make_request(
        self, prompt: list[int], body: ChatCompletionRequest | CompletionRequest, prompt_param: str
    ) -> Request:
        n_ctx = self.n_ctx
        limit = body.token_limit
        if limit is None:
            limit = max(1, n_ctx - len(prompt))
            if self.max_tokens_default is not None:
                limit = min(limit, self.max_tokens_default)
        if len(prompt) >= n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(prompt)} tokens; the context is {n_ctx} tokens",
                param=prompt_param,
            )
        seed = None if body.seed is None else body.seed & 0xFFFFFFFF
        sampling = SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            seed=seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repeat_penalty=body.repeat_penalty,
            max_tokens=limit,
            stop=body.stop_strings(),
            ignore_eos=body.ignore_eos,
        )
        return Request(uuid.uuid4().hex, prompt, sampling, arrival_time=time.monotonic())


class ModelTable:
    def __init__(self, models: list[ServedModel]):
        self._models = {m.model_id: m for m in models}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def get(self, model_id: str) -> ServedModel:
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotFound(model_id)
        if not model.engine.ready:
            raise NotReady(f"the model '{model_id}' is still loading")
        return model
