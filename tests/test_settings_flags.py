"""Every settings field is a `serve` flag with the model's default in its help, an
`EDGELLM_<FIELD>` variable and a config-file key, with flag > env > config > default."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import typer.main
from pydantic.fields import FieldInfo
from typer.core import TyperGroup
from typer.testing import CliRunner

from edgellm.cli.main import app
from edgellm.cli.options import flag_name
from edgellm.cli.serve import settings_from_cli
from edgellm.settings import EngineSettings, ServerSettings, _default_threads

MODELS = {"server": ServerSettings, "engine": EngineSettings}
FIELDS = {name: table for table, model in MODELS.items() for name in model.model_fields}

# A valid value other than the default for every field; a new field needs one here.
OTHER: dict[str, Any] = {
    "model": Path("/models/other.gguf"),
    "model_key_file": Path("/etc/edgellm/model.key"),
    "model_id": "other-model",
    "host": "0.0.0.0",
    "port": 9001,
    "max_body_bytes": 2048,
    "max_tokens_default": 100,
    "request_timeout": 30.5,
    "max_messages": 100,
    "max_message_chars": 5000,
    "max_request_chars": 20000,
    "max_content_parts": 8,
    "max_tools": 4,
    "max_tool_schema_chars": 2048,
    "max_tool_calls": 2,
    "max_json_depth": 16,
    "max_json_objects": 500,
    "max_stop_strings": 4,
    "max_stop_chars": 32,
    "max_logit_bias": 10,
    "max_embed_inputs": 16,
    "max_prompt_token_ids": 4096,
    "max_grammar_bytes": 65536,
    "log_level": "debug",
    "log_format": "json",
    "log_prompts": True,
    "reasoning": "off",
    "api_key": "sk-test",
    "tls_cert": Path("/etc/edgellm/server.pem"),
    "tls_key": Path("/etc/edgellm/server-key.pem"),
    "allowed_origins": ["https://a.example", "https://b.example"],
    "allowed_hosts": ["box.lan"],
    "header_timeout": 1.5,
    "body_timeout": 2.5,
    "keep_alive": 3.5,
    "max_connections": 64,
    "drain_timeout": 2.5,
    "shutdown_timeout": 9,
    "metrics": False,
    "metrics_compat": "vllm",
    "metrics_public": True,
    "audit": False,
    "audit_text": True,
    "audit_required": False,
    "agent_port": 9101,
    "prefix_cache_scope": "global",
    "ctx": 4096,
    "parallel": 2,
    "batch": 64,
    "threads": _default_threads() + 1,
    "max_queue": 7,
    "kv_layout": "shared",
    "flash_attn": False,
    "pooling": "cls",
    "prefix_cache": False,
    "grammar_timeout": 1.25,
    "grammar_wait": 0.5,
    "grammar_memory": 128,
}


@pytest.fixture(autouse=True)
def no_edgellm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("EDGELLM_"):
            monkeypatch.delenv(name)


def field(name: str) -> FieldInfo:
    return MODELS[FIELDS[name]].model_fields[name]


@functools.cache
def serve_command() -> Any:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return group.commands["serve"]


def parse(args: list[str]) -> tuple[ServerSettings, EngineSettings]:
    """What `edgellm serve ARGS` would run with: click's parsing, then serve's own step."""
    params = dict(serve_command().make_context("serve", args).params)
    params.pop("insecure")
    return settings_from_cli(params.pop("model_path"), params.pop("config"), params)


def value_of(name: str, settings: tuple[ServerSettings, EngineSettings]) -> Any:
    return getattr(settings[0] if FIELDS[name] == "server" else settings[1], name)


def flag_args(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag_name(name) if value else "--no-" + flag_name(name)[2:]]
    return [flag_name(name), ",".join(value) if isinstance(value, list) else str(value)]


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, list) else str(value)


def toml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # TOML's basic strings and string arrays read like JSON's for these values
    return json.dumps([str(v) for v in value] if isinstance(value, list) else str(value))


def expected_default(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    assert info.default is not None and info.default_factory is None, "needs a shown_default"
    if isinstance(info.default, bool):
        return "on" if info.default else "off"
    return str(info.default)


@pytest.fixture(scope="module")
def help_rows() -> dict[str, str]:
    """`serve --help`'s option rows, keyed by flag, each row's wrapped lines joined."""
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows: dict[str, str] = {}
    flag = ""
    for line in result.output.splitlines():
        cells = line.strip("│ ").split()
        if cells and cells[0].startswith("--"):
            flag = cells[0]
            rows[flag] = ""
        if flag and cells:
            rows[flag] += " " + " ".join(cells)
    return rows


def test_fields_have_test_values_and_distinct_names() -> None:
    assert set(OTHER) == set(FIELDS)
    assert not set(ServerSettings.model_fields) & set(EngineSettings.model_fields)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_help_shows_a_flag_with_the_models_default(name: str, help_rows: dict[str, str]) -> None:
    rows = help_rows
    assert flag_name(name) in rows, f"serve --help has no {flag_name(name)}"
    row = rows[flag_name(name)]
    assert f"(default: {expected_default(field(name))}" in row, row
    if isinstance(field(name).default, bool):
        assert "--no-" + flag_name(name)[2:] in row


@pytest.mark.parametrize("name", sorted(FIELDS))
@pytest.mark.parametrize("form", ["flag", "env", "config"])
def test_every_form_reaches_the_field(
    name: str, form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = OTHER[name]
    assert value != value_of(name, parse([])), "the test value must not be the default"
    if form == "flag":
        settings = parse(flag_args(name, value))
    elif form == "env":
        monkeypatch.setenv("EDGELLM_" + name.upper(), env_text(value))
        settings = parse([])
    else:
        config = tmp_path / "edgellm.toml"
        config.write_text(f"[{FIELDS[name]}]\n{name} = {toml_text(value)}\n")
        settings = parse(["--config", str(config)])
    assert value_of(name, settings) == value


# (config, environment, flag) values, each different from the one beside it
PRECEDENCE: dict[str, tuple[Any, Any, Any]] = {
    "ctx": (1024, 2048, 4096),
    "port": (9001, 9002, 9003),
    "flash_attn": (False, True, False),
    "reasoning": ("on", "off", "on"),
    "allowed_origins": (["https://c.example"], ["https://e.example"], ["https://f.example"]),
}


@pytest.mark.parametrize("name", sorted(PRECEDENCE))
def test_flag_beats_env_beats_config(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_config, in_env, in_flag = PRECEDENCE[name]
    config = tmp_path / "edgellm.toml"
    config.write_text(f"[{FIELDS[name]}]\n{name} = {toml_text(in_config)}\n")
    monkeypatch.setenv("EDGELLM_CONFIG", str(config))  # the variable names the file too
    monkeypatch.setenv("EDGELLM_" + name.upper(), env_text(in_env))
    assert value_of(name, parse(flag_args(name, in_flag))) == in_flag
    assert value_of(name, parse([])) == in_env
    monkeypatch.delenv("EDGELLM_" + name.upper())
    assert value_of(name, parse([])) == in_config


def test_model_path_argument_or_model_flag(tmp_path: Path) -> None:
    assert parse(["a.gguf"])[0].model == Path("a.gguf")
    assert parse(["--model", "b.gguf"])[0].model == Path("b.gguf")
    result = CliRunner().invoke(app, ["serve", "a.gguf", "--model", "b.gguf"])
    assert result.exit_code == 1
    assert "give the model once" in result.output
