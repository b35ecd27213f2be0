"""Assemble a served model from settings: check the file, load the template, plan the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.backends import Backend, load_backend
from edgellm.chat_template import ChatTemplate
from edgellm.engine import AsyncEngine, Engine, SchedulerConfig
from edgellm.engine.runner import Embedder
from edgellm.engine.turns import StepTurns
from edgellm.errors import NotReady, ValidationError
from edgellm.modelfile import default_model_path, inspect_gguf
from edgellm.reasoning import detect_reasoning
from edgellm.records import sha256_file
from edgellm.server.lifecycle import FOREVER, ModelTable, Policy, Prepared
from edgellm.server.models import ServedModel
from edgellm.settings import EngineSettings, ModelsSettings, ServerSettings

if TYPE_CHECKING:
    from edgellm.registry import Version
    from edgellm.registry.crypto import MemoryModel
    from edgellm.registry.deploy import Deployment

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

    def __init__(self, path: Path, settings: EngineSettings, version: str = ""):
        self.path = path  # (a memfd path stays valid while `memory` is open)
        self.settings = settings
        self.backend: Backend | None = None  # set once the engine thread has loaded it
        self.version = version  # the file's SHA-256 prefix, known before the engine serves
        self.memory: MemoryModel | None = None  # a decrypted model's memfd, kept open

    def load_engine(self) -> Engine:
        # hashing reads the file once (~0.5 s per GB here); the load then finds it in the page
        # cache. Done before the engine is ready, so every request served sees the version.
        # A registry version's hash was checked already.
        self.version = self.version or sha256_file(self.path)[:VERSION_CHARS]
        self.backend = load_backend(self.path, self.settings)
        return _engine_on(self.backend, self.settings)

    def make_embedder(self) -> Embedder:
        if self.backend is None:
            raise NotReady("the model is still loading")
        return self.backend.embedder(self.settings.pooling, self.settings.threads)


@dataclass(slots=True)
class ModelSource:
    """The file a server loads, and what the registry says of it."""

    path: Path  # a GGUF file, or /proc/self/fd/N: a decrypted registry model in memory
    name: str | None = None  # the registry's name[:tag] (":latest" dropped); None: a plain file
    version: Version | None = None
    memory: MemoryModel | None = None  # holds the decrypted bytes while the server runs


def open_source(server: ServerSettings) -> ModelSource:
    """What `server.model` names: the embedded default (None), an existing file, else a model of
    the registry, checked against its registered hash (decrypted into memory when encrypted)."""
    if server.model is None:
        return ModelSource(default_model_path())
    from edgellm.registry import Registry, looks_like_ref, parse_ref

    if server.model.exists() or not looks_like_ref(str(server.model)):
        return ModelSource(server.model)

    name, tag = parse_ref(str(server.model), param="model")
    with Registry.open() as registry:
        version = registry.resolve(f"{name}:{tag}")
    shown = name if tag == "latest" else f"{name}:{tag}"
    return version_source(version, shown, server.model_key_file)


def version_source(version: Version, shown: str, key_file: Path | None) -> ModelSource:
    """A registry version as a file to load: its blob, hash checked, or its decrypted bytes."""
    from edgellm.registry import check_blob

    if not version.encrypted:
        check_blob(version)  # a blob changed on disk is refused, not served
        return ModelSource(version.blob, shown, version)
    from edgellm.registry.crypto import decrypt_to_memory, load_key

    memory = decrypt_to_memory(version.blob, load_key(key_file), version.sha256)
    return ModelSource(memory.path, shown, version, memory)


def prepare_model(
    server: ServerSettings, engine: EngineSettings, turns: StepTurns | None = None
) -> ServedModel:
    """Check everything that can be checked before loading; the weights load in the engine thread.

    Raises ModelFileError for a missing or malformed GGUF or a chat template that is refused,
    ValidationError for a registry name that names nothing.
    """
    return _served(open_source(server), server, engine, turns)


def _served(
    source: ModelSource,
    server: ServerSettings,
    engine: EngineSettings,
    turns: StepTurns | None,
    model_id: str | None = None,
) -> ServedModel:
    info = inspect_gguf(source.path)  # on the decrypted bytes, for an encrypted version
    if source.version is not None:  # the registry hashed it: /api/tags need not read it again
        info.metadata["edgellm.sha256"] = source.version.sha256
    template = ChatTemplate.load(
        info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
    )
    version = source.version.short if source.version else ""
    loaded = _LoadedBackend(source.path, engine, version)
    loaded.memory = source.memory  # the decrypted bytes live as long as the served model
    return ServedModel(
        model_id=model_id or server.model_id or source.name or info.model_id,
        info=info,
        template=template,
        engine=AsyncEngine(loaded.load_engine, turns=turns),
        max_tokens_default=server.max_tokens_default,
        params=dict(source.version.params) if source.version else {},  # `models set` values
        reasoning=detect_reasoning(info.chat_template, server.reasoning),
        make_embedder=loaded.make_embedder,
        turns=turns,
        version_of=lambda: loaded.version,
    )


class RegistryLoader:
    """Versions of the registry as the model table loads them (edgellm.server.lifecycle)."""

    def __init__(self, server: ServerSettings, engine: EngineSettings, turns: StepTurns):
        self.server = server
        self.engine = engine
        self.turns = turns
        self._registry: Any = None  # opened in the watcher's thread on first use

    def prepare(self, version: Version, model_id: str) -> Prepared:
        from edgellm.server.lifecycle.memory import estimate_bytes

        source = version_source(version, model_id, self.server.model_key_file)
        try:
            model = _served(source, self.server, self.engine, self.turns, model_id)
            estimate = estimate_bytes(model.info, self.engine.ctx)
        except BaseException:
            if source.memory is not None:
                source.memory.close()
            raise
        memory = source.memory
        return Prepared(model, estimate, memory.close if memory is not None else _nothing)

    def warm(self, version: Version) -> None:
        """Read a plain version's header now (kept per process while the file is unchanged)."""
        if not version.encrypted:
            inspect_gguf(version.blob)

    def deployments(self) -> list[Deployment]:
        from edgellm.registry import Registry

        with Registry.open() as registry:
            return registry.deployments()


def _nothing() -> None:
    pass


def model_table(
    server: ServerSettings, engine: EngineSettings, models: ModelsSettings
) -> ModelTable:
    """The models `serve` serves: a GGUF file (or the embedded default) loaded at start, or
    registry names loaded on demand and following their tags (checked now: a bad name, blob or
    budget is refused before the server starts)."""
    from edgellm.registry import looks_like_ref
    from edgellm.server.lifecycle.keep_alive import parse_keep_alive
    from edgellm.server.lifecycle.memory import parse_size

    turns = StepTurns()  # engines of one process take turns (edgellm.engine.turns)
    refs = list(models.names)
    single = server.model
    if single is not None and not single.exists() and looks_like_ref(str(single)):
        refs.insert(0, str(single))
        single = None
    if not refs and not models.all:
        return ModelTable([prepare_model(server, engine, turns)])
    if single is not None:
        raise ValidationError(
            f"{single}: serve one GGUF file alone, or registry names together", param="model"
        )
    if server.model_id is not None:
        raise ValidationError(
            "--model-id names one file's model; registry models are served by their names",
            param="model_id",
        )
    keep_alive = parse_keep_alive(models.model_keep_alive, "model_keep_alive") or 0.0
    lone = len(refs) == 1 and not models.all
    if lone and "model_keep_alive" not in models.model_fields_set:
        keep_alive = FOREVER  # one served model stays loaded, as a file does
    policy = Policy(
        max_models=models.max_models,
        max_memory=parse_size(models.max_memory) if models.max_memory else None,
        keep_alive_s=keep_alive,
    )
    table = ModelTable(loader=RegistryLoader(server, engine, turns), policy=policy)
    preload = list(models.preload) or (refs[:1] if lone else [])
    table.open_registry(refs, all_tags=models.all, preload=preload)
    return table
