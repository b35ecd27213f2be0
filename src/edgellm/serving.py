"""Assemble a served model from settings: check the file, load the template, plan the engine."""

from __future__ import annotations

from pathlib import Path

from edgellm.backends import Backend, load_backend
from edgellm.chat_template import ChatTemplate
from edgellm.engine import AsyncEngine, Engine, SchedulerConfig
from edgellm.engine.runner import Embedder
from edgellm.errors import NotReady
from edgellm.modelfile import default_model_path, inspect_gguf
from edgellm.reasoning import detect_reasoning
from edgellm.records import sha256_file
from edgellm.server.models import ServedModel
from edgellm.settings import EngineSettings, ServerSettings

VERSION_CHARS = 12  # of the weights' SHA-256: a model's version in metrics and logs


def load_engine(path: Path, settings: EngineSettings) -> Engine:
    """Build the llama.cpp backend and its engine (call on the engine's own thread)."""
    return _engine_on(load_backend(path, settings), settings)


def _engine_on(backend: Backend, settings: EngineSettings) -> Engine:
    n_ctx = backend.runner.n_ctx
    config = SchedulerConfig(
        n_ctx=n_ctx,
        max_running=settings.parallel,
        max_batch_tokens=settings.batch,
        max_queue=settings.max_queue,
        seq_cells=n_ctx // settings.parallel if settings.kv_layout == "split" else None,
        prefix_cache=settings.prefix_cache,
    )
    return Engine(backend.runner, backend.tokenizer, config)


class _LoadedBackend:
    """The backend the engine thread loads, kept for the embedder factory (the engine itself
    sees only its runner and tokenizer)."""

    def __init__(self, path: Path, settings: EngineSettings):
        self.path = path
        self.settings = settings
        self.backend: Backend | None = None  # set once the engine thread has loaded it
        self.version = ""  # the file's SHA-256 prefix, known before the engine serves

    def load_engine(self) -> Engine:
        # hashing reads the file once (~0.5 s per GB here); the load then finds it in the page
        # cache. Done before the engine is ready, so every request served sees the version.
        self.version = sha256_file(self.path)[:VERSION_CHARS]
        self.backend = load_backend(self.path, self.settings)
        return _engine_on(self.backend, self.settings)

    def make_embedder(self) -> Embedder:
        if self.backend is None:
            raise NotReady("the model is still loading")
        return self.backend.embedder(self.settings.pooling, self.settings.threads)


def prepare_model(server: ServerSettings, engine: EngineSettings) -> ServedModel:
    """Check everything that can be checked before loading; the weights load in the engine thread.

    Raises ModelFileError for a missing or malformed GGUF or a chat template that is refused.
    """
    path = server.model or default_model_path()
    info = inspect_gguf(path)
    template = ChatTemplate.load(
        info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
    )
    loaded = _LoadedBackend(path, engine)
    return ServedModel(
        model_id=server.model_id or info.model_id,
        info=info,
        template=template,
        engine=AsyncEngine(loaded.load_engine),
        max_tokens_default=server.max_tokens_default,
        reasoning=detect_reasoning(info.chat_template, server.reasoning),
        make_embedder=loaded.make_embedder,
        version_of=lambda: loaded.version,
    )
