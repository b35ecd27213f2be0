"""`edgellm export --format onnx` through the real CLI, the graph run by ONNX Runtime against
llama.cpp's logits on the same GGUF.

Exporting all 30 blocks of the default model takes ~35 s on 2 cores (measured), and every block
traces to the same ops, so the graph under test is the default model cut to its first 3 blocks
(written by the torch bridge as an F16 GGUF, which llama.cpp computes the reference on)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from edgellm.backends import load_scorer
from edgellm.evaluate.scores import log_softmax
from edgellm.records import sha256_file
from tests.conftest import EDGELLM

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgellm.compress.torch_bridge import load_module, remove_layers, save_gguf  # noqa: E402

TEXT = Path(__file__).parent / "data" / "eval-text.txt"
N_TOKENS = 64
KEEP = 3  # blocks


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGELLM, *args], capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = load_module(model_path)
    remove_layers(module, range(KEEP, module.config.n_layer))
    path = tmp_path_factory.mktemp("onnx") / f"smollm2-{KEEP}-blocks.f16.gguf"
    save_gguf(module, model_path, path)
    return path


@pytest.fixture(scope="module")
def exported(small: Path) -> Path:
    out = small.parent / "onnx"
    result = cli("export", str(small), "--format", "onnx", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr
    return out


def reference_logits(path: Path, rows: list[list[int]]) -> list[Any]:
    scorer = load_scorer(path, N_TOKENS, threads=2)
    try:
        return [scorer.window_logits(row, 0) for row in rows]
    finally:
        scorer.close()


def test_onnx_runtime_matches_llama_cpp(small: Path, exported: Path) -> None:
    scorer = load_scorer(small, N_TOKENS, threads=2)
    tokens = scorer.tokenize(TEXT.read_text())
    scorer.close()
    rows = [tokens[:N_TOKENS], tokens[N_TOKENS : 2 * N_TOKENS]]  # a batch of two windows
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(exported / "model.onnx"), options)
    (logits,) = session.run(["logits"], {"input_ids": np.array(rows, dtype=np.int64)})
    assert logits.shape == (2, N_TOKENS, 49152) and logits.dtype == np.float32
    for ref, got in zip(reference_logits(small, rows), logits, strict=True):
        p, q = log_softmax(ref), log_softmax(got)
        kl = (np.exp(p) * (p - q)).sum(-1)
        assert kl.max() < 1e-3, f"KL per token: max {kl.max():.2e}, mean {kl.mean():.2e}"
        assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.99
    (short,) = session.run(["logits"], {"input_ids": np.array([rows[0][:17]], dtype=np.int64)})
    assert short.shape == (1, 17, 49152)  # both axes dynamic; causal: a prefix's logits agree
    assert np.abs(short[0] - logits[0, :17]).max() < 1e-3


def test_manifest_describes_the_graph(small: Path, exported: Path) -> None:
    manifest = json.loads((exported / "model.onnx.manifest.json").read_text())
    assert manifest["method"] == "export"
    assert manifest["parent"]["sha256"] == sha256_file(small)
    assert manifest["artifact"]["sha256"] == sha256_file(exported / "model.onnx")
    assert manifest["params"]["kv_cache"] is False
    graph = manifest["graph"]
    assert graph["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    ]
    assert graph["outputs"][0]["shape"] == ["batch", "sequence", 49152]
    assert sorted(p.name for p in exported.iterdir()) == ["model.onnx", "model.onnx.manifest.json"]


def test_bad_input_is_one_line(small: Path, tmp_path: Path) -> None:
    qwen = tmp_path / "tiny-qwen2.gguf"
    writer = gguf.GGUFWriter(qwen, "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model\n")
    out = tmp_path / "out"
    assert "is a qwen2 model; edgellm's torch bridge reads llama-architecture" in error_line(
        cli("export", str(qwen), "-o", str(out))
    )
    assert "not a GGUF file" in error_line(cli("export", str(notes), "-o", str(out)))
    assert "unknown export format 'tflite'" in error_line(
        cli("export", str(small), "--format", "tflite", "-o", str(out))
    )
    assert "is a file; export writes a directory" in error_line(
        cli("export", str(small), "-o", str(notes))
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "tiny-qwen2.gguf"]
