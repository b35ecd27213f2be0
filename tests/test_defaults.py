"""Defaults for what a client omits (issue 18, acceptance 4), in-process with the scripted
runner: the sampler gets the client's value, else the version's parameter (`models set`),
else the GGUF's general.sampling.*, else the API's (llama.cpp server's on /v1, Ollama's on
/api); the version's system prompt, max_tokens, num_ctx and reasoning likewise. The
real-model checks are in test_defaults_real.py; `KEY=VALUE` parsing in test_params.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import httpx
import pytest

from edgellm.chat_template import ChatTemplate
from edgellm.cli.chat import _http_reply
from edgellm.compress.convert import copy_metadata
from edgellm.engine import SamplingParams
from edgellm.modelfile import default_model_path, inspect_gguf
from edgellm.reasoning import ReasoningFormat
from edgellm.registry import Registry
from edgellm.registry.params import parse_assignments
from edgellm.server.defaults import GGUF_SAMPLING, LLAMA_SERVER, OLLAMA, gguf_defaults
from edgellm.server.models import ServedModel
from edgellm.serving import prepare_model
from edgellm.settings import EngineSettings, ServerSettings
from tests.gguf_tools import write_tensors
from tests.inprocess import MODEL, ScriptedServer, scripted_server

anyio = pytest.mark.anyio
HI = [{"role": "user", "content": "hi"}]
SET = {  # a version's `models set` values (as parse_assignments stores them)
    "temperature": 0.6,
    "top_p": 0.5,
    "top_k": 7,
    "min_p": 0.1,
    "repeat_penalty": 1.2,
    "repeat_last_n": 32,
    "stop": ["zz"],
}


def sampled(srv: ScriptedServer) -> SamplingParams:
    """The SamplingParams the sampler got for the latest request."""
    chunks = [c for batch in srv.runner.batches for c in batch.chunks]
    return chunks[-1].sampling


def fed_text(srv: ScriptedServer) -> str:
    """What the model holds of the latest request (its prompt, cached prefix included, then
    its output), as text: TextRunner's tokens are a text's bytes plus one."""
    chunks = [c for batch in srv.runner.batches for c in batch.chunks]
    tokens = srv.runner.kv[chunks[-1].seq_id]
    return bytes((t - 1) % 256 for t in tokens).decode(errors="replace")


def knobs(s: SamplingParams) -> tuple[float, float, int, float, float, int]:
    return (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.penalty_last_n)


VERSION_KNOBS = (0.6, 0.5, 7, 0.1, 1.2, 32)


def test_the_gguf_keys_are_ggufs_own() -> None:
    spelled = {v for k, v in vars(gguf.Keys.General).items() if k.startswith("SAMPLING_")}
    assert set(GGUF_SAMPLING) <= spelled
    assert gguf_defaults(
        {
            "general.sampling.temp": 0.3,
            "general.sampling.top_k": 5,
            "general.sampling.top_p": 7.0,  # out of range: as if absent
            "general.sampling.min_p": "0.1",  # not a number: as if absent
            "general.sampling.penalty_repeat": 1.05,
            "general.sampling.penalty_last_n": 128,
        }
    ) == {"temperature": 0.3, "top_k": 5, "repeat_penalty": 1.05, "repeat_last_n": 128}


# --- the sampler's values, layer by layer ---------------------------------------------------


@anyio
async def test_the_api_defaults_when_nothing_sets_them() -> None:
    async with scripted_server() as srv:
        assert (await srv.chat()).status_code == 200
        assert knobs(sampled(srv)) == knobs(LLAMA_SERVER)
        assert knobs(LLAMA_SERVER) == (0.8, 0.95, 40, 0.05, 1.0, 64)  # llama.cpp's server
        body = {"model": MODEL, "messages": HI, "stream": False, "options": {"num_predict": 2}}
        assert (await srv.client.post("/api/chat", json=body)).status_code == 200
        assert knobs(sampled(srv)) == knobs(OLLAMA) == (0.8, 0.9, 40, 0.0, 1.1, 64)


@anyio
async def test_the_versions_values_when_the_request_omits_them() -> None:
    async with scripted_server() as srv:
        srv.model.params = dict(SET)
        assert (await srv.chat()).status_code == 200
        assert knobs(sampled(srv)) == VERSION_KNOBS
        assert sampled(srv).stop == ("zz",)
        text = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert (await srv.client.post("/v1/completions", json=text)).status_code == 200
        assert knobs(sampled(srv)) == VERSION_KNOBS
        body = {"model": MODEL, "messages": HI, "stream": False, "num_predict": 2}
        assert (await srv.client.post("/api/chat", json=body)).status_code == 200
        assert knobs(sampled(srv)) == VERSION_KNOBS  # over Ollama's defaults too
        assert sampled(srv).stop == ("zz",)


@anyio
async def test_the_clients_values_win_field_by_field() -> None:
    async with scripted_server() as srv:
        srv.model.params = dict(SET)
        given = await srv.chat(temperature=0.0, top_k=3, stop=["qq"], seed=5)
        assert given.status_code == 200
        assert knobs(sampled(srv)) == (0.0, 0.5, 3, 0.1, 1.2, 32)
        assert (sampled(srv).stop, sampled(srv).seed) == (("qq",), 5)
        # null is "not given", as OpenAI's API takes it
        assert (await srv.chat(temperature=None, top_p=None)).status_code == 200
        assert knobs(sampled(srv)) == VERSION_KNOBS
        options = {"temperature": 1.5, "repeat_last_n": 8, "stop": "qq", "num_predict": 2}
        body = {"model": MODEL, "messages": HI, "stream": False, "options": options}
        assert (await srv.client.post("/api/chat", json=body)).status_code == 200
        assert knobs(sampled(srv)) == (1.5, 0.5, 7, 0.1, 1.2, 8)
        assert sampled(srv).stop == ("qq",)


@anyio
async def test_the_ggufs_sampling_metadata_below_the_versions() -> None:
    async with scripted_server() as srv:
        metadata = {**srv.model.info.metadata, "general.sampling.temp": 0.3}
        metadata["general.sampling.top_k"] = 5
        srv.model.info = dataclasses.replace(srv.model.info, metadata=metadata)
        assert (await srv.chat()).status_code == 200
        assert knobs(sampled(srv)) == (0.3, 0.95, 5, 0.05, 1.0, 64)  # the rest: llama.cpp's
        body = {"model": MODEL, "messages": HI, "stream": False, "num_predict": 2}
        assert (await srv.client.post("/api/chat", json=body)).status_code == 200
        assert knobs(sampled(srv)) == (0.3, 0.9, 5, 0.0, 1.1, 64)  # the rest: Ollama's
        srv.model.params = {"temperature": 0.6}
        assert (await srv.chat()).status_code == 200
        assert knobs(sampled(srv)) == (0.6, 0.95, 5, 0.05, 1.0, 64)
        assert (await srv.chat(temperature=1.0)).status_code == 200
        assert sampled(srv).temperature == 1.0


def _with_sampling_metadata(dst: Path, values: dict[str, float | int]) -> Path:
    """A copy of the default model with general.sampling.* fields added."""
    reader = gguf.GGUFReader(default_model_path())
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer, {})
    for key, value in values.items():
        kind = gguf.GGUFValueType.INT32 if isinstance(value, int) else gguf.GGUFValueType.FLOAT32
        writer.add_key_value(key, value, kind)
    write_tensors(writer, [(t, t.data) for t in reader.tensors])
    return dst


@anyio
async def test_a_gguf_written_with_sampling_fields_gives_its_defaults(tmp_path: Path) -> None:
    path = _with_sampling_metadata(
        tmp_path / "sampling.gguf",
        {gguf.Keys.General.SAMPLING_TEMP: 0.25, gguf.Keys.General.SAMPLING_TOP_P: 0.5},
    )
    info = inspect_gguf(path)
    assert gguf_defaults(info.metadata) == {"temperature": 0.25, "top_p": 0.5}
    async with scripted_server() as srv:
        srv.model.info = info
        assert (await srv.chat()).status_code == 200
        assert knobs(sampled(srv)) == (0.25, 0.5, 40, 0.05, 1.0, 64)


# --- max_tokens, num_ctx, system, reasoning -------------------------------------------------


@anyio
async def test_max_tokens_the_clients_else_the_versions_else_the_apis() -> None:
    async with scripted_server() as srv:
        srv.model.params = {"max_tokens": 5}
        answer = (await srv.chat(max_tokens=None)).json()
        assert (answer["usage"]["completion_tokens"], sampled(srv).max_tokens) == (5, 5)
        assert answer["choices"][0]["finish_reason"] == "length"
        assert (await srv.chat(max_tokens=3)).json()["usage"]["completion_tokens"] == 3
        text = {"model": MODEL, "prompt": "hi"}
        out = (await srv.client.post("/v1/completions", json=text)).json()
        assert out["usage"]["completion_tokens"] == 5
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        assert (await srv.client.post("/api/generate", json=body)).json()["eval_count"] == 5
        srv.model.params = {"max_tokens": 1 << 20}  # a default beyond the context: a cap
        assert (await srv.chat(max_tokens=None)).status_code == 200
        srv.model.params = {}
        out = (await srv.client.post("/v1/completions", json=text)).json()
        assert out["usage"]["completion_tokens"] == 16  # OpenAI's default there


@anyio
async def test_num_ctx_the_versions_when_the_client_gives_none() -> None:
    async with scripted_server() as srv:
        first = (await srv.chat(max_tokens=1)).json()["usage"]["prompt_tokens"]
        srv.model.params = {"num_ctx": first + 4}
        answer = (await srv.chat(max_tokens=None)).json()
        assert answer["usage"]["completion_tokens"] == 4  # the rest of that smaller context
        srv.model.params = {"num_ctx": first - 1}
        too_small = await srv.chat(max_tokens=None)
        assert too_small.status_code == 400, too_small.text
        options = {"num_ctx": 2048, "num_predict": 2}
        body = {"model": MODEL, "messages": HI, "stream": False, "options": options}
        assert (await srv.client.post("/api/chat", json=body)).status_code == 200


@anyio
async def test_the_versions_system_prompt_when_the_chat_has_none() -> None:
    async with scripted_server() as srv:
        srv.model.params = {"system": "Answer like a pirate."}
        assert (await srv.chat()).status_code == 200
        assert "Answer like a pirate." in fed_text(srv)
        own = [{"role": "system", "content": "Be brief."}, *HI]
        assert (await srv.chat(messages=own)).status_code == 200
        assert "Be brief." in fed_text(srv) and "pirate" not in fed_text(srv)
        generate = {"model": MODEL, "prompt": "hi", "stream": False, "num_predict": 2}
        assert (await srv.client.post("/api/generate", json=generate)).status_code == 200
        assert "pirate" in fed_text(srv)
        generate["system"] = "Be brief."
        assert (await srv.client.post("/api/generate", json=generate)).status_code == 200
        assert "pirate" not in fed_text(srv)
        raw = {"model": MODEL, "prompt": "hi", "stream": False, "raw": True, "num_predict": 2}
        assert (await srv.client.post("/api/generate", json=raw)).status_code == 200
        assert "pirate" not in fed_text(srv)  # a raw prompt is taken as it is


THINKING = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" + (
    "{% if enable_thinking is defined %}[thinking {{ enable_thinking }}]{% endif %}"
)


def _reasoning_model(model: ServedModel, reasons: bool) -> None:
    model.template = ChatTemplate.load(THINKING, bos_token="", eos_token="")
    model.reasoning = ReasoningFormat() if reasons else None


@anyio
async def test_reasoning_is_the_default_of_think() -> None:
    async with scripted_server() as srv:
        _reasoning_model(srv.model, reasons=True)
        srv.model.params = {"reasoning": False}
        assert (await srv.chat()).status_code == 200
        assert "[thinking False]" in fed_text(srv)
        assert (await srv.chat(think=True)).status_code == 200
        assert "[thinking True]" in fed_text(srv)
        srv.model.params = {"reasoning": True}
        body = {"model": MODEL, "messages": HI, "stream": False, "num_predict": 2}
        assert (await srv.client.post("/api/chat", json=body)).status_code == 200
        assert "[thinking True]" in fed_text(srv)
        assert (await srv.client.post("/api/chat", json={**body, "think": False})).is_success
        assert "[thinking False]" in fed_text(srv)
        # "on" for a model that does not reason is no default at all (and no 400)
        _reasoning_model(srv.model, reasons=False)
        assert (await srv.chat()).status_code == 200
        assert "[thinking" not in fed_text(srv)


@anyio
async def test_edgellm_chat_sends_only_what_its_user_gave() -> None:
    async with scripted_server() as srv:
        srv.model.params = {"temperature": 0.6, "max_tokens": 3}
        transport = httpx.ASGITransport(app=srv.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1/v1") as c:
            reply = _http_reply(c, MODEL, {})
            text = "".join([piece async for piece in reply(list(HI))])
            assert len(text) == 3 and sampled(srv).temperature == 0.6
            reply = _http_reply(c, MODEL, {"temperature": 0.0})
            assert "".join([piece async for piece in reply(list(HI))])
            assert sampled(srv).temperature == 0.0


def test_a_registry_versions_parameters_reach_the_served_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    with Registry.open() as registry:
        registry.add_file(default_model_path(), "tiny:q4", link=True)
        registry.set_params("tiny:q4", parse_assignments(["temperature=0.6", "ctx=1024"]))
    served = prepare_model(ServerSettings(model=Path("tiny:q4")), EngineSettings())
    assert served.params == {"temperature": 0.6, "num_ctx": 1024}
    assert prepare_model(ServerSettings(), EngineSettings()).params == {}  # a plain file


@anyio
async def test_api_show_lists_the_versions_parameters_as_ollama_does() -> None:
    async with scripted_server() as srv:
        srv.model.params = {**SET, "stop": ["zz", "yy"], "max_tokens": 64, "system": "Be brief."}
        shown = (await srv.client.post("/api/show", json={"model": MODEL})).json()
    lines = [line.split(None, 1) for line in shown["parameters"].splitlines()]
    assert ["temperature", "0.6"] in lines and ["num_predict", "64"] in lines
    assert [v for k, v in lines if k == "stop"] == ['"zz"', '"yy"']
    assert "system" not in dict(lines)
    assert 'SYSTEM """Be brief."""' in shown["modelfile"]
    assert "PARAMETER temperature" in shown["modelfile"]


@anyio
async def test_repeat_last_n_minus_one_means_the_context() -> None:
    """-1 is "the whole context" (Ollama, llama-server); libllama itself would turn it off."""
    async with scripted_server() as srv:
        srv.model.params = {"repeat_penalty": 1.2, "repeat_last_n": -1}
        assert (await srv.chat()).status_code == 200
        assert sampled(srv).penalty_last_n == srv.model.n_ctx > 0
        body = {"model": MODEL, "messages": HI, "stream": False,
                "options": {"num_predict": 2, "repeat_last_n": -1, "num_ctx": 256}}  # fmt: skip
        assert (await srv.client.post("/api/chat", json=body)).status_code == 200
        assert sampled(srv).penalty_last_n == 256
