# ruff: noqa: RUF001  (R1's turn markers use the fullwidth bar on purpose)
"""Reasoning on a real GGUF with DeepSeek-R1's conversation format (tests/r1_model.py): the
split the server returns equals the split of the raw text the same model writes, for a
template that opens `<think>` itself and one that leaves it to the model; through /v1 (whole and
streamed, official `openai` client) and /api/chat (official `ollama` client)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import ServerProcess, ollama_client, openai_client
from tests.r1_model import write_r1_model
from tests.test_reasoning import oracle

# Reasoning written in the user turn, three times: the model copies it. The bias on `</think>`
# (token 9) makes the copy keep the tag; EOS tokens are banned so it goes on after the answer.
EXAMPLE = "<think>\nhmm, easy\n</think>\nThe answer is four."
QUESTION = EXAMPLE * 3
BIAS = {"9": 10, "0": -100, "2": -100}
# A template that does not open <think>: the model must; biased so, it thinks to the end
BIAS_OPEN = {"8": 12, **BIAS}


@pytest.fixture(scope="module", params=[True, False], ids=["template-opens", "model-opens"])
def r1(
    request: pytest.FixtureRequest, model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, bool]]:
    opens = bool(request.param)
    path = write_r1_model(model_path, tmp_path_factory.mktemp("r1") / "r1.gguf", open_think=opens)
    server = ServerProcess(str(path), "--ctx", "1024", "--parallel", "2")
    yield server, opens
    server.stop()


def _raw(server: ServerProcess, opens: bool, bias: dict[str, int]) -> str:
    """The model's text for the same prompt, through /v1/completions (nothing parsed)."""
    prompt = (
        "<|im_start|><｜User｜>" + QUESTION + "<｜Assistant｜>" + ("<think>\n" if opens else "")
    )
    body = {"model": "r1", "prompt": prompt, "max_tokens": 40, "temperature": 0}
    reply = httpx.post(server.base + "/v1/completions", json={**body, "logit_bias": bias})
    return str(reply.json()["choices"][0]["text"])


def test_openai_reasoning_content_is_split_exactly(r1: tuple[ServerProcess, bool]) -> None:
    server, opens = r1
    bias = BIAS if opens else BIAS_OPEN
    raw = _raw(server, opens, bias)
    reasoning, answer = oracle(raw, opens)
    if opens:
        assert "</think>" in raw and reasoning and answer  # the test data has all three parts
    else:
        assert raw.startswith("<think>") and reasoning
    with openai_client(server) as client:
        _check_openai(client, bias, reasoning, answer)


def _check_openai(client: openai.OpenAI, bias: dict[str, int], reasoning: str, answer: str) -> None:
    ask = {
        "model": "r1",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 40,
        "temperature": 0,
        "logit_bias": bias,
    }
    whole = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    message = whole.choices[0].message
    assert message.content == answer
    assert message.reasoning_content == reasoning  # type: ignore[attr-defined]
    assert message.reasoning == reasoning  # type: ignore[attr-defined]
    streamed_reasoning, streamed_answer = "", ""
    for chunk in client.chat.completions.create(**ask, stream=True):  # type: ignore[call-overload]
        delta = chunk.choices[0].delta
        assert not (getattr(delta, "reasoning_content", None) and delta.content)
        streamed_reasoning += getattr(delta, "reasoning_content", None) or ""
        streamed_answer += delta.content or ""
    assert (streamed_reasoning, streamed_answer) == (reasoning, answer)
    hidden = client.chat.completions.create(**ask, extra_body={"include_reasoning": False})  # type: ignore[call-overload]
    assert hidden.choices[0].message.content == answer
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None


def test_ollama_chat_puts_reasoning_in_thinking(r1: tuple[ServerProcess, bool]) -> None:
    server, opens = r1
    bias = BIAS if opens else BIAS_OPEN
    reasoning, answer = oracle(_raw(server, opens, bias), opens)
    with ollama_client(server) as client:
        _check_ollama(client, bias, reasoning, answer)


def _check_ollama(client: ollama.Client, bias: dict[str, int], reasoning: str, answer: str) -> None:
    # logit_bias is an edgellm extension of Ollama's options; the client passes it through
    options = {"temperature": 0, "num_predict": 40, "repeat_penalty": 1.0, "logit_bias": bias}
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat(model="r1", messages=messages, options=options, think=True)
    assert whole.message.thinking == reasoning
    assert whole.message.content == answer
    without = client.chat(model="r1", messages=messages, options=options, think=False)
    assert without.message.thinking is None and without.message.content == answer
    thinking, content = "", ""
    for part in client.chat(
        model="r1", messages=messages, options=options, stream=True, think=True
    ):
        assert not (part.message.thinking and part.message.content)
        thinking += part.message.thinking or ""
        content += part.message.content or ""
    assert (thinking, content) == (reasoning, answer)
    generated = client.generate(model="r1", prompt=QUESTION, options=options, think=True)
    assert (generated.thinking, generated.response) == (reasoning, answer)


def test_earlier_reasoning_is_not_sent_back_to_the_model(r1: tuple[ServerProcess, bool]) -> None:
    """The R1 template drops `<think>` blocks of earlier answers; a multi-turn chat works."""
    server, _ = r1
    with openai_client(server) as client:
        _check_history(client)


def _check_history(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="r1",
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>secret plan</think>Hello!"},
            {"role": "user", "content": "Again?"},
        ],
        max_tokens=4,
    )
    assert reply.usage is not None
    short = client.chat.completions.create(
        model="r1",
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again?"},
        ],
        max_tokens=4,
    )
    assert short.usage is not None and reply.usage.prompt_tokens == short.usage.prompt_tokens
