"""`edgellm compress --recipe`: a gated chain on the real default model, through the real CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EDGELLM

pytestmark = [pytest.mark.model, pytest.mark.slow]

TEXT = Path(__file__).parent / "data" / "eval-text.txt"  # 1078 tokens


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGELLM, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def f16(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "m.f16.gguf"
    result = cli("convert", str(model_path), "--to", "f16", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def write_recipe(path: Path, steps: str) -> Path:
    path.write_text(f'[eval]\ndata = "{TEXT}"\nctx = 128\nchunks = 2\n\n' + steps, encoding="utf-8")
    return path


CHAIN = """
[[steps]]
kind = "prune"
remove = 4
method = "influence"
data = "{text}"
ctx = 128
chunks = 2
gate = "top1>0.05"

[[steps]]
kind = "distill"
generate = 256
steps = 3
seq = 64
lr = 1e-4
gate = "top1>0.05"

[[steps]]
kind = "quantize"
type = "Q8_0"
gate = "top1>0.05"

[[steps]]
kind = "eval"
gate = "kl_mean<1e-6"

[[steps]]
kind = "quantize"
type = "Q4_K_M"
"""


def test_a_recipe_runs_stops_at_the_failing_gate_and_registers_the_chain(
    f16: Path, tmp_path: Path
) -> None:
    text = TEXT.read_text()
    cut = text.index("\n", len(text) // 2)  # calibration: the first half; held out: the rest
    calibration, held_out = tmp_path / "calibration.txt", tmp_path / "held-out.txt"
    calibration.write_text(text[:cut])
    held_out.write_text(text[cut:])
    recipe = write_recipe(tmp_path / "r.toml", CHAIN.replace("{text}", str(calibration)))
    recipe.write_text(recipe.read_text().replace(str(TEXT), str(held_out)))
    out = tmp_path / "out"
    run = cli("compress", str(f16), "--recipe", str(recipe), "-o", str(out),
              "--register", "tiny", "--threads", "2")  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    assert "gate failed at step 4 (eval)" in run.stderr
    assert "Traceback" not in run.stderr
    made = sorted(p.name for p in out.glob("*.gguf"))
    assert made == ["01-prune.gguf", "02-distill.gguf", "03-quantize-Q8_0.gguf"]  # not step 5
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert [s["kind"] for s in steps] == ["original", "prune", "distill", "quantize", "eval"]
    assert steps[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert all(s["kl_mean"] > 0 for s in steps[1:])
    assert steps[3]["mib"] < steps[2]["mib"] < steps[0]["mib"]  # Q8_0 < F16 pruned < F16
    assert [s["gate"]["passed"] for s in steps[1:]] == [True, True, True, False]
    assert (out / "report.md").read_text().count("\n| ") == 7  # header, rule and five rows
    assert (out / "report.png").stat().st_size > 10_000
    # every artifact's manifest has its evaluation against the original and its verdict
    q8 = json.loads((out / "03-quantize-Q8_0.gguf.manifest.json").read_text())
    assert q8["method"] == "quantize"
    assert [g["passed"] for g in q8["gates"]] == [True, False]  # its own gate, then step 4's
    assert q8["evals"][-1]["ref"]["sha256"] == steps[0]["sha256"]
    # the registry's show prints the chain: quantize <- distill <- prune <- original
    shown = cli("models", "show", "tiny:03-quantize-Q8_0")
    assert shown.returncode == 0, shown.stderr
    chain = shown.stdout[shown.stdout.index("lineage") :]
    for tag in ("quantize", "distill", "prune"):
        assert tag in chain, chain
    as_json = json.loads(cli("models", "show", "tiny:03-quantize-Q8_0", "--json").stdout)
    assert [link.get("operation") for link in as_json["lineage"]] == [
        "quantize", "distill", "prune", "external"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("steps", "says"),
    [
        ('[[steps]]\nkind = "shrink"\n', "steps.0"),
        ('[[steps]]\nkind = "prune"\nremove = 2\nlayers = [1]\n', "remove or layers"),
        ('[[steps]]\nkind = "quantize"\ntype = "Q8_0"\ngate = "kl<1"\n', "steps.0.gate"),
        ('[[steps]]\nkind = "distill"\n', "data files or generate"),
        ('[[steps]]\nkind = "prune"\nremove = 2\ndata = "missing.txt"\n', "does not exist"),
        ("", "steps"),
        ('[[steps]]\nkind = "quantize"\ntype = "Q8_O"\n', "steps.0.type: unknown"),
        ('[[steps]]\nkind = "quantize"\ntype = "IQ2_XS"\n', "importance matrix"),
        ('[[steps]]\nkind = "prune"\nremove = 30\nmethod = "last"\n', "has 30 layers"),
        (
            '[[steps]]\nkind = "prune"\nremove = 2\nmethod = "last"\n'
            '[[steps]]\nkind = "prune"\nlayers = [28]\n',
            "steps.1: m.f16.gguf has 28 layers",
        ),
        (f'[[steps]]\nkind = "prune"\nremove = 2\ndata = "{TEXT}"\n', "must be held out"),
        (f'[[steps]]\nkind = "distill"\ndata = ["{TEXT}"]\n', "must be held out"),
    ],
)
def test_a_bad_recipe_is_one_line_and_writes_nothing(
    f16: Path, tmp_path: Path, steps: str, says: str
) -> None:
    recipe = write_recipe(tmp_path / "r.toml", steps)
    out = tmp_path / "out"
    run = cli("compress", str(f16), "--recipe", str(recipe), "-o", str(out))
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], run.stderr
    assert not out.exists()
