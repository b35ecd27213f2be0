# ruff: noqa: RUF001  (R1's turn markers use the fullwidth bar on purpose)
"""A DeepSeek-R1-style model for tests: the default model's GGUF rewritten with the `gguf`
package so that its chat template is in R1's format and `<think>` / `</think>` are tokens of
its vocabulary (two unused special tokens renamed, typed user-defined as in R1's tokenizer).
The weights are unchanged, so what it writes is SmolLM2's; the tests check the parsing."""

from __future__ import annotations

from pathlib import Path

import gguf

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
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            value = r1_template(open_think)
        elif field.name == gguf.Keys.Tokenizer.LIST:
            value = [THINK_IDS.get(i, text) for i, text in enumerate(value)]
        elif field.name == gguf.Keys.Tokenizer.TOKEN_TYPE:
            value = [
                gguf.TokenType.USER_DEFINED if i in THINK_IDS else kind
                for i, kind in enumerate(value)
            ]
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return dest
