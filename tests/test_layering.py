"""Import layering, read from the source: `llama_cpp` only inside the backend package, evaluate
never importing compress (compress builds on evaluate), and the loaders importing no backend."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edgellm

PACKAGE = Path(edgellm.__file__).parent  # src/edgellm
BACKEND = PACKAGE / "backends" / "llama_cpp"


def _imports(path: Path) -> list[str]:
    """Every module `path` imports absolutely, at any depth (function-level ones too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _importers(prefix: str) -> set[Path]:
    return {
        path
        for path in PACKAGE.rglob("*.py")
        if any(name == prefix or name.startswith(prefix + ".") for name in _imports(path))
    }


def test_only_the_backend_package_imports_llama_cpp() -> None:
    importers = _importers("llama_cpp")
    assert importers, "the scan found no importer at all: it is broken"
    outside = sorted(str(p.relative_to(PACKAGE)) for p in importers if BACKEND not in p.parents)
    assert outside == []


def test_evaluate_does_not_import_compress() -> None:
    evaluate = PACKAGE / "evaluate"
    assert _importers("edgellm.evaluate"), "the scan found no importer at all: it is broken"
    assert sorted(p.name for p in _importers("edgellm.compress") if evaluate in p.parents) == []


def test_loaders_and_their_users_import_no_backend() -> None:
    """In a fresh interpreter: importing these leaves libllama unloaded."""
    modules = [
        "edgellm.backends",
        "edgellm.backends.llama_cpp",
        "edgellm.structured",
        "edgellm.serving",
        "edgellm.evaluate.run",
        "edgellm.compress.quantize",
        "edgellm.compress.sweep",
        "edgellm.compress.prune",
        "edgellm.compress.recipe",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_serving_and_the_cli_import_no_torch() -> None:
    """PyTorch is an extra for distill and export: the server, the CLI and the compression
    modules that do not train leave it unloaded (it costs seconds and hundreds of MB)."""
    modules = [
        "edgellm.serving",
        "edgellm.cli.main",
        "edgellm.compress.prune",
        "edgellm.compress.recipe",
        "edgellm.compress.distill",
        "edgellm.compress.gguf_model",
        "edgellm.compress.onnx_export",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
