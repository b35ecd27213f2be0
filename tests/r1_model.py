# ruff: noqa: RUF001  (R1's turn markers use the fullwidth bar on purpose)
"""A DeepSeek-R1-style model for tests: the default model's GGUF rewritten with the `gguf`
package so that its chat template is in R1's format and `<think>` / `</think>` are tokens of
its vocabulary (two unused special tokens renamed, typed user-defined as in R1's tokenizer).
The weights are unchanged, so what it writes is SmolLM2's; the tests check the parsing."""

from __future__ import annotations

from pathlib import Path

import gguf

from edgellm.compress.convert import copy_metadata
from tests.gguf_tools import write_tensors

# R1's conversation format (written for these tests): system text first, user and assistant
# turns marked by R1's markers, earlier answers stripped of their reasoning, and `<think>`
# opened at the start of the answer when `open_think` is set (R1's later templates do this).
_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + m['content'] %}{% endif %}{% endfor %}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set answer = m['content'] %}"
    "{% if '</think>' in answer %}{% set answer = answer.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ answer }}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{{ OPEN }}{% endif %}"
)
THINK_IDS = {8: "<think>", 9: "</think>"}  # <issue_start>, <issue_comment> in SmolLM2


def r1_template(open_think: bool) -> str:
    return _TEMPLATE.replace("{{ OPEN }}", "<think>\n" if open_think else "")


def write_r1_model(source: Path, dest: Path, *, open_think: bool = True) -> Path:
    reader = gguf.GGUFReader(source, "r")
    writer = gguf.GGUFWriter(dest, str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents()))
    tokens = reader.fields[gguf.Keys.Tokenizer.LIST].contents()
    kinds = reader.fields[gguf.Keys.Tokenizer.TOKEN_TYPE].contents()
    copy_metadata(
        reader,
        writer,
        {
            gguf.Keys.Tokenizer.CHAT_TEMPLATE: r1_template(open_think),
            gguf.Keys.Tokenizer.LIST: [THINK_IDS.get(i, text) for i, text in enumerate(tokens)],
            gguf.Keys.Tokenizer.TOKEN_TYPE: [
                gguf.TokenType.USER_DEFINED if i in THINK_IDS else kind
                for i, kind in enumerate(kinds)
            ],
        },
    )
    write_tensors(writer, [(t, t.data) for t in reader.tensors])
    return dest
