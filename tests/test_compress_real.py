"""convert, quantize, eval and gates on the real default model, through the real CLI."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_cpp import Llama

from edgellm.compress.imatrix import load_imatrix
from edgellm.evaluate.run import evaluate, read_text
from edgellm.evaluate.scores import log_softmax
from edgellm.records import sha256_file
from tests.conftest import EDGELLM
from tests.gguf_tools import with_more_tokens

TEXT = Path(__file__).parent / "data" / "eval-text.txt"  # 1078 tokens: 8 windows of 128
CTX = 128


def cli(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit_file_size() -> None:  # a "full disk": writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [*EDGELLM, *args, "--threads", "2"] if args[0] != "convert" else [*EDGELLM, *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size if limit_bytes else None,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]  # others: notes, progress
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def manifest(model: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(model.with_name(model.name + ".manifest.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compress")


@pytest.fixture(scope="module")
def f16(model_path: Path, work: Path) -> Path:
    result = cli("convert", str(model_path), "--to", "f16", "-o", str(work / "m.f16.gguf"))
    assert result.returncode == 0, result.stderr
    return work / "m.f16.gguf"


@pytest.fixture(scope="module")
def q8(f16: Path, work: Path) -> Path:
    result = cli("quantize", str(f16), "--type", "Q8_0", "-o", str(work / "m.Q8_0.gguf"))
    assert result.returncode == 0, result.stderr
    return work / "m.Q8_0.gguf"


def test_convert_dequantizes_exactly(model_path: Path, f16: Path) -> None:
    src, out = gguf.GGUFReader(model_path), gguf.GGUFReader(f16)
    assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert out.fields["tokenizer.chat_template"].contents() == (
        src.fields["tokenizer.chat_template"].contents()
    )
    by_name = {t.name: t for t in out.tensors}
    for t in src.tensors:
        mine = by_name[t.name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine.data.shape)
        if len(t.shape) > 1 and int(t.shape[1]) > 1:
            assert mine.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(mine.data, want.astype(np.float16)), t.name
        else:  # norms stay F32
            assert mine.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(mine.data, want), t.name


def test_f16_against_itself_has_zero_divergence(f16: Path) -> None:
    (result,) = evaluate([f16], TEXT, ref=f16, ctx=CTX, chunks=4, threads=2)
    m = result.metrics
    assert m["tokens"] == 4 * (CTX // 2 - 1)
    assert abs(m["kl_mean"]) < 1e-9 and abs(m["kl_p99"]) < 1e-9
    assert m["top1"] == 1.0 and m["dp_p99"] < 1e-9
    assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_perplexity_matches_an_independent_computation(f16: Path) -> None:
    """Ours against llama-cpp-python's high-level Llama with logits_all: the same windows
    (llama.cpp's perplexity method), scored with our own numpy here."""
    (result,) = evaluate([f16], TEXT, ref=None, ctx=CTX, chunks=None, threads=2)
    llm = Llama(str(f16), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=2, verbose=False)
    try:
        tokens = llm.tokenize(read_text(TEXT).encode(), add_bos=True, special=False)
        nll, first = [], CTX // 2
        for i in range(len(tokens) // CTX):
            window = tokens[i * CTX : (i + 1) * CTX]
            llm.reset()
            llm.eval(window)
            logp = log_softmax(np.array(llm.scores[first : CTX - 1]))
            nll.extend(-logp[np.arange(CTX - 1 - first), window[first + 1 :]])
    finally:
        llm.close()
    independent = float(np.exp(np.mean(nll)))
    assert result.windows == len(tokens) // CTX == 8
    assert result.metrics["ppl"] == pytest.approx(independent, rel=0.005)


def test_sweep_table_plot_and_manifests(f16: Path, work: Path) -> None:
    out_dir, png = work / "sweep", work / "sweep.png"
    result = cli(
        "quantize", str(f16), "--sweep", "Q8_0,Q4_K_M,Q2_K", "--data", str(TEXT),
        "--ctx", str(CTX), "--chunks", "6", "-o", str(out_dir), "--plot", str(png), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["type"]: row for row in json.loads(result.stdout)}
    assert list(rows) == ["reference", "Q8_0", "Q4_K_M", "Q2_K"]
    kl = [rows[t]["kl_mean"] for t in ("Q8_0", "Q4_K_M", "Q2_K")]
    sizes = [rows[t]["size_bytes"] for t in ("reference", "Q8_0", "Q4_K_M", "Q2_K")]
    assert kl == sorted(kl) and kl[0] > 0  # fewer bits, more divergence
    assert sizes == sorted(sizes, reverse=True)
    assert rows["Q8_0"]["top1"] > rows["Q2_K"]["top1"]
    assert all(row["decode_tps"] > 0 for row in rows.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for qtype in ("Q8_0", "Q4_K_M", "Q2_K"):
        path = Path(rows[qtype]["path"])
        record = manifest(path)
        assert record["method"] == "quantize" and record["params"]["type"] == qtype
        assert record["parent"]["sha256"] == sha256_file(f16)
        assert record["artifact"]["sha256"] == sha256_file(path)
        assert record["evals"][-1]["metrics"]["kl_mean"] == rows[qtype]["kl_mean"]
        assert record["evals"][-1]["ref"]["sha256"] == sha256_file(f16)


def test_quantized_source_is_dequantized_first(model_path: Path, work: Path) -> None:
    out = work / "from-q4_1.Q8_0.gguf"
    result = cli("quantize", str(model_path), "--type", "q8_0", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "already quantized" in result.stderr and "cannot be better" in result.stderr
    record = manifest(out)
    assert record["params"]["dequantized_from"] == {"file_type": 3}  # MOSTLY_Q4_1
    assert record["parent"]["sha256"] == sha256_file(model_path)
    assert not [p for p in work.iterdir() if ".partial" in p.name]


def test_calibrated_imatrix_drives_an_iq_type(f16: Path, work: Path) -> None:
    out = work / "m.IQ4_XS.gguf"
    needs = cli("quantize", str(f16), "--type", "IQ2_XXS", "-o", str(work / "x.gguf"))
    assert "needs an importance matrix" in error_line(needs)
    result = cli(
        "quantize", str(f16), "--type", "IQ4_XS", "-o", str(out), "--calibrate", str(TEXT),
        "--calib-ctx", str(CTX),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    imatrix_file = work / "m.IQ4_XS.gguf.imatrix.gguf"
    imatrix = load_imatrix(imatrix_file)
    assert len(imatrix.in_sum2) == 30 * 7  # 30 blocks x (q, k, v, o, gate, up, down)
    assert imatrix.chunks == 8 and imatrix.chunk_size == CTX
    assert imatrix.counts["blk.0.attn_q.weight"][0] == 8 * CTX
    q = imatrix.for_quantizer()["blk.0.attn_q.weight"]
    assert q.shape == (576,) and (q > 0).all()
    record = manifest(out)
    assert record["params"]["imatrix"]["sha256"] == sha256_file(imatrix_file)
    # the saved imatrix is read back by --imatrix, and changes what the quantizer writes
    plain, weighted = work / "plain.Q4_K_M.gguf", work / "weighted.Q4_K_M.gguf"
    assert cli("quantize", str(f16), "-t", "Q4_K_M", "-o", str(plain)).returncode == 0
    result = cli(
        "quantize", str(f16), "-t", "Q4_K_M", "-o", str(weighted), "--imatrix", str(imatrix_file)
    )
    assert result.returncode == 0, result.stderr
    assert sha256_file(plain) != sha256_file(weighted)
    assert plain.stat().st_size == weighted.stat().st_size


def test_gate_pass_and_fail_exit_codes_and_manifest(f16: Path, q8: Path) -> None:
    base = ["eval", str(q8), "--ref", str(f16), "--data", str(TEXT), "--ctx", str(CTX)]
    passed = cli(*base, "--chunks", "3", "--gate", "kl_mean<0.05,ppl_ratio<1.05,top1>0.5")
    assert passed.returncode == 0, passed.stderr
    assert "gate passed" in passed.stderr
    verdict = manifest(q8)["gates"][-1]
    assert verdict["passed"] is True and verdict["expr"] == "kl_mean<0.05,ppl_ratio<1.05,top1>0.5"
    failed = cli(*base, "--chunks", "3", "--gate", "kl_mean<1e-9", "--json")
    assert failed.returncode == 3, failed.stderr
    assert "gate failed: kl_mean" in failed.stderr
    body = json.loads(failed.stdout)
    record = manifest(q8)
    verdict = record["gates"][-1]
    assert verdict["passed"] is False and body["gate"]["passed"] is False
    assert verdict["checks"][0]["value"] == body["metrics"]["kl_mean"] > 1e-9
    assert record["evals"][verdict["eval"]]["metrics"] == body["metrics"]
    assert len(record["gates"]) == 2


def test_eval_without_reference_and_without_record(f16: Path, work: Path) -> None:
    copy = work / "copy.f16.gguf"
    copy.write_bytes(f16.read_bytes())
    result = cli("eval", str(copy), "--data", str(TEXT), "--ctx", str(CTX), "--chunks", "2",
                 "--gate", "ppl<1000", "--json", "--no-record")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["metrics"]) == {"tokens", "nll", "ppl"}
    assert not copy.with_name(copy.name + ".manifest.json").exists()


def test_bad_input_gets_one_clear_line(f16: Path, work: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model\n")
    empty, tiny = tmp_path / "empty.txt", tmp_path / "tiny.txt"
    empty.write_text("")
    tiny.write_text("Only a few words here.")
    out = str(tmp_path / "o.gguf")
    assert "unknown quantization type 'Q9_Z'" in error_line(
        cli("quantize", str(f16), "--type", "Q9_Z", "-o", out)
    )
    assert "not a GGUF" in error_line(cli("quantize", str(notes), "--type", "Q8_0", "-o", out))
    assert "not a GGUF" in error_line(cli("eval", str(notes), "--data", str(TEXT)))
    data = ["--ctx", str(CTX)]
    assert "empty" in error_line(cli("eval", str(f16), "--data", str(empty), *data))
    assert "fewer than one window of 128" in error_line(
        cli("eval", str(f16), "--data", str(tiny), *data)
    )
    assert "fewer than one window" in error_line(
        cli("quantize", str(f16), "-t", "IQ4_XS", "-o", out, "--calibrate", str(tiny))
    )
    assert "not found" in error_line(cli("eval", str(f16), "--data", str(tmp_path / "no.txt")))
    assert "UTF-8" in error_line(cli("eval", str(f16), "--data", str(f16), *data))
    assert "unknown gate metric 'loss'" in error_line(
        cli("eval", str(f16), "--data", str(TEXT), "--gate", "loss<1")
    )
    assert "add --ref" in error_line(
        cli("eval", str(f16), "--data", str(TEXT), "--gate", "kl_mean<1")
    )
    assert "choose f16, bf16 or f32" in error_line(
        cli("convert", str(f16), "--to", "f8", "-o", out)
    )
    assert not list(tmp_path.glob("o.gguf*"))


def test_reference_with_another_vocabulary_is_refused(f16: Path, work: Path) -> None:
    other = with_more_tokens(f16, work / "more-tokens.gguf", 64)
    line = error_line(cli("eval", str(f16), "--ref", str(other), "--data", str(TEXT),
                          "--ctx", str(CTX)))  # fmt: skip
    assert "need the same tokenizer" in line and "49152 vs 49216" in line


@pytest.mark.parametrize("source", ["f16", "quantized"])
def test_full_disk_leaves_no_half_file(
    source: str, f16: Path, model_path: Path, tmp_path: Path
) -> None:
    src = f16 if source == "f16" else model_path  # the quantizer fails / our F16 step fails
    out = tmp_path / "m.Q8_0.gguf"
    result = cli("quantize", str(src), "--type", "Q8_0", "-o", str(out), limit_bytes=50 << 20)
    line = error_line(result)
    assert "nothing was kept" in line, line
    assert list(tmp_path.iterdir()) == []  # no model, no manifest, no partial directory
