"""Depth pruning on the default model (issue 21, acceptance 2): blocks removed 0, 2, 4, 6, 8 by
block influence and as the last blocks; for each file its size, decode tokens/s, perplexity,
KL divergence from the unpruned model and top-1 agreement, on held-out WikiText-2 windows.

The parent is an F16 copy of the default model (so the pruned files differ only by the blocks
removed). Influence is measured once, on calibration text that the evaluation never sees.
../shared/data holds WikiText-2's test split only (no train split): unless --calib names other
text, the calibration text is the test split's last articles (from the article heading after
--calib-from of the file) and the evaluation windows come from its start, which that cut never
reaches; the JSON records both files' hashes and the cut. All models are scored on the same
windows in one pass (`edgellm.evaluate.run.evaluate` with the F16 as the reference). Run it
with nothing else busy, holding the model lock:

    flock /tmp/edgellm-model.lock .venv/bin/python bench/prune_table.py

Writes bench/results/issue21-prune.{json,md} (--out PREFIX elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from edgellm.compress.convert import convert
from edgellm.compress.prune import Calibration, Influence, Method, block_influence, prune
from edgellm.compress.sweep import decode_speed
from edgellm.evaluate.run import evaluate
from edgellm.modelfile import default_model_path
from edgellm.records import file_record

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-test.txt"
HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)  # " = Robert Boulter = ": an article


def split_held_out(text: str, calib_from: float) -> tuple[str, str]:
    """(evaluation head, calibration tail), cut at the first article heading after
    `calib_from` of the text."""
    cut = next((m.start() for m in HEADING.finditer(text, int(len(text) * calib_from))), None)
    if cut is None:
        raise SystemExit(f"no article heading after {calib_from:.0%} of the text")
    return text[:cut], text[cut:]


def prepare_text(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The evaluation and calibration files, and how they were made."""
    if not args.data.exists():
        raise SystemExit(f"{args.data} is missing: this benchmark needs WikiText-2 (--data)")
    text = args.data.read_text(encoding="utf-8")
    if args.calib is not None:
        return args.data, args.calib, {"eval": str(args.data), "calib": str(args.calib)}
    head, tail = split_held_out(text, args.calib_from)
    eval_file, calib_file = work / "eval.txt", work / "calib.txt"
    eval_file.write_text(head, encoding="utf-8")
    calib_file.write_text(tail, encoding="utf-8")
    how = {
        "source": file_record(args.data),
        "cut_char": len(head),
        "eval": "characters before the cut (windows from the start)",
        "calib": "characters from the cut (the article heading after --calib-from) on",
    }
    return eval_file, calib_file, how


def make_models(
    args: argparse.Namespace, work: Path, calib: Path
) -> tuple[Path, list[dict[str, Any]], Influence]:
    """The F16 parent, one row per (N, method) with its pruned file, and the influence."""
    f16 = work / "smollm2.f16.gguf"
    convert(default_model_path(), f16, "f16")
    calibrate = Calibration(calib, args.ctx, args.calib_chunks)
    started = time.perf_counter()
    influence = block_influence(f16, calibrate, args.threads)
    print(f"influence over {influence.windows} windows: {time.perf_counter() - started:.0f} s")
    rows: list[dict[str, Any]] = []
    for n in args.removed:
        for method in (Method.INFLUENCE, Method.LAST):
            if n == 0:
                if method is Method.INFLUENCE:
                    rows.append({"removed_n": 0, "method": "none", "removed": [], "path": f16})
                continue
            out = work / f"smollm2.f16.prune{n}-{method.value}.gguf"
            result = prune(
                f16,
                out,
                method=method,
                remove=n,
                calibrate=calibrate,
                threads=args.threads,
                measured=influence,
            )
            rows.append(
                {"removed_n": n, "method": method.value, "removed": result.removed, "path": out}
            )
    return f16, rows, influence


def measure(args: argparse.Namespace, f16: Path, rows: list[dict[str, Any]], data: Path) -> None:
    started = time.perf_counter()
    results = evaluate(
        [r["path"] for r in rows],
        data,
        ref=f16,
        ctx=args.ctx,
        chunks=args.chunks,
        threads=args.threads,
        progress=lambda done, total: print(f"  window {done}/{total}", end="\r", flush=True),
    )
    print(f"\nevaluation: {time.perf_counter() - started:.0f} s")
    for row, result in zip(rows, results, strict=True):
        m = result.metrics
        row |= {
            "mib": row["path"].stat().st_size / 2**20,
            "ppl": m["ppl"],
            "ppl_ratio": m.get("ppl_ratio", 1.0),
            "kl_mean": m.get("kl_mean", 0.0),
            "kl_p99": m.get("kl_p99", 0.0),
            "top1": m.get("top1", 1.0),
            "tokens": int(m["tokens"]),
            "windows": result.windows,
            "decode_tps": decode_speed(row["path"], args.threads),
        }


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """At each N: does influence beat last on mean KL?"""
    out: dict[str, Any] = {}
    for n in sorted({r["removed_n"] for r in rows if r["removed_n"]}):
        kl = {r["method"]: r["kl_mean"] for r in rows if r["removed_n"] == n}
        out[str(n)] = {
            "kl_influence": kl["influence"],
            "kl_last": kl["last"],
            "influence_beats_last": kl["influence"] < kl["last"],
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Depth pruning of SmolLM2-135M-Instruct (F16 parent), issue 21",
        "",
        f"{report['windows']} held-out WikiText-2 windows of {report['ctx']} tokens "
        f"({report['tokens']} scored tokens); influence measured on "
        f"{report['calib_windows']} calibration windows; {report['threads']} threads; "
        f"{report['seconds']:.0f} s in all.",
        "",
        "| removed | method | blocks | MiB | decode tok/s | ppl | ppl ratio | KL mean | KL p99 "
        "| top-1 |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        blocks = ",".join(map(str, r["removed"])) or "-"
        lines.append(
            f"| {r['removed_n']} | {r['method']} | {blocks} | {r['mib']:.1f} | "
            f"{r['decode_tps']:.1f} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | "
            f"{r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['top1']:.3f} |"
        )
    lines += ["", "Influence beats last on KL:"]
    for n, v in report["influence_beats_last"].items():
        lines.append(
            f"- {n} removed: {'yes' if v['influence_beats_last'] else 'NO'} "
            f"(KL {v['kl_influence']:.5f} vs {v['kl_last']:.5f})"
        )
    scores = ", ".join(f"{i}: {s:.4f}" for i, s in enumerate(report["scores"]))
    lines += ["", f"Block influence (1 - mean cos): {scores}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--removed", default="0,2,4,6,8", help="blocks removed, e.g. 0,2,4")
    parser.add_argument("--data", type=Path, default=WIKITEXT, help="WikiText-2 test split")
    parser.add_argument("--calib", type=Path, default=None, help="calibration text (else cut)")
    parser.add_argument("--calib-from", type=float, default=0.8, help="cut: fraction of --data")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=40, help="evaluation windows")
    parser.add_argument("--calib-chunks", type=int, default=32, help="calibration windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "issue21-prune")
    args = parser.parse_args()
    args.removed = [int(n) for n in args.removed.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prune-table-") as scratch:
        work = Path(scratch)
        eval_file, calib_file, text_how = prepare_text(args, work)
        f16, rows, influence = make_models(args, work, calib_file)
        measure(args, f16, rows, eval_file)
        report = {
            "model": file_record(default_model_path()),
            "text": text_how,
            "ctx": args.ctx,
            "windows": rows[0]["windows"],
            "tokens": rows[0]["tokens"],
            "calib_windows": influence.windows,
            "threads": args.threads,
            "machine": platform.processor() or platform.machine(),
            "scores": influence.scores,
            "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows],
            "influence_beats_last": verdicts(rows),
        }
        report["seconds"] = time.perf_counter() - started
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_name(args.out.name + ".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
