"""Distillation after depth pruning, on the default model: KL to the teacher vs training tokens.

The default model's F16 copy is the teacher. Four blocks are pruned from it (`edgellm prune`'s
library, block influence measured on the project's own text), and the pruned model is
distilled from the teacher with teacher-generated text only (`--generate`: no data set) for a
budget of training wall time. Before training and after every `--eval-every` steps, the student
is written to GGUF and llama.cpp measures its KL to the teacher on held-out WikiText-2 test
windows (../shared/data; never trained on: the overlap check runs on it). Writes
bench/results/<name>.{json,md,png}.

    python bench/distill_run.py --minutes 2 --generate 4000 --eval-every 20   # a smoke run
    python bench/distill_run.py --minutes 40 --generate 60000 --eval-every 150
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgellm.compress.convert import convert
from edgellm.compress.distill import DistillOptions, distill
from edgellm.compress.prune import Calibration, Method, prune
from edgellm.evaluate.run import evaluate
from edgellm.modelfile import default_model_path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-test.txt"
CALIBRATION = ROOT / "tests" / "data" / "eval-text.txt"  # the project's own text, not WikiText


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="training wall-time budget")
    parser.add_argument("--remove", type=int, default=4)
    parser.add_argument("--method", choices=["influence", "last"], default="influence")
    parser.add_argument("--generate", type=int, default=4000, help="teacher-written tokens")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--train-from", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between KL points")
    parser.add_argument("--eval-ctx", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="issue21-distill")
    parser.add_argument("--work", type=Path, default=None, help="keep the models here")
    args = parser.parse_args()
    if not WIKI.exists():
        raise SystemExit(f"needs {WIKI} (WikiText-2's test split): see ../shared/data/README.md")
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write(report, ROOT / "bench" / "results" / args.name)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    teacher = work / "teacher.f16.gguf"
    if not teacher.exists():
        convert(default_model_path(), teacher, "f16")
    pruned = work / f"pruned-{args.remove}.gguf"
    result = prune(
        teacher, pruned, method=Method(args.method), remove=args.remove,
        calibrate=Calibration(CALIBRATION, 128, None), threads=args.threads,
    )  # fmt: skip
    print(f"pruned blocks {result.removed} ({args.method})", flush=True)
    probe = work / "probe.gguf"
    points: list[dict[str, Any]] = [kl_point(pruned, teacher, args) | {"step": 0, "tokens": 0}]
    print(f"before: {points[0]}", flush=True)
    trained_s = [0.0]

    def on_checkpoint(student: Any, step: int, tokens: int) -> None:
        from edgellm.compress.torch_bridge import save_gguf

        save_gguf(student, pruned, probe)
        points.append(kl_point(probe, teacher, args) | {"step": step, "tokens": tokens})
        print(f"step {step}: {points[-1]}", flush=True)

    opts = DistillOptions(
        student=pruned, teacher=teacher, output=work / "distilled.gguf",
        generate=args.generate, steps=10**9, seq=args.seq, batch=args.batch, lr=args.lr,
        top_k=args.top_k, checkpoint_every=args.eval_every, eval=WIKI, eval_ctx=args.eval_ctx,
        eval_chunks=args.eval_windows,
        train_from=args.train_from, bf16=not args.fp32, minutes=args.minutes,
        threads=args.threads,
    )  # fmt: skip
    shutil.rmtree(work / "distilled.gguf.distill", ignore_errors=True)  # a fresh run each time
    stages: dict[str, float] = {}
    stage_start = [time.perf_counter()]

    def progress(stage: Any) -> None:
        stages.setdefault(stage.name, time.perf_counter() - stage_start[0])

    done = distill(opts, progress, on_checkpoint)
    trained_s[0] = done.curve.seconds
    before, after = points[0]["kl_mean"], points[-1]["kl_mean"]
    return {
        "model": default_model_path().name,
        "removed": result.removed,
        "method": args.method,
        "influence": result.influence.scores if result.influence else None,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "generated_tokens": done.generated_tokens,
        "windows": done.windows,
        "steps": done.curve.step,
        "tokens_trained": done.curve.tokens,
        "train_seconds": round(done.curve.seconds, 1),
        "tokens_per_s": round(done.curve.tokens / max(done.curve.seconds, 1e-9), 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "eval": {"data": str(WIKI.name), "ctx": args.eval_ctx, "windows": args.eval_windows},
        "kl_before": before,
        "kl_after": after,
        "kl_ratio": after / before,
        "curve": points,
        "losses": done.curve.losses,
    }


def kl_point(model: Path, teacher: Path, args: argparse.Namespace) -> dict[str, Any]:
    (result,) = evaluate(
        [model], WIKI, ref=teacher, ctx=args.eval_ctx, chunks=args.eval_windows,
        threads=args.threads,
    )  # fmt: skip
    m = result.metrics
    return {
        "kl_mean": m["kl_mean"],
        "top1": m["top1"],
        "ppl": m["ppl"],
        "ppl_ratio": m["ppl_ratio"],
    }


def write(report: dict[str, Any], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        f"| {p['step']} | {p['tokens']} | {p['kl_mean']:.4f} | {p['top1']:.3f} | {p['ppl']:.2f} |"
        for p in report["curve"]
    ]
    stem.with_suffix(".md").write_text(
        f"# Distillation after pruning {len(report['removed'])} blocks ({report['method']}: "
        f"{report['removed']})\n\n"
        f"Teacher: {report['model']} as F16. Training text: {report['generated_tokens']} tokens "
        f"written by the teacher ({report['windows']} windows). {report['steps']} steps, "
        f"{report['tokens_trained']} tokens in {report['train_seconds']} s of training "
        f"({report['tokens_per_s']} tokens/s, 2 cores); {report['wall_seconds']} s wall in all. "
        f"KL to the teacher on {report['eval']['windows']} held-out WikiText-2 test windows of "
        f"{report['eval']['ctx']}: {report['kl_before']:.4f} -> {report['kl_after']:.4f} "
        f"({report['kl_ratio']:.2f}x).\n\n"
        "| step | tokens | KL mean | top-1 | ppl |\n| ---: | ---: | ---: | ---: | ---: |\n"
        + "\n".join(rows)
        + "\n"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["tokens"] for p in report["curve"]], [p["kl_mean"] for p in report["curve"]], "o-")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("KL to the teacher (held-out WikiText-2)")
    ax.set_title(f"{len(report['removed'])} blocks pruned, then distilled")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
