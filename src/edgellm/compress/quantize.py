"""`edgellm quantize`: one source file to one quantized file, its manifest beside it.

Steps: check the source; if it is already quantized, dequantize it to a temporary F16 (the
user is told: quality is bounded by the source); load or compute the importance matrix; run
llama.cpp's quantizer into a temporary file in the output's directory; rename it into place
and write the manifest last. Any failure (a full disk included) removes the temporary files,
so there is never a half-written model, and never a manifest for one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.backends import load_scorer, quantize_file
from edgellm.compress.convert import convert, is_quantized
from edgellm.compress.imatrix import Imatrix, compute_imatrix, load_imatrix, save_imatrix
from edgellm.compress.manifest import new_manifest, save_manifest
from edgellm.compress.qtypes import QuantType
from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.evaluate.run import read_text, split_windows
from edgellm.modelfile import inspect_gguf
from edgellm.records import file_record

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Notice = Callable[[str], None]


@dataclass(slots=True)
class Calibration:
    data: Path  # calibration text
    ctx: int  # tokens per window
    chunks: int | None  # at most this many windows


@dataclass(slots=True)
class QuantizeResult:
    output: Path
    manifest: Path
    seconds: float
    imatrix: Path | None  # the imatrix used (computed ones are saved beside the output)


def quantize(
    source: Path,
    qtype: QuantType,
    output: Path,
    *,
    imatrix_file: Path | None = None,
    calibrate: Calibration | None = None,
    threads: int,
    progress: Progress | None = None,
    notice: Notice | None = None,
) -> QuantizeResult:
    started = time.perf_counter()
    info = inspect_gguf(source)
    check_output(source, output)
    if qtype.needs_imatrix and imatrix_file is None and calibrate is None:
        raise ValidationError(
            f"{qtype.name} needs an importance matrix: add --imatrix FILE or --calibrate TEXT",
            param="imatrix",
        )
    parent = file_record(source)
    params: dict[str, Any] = {"type": qtype.name, "ftype": qtype.ftype, "threads": threads}
    with scratch_dir(output) as scratch:
        work = source
        if is_quantized(source):
            kind = info.metadata.get("general.file_type")
            if notice is not None:
                notice(
                    f"{source.name} is already quantized: dequantizing it to F16 first; "
                    "the result cannot be better than this source"
                )
            work = scratch / "source-f16.gguf"
            _write(lambda: convert(source, work, "f16", _stage(progress, "dequantize")), work)
            params["dequantized_from"] = {"file_type": kind}
        imatrix_path = imatrix_file
        imatrix = None
        if imatrix_file is not None:
            imatrix = load_imatrix(imatrix_file)
        elif calibrate is not None:
            imatrix = _calibrate(work, calibrate, threads, progress)
            imatrix_path = output.with_name(output.name + ".imatrix.gguf")
            _write(lambda: save_imatrix(imatrix, scratch / "imatrix.gguf"), imatrix_path)
        partial = scratch / "output.gguf"
        _llama_quantize(work, partial, qtype, threads, imatrix, progress)
        if imatrix_file is None and imatrix_path is not None:
            os.replace(scratch / "imatrix.gguf", imatrix_path)
        os.replace(partial, output)
    if imatrix is not None and imatrix_path is not None:
        params["imatrix"] = file_record(imatrix_path) | {
            "chunks": imatrix.chunks,
            "chunk_size": imatrix.chunk_size,
            "datasets": imatrix.datasets,
        }
    path = save_manifest(
        output, new_manifest(output, method="quantize", parent=parent, params=params)
    )
    return QuantizeResult(output, path, time.perf_counter() - started, imatrix_path)


def check_output(source: Path, output: Path) -> None:
    if output.exists() and output.is_dir():
        raise ValidationError(f"--output {output} is a directory; name a file", param="output")
    if not output.parent.is_dir():
        raise ValidationError(f"the directory of --output {output} does not exist", param="output")
    if output.exists() and output.resolve() == source.resolve():
        raise ValidationError("--output must not be the source file", param="output")


@contextlib.contextmanager
def scratch_dir(output: Path) -> Iterator[Path]:
    """A temporary directory beside the output (same file system, so the rename is atomic),
    removed with whatever is left in it."""
    path = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write(step: Callable[[], None], target: Path) -> None:
    try:
        step()
    except OSError as exc:
        raise EdgeLLMError(
            f"could not write {target.name}: {exc.strerror or exc} ({free_space(target)}); "
            "nothing was kept"
        ) from exc


def free_space(path: Path) -> str:
    return f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on that disk"


def _stage(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def _calibrate(
    model: Path, calibrate: Calibration, threads: int, progress: Progress | None
) -> Imatrix:
    text = read_text(calibrate.data)
    scorer = load_scorer(model, calibrate.ctx, threads)
    try:
        tokens = scorer.tokenize(text)
        bos = scorer.bos if scorer.add_bos else None
    finally:
        scorer.close()
    windows = [w.tolist() for w in split_windows(tokens, calibrate.ctx, calibrate.chunks, bos)]
    return compute_imatrix(
        model,
        windows,
        n_ctx=calibrate.ctx,
        threads=threads,
        dataset=str(calibrate.data),
        progress=_stage(progress, "imatrix"),
    )


class QuantizerLog(logging.Handler):
    """Reads llama.cpp's quantizer log: one "[  i/  n] name ..." line per tensor (progress),
    and its error lines (for the message when it fails)."""

    _TENSOR = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
    _TOTAL = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")

    def __init__(self, progress: Progress | None):
        super().__init__(logging.DEBUG)
        self.progress = progress
        self.errors: list[str] = []
        self.total_mib: float | None = None  # "quant size = X MiB": the new tensor bytes

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        match = self._TENSOR.match(message)
        if match and self.progress is not None:
            self.progress("quantize", int(match[1]), int(match[2]))
        elif total := self._TOTAL.search(message):
            self.total_mib = float(total[1])
        elif record.levelno >= logging.ERROR:
            self.errors.append(message)


def quantized_bytes(source: Path, qtype: QuantType) -> int:
    """The tensor bytes `source` would have in `qtype`, by llama.cpp's quantizer in dry-run
    mode: its own per-tensor type choices and fallbacks, nothing written."""
    handler = _llama_quantize(source, source, qtype, 1, None, None, dry_run=True)
    if handler.total_mib is None:
        raise EdgeLLMError("llama.cpp's dry run did not report a size")
    return int(handler.total_mib * 2**20)


def _llama_quantize(
    source: Path,
    dest: Path,
    qtype: QuantType,
    threads: int,
    imatrix: Imatrix | None,
    progress: Progress | None,
    *,
    dry_run: bool = False,
) -> QuantizerLog:
    logger = logging.getLogger("edgellm.llama_cpp")
    handler = QuantizerLog(progress)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the quantizer's log is long; its errors reach the user below
    try:
        quantize_file(
            source,
            dest,
            qtype.ftype,
            threads=threads,
            imatrix=imatrix.for_quantizer() if imatrix is not None else None,
            dry_run=dry_run,
        )
    except EdgeLLMError:
        why = handler.errors[-1] if handler.errors else "no reason given"
        raise EdgeLLMError(
            f"llama.cpp's quantizer failed: {why} ({free_space(dest)}); nothing was kept"
        ) from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    return handler
