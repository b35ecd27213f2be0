"""edgellm prune on the real default model: block influence from llama.cpp's graph, blocks
removed by llama.cpp's quantizer in copy mode, the result loaded and run by llama.cpp."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from typer.testing import CliRunner

from edgellm.cli.main import app
from edgellm.compress.prune import Calibration, Method, block_influence, prune
from edgellm.records import sha256_file

pytestmark = pytest.mark.model

TEXT = Path(__file__).parent / "data" / "eval-text.txt"  # 1078 tokens
CALIBRATE = ["--data", str(TEXT), "--ctx", "64", "--chunks", "4", "--threads", "2"]


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["prune", *args])


def manifest(model: Path) -> dict[str, Any]:
    return dict(json.loads(model.with_name(model.name + ".manifest.json").read_text()))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prune")


@pytest.fixture(scope="module")
def by_influence(model_path: Path, work: Path) -> dict[str, Any]:
    out = work / "influence2.gguf"
    result = cli(str(model_path), "--remove", "2", *CALIBRATE, "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_influence_scores_every_block_and_removes_the_lowest(by_influence: dict[str, Any]) -> None:
    scores = by_influence["scores"]
    assert len(scores) == 30 and all(math.isfinite(s) for s in scores)
    assert all(-1e-6 <= s <= 2 for s in scores)  # 1 - cos
    assert by_influence["removed"] == sorted(np.argsort(scores, kind="stable")[:2].tolist())
    assert by_influence["layers_before"] == 30 and by_influence["layers_after"] == 28


def test_the_pruned_model_loads_and_generates(by_influence: dict[str, Any]) -> None:
    llm = Llama(by_influence["output"], n_ctx=64, n_threads=2, verbose=False)
    try:
        assert llm.metadata["llama.block_count"] == "28"
        assert llama_cpp.llama_model_n_layer(llm._model.model) == 28  # what llama.cpp built
        text = llm("The capital of France is", max_tokens=8, temperature=0.0)
        assert text["usage"]["completion_tokens"] > 0  # type: ignore[index]
    finally:
        llm.close()


def test_the_manifest_records_lineage_method_and_scores(
    model_path: Path, by_influence: dict[str, Any]
) -> None:
    out = Path(by_influence["output"])
    m = manifest(out)
    assert m["method"] == "prune"
    assert m["artifact"]["sha256"] == sha256_file(out)
    assert m["parent"]["sha256"] == sha256_file(model_path)
    p = m["params"]
    assert p["method"] == "influence" and p["removed"] == by_influence["removed"]
    assert p["scores"] == by_influence["scores"]
    assert p["data"]["sha256"] == sha256_file(TEXT)
    assert (p["ctx"], p["chunks"], p["windows"], p["tokens"]) == (64, 4, 4, 256)
    assert (p["layers_before"], p["layers_after"]) == (30, 28)


def test_layers_are_copied_byte_for_byte_and_renumbered(model_path: Path, work: Path) -> None:
    out = work / "layers.gguf"
    result = prune(
        model_path, out, method=Method.LAYERS, layers="29,0,13", calibrate=None, threads=2
    )
    assert result.removed == [0, 13, 29] and result.influence is None
    source = {t.name: t for t in gguf.GGUFReader(model_path).tensors}
    pruned = {t.name: t for t in gguf.GGUFReader(out).tensors}
    kept = [i for i in range(30) if i not in (0, 13, 29)]  # new block j is old block kept[j]
    assert len(pruned) == len(source) - 3 * 9  # 9 tensors a block
    for name, t in pruned.items():
        old = name
        if name.startswith("blk."):
            block, rest = name[4:].split(".", 1)
            old = f"blk.{kept[int(block)]}.{rest}"
        assert t.tensor_type == source[old].tensor_type, name  # Q4_1 stays Q4_1, ...
        assert np.array_equal(t.data, source[old].data), name
    p = manifest(out)["params"]
    assert p["method"] == "layers" and p["removed"] == [0, 13, 29] and p["scores"] is None


def test_last_takes_the_last_blocks_without_data(model_path: Path, work: Path) -> None:
    out = work / "last.gguf"
    result = cli(str(model_path), "--remove", "3", "--method", "last", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert "removed blocks 27, 28, 29" in result.stderr and "30 -> 27 layers" in result.stderr
    assert manifest(out)["params"]["removed"] == [27, 28, 29]


def per_layer_array_model(path: Path) -> Path:
    """A tiny llama GGUF whose head counts are a per-layer array (as OpenELM's are)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_array("llama.attention.head_count", [4, 8])
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--remove", "30", "--method", "last"], "smollm2 has 30 layers; --remove must be 1..29"),
        (["--remove", "0", "--method", "last"], "--remove must be 1..29"),
        (["--layers", "3,30"], "--layers 30 is out of range: smollm2 has 30 layers (0..29)"),
        (["--layers", "3,17,3"], "--layers names layer 3 twice"),
        (["--layers", "3,x"], "--layers takes block numbers"),
        (["--remove", "2", "--layers", "3"], "give --remove N or --layers LIST"),
        ([], "give --remove N or --layers LIST"),
        (["--remove", "2"], "--method influence needs --data TEXT"),
        (["--remove", "2", "--method", "first"], "--method must be influence or last"),
        (["--remove", "2", "--data", "EMPTY"], "is empty"),
        (["--remove", "2", "--data", "SHORT", "--ctx", "64"], "fewer than one window of 64"),
        (["--remove", "2", "--data", "MISSING"], "data file not found"),
        (["--remove", "2", "--data", "SHORT", "--ctx", "7"], "--ctx must be an even number"),
        (["--layers", "1", "--model", "ARRAYS"], "per-layer metadata array"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    model_path: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    files = {
        "EMPTY": tmp_path / "empty.txt",
        "SHORT": tmp_path / "short.txt",
        "MISSING": tmp_path / "missing.txt",
    }
    files["EMPTY"].write_text(" \n")
    files["SHORT"].write_text("Only a few words here.")
    model = model_path
    if "--model" in args:
        at = args.index("--model")
        model = per_layer_array_model(tmp_path / "arrays.gguf")
        args = args[:at] + args[at + 2 :]
    args = [str(files[a]) if a in files else a for a in args]
    out = tmp_path / "out" / "pruned.gguf"
    out.parent.mkdir()
    result = cli(str(model), *args, "-o", str(out), "--threads", "2")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert list(out.parent.iterdir()) == []  # no output, manifest or scratch directory


def test_influence_matches_the_torch_bridge(model_path: Path) -> None:
    """The same blocks' influence from an independent forward pass (the torch bridge's
    hidden states) on the same window."""
    torch = pytest.importorskip("torch")
    from edgellm.backends import load_scorer
    from edgellm.compress.torch_bridge import load_module
    from edgellm.evaluate.run import read_text, split_windows

    influence = block_influence(model_path, Calibration(TEXT, 64, 1), threads=2)
    scorer = load_scorer(model_path, 64, 2)
    try:
        bos = scorer.bos if scorer.add_bos else None  # as block_influence cuts its windows
        (window,) = split_windows(scorer.tokenize(read_text(TEXT)), 64, 1, bos)
    finally:
        scorer.close()
    with torch.no_grad():
        _, states = load_module(model_path)(torch.from_numpy(window)[None], hidden=True)
    cos = [torch.nn.functional.cosine_similarity(a[0], b[0], dim=-1) for a, b in pairwise(states)]
    theirs = np.array([1 - float(c.double().mean()) for c in cos])
    ours = np.array(influence.scores)
    # llama.cpp multiplies Q4_1 weights by activations rounded to Q8_0, torch by float32 ones:
    # measured max |diff| 0.00049, mean 0.0001, correlation 0.9999997, on scores of 0.03 .. 1.0
    assert np.abs(ours - theirs).max() < 0.002 and np.abs(ours - theirs).mean() < 0.0005
    assert np.corrcoef(ours, theirs)[0, 1] > 0.99999
