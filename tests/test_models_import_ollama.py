"""`edgellm models import-ollama` on a fake Ollama models directory (manifests/ and blobs/) and a
real SQLite registry in a temporary $EDGELLM_HOME, through the real CLI: names, hard links,
template and parameters; manifests whose digests are no digests (path traversal), blobs whose
bytes are not their digest, unreadable layers, and re-imports that keep what the user set."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from edgellm.cli.main import app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "home"
    monkeypatch.setenv("EDGELLM_HOME", str(path))
    monkeypatch.delenv("EDGELLM_MODEL_KEY", raising=False)
    yield path


def tiny_gguf(path: Path, seed: int, *, params: int = 4096) -> Path:
    """A small, well-formed llama GGUF whose weights depend on `seed` (so its hash does)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-{seed}")
    writer.add_context_length(512)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    weights = np.random.default_rng(seed).standard_normal(params).astype(np.float32)
    writer.add_tensor("token_embd.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cli(*args: str) -> Any:
    """Run `edgellm ARGS` in-process; returns the result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args))


def cli_json(*args: str) -> Any:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


class Ollama:
    """A fake Ollama models directory."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True)

    def blob(self, data: bytes, *, digest: str | None = None) -> str:
        """Store `data` as a blob; named by its own digest unless `digest` is given."""
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        (self.blobs / digest.replace(":", "-")).write_bytes(data)
        return digest

    def manifest(self, path: str, layers: dict[str, str]) -> None:
        where = self.root / "manifests" / path
        where.parent.mkdir(parents=True, exist_ok=True)
        body = {"schemaVersion": 2, "config": {"digest": self.blob(b"{}")},
                "layers": [{"mediaType": f"application/vnd.ollama.image.{kind}",
                            "digest": digest} for kind, digest in layers.items()]}  # fmt: skip
        where.write_text(json.dumps(body))

    def imported(self) -> dict[str, Any]:
        """`import-ollama DIR --json`, by name."""
        return {row["name"]: row for row in cli_json("models", "import-ollama", str(self.root))}


@pytest.fixture
def ollama(tmp_path: Path) -> Ollama:
    return Ollama(tmp_path / "ollama")


def test_import_ollama_links_blobs_with_names_tags_and_params(home: Path, tmp_path: Path) -> None:
    ollama = tmp_path / "ollama"
    blobs = ollama / "blobs"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest.replace(":", "-")).write_bytes(data)
        return digest

    def manifest(path: str, layers: dict[str, str]) -> None:
        where = ollama / "manifests" / path
        where.parent.mkdir(parents=True, exist_ok=True)
        body = {"schemaVersion": 2, "config": {"digest": blob(b"{}")},
                "layers": [{"mediaType": f"application/vnd.ollama.image.{kind}",
                            "digest": digest} for kind, digest in layers.items()]}  # fmt: skip
        where.write_text(json.dumps(body))

    model = blob(tiny_gguf(tmp_path / "m.gguf", 5).read_bytes())
    params = blob(json.dumps({"temperature": 0.6, "stop": ["</s>"], "mirostat": 1}).encode())
    system = blob(b"You are terse.")
    template = blob(b"{{ .Prompt }}")
    layers = {"model": model, "params": params, "system": system, "template": template}
    manifest("registry.ollama.ai/library/tiny/1b", layers)
    manifest("registry.ollama.ai/someone/tiny/latest", {"model": model})
    manifest("registry.ollama.ai/library/adapter/latest", {"adapter": model})
    result = cli_json("models", "import-ollama", str(ollama))
    by_name = {row["name"]: row for row in result}
    assert set(by_name) == {"tiny:1b", "someone/tiny:latest", "adapter:latest"}
    assert "no GGUF model layer" in by_name["adapter:latest"]["skipped"]
    source = blobs / model.replace(":", "-")
    for name in ("tiny:1b", "someone/tiny:latest"):
        assert Path(by_name[name]["blob"]).stat().st_ino == source.stat().st_ino  # not copied
    shown = cli_json("models", "show", "tiny:1b")
    assert shown["params"] == {"temperature": 0.6, "stop": ["</s>"], "system": "You are terse."}
    assert shown["operation"] == "import-ollama"
    assert shown["operation_params"]["ollama_template"] == "{{ .Prompt }}"


def test_a_digest_that_is_a_path_is_refused(home: Path, tmp_path: Path, ollama: Ollama) -> None:
    """`../..` in a layer's digest would reach any readable file: such a manifest is skipped,
    naming the digest, and nothing of the file it points at reaches the registry."""
    tiny_gguf(tmp_path / "outside.gguf", 1)  # what the traversal would register
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    model = ollama.blob(tiny_gguf(tmp_path / "m.gguf", 2).read_bytes())
    ollama.manifest("registry.ollama.ai/library/out/latest", {"model": "../../outside.gguf"})
    ollama.manifest("registry.ollama.ai/library/tpl/latest",
                    {"model": model, "template": "../../secret.txt"})  # fmt: skip
    ollama.manifest("registry.ollama.ai/library/sys/latest",
                    {"model": model, "system": "sha256:../../../secret.txt"})  # fmt: skip
    ollama.manifest("registry.ollama.ai/library/ok/latest", {"model": model})
    imported = ollama.imported()
    for name in ("out:latest", "tpl:latest", "sys:latest"):
        assert "is not a sha256 digest" in imported[name]["skipped"], imported[name]
    assert "blob" in imported["ok:latest"]
    listed = cli("models", "list", "--json")
    assert [row["name"] for row in json.loads(listed.stdout)] == ["ok:latest"]
    assert "hunter2" not in listed.stdout
    stored = [p.read_bytes() for p in home.rglob("*") if p.is_file()]  # database, WAL, blobs
    assert stored and not any(b"hunter2" in data for data in stored)


def test_a_blob_whose_bytes_are_not_its_digest_is_skipped(
    home: Path, tmp_path: Path, ollama: Ollama
) -> None:
    """The registry records the SHA-256 it hashed, not the one the manifest claims."""
    data = tiny_gguf(tmp_path / "m.gguf", 3).read_bytes()
    claimed = "sha256:" + hashlib.sha256(b"other bytes").hexdigest()
    ollama.blob(data, digest=claimed)
    ollama.manifest("registry.ollama.ai/library/bad/latest", {"model": claimed})
    model = ollama.blob(data)
    system = ollama.blob(b"Be evil.", digest="sha256:" + hashlib.sha256(b"Be kind.").hexdigest())
    ollama.manifest("registry.ollama.ai/library/sys/latest", {"model": model, "system": system})
    imported = ollama.imported()
    assert imported["bad:latest"]["skipped"] == "its blob's bytes do not match its digest"
    assert imported["sys:latest"]["skipped"] == "its system layer's bytes do not match its digest"
    assert cli_json("models", "list") == []


def test_an_unreadable_layer_skips_that_model_and_the_import_goes_on(
    home: Path, tmp_path: Path, ollama: Ollama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A system prompt that is not UTF-8, a template the user may not read: each model is
    reported skipped, one line, and the others are imported."""
    model = ollama.blob(tiny_gguf(tmp_path / "m.gguf", 4).read_bytes())
    latin1 = ollama.blob("Tu es concis, très concis.".encode("latin-1"))
    template = ollama.blob(b"{{ .System }} {{ .Prompt }}")
    ollama.manifest("registry.ollama.ai/library/latin1/latest", {"model": model, "system": latin1})
    ollama.manifest("registry.ollama.ai/library/locked/latest",
                    {"model": model, "template": template})  # fmt: skip
    ollama.manifest("registry.ollama.ai/library/fine/latest", {"model": model})
    locked = ollama.blobs / template.replace(":", "-")
    real_open = Path.open

    def no_access(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_access)  # root reads any file: simulate the denial
    imported = ollama.imported()
    assert "system layer is not UTF-8 text" in imported["latin1:latest"]["skipped"]
    assert "cannot read its template layer" in imported["locked:latest"]["skipped"]
    assert "Permission denied" in imported["locked:latest"]["skipped"]
    assert "blob" in imported["fine:latest"]
    assert [row["name"] for row in cli_json("models", "list")] == ["fine:latest"]


def test_params_are_typed_values_and_a_reimport_keeps_what_the_user_set(
    home: Path, tmp_path: Path, ollama: Ollama
) -> None:
    """A `stop` given as one string is that string (not its JSON quoting); repeat_last_n -1
    (Ollama: the whole context) is kept as -1, which the server serves as the context too;
    num_predict is max_tokens. Importing again fills only the keys the version lacks."""
    model = ollama.blob(tiny_gguf(tmp_path / "m.gguf", 6).read_bytes())
    params = ollama.blob(json.dumps({
        "temperature": 0.6, "stop": "</s>", "repeat_last_n": -1, "num_predict": 128,
        "num_ctx": 4096, "top_k": 40,
    }).encode())  # fmt: skip
    ollama.manifest("registry.ollama.ai/library/tiny/1b", {"model": model, "params": params})
    assert "blob" in ollama.imported()["tiny:1b"]
    want = {"temperature": 0.6, "stop": ["</s>"], "repeat_last_n": -1, "max_tokens": 128,
            "num_ctx": 4096, "top_k": 40}  # fmt: skip
    assert cli_json("models", "show", "tiny:1b")["params"] == want
    cli_json("models", "set", "tiny:1b", "temperature=0.2", "system=Be brief.")
    cli_json("models", "unset", "tiny:1b", "top_k")
    again = ollama.imported()["tiny:1b"]
    assert "blob" in again and again["params"] == want | {"temperature": 0.2, "system": "Be brief."}
    assert cli_json("models", "show", "tiny:1b")["params"] == again["params"]


def test_a_param_out_of_range_skips_the_model_naming_it(
    home: Path, tmp_path: Path, ollama: Ollama
) -> None:
    model = ollama.blob(tiny_gguf(tmp_path / "m.gguf", 7).read_bytes())
    params = ollama.blob(json.dumps({"temperature": 9}).encode())
    ollama.manifest("registry.ollama.ai/library/hot/latest", {"model": model, "params": params})
    skipped = ollama.imported()["hot:latest"]["skipped"]
    assert skipped.startswith("its parameters: temperature must be a number between 0 and 2")
