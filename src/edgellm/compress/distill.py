"""`edgellm distill`: a student GGUF (e.g. a pruned model) learns its teacher's next-token
distribution; the result is a GGUF with a manifest.

Steps: check every input (nothing is written before they pass); tokenize the training files
and have the teacher write `--generate` tokens of its own text; check that evaluation text
shares no 64-token passage with the training text; decode every training window with the
teacher once (llama.cpp) and cache its top-k in the checkpoint directory; train the student
(torch, `distill_train`); write it with the torch bridge's `save_gguf` and the manifest last.

The checkpoint directory `OUT.distill/` holds `run.json` (the run's identity: hashes of the
student, teacher and data, and the settings that change the result), the teacher's cache and
`checkpoint.pt` (trained tensors, optimizer, step, loss curve), replaced atomically every
`checkpoint_every` steps: Ctrl-C or a crash loses at most one interval, and `--resume`
continues. A directory of another run is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgellm.compress.distill_data import (
    PROMPTS,
    GenerateSpec,
    TeacherTargets,
    generate,
    load_targets,
    make_windows,
    overlap,
    save_targets,
    teacher_targets,
)
from edgellm.compress.manifest import load_manifest, new_manifest, save_manifest
from edgellm.errors import ValidationError
from edgellm.evaluate.run import read_text
from edgellm.modelfile import inspect_gguf
from edgellm.records import file_record, sha256_file

if TYPE_CHECKING:
    from edgellm.compress.distill_train import Trainer
    from edgellm.compress.torch_bridge import LlamaModule

RUN_FILE = "run.json"
TARGETS_FILE = "teacher-topk.npz"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(slots=True)
class DistillOptions:
    student: Path  # GGUF to train (llama architecture; e.g. a pruned model)
    teacher: Path  # GGUF whose distribution it learns; the same vocabulary
    output: Path  # GGUF to write (F16); checkpoints go to OUTPUT.distill/
    data: list[Path] = field(default_factory=list)  # training text files
    generate: int = 0  # tokens of text the teacher writes from the built-in prompts
    steps: int = 200  # optimizer steps in all (a resumed run counts those already done)
    seq: int = 128  # tokens per training window
    batch: int = 4  # windows per step
    lr: float = 1e-4  # AdamW learning rate after warm-up
    warmup: int = 10  # steps of linear warm-up
    top_k: int = 64  # teacher tokens kept per position
    checkpoint_every: int = 50  # steps between checkpoints
    resume: bool = False  # continue the checkpoint in OUTPUT.distill/
    eval: Path | None = None  # held-out text: overlap check, then KL before and after
    eval_ctx: int = 512  # tokens per evaluation window
    eval_chunks: int | None = 16  # most evaluation windows
    hidden_weight: float = 0.0  # weight of the hidden-state MSE at mapped blocks; 0: off
    train_from: int = 0  # student blocks below this index stay frozen
    train_embeddings: bool = False  # also train the token embeddings (and a tied head)
    bf16: bool = True  # bfloat16 autocast (float32 weights and optimizer): 1.6x on AVX-512 BF16
    seed: int = 0  # generation seeds and window order
    minutes: float | None = None  # stop after this much training time (at a step's end)
    threads: int = 2  # CPU threads for llama.cpp and torch


@dataclass(slots=True)
class Stage:
    """A progress report: one stage's units done."""

    name: str  # "generate" (tokens), "teacher top-k" (windows), "train" (steps)
    done: int
    total: int
    loss: float | None = None  # train: mean loss of the last steps
    tokens_per_s: float | None = None  # train: student tokens trained per second


Progress = Callable[[Stage], None]
# After each checkpoint: (the student, steps done, tokens trained). The bench evaluates here.
CheckpointHook = Callable[["LlamaModule", int, int], None]


@dataclass(slots=True)
class Curve:
    """The training record a checkpoint carries forward."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # student tokens trained on
    seconds: float = 0.0  # training wall time, over every resumed part
    losses: list[float] = field(default_factory=list)  # [step] loss of each step


@dataclass(slots=True)
class DistillResult:
    output: Path
    manifest: Path
    curve: Curve
    resumed_at: int  # step the run started from (0: a fresh run)
    top_k_mass: float  # mean teacher probability its top-k holds
    windows: int  # training windows
    generated_tokens: int  # of them, tokens the teacher wrote
    evals: dict[str, Any] | None  # --eval: metrics before (the student) and after


def checkpoint_dir(output: Path) -> Path:
    return output.with_name(output.name + ".distill")


def distill(
    opts: DistillOptions, progress: Progress | None = None, hook: CheckpointHook | None = None
) -> DistillResult:
    """The whole run; see the module docstring."""
    from edgellm.compress.gguf_model import need_torch

    _check_options(opts)
    need_torch()
    texts = [read_text(p) for p in opts.data]
    held_out = read_text(opts.eval) if opts.eval is not None else None
    check_vocabulary(opts.student, opts.teacher)
    n_student = inspect_gguf(opts.student).metadata.get("llama.block_count")
    if isinstance(n_student, int) and opts.train_from >= n_student:
        raise ValidationError(
            f"--train-from {opts.train_from} freezes every block of the student's {n_student}: "
            f"use 0..{n_student - 1}",
            param="train_from",
        )
    identity = run_identity(opts)
    work = checkpoint_dir(opts.output)
    check_checkpoint_dir(work, identity, opts.resume)
    targets, generated = _targets(opts, identity, texts, held_out, progress)
    curve, trainer, resumed_at = _train(opts, targets, progress, hook)
    from edgellm.compress.torch_bridge import save_gguf

    save_gguf(trainer.student, opts.student, opts.output, ftype="f16")
    params = _params(opts, identity, targets, generated, curve, None)
    parent = file_record(opts.student, identity["student"])
    manifest = new_manifest(opts.output, method="distill", parent=parent, params=params)
    path = save_manifest(opts.output, manifest)  # at once: the file never lacks its manifest
    evals = None
    if opts.eval is not None:
        evals = _evaluate(opts, opts.eval)
        manifest["params"] = _params(opts, identity, targets, generated, curve, evals)
        path = save_manifest(opts.output, manifest)
    return DistillResult(
        opts.output, path, curve, resumed_at, targets.mass,
        len(targets.windows), generated, evals,
    )  # fmt: skip


def _check_options(opts: DistillOptions) -> None:
    checks = [
        (opts.steps >= 1, "steps", "--steps must be at least 1"),
        (16 <= opts.seq <= 8192, "seq", "--seq must be 16..8192 tokens"),
        (opts.batch >= 1, "batch", "--batch must be at least 1"),
        (0 < opts.lr < 1, "lr", "--lr must be between 0 and 1"),
        (1 <= opts.top_k <= 1024, "top_k", "--top-k must be 1..1024"),
        (opts.checkpoint_every >= 1, "checkpoint_every", "--checkpoint-every must be >= 1"),
        (opts.generate >= 0, "generate", "--generate must be 0 or more tokens"),
        (opts.hidden_weight >= 0, "hidden_weight", "--hidden-weight must be 0 or more"),
        (bool(opts.data) or opts.generate > 0, "data", "give --data TEXT and/or --generate N"),
        (opts.minutes is None or opts.minutes > 0, "minutes", "--minutes must be more than 0"),
        (opts.train_from >= 0, "train_from", "--train-from must be 0 or more"),
        (opts.eval_ctx >= 8 and opts.eval_ctx % 2 == 0, "eval_ctx",
         "the evaluation window must be an even number of tokens, at least 8"),
    ]  # fmt: skip
    for ok, param, message in checks:
        if not ok:
            raise ValidationError(message, param=param)
    out = opts.output
    if out.is_dir():
        raise ValidationError(f"--output {out} is a directory; name a file", param="output")
    if not out.parent.is_dir():
        raise ValidationError(f"the directory of --output {out} does not exist", param="output")
    for other in (opts.student, opts.teacher):
        if out.exists() and out.resolve() == other.resolve():
            raise ValidationError("--output must not be the student or the teacher", param="output")


# Metadata that, with the token count, identifies a vocabulary (llama.cpp's tokenizer keys).
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
)


def check_vocabulary(student: Path, teacher: Path) -> None:
    """The student and the teacher share a vocabulary (the KL compares token by token): the
    same token count, tokenizer model, pre-tokenizer and special tokens. Read from the
    headers `inspect_gguf` parses once per process (the token list itself: seconds more)."""
    from edgellm.compress.gguf_model import ARCH, SUPPORTED

    infos = [inspect_gguf(student), inspect_gguf(teacher)]
    for path, info in zip((student, teacher), infos, strict=True):
        if info.architecture != ARCH:
            raise ValidationError(
                f"{path.name} is a {info.architecture} model; edgellm's torch bridge reads "
                f"llama-architecture GGUFs ({SUPPORTED})",
                param="model",
            )
    keys = [[info.n_vocab] + [info.metadata.get(k) for k in _TOKENIZER_KEYS] for info in infos]
    if keys[0] != keys[1]:
        raise ValidationError(
            f"the teacher {teacher.name} has another vocabulary than the student {student.name} "
            f"({infos[1].n_vocab} vs {infos[0].n_vocab} tokens): distillation compares them "
            "token by token",
            param="teacher",
        )


def run_identity(opts: DistillOptions) -> dict[str, Any]:
    """What makes this run this run: inputs by hash, and every setting that changes the
    result (not --steps, --minutes or --checkpoint-every: a run may be extended)."""
    identity: dict[str, Any] = {
        "student": sha256_file(opts.student),
        "teacher": sha256_file(opts.teacher),
        "data": [sha256_file(p) for p in opts.data],
        "generate": asdict(_generate_spec(opts)) if opts.generate else None,
        "prompts": hashlib.sha256("\0".join(PROMPTS).encode()).hexdigest()
        if opts.generate
        else None,
        "seq": opts.seq,
        "top_k": opts.top_k,
        "train": asdict(_train_settings(opts)),
    }
    identity["run_id"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return identity


def _generate_spec(opts: DistillOptions) -> GenerateSpec:
    return GenerateSpec(tokens=opts.generate, seed=opts.seed)


def _train_settings(opts: DistillOptions) -> Any:
    from edgellm.compress.distill_train import TrainSettings

    return TrainSettings(
        batch=opts.batch,
        lr=opts.lr,
        warmup=opts.warmup,
        hidden_weight=opts.hidden_weight,
        train_from=opts.train_from,
        train_embeddings=opts.train_embeddings,
        bf16=opts.bf16,
        seed=opts.seed,
    )


def check_checkpoint_dir(work: Path, identity: dict[str, Any], resume: bool) -> None:
    """One line when `work` belongs to another run, holds this run's checkpoint without
    --resume, or --resume finds nothing there. Reads only; writes nothing."""
    if not work.exists():
        if resume:
            raise ValidationError(f"--resume: there is no checkpoint to resume ({work} is missing)")
        return
    try:
        recorded = json.loads((work / RUN_FILE).read_text())
        recorded_id = recorded["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValidationError(
            f"{work} is not an edgellm distill checkpoint directory; remove it or choose "
            "another --output",
            param="output",
        ) from None
    if recorded_id != identity["run_id"]:
        differs = [k for k in identity if k != "run_id" and recorded.get(k) != identity[k]]
        raise ValidationError(
            f"{work} holds a checkpoint of another run (its {', '.join(differs) or 'identity'} "
            "differ from this one's); nothing was changed: remove it or choose another --output",
            param="resume",
        )
    has_checkpoint = (work / CHECKPOINT_FILE).exists()
    if has_checkpoint and not resume:
        raise ValidationError(
            f"{work} holds this run's checkpoint: add --resume to continue it, or remove it",
            param="resume",
        )


def _targets(
    opts: DistillOptions,
    identity: dict[str, Any],
    texts: list[str],
    held_out: str | None,
    progress: Progress | None,
) -> tuple[TeacherTargets, int]:
    """The training windows and the teacher's top-k on them: from the cache in the checkpoint
    directory, or made (and cached) now. Also: how many tokens the teacher wrote."""
    from edgellm.backends import load_scorer

    work = checkpoint_dir(opts.output)
    stage = _stage_progress(progress)
    scorer = load_scorer(opts.teacher, opts.seq, opts.threads)
    try:
        bos = scorer.bos if scorer.add_bos else None
        eval_tokens = scorer.tokenize(held_out) if held_out is not None else None
        if eval_tokens is not None and len(eval_tokens) < opts.eval_ctx:
            raise ValidationError(  # said now, not after the training
                f"--eval {opts.eval} is {len(eval_tokens)} tokens, fewer than one evaluation "
                f"window of {opts.eval_ctx}: give a longer held-out text",
                param="eval",
            )
        cached = work / TARGETS_FILE
        if cached.exists():
            targets = load_targets(cached)
            _check_overlap(list(targets.windows), eval_tokens, opts.eval)
            return targets, int(json.loads((work / RUN_FILE).read_text()).get("generated", 0))
        streams = [scorer.tokenize(text) for text in texts]
        _check_overlap(streams, eval_tokens, opts.eval)  # before the long part: generation
        samples = generate(opts.teacher, _generate_spec(opts), opts.threads, stage) if (
            opts.generate
        ) else []  # fmt: skip
        generated = [t for sample in samples for t in sample]
        windows = make_windows([*streams, generated], opts.seq, bos)
        _check_overlap([generated], eval_tokens, opts.eval)
        targets = teacher_targets(scorer, windows, opts.top_k, stage)
    finally:
        scorer.close()
    # the directory appears only with its cache complete: a run stopped before this leaves
    # nothing that would block another run
    work.mkdir(exist_ok=True)
    save_targets(cached, targets)
    _start_dir(work, identity, generated)
    return targets, len(generated)


def _check_overlap(
    streams: list[Any], eval_tokens: list[int] | None, eval_path: Path | None
) -> None:
    if eval_tokens is None:
        return
    shared, passages = overlap(streams, eval_tokens)
    if shared:
        raise ValidationError(
            f"the evaluation text {eval_path} shares {shared} of its {passages} 64-token "
            "passages with the training text: evaluation text must be held out",
            param="eval",
        )


def _start_dir(work: Path, identity: dict[str, Any], generated: list[int]) -> None:
    """The checkpoint directory with its identity (and a record of the generated text)."""
    work.mkdir(exist_ok=True)
    digest = hashlib.sha256(np.asarray(generated, dtype=np.int32).tobytes()).hexdigest()
    record = identity | {"generated": len(generated), "generated_sha256": digest}
    _atomic_write(work / RUN_FILE, json.dumps(record, indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stage_progress(progress: Progress | None) -> Callable[[str, int, int], None] | None:
    if progress is None:
        return None
    return lambda name, done, total: progress(Stage(name, done, total))


def _train(
    opts: DistillOptions,
    targets: TeacherTargets,
    progress: Progress | None,
    hook: CheckpointHook | None,
) -> tuple[Curve, Trainer, int]:
    """The trained student, its curve, and the step it started from (0: a fresh run)."""
    from edgellm.compress.distill_train import Trainer, torch_threads
    from edgellm.compress.torch_bridge import load_module

    with torch_threads(opts.threads):
        student = load_module(opts.student)
        teacher, layer_map = None, None
        if opts.hidden_weight > 0:
            teacher = load_module(opts.teacher)
            layer_map = hidden_layer_map(opts.student, student.config.n_layer, teacher)
        trainer = Trainer(student, targets, _train_settings(opts), teacher, layer_map)
        curve = _restore(trainer, checkpoint_dir(opts.output)) if opts.resume else Curve()
        start = curve.step
        _loop(opts, trainer, curve, progress, hook)
    return curve, trainer, start


def hidden_layer_map(
    student_path: Path, n_student: int, teacher: LlamaModule
) -> list[tuple[int, int]]:
    """(student hidden index, teacher hidden index) pairs: the output of student block j and
    of the teacher block it was (from the prune manifest's `removed`); without a record, only
    the last block's output, which every student and teacher share."""
    n_teacher = teacher.config.n_layer
    removed: list[int] = []
    try:
        manifest = load_manifest(student_path, sha256_file(student_path))
        removed = [int(i) for i in manifest.get("params", {}).get("removed", [])]
    except (ValidationError, TypeError, ValueError):
        removed = []
    kept = [i for i in range(n_teacher) if i not in set(removed)]
    if len(kept) == n_student:
        return [(j + 1, t + 1) for j, t in enumerate(kept)]
    return [(n_student, n_teacher)]


def _restore(trainer: Trainer, work: Path) -> Curve:
    import torch

    path = work / CHECKPOINT_FILE
    if not path.exists():
        return Curve()  # this run's directory, stopped before its first checkpoint
    state = torch.load(path, weights_only=True)
    trainer.load_state(state)
    return Curve(**state["curve"])


def _loop(
    opts: DistillOptions,
    trainer: Trainer,
    curve: Curve,
    progress: Progress | None,
    hook: CheckpointHook | None,
) -> None:
    """Steps curve.step .. opts.steps - 1 (or until --minutes), a checkpoint every interval
    and at the end."""
    work = checkpoint_dir(opts.output)
    budget = opts.minutes * 60 if opts.minutes is not None else None
    recent: list[float] = []
    start = curve.step
    while curve.step < opts.steps and (budget is None or curve.seconds < budget):
        started = time.perf_counter()
        loss = trainer.step(curve.step)
        elapsed = time.perf_counter() - started
        curve.step += 1
        curve.tokens += trainer.tokens_per_step
        curve.seconds += elapsed
        curve.losses.append(round(loss, 6))
        recent = [*recent[-9:], loss]
        if progress is not None:
            rate = trainer.tokens_per_step / elapsed
            progress(Stage("train", curve.step, opts.steps, sum(recent) / len(recent), rate))
        if curve.step % opts.checkpoint_every == 0:
            save_checkpoint(work, trainer, curve)
            if hook is not None:
                hook(trainer.student, curve.step, curve.tokens)
    if curve.step > start and curve.step % opts.checkpoint_every:
        save_checkpoint(work, trainer, curve)
        if hook is not None:
            hook(trainer.student, curve.step, curve.tokens)


def save_checkpoint(work: Path, trainer: Trainer, curve: Curve) -> None:
    """checkpoint.pt replaced atomically: the previous one stays until the new one is whole."""
    import torch

    state = trainer.state() | {"curve": asdict(curve)}
    fd, tmp = tempfile.mkstemp(dir=work, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, work / CHECKPOINT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _evaluate(opts: DistillOptions, held_out: Path) -> dict[str, Any]:
    """KL etc. to the teacher on --eval: the student as given, and the result."""
    from edgellm.evaluate.run import evaluate

    before, after = evaluate(
        [opts.student, opts.output],
        held_out,
        ref=opts.teacher,
        ctx=opts.eval_ctx,
        chunks=opts.eval_chunks,
        threads=opts.threads,
    )
    return {
        "data": file_record(held_out),
        "ctx": opts.eval_ctx,
        "windows": before.windows,
        "before": before.metrics,
        "after": after.metrics,
    }


def _params(
    opts: DistillOptions,
    identity: dict[str, Any],
    targets: TeacherTargets,
    generated: int,
    curve: Curve,
    evals: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "teacher": file_record(opts.teacher, identity["teacher"]),
        "data": [file_record(p, h) for p, h in zip(opts.data, identity["data"], strict=True)],
        "generate": identity["generate"] | {"generated_tokens": generated}
        if identity["generate"]
        else None,
        "windows": len(targets.windows),
        "seq": opts.seq,
        "top_k": opts.top_k,
        "top_k_mass": round(targets.mass, 6),
        "train": identity["train"],
        "steps": curve.step,
        "tokens": curve.tokens,
        "seconds": round(curve.seconds, 1),
        "losses": curve.losses,
        "run_id": identity["run_id"],
        "eval": evals,
    }
