"""The CLI as a user runs it: one clear line and a non-zero exit for every bad model file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edgellm import __version__
from edgellm.chat_template import ChatTemplate
from edgellm.errors import ModelFileError, ValidationError
from edgellm.modelfile import inspect_gguf, model_id_from_path
from tests.conftest import EDGELLM, free_port
from tests.gguf_tools import copy_with_metadata, truncated_copy

EVIL_TEMPLATE = (
    "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    "{% for m in messages %}{{ m.content }}{% endfor %}"
)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGELLM, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], contains: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and contains in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.strip() == f"edgellm {__version__}"
    help_text = run_cli("serve", "--help").stdout
    assert "--parallel" in help_text and "Example" in help_text
    assert "127.0.0.1" in help_text  # defaults written in help survive Rich's markup
    for command in ("convert", "quantize", "eval", "plan"):
        assert "Example: edgellm " + command in run_cli(command, "--help").stdout


@pytest.fixture(scope="module")
def evil_gguf(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("evil") / "evil.gguf"
    return copy_with_metadata(model_path, dst, {"tokenizer.chat_template": EVIL_TEMPLATE})


def test_serve_refuses_truncated_gguf(model_path: Path, tmp_path: Path) -> None:
    bad = truncated_copy(model_path, tmp_path / "cut.gguf", 5_000_000)
    assert_one_line_error(run_cli("serve", str(bad), "--port", str(free_port())), "truncated")


def test_serve_refuses_text_file_named_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("these are my notes, not a model\n")
    assert_one_line_error(run_cli("serve", str(fake), "--port", str(free_port())), "not a GGUF")


def test_serve_refuses_header_only_gguf(model_path: Path, tmp_path: Path) -> None:
    bad = truncated_copy(model_path, tmp_path / "head.gguf", 24)
    assert_one_line_error(run_cli("serve", str(bad), "--port", str(free_port())), "GGUF")


def test_serve_refuses_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("serve", str(tmp_path / "nope.gguf")), "not found")


def test_serve_refuses_template_that_escapes_the_sandbox(evil_gguf: Path) -> None:
    inspect_gguf(evil_gguf)  # the file itself is a valid GGUF
    assert_one_line_error(
        run_cli("serve", str(evil_gguf), "--port", str(free_port())), "unsafe operation"
    )


def test_serve_refuses_public_bind_without_keys() -> None:
    assert_one_line_error(run_cli("serve", "--host", "0.0.0.0"), "--insecure")


def test_bad_setting_from_environment() -> None:
    result = subprocess.run(
        [*EDGELLM, "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"EDGELLM_CTX": "lots", "PATH": "/usr/bin:/bin"},
    )
    assert_one_line_error(result, "ctx")


def test_template_sandbox_blocks_internals_at_render_time() -> None:
    with pytest.raises(ModelFileError, match="unsafe"):
        ChatTemplate.load(EVIL_TEMPLATE)
    sneaky = ChatTemplate(
        "{% for m in messages %}{% if m.content == 'x' %}{{ m.__class__.__init__.__globals__ }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    assert sneaky.render([{"role": "user", "content": "fine"}]) == "fine"
    with pytest.raises(ValidationError):
        sneaky.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
        ("DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf", "deepseek-r1-distill-qwen-7b"),
        ("model-f16.gguf", "model"),
        ("weird name!.gguf", "weird-name"),
    ],
)
def test_model_id_from_file_name(name: str, expected: str) -> None:
    assert model_id_from_path(Path(name)) == expected


def test_chat_in_process_answers_and_quits(model_path: Path) -> None:
    result = subprocess.run(
        [*EDGELLM, "chat", "--max-tokens", "8", "--temperature", "0"],
        input="Hello!\n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Chatting with smollm2-135m-instruct")
    assert len(lines) >= 2 and lines[1].startswith("> ") and len(lines[1]) > 2


def test_chat_against_unreachable_server() -> None:
    result = run_cli("chat", "--url", f"http://127.0.0.1:{free_port()}/v1")
    assert_one_line_error(result, "cannot reach")
