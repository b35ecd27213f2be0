"""The torch bridge on the real default model: its logits against llama.cpp's, GGUF -> torch ->
GGUF round trips, layer removal, and the bad inputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from edgellm.backends import load_scorer
from edgellm.compress.convert import convert, copy_metadata
from edgellm.errors import ModelFileError, ValidationError
from edgellm.evaluate.scores import log_softmax
from edgellm.modelfile import inspect_gguf
from tests.gguf_tools import write_tensors

torch = pytest.importorskip("torch")

from edgellm.compress.torch_bridge import (  # noqa: E402 - after the torch guard
    LlamaModule,
    load_module,
    remove_layers,
    save_gguf,
)

TEXT = Path(__file__).parent / "data" / "eval-text.txt"
N_TOKENS = 64


@pytest.fixture(scope="module")
def f16(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bridge") / "m.f16.gguf"
    convert(model_path, path, "f16")
    return path


def llama_cpp_logits(path: Path, text: str) -> tuple[list[int], Any]:
    """The first N_TOKENS tokens of `text` and llama.cpp's logits for every one: [T, V]."""
    scorer = load_scorer(path, N_TOKENS, threads=2)
    try:
        tokens = scorer.tokenize(text)[:N_TOKENS]
        return tokens, scorer.window_logits(tokens, 0)
    finally:
        scorer.close()


@pytest.fixture(scope="module")
def f16_reader(f16: Path) -> Any:
    return gguf.GGUFReader(f16)  # ~2 s: it parses the whole vocabulary, so once


@pytest.fixture(scope="module")
def reference(f16: Path) -> tuple[list[int], Any]:
    return llama_cpp_logits(f16, TEXT.read_text())


@pytest.fixture(scope="module")
def module(f16: Path) -> LlamaModule:
    return load_module(f16)


def torch_logits(module: LlamaModule, tokens: list[int]) -> Any:
    with torch.no_grad():
        return module(torch.tensor([tokens]))[0].numpy()  # [T, V]


def divergence(ref: Any, other: Any) -> tuple[Any, float]:
    """KL(ref || other) per token [T], and the share of tokens whose argmax agrees."""
    p, q = log_softmax(ref.astype(np.float64)), log_softmax(other.astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(-1)
    return kl, float((ref.argmax(-1) == other.argmax(-1)).mean())


def test_logits_match_llama_cpp(module: LlamaModule, reference: tuple[list[int], Any]) -> None:
    tokens, ref = reference
    assert len(tokens) == N_TOKENS
    kl, agree = divergence(ref, torch_logits(module, tokens))
    assert kl.max() < 1e-3, f"KL per token: max {kl.max():.2e}, mean {kl.mean():.2e}"
    assert agree >= 0.99


def test_hidden_states_are_the_residual_stream(module: LlamaModule) -> None:
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        logits, states = module(tokens, hidden=True)
    assert logits.shape == (2, 4, module.config.n_vocab) and logits.dtype == torch.float32
    assert len(states) == module.config.n_layer + 1 == 31
    assert all(s.shape == (2, 4, module.config.n_embd) for s in states)
    assert torch.equal(states[0], module.token_embd(tokens))
    assert torch.equal(module(tokens), logits)


def test_round_trip_is_bit_equal(
    module: LlamaModule,
    f16: Path,
    f16_reader: Any,
    reference: tuple[list[int], Any],
    tmp_path: Path,
) -> None:
    out = tmp_path / "again.gguf"
    save_gguf(module, f16, out)
    before, after = f16_reader, gguf.GGUFReader(out)
    assert [t.name for t in before.tensors] == [t.name for t in after.tensors]
    for a, b in zip(before.tensors, after.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "llama.block_count"):
        assert before.fields[key].contents() == after.fields[key].contents()
    _, ref = reference
    assert np.array_equal(llama_cpp_logits(out, TEXT.read_text())[1], ref)
    assert list(tmp_path.iterdir()) == [out]  # no temporary left


def test_removed_layers_renumber_and_still_match(
    module: LlamaModule, f16: Path, tmp_path: Path
) -> None:
    pruned = copy.deepcopy(module)
    remove_layers(pruned, [3, 17])
    assert pruned.config.n_layer == len(pruned.layers) == 28
    assert pruned.source_layers[:4] == [0, 1, 2, 4] and 17 not in pruned.source_layers
    out = tmp_path / "pruned.gguf"
    save_gguf(pruned, f16, out)
    assert inspect_gguf(out).metadata["llama.block_count"] == 28
    tokens, ref = llama_cpp_logits(out, TEXT.read_text())  # llama.cpp wants blk.0..27 exactly
    kl, agree = divergence(ref, torch_logits(pruned, tokens))
    assert kl.max() < 1e-3 and agree >= 0.99
    with pytest.raises(ValidationError, match=r"distinct numbers in 0\.\.27"):
        remove_layers(pruned, [28])


def test_bad_input_is_one_clear_line(module: LlamaModule, f16: Path, tmp_path: Path) -> None:
    qwen = tmp_path / "tiny-qwen2.gguf"
    writer = gguf.GGUFWriter(qwen, "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValidationError) as caught:
        load_module(qwen)
    assert caught.value.message == (
        "tiny-qwen2.gguf is a qwen2 model; edgellm's torch bridge reads llama-architecture "
        "GGUFs (SmolLM2, DeepSeek-R1-Distill-Llama)"
    )
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model\n")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_module(notes)
    with pytest.raises(ValidationError, match="does not exist"):
        save_gguf(module, f16, tmp_path / "no-such-dir" / "x.gguf")
    with pytest.raises(ValidationError, match="writes f16 or f32"):
        save_gguf(module, f16, tmp_path / "x.gguf", ftype="q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "tiny-qwen2.gguf"]


def test_missing_torch_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from edgellm.compress import gguf_model

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(ValidationError, match=r"needs PyTorch: pip install 'edgellm\[train\]'"):
        gguf_model.need_torch()


def test_rope_frequency_factors_as_llama_3_files_carry_them(
    module: LlamaModule, f16: Path, f16_reader: Any, tmp_path: Path
) -> None:
    """Llama 3 GGUFs (DeepSeek-R1-Distill-Llama) have `rope_freqs.weight`, which divides the
    rope frequencies: the bridge loads it, applies it as llama.cpp does, and writes it back."""
    n = module.config.rope_dim // 2
    factors = np.linspace(1.0, 8.0, n, dtype=np.float32)  # [rope_dim / 2]
    with_freqs = tmp_path / "freqs.gguf"
    writer = gguf.GGUFWriter(with_freqs, "llama")
    copy_metadata(f16_reader, writer)
    write_tensors(writer, [(t, t.data) for t in f16_reader.tensors] + [(_F32(), factors)])
    loaded = load_module(with_freqs)
    assert loaded.rope_freqs is not None and np.array_equal(loaded.rope_freqs.numpy(), factors)
    tokens, ref = llama_cpp_logits(with_freqs, TEXT.read_text())
    _, plain = llama_cpp_logits(f16, TEXT.read_text())
    assert not np.allclose(ref, plain, atol=1e-2)  # llama.cpp applied them
    kl, agree = divergence(ref, torch_logits(loaded, tokens))
    assert kl.max() < 1e-3 and agree >= 0.99
    again = tmp_path / "again.gguf"
    save_gguf(loaded, with_freqs, again)
    names = [t.name for t in gguf.GGUFReader(again).tensors]
    assert names == [t.name for t in f16_reader.tensors] + ["rope_freqs.weight"]


class _F32:
    """The reader-tensor fields write_tensors needs, for a new F32 tensor."""

    name = "rope_freqs.weight"
    tensor_type = gguf.GGMLQuantizationType.F32
