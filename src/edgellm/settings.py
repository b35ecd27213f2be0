"""Settings: one model per layer, the only source of defaults.

Each model reads, highest priority first: explicit values (CLI flags), `EDGELLM_*` environment
variables, its table in an optional TOML file (`[engine]`, `[server]`), then its defaults.
Every field is all three: `--max-queue` is `EDGELLM_MAX_QUEUE` is `max_queue` in `[engine]`
(edgellm.cli.options makes the flags). A field's `shown_default` is how `--help` states a
default that is None or computed.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from edgellm.errors import ValidationError


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class _TomlTable(PydanticBaseSettingsSource):
    """Reads one table of the TOML config file named by the settings class."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None, table: str):
        super().__init__(settings_cls)
        self._values: dict[str, Any] = {}
        if path is None:
            return
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ValidationError(f"config file not found: {path}", param="config") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValidationError(f"config file {path} is not valid TOML: {exc}") from exc
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise ValidationError(f"config file {path}: [{table}] must be a table")
        self._values = section

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class _LayerSettings(BaseSettings):
    toml_table: ClassVar[str] = ""
    # Set by `load()` for the duration of construction; a class-level default keeps it simple.
    _config_path: ClassVar[Path | None] = None

    model_config = SettingsConfigDict(env_prefix="EDGELLM_", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _TomlTable(settings_cls, cls._config_path, cls.toml_table)
        return (init_settings, env_settings, toml)

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> Any:
        """Build the settings; `overrides` whose value is None are treated as not given."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if config is None and os.environ.get("EDGELLM_CONFIG"):
            config = Path(os.environ["EDGELLM_CONFIG"])
        cls._config_path = config
        try:
            return cls(**given)
        finally:
            cls._config_path = None


class EngineSettings(_LayerSettings):
    """How the model runs: KV cache size, batching, threads, queue."""

    toml_table: ClassVar[str] = "engine"

    ctx: int = Field(
        16384,
        ge=64,
        le=1 << 20,
        description="Total KV cache cells; with the split layout each sequence gets ctx/parallel.",
    )
    parallel: int = Field(8, ge=1, le=256, description="Most sequences running at once.")
    batch: int = Field(
        256, ge=16, le=8192, description="Most tokens decoded in one step (prefill chunk budget)."
    )
    threads: int = Field(
        default_factory=_default_threads,
        ge=1,
        le=512,
        description="CPU threads for llama.cpp.",
        json_schema_extra={"shown_default": "all cores"},
    )
    max_queue: int = Field(
        64, ge=0, le=100_000, description="Most requests waiting; beyond it: 503."
    )
    kv_layout: Literal["split", "shared"] = Field(
        "split",
        description="split: each sequence has its own KV stream of ctx/parallel cells (fastest "
        "with several requests, and greedy output is the same however requests are batched); "
        "shared: one pool any sequence may fill, for one long context among short ones.",
    )
    flash_attn: bool = Field(True, description="Use llama.cpp's flash attention kernels.")
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto",
        description="Embedding pooling; auto: the model file's, else mean.",
    )
    prefix_cache: bool = Field(
        True,
        description="Keep finished requests' KV cells and reuse the longest matching prefix "
        "(multi-turn chats, shared system prompts) instead of recomputing it.",
    )
    grammar_timeout: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Seconds a structured-output grammar may take to compile or to choose one "
        "token (in its sandbox process); beyond it the request ends with an error.",
    )
    grammar_wait: float = Field(
        0.02,
        ge=0,
        le=10,
        description="Seconds a step waits for grammar sandboxes before going on without their "
        "tokens: the most one slow grammar adds to everyone else's step.",
    )
    grammar_memory: int = Field(
        1024, ge=64, le=1 << 20, description="MiB of memory one grammar sandbox may add."
    )


class ServerSettings(_LayerSettings):
    """How the HTTP server listens and what it accepts."""

    toml_table: ClassVar[str] = "server"

    model: Path | None = Field(
        None,
        description="GGUF file, or NAME[:TAG] of the model registry (edgellm models), to serve "
        "(or give it as MODEL_PATH).",
        json_schema_extra={"shown_default": "the embedded model"},
    )
    model_key_file: Path | None = Field(
        None,
        description="Key file of an encrypted registry model (edgellm models keygen); else "
        "$EDGELLM_MODEL_KEY holds the key.",
        json_schema_extra={"shown_default": "none"},
    )
    model_id: str | None = Field(
        None,
        description="Name clients use for the model.",
        json_schema_extra={"shown_default": "the registry name, else from the file name"},
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    max_body_bytes: int = Field(
        4 << 20, ge=1024, description="Largest request body accepted, in bytes; beyond it: 413."
    )
    max_tokens_default: int | None = Field(
        None,
        ge=1,
        description="max_tokens when a request omits it.",
        json_schema_extra={"shown_default": "the rest of the context"},
    )
    # Bounds on one request (edgellm.server.limits): beyond each, a 400 naming the field.
    request_timeout: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Seconds a generation request may take from its arrival; then it ends "
        'with the text generated so far and finish reason "length".',
    )
    max_messages: int = Field(4096, ge=1, le=1 << 20, description="Messages in one chat.")
    max_message_chars: int = Field(
        1 << 20,
        ge=1,
        le=1 << 30,
        description="Characters of one message's content, one prompt or one embedding input.",
    )
    max_request_chars: int = Field(
        2 << 20,
        ge=1,
        le=1 << 30,
        description="Characters of all messages, prompts or embedding inputs of one request.",
    )
    max_content_parts: int = Field(1024, ge=1, le=1 << 20, description="Parts of one message.")
    max_tools: int = Field(128, ge=0, le=1 << 16, description="Tools in one request.")
    max_tool_schema_chars: int = Field(
        32 << 10,
        ge=16,
        le=1 << 30,
        description="Characters of one tool's parameters schema, written as compact JSON.",
    )
    max_tool_calls: int = Field(
        128, ge=0, le=1 << 16, description="Tool calls in one message of a chat's history."
    )
    max_json_depth: int = Field(
        64,
        ge=2,
        le=512,
        description="Nesting of objects and lists in a request body or in tool-call arguments.",
    )
    max_json_objects: int = Field(
        10_000, ge=1, le=1 << 24, description="JSON objects in one request body."
    )
    max_stop_strings: int = Field(16, ge=0, le=4096, description="Stop strings of one request.")
    max_stop_chars: int = Field(256, ge=1, le=1 << 16, description="Characters of a stop string.")
    max_logit_bias: int = Field(1024, ge=0, le=1 << 20, description="logit_bias entries.")
    max_embed_inputs: int = Field(
        2048, ge=1, le=1 << 20, description="Inputs of one embedding request."
    )
    max_prompt_token_ids: int = Field(
        1 << 20,
        ge=1,
        le=1 << 26,
        description="Token ids of a prompt given as ids (or of Ollama's context).",
    )
    max_grammar_bytes: int = Field(
        256 << 10,
        ge=1024,
        le=64 << 20,
        description="Bytes of the grammar made from a JSON schema (structured output, forced "
        "tool calls); a schema whose grammar would be larger is refused before it is built.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="Log level of the server and uvicorn."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text or as JSON objects (one per line: each finished "
        "request, uvicorn's access lines and every other message).",
    )
    log_prompts: bool = Field(
        False,
        description="Put each request's prompt and output text in its log line (off: counts "
        "and timings only).",
    )
    reasoning: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Split <think> reasoning from answers; auto: when the chat template uses it.",
    )
    api_key: str | None = Field(
        None,
        description="When set, every API request must carry it (Authorization: Bearer KEY or "
        "X-Api-Key: KEY).",
        json_schema_extra={"shown_default": "none"},
    )
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate (chain) to serve HTTPS with; needs --tls-key. TLS 1.2 at "
        "least, 1.3 when the client has it (`edgellm tls self-signed` makes a lab one).",
        json_schema_extra={"shown_default": "none: plain HTTP"},
    )
    tls_key: Path | None = Field(
        None,
        description="PEM private key of --tls-cert, unencrypted (keep it 0600).",
        json_schema_extra={"shown_default": "none"},
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (https://app.example) whose pages may call the API, comma-"
        "separated; * for any.",
        json_schema_extra={"shown_default": "none but the server's own pages"},
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names clients may use besides loopback names and the bound address "
        "(a loopback bind refuses others: DNS rebinding), comma-separated.",
        json_schema_extra={"shown_default": "none"},
    )
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a connection has to send its request headers."
    )
    body_timeout: float = Field(
        30.0, gt=0, le=3600, description="Seconds a request has to send its whole body."
    )
    keep_alive: float = Field(
        5.0, gt=0, le=3600, description="Seconds an idle keep-alive connection stays open."
    )
    max_connections: int = Field(
        512, ge=1, le=1 << 20, description="Open connections at most; beyond it: refused."
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Seconds requests in flight have to finish after the first Ctrl-C or "
        "SIGTERM (new ones get 503, /ready 503); then they end with an error and the server "
        "exits.",
    )
    shutdown_timeout: int = Field(
        5,
        ge=0,
        le=3600,
        description="Seconds open connections have to close after the drain; then they are "
        "cancelled.",
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics at GET /metrics.")
    metrics_compat: Literal["off", "vllm"] = Field(
        "off",
        description="vllm: also export the load gauges under vLLM's names "
        "(vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc, "
        "vllm:gpu_cache_usage_perc), for routers that read only those: llm-d's scheduler, the "
        "vLLM production-stack router.",
    )
    metrics_public: bool = Field(
        False,
        description="Let anyone read /metrics; off: with API keys on, it needs a metrics or "
        "admin key.",
    )
    audit: bool = Field(
        True,
        description="Keep the tamper-evident audit log: one HMAC-chained record per API "
        "request (who, what, status, tokens, hashes of input and output) in the data "
        "directory's database (edgellm audit verify checks it).",
    )
    audit_text: bool = Field(
        False,
        description="Put each request's prompt and output text in its audit record (off: "
        "their SHA-256 only).",
    )
    audit_required: bool = Field(
        True,
        description="While the audit log cannot be written (disk full, database locked), "
        "refuse new requests with 503 until it can; off: serve on, records wait in memory.",
    )
    agent_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Answer HAProxy's agent check on this port (same address as --host): "
        "'up NN%' with the free capacity, 'drain' while draining, 'down' when an engine died.",
        json_schema_extra={"shown_default": "off"},
    )
    prefix_cache_scope: Literal["key", "global"] = Field(
        "key",
        description="key: a request reuses cached prompt cells of its own API key's requests "
        "only; global: of any key's (shared system prompts computed once, but a key can learn "
        "from cached_tokens whether another sent a prompt).",
    )

    @field_validator("allowed_origins", "allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class ModelsSettings(_LayerSettings):
    """Which registry models one server serves, and how many stay loaded."""

    toml_table: ClassVar[str] = "models"

    names: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Registry models NAME[:TAG] to serve (or give them as MODEL_PATH ...).",
        json_schema_extra={"shown_default": "none"},
    )
    all: bool = Field(False, description="Serve every tagged model of the registry.")
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Served models to load at start; the others load on their first request.",
        json_schema_extra={"shown_default": "a single served model"},
    )
    max_models: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Most models loaded at once; the least recently used "
        "idle one is unloaded to make room.",
        json_schema_extra={"shown_default": "no limit"},
    )
    max_memory: str | None = Field(
        None,
        description="Memory the loaded models may take (weights + KV cache + buffers), e.g. "
        "8G, 800M; the least recently used idle model is unloaded to make room.",
        json_schema_extra={"shown_default": "no limit"},
    )
    model_keep_alive: str = Field(
        "5m",
        description="How long a model stays loaded after its last request (Ollama's "
        "keep_alive: 30s, 5m, 1h; 0: unload at once; -1: forever). A single served model "
        "stays loaded unless this is set.",
    )

    @field_validator("names", "preload", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            from edgellm.server.lifecycle.memory import parse_size

            parse_size(value)
        return value

    @field_validator("model_keep_alive")
    @classmethod
    def _duration(cls, value: str) -> str:
        from edgellm.server.lifecycle.keep_alive import parse_keep_alive

        parse_keep_alive(value, "model_keep_alive")
        return value
