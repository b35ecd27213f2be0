"""Write test GGUFs: a copy of a model with some string metadata replaced, or a broken file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.compress.convert import copy_metadata


def copy_with_metadata(src: Path, dst: Path, strings: dict[str, str]) -> Path:
    """A copy of `src` whose string fields `strings` are set (replaced or added)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer, {k: v for k, v in strings.items() if k in reader.fields})
    for key, value in strings.items():
        if key not in reader.fields:
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
    write_tensors(writer, [(t, t.data) for t in reader.tensors])
    return dst


def write_tensors(writer: Any, tensors: list[tuple[Any, Any]]) -> None:
    """(reader tensor, data to write) pairs, in order; the type is the reader tensor's."""
    for t, data in tensors:
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in tensors:
        writer.write_tensor_data(data)
    writer.close()


def with_more_tokens(src: Path, dst: Path, extra: int) -> Path:
    """An F16 model with `extra` tokens appended to its vocabulary (zero embedding rows):
    same text tokenization, another vocabulary size."""
    reader = gguf.GGUFReader(src)
    tokens = reader.fields[gguf.Keys.Tokenizer.LIST].contents()
    n_vocab = len(tokens)
    replace: dict[str, Any] = {
        gguf.Keys.Tokenizer.LIST: tokens + [f"<extra_{i}>" for i in range(extra)]
    }
    for key, pad in ((gguf.Keys.Tokenizer.TOKEN_TYPE, 1), (gguf.Keys.Tokenizer.SCORES, 0.0)):
        if key in reader.fields:
            replace[key] = reader.fields[key].contents() + [pad] * extra
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer, replace)
    tensors = []
    for t in reader.tensors:
        data = t.data
        if t.name == "token_embd.weight":  # [n_vocab, n_embd], F16
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and data.shape[0] == n_vocab
            data = np.concatenate([data, np.zeros((extra, data.shape[1]), dtype=data.dtype)])
        tensors.append((t, data))
    write_tensors(writer, tensors)
    return dst


def truncated_copy(src: Path, dst: Path, keep_bytes: int) -> Path:
    with src.open("rb") as f:
        dst.write_bytes(f.read(keep_bytes))
    return dst
