"""Assemble a served model from settings: check the file, load the template, plan the engine."""

from __future__ import annotations

from pathlib import Path

from edgellm.chat_template import ChatTemplate
from edgellm.engine import AsyncEngine, Engine, SchedulerConfig
from edgellm.modelfile import default_model_path, inspect_gguf
from edgellm.reasoning import detect_reasoning
from edgellm.server.models import Embedder, ServedModel
from edgellm.settings import EngineSettings, ServerSettings


def load_engine(path: Path, settings: EngineSettings) -> Engine:
    """Build the llama.cpp backend and its engine (call on the engine's own thread)."""
    from edgellm.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(path, settings)
    config = SchedulerConfig(
        n_ctx=backend.n_ctx,
        max_running=settings.parallel,
        max_batch_tokens=settings.batch,
        max_queue=settings.max_queue,
        seq_cells=backend.n_ctx // settings.parallel if settings.kv_layout == "split" else None,
        prefix_cache=settings.prefix_cache,
    )
    return Engine(backend, backend, config)


def prepare_model(server: ServerSettings, engine: EngineSettings) -> ServedModel:
    """Check everything that can be checked before loading; the weights load in the engine thread.

    Raises ModelFileError for a missing or malformed GGUF or a chat template that is refused.
    """
    path = server.model or default_model_path()
    info = inspect_gguf(path)
    template = ChatTemplate.load(
        info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
    )
    served = ServedModel(
        model_id=server.model_id or info.model_id,
        info=info,
        template=template,
        engine=AsyncEngine(lambda: load_engine(path, engine)),
        max_tokens_default=server.max_tokens_default,
        reasoning=detect_reasoning(info.chat_template, server.reasoning),
    )

    def make_embedder() -> Embedder:
        from edgellm.backends.llama_cpp import LlamaCppBackend

        backend = served.engine.engine.runner
        assert isinstance(backend, LlamaCppBackend)
        return backend.embedder(engine.pooling, engine.threads)

    served.make_embedder = make_embedder
    return served
