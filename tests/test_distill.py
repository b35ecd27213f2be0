"""`edgellm distill` on the real default model (2 blocks removed) through the real CLI: a tiny
run whose loss falls and whose GGUF llama.cpp loads, a resumed run, and bad input refused in
one line with nothing written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgellm.backends import load_scorer
from edgellm.errors import ValidationError
from edgellm.modelfile import inspect_gguf
from edgellm.records import sha256_file
from tests.conftest import EDGELLM
from tests.gguf_tools import with_more_tokens

pytest.importorskip("torch")  # a guard only: CI installs the [train] extra

pytestmark = [pytest.mark.model, pytest.mark.slow]

TEXT = Path(__file__).parent / "data" / "eval-text.txt"  # 1078 tokens
# Short windows, a few steps, only the top blocks trained (small checkpoints): seconds a run.
TINY = ["--seq", "32", "--batch", "2", "--lr", "3e-4", "--train-from", "20", "--threads", "2"]


def distill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGELLM, "distill", *args], capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def refused(**options: object) -> str:
    """The one-line message of a run the library refuses (the CLI prints it as one line)."""
    from edgellm.compress.distill import DistillOptions, distill

    options = {"steps": 2, "seq": 32, "batch": 2, "train_from": 20} | options
    with pytest.raises(ValidationError) as caught:
        distill(DistillOptions(**options))  # type: ignore[arg-type]
    return caught.value.message


def manifest(model: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(model.with_name(model.name + ".manifest.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def student(model_path: Path, work: Path) -> Path:
    """The default model with blocks 20 and 21 removed, as F16 (the torch bridge)."""
    from edgellm.compress.torch_bridge import load_module, remove_layers, save_gguf

    module = load_module(model_path)
    remove_layers(module, [20, 21])
    save_gguf(module, model_path, work / "student.f16.gguf")
    return work / "student.f16.gguf"


@pytest.fixture(scope="module")
def first_run(model_path: Path, student: Path, work: Path) -> Path:
    out = work / "distilled.gguf"
    result = distill(
        str(student), "--teacher", str(model_path), "-o", str(out), "--generate", "128",
        "--steps", "6", "--checkpoint-every", "3", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_a_tiny_run_lowers_the_loss_and_writes_a_gguf_llama_cpp_loads(
    first_run: Path, student: Path, model_path: Path
) -> None:
    record = manifest(first_run)
    assert record["method"] == "distill"
    assert record["parent"]["sha256"] == sha256_file(student)
    params = record["params"]
    assert params["teacher"]["sha256"] == sha256_file(model_path)
    assert params["generate"]["generated_tokens"] >= 128 and params["data"] == []
    assert params["steps"] == 6 and len(params["losses"]) == 6
    losses = params["losses"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # the same few windows: it learns them
    assert inspect_gguf(first_run).metadata["llama.block_count"] == 28
    scorer = load_scorer(first_run, 32, 2)
    try:
        tokens = scorer.tokenize(TEXT.read_text())[:32]
        logits = scorer.window_logits(tokens, 0)
    finally:
        scorer.close()
    assert logits.shape == (32, scorer.n_vocab) and bool((abs(logits) < 1e4).all())


def test_resume_continues_at_the_checkpointed_step(
    first_run: Path, student: Path, model_path: Path
) -> None:
    before = manifest(first_run)["params"]["losses"]
    common = [str(student), "--teacher", str(model_path), "-o", str(first_run), "--generate",
              "128", "--checkpoint-every", "3", *TINY]  # fmt: skip
    again = refused(  # the checkpoint is there: not overwritten without --resume
        student=student, teacher=model_path, output=first_run, generate=128, lr=3e-4
    )
    assert "add --resume to continue it" in again
    result = distill(*common, "--steps", "8", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resumed at step 6" in result.stderr
    params = manifest(first_run)["params"]
    assert params["steps"] == 8 and params["losses"][:6] == before
    # the restored weights, optimizer moments and window order are the ones a run that never
    # stopped has: its steps 6 and 7 have the same losses
    straight = first_run.with_name("straight.gguf")
    result = distill(*common[:4], str(straight), *common[5:], "--steps", "8")
    assert result.returncode == 0, result.stderr
    assert manifest(straight)["params"]["losses"][6:] == pytest.approx(
        params["losses"][6:], rel=1e-4
    )


def test_bad_input_is_one_line_and_nothing_is_written(
    first_run: Path, student: Path, model_path: Path, work: Path
) -> None:
    out = work / "bad.gguf"
    base = {"student": student, "teacher": model_path, "output": out}
    empty, short = work / "empty.txt", work / "short.txt"
    empty.write_text("\n")
    short.write_text("Too short to fill a window.")
    assert "is empty" in refused(**base, data=[empty])
    assert "too short" in refused(**base, data=[short])
    assert "must be held out" in refused(**base, data=[TEXT], eval=TEXT)
    wide = with_more_tokens(student, work / "wide.f16.gguf", 8)
    assert "another vocabulary" in refused(**base | {"teacher": wide}, data=[TEXT])
    assert not out.exists() and not (work / "bad.gguf.distill").exists()

    checkpoint = first_run.with_name(first_run.name + ".distill") / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    other_run = distill(  # through the CLI: one line
        str(student), "--teacher", str(model_path), "-o", str(first_run), "--generate", "128",
        "--steps", "9", *TINY, "--lr", "5e-4", "--resume",
    )  # fmt: skip
    assert "checkpoint of another run" in error_line(other_run)
    assert checkpoint.stat().st_mtime_ns == stamp
