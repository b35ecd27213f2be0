"""Property tests over JSON schemas built from the supported keywords with random bounds:
each is refused with a 400 or yields a grammar within the size and time bounds that the
grammar sandbox compiles in time; and a constrained generation from it ends within its
max_tokens (or with a clean error), on the real model."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.backends.llama_cpp.grammar import Sandbox, SandboxPool, SandboxSpec
from edgellm.errors import ValidationError
from edgellm.modelfile import default_model_path
from edgellm.structured import LIMITS, schema_grammar
from tests.conftest import MODEL_ID, ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.slow]
# The same examples every run, so the suite is deterministic; EDGELLM_SCHEMA_SEARCH=1 draws new
# ones each run (a wider search, by hand).
DERANDOMIZE = "EDGELLM_SCHEMA_SEARCH" not in os.environ

COUNT = st.one_of(st.integers(0, 12), st.integers(0, 3000), st.just(10**7))
PATTERNS = st.sampled_from(
    ["^[a-z]+$", "^[0-9]{2,4}$", "^(ab|cd)*$", "^x{0,5000}$", "^a{3}b?$", "^\\d+(\\.\\d+)?$"]
)

SCALARS = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("string")},
        optional={"minLength": COUNT, "maxLength": COUNT, "pattern": PATTERNS},
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["integer", "number", "boolean", "null"])}),
    st.fixed_dictionaries(
        {
            "enum": st.lists(
                st.one_of(st.integers(), st.text(max_size=8), st.none()),
                min_size=1,
                max_size=400,
                unique=True,
            )
        }
    ),
    st.fixed_dictionaries({"const": st.one_of(st.integers(), st.text(max_size=20))}),
    st.fixed_dictionaries(
        {
            "type": st.just("string"),
            "format": st.sampled_from(["date", "time", "date-time", "uuid"]),
        }
    ),
)


def _compound(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    names = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
    return st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("array"), "items": children},
            optional={"minItems": COUNT, "maxItems": COUNT},
        ),
        st.fixed_dictionaries(
            {"type": st.just("array"), "prefixItems": st.lists(children, min_size=1, max_size=4)}
        ),
        st.builds(
            lambda props, extra: {
                "type": "object",
                "properties": props,
                "required": sorted(props)[: len(props) // 2],
                "additionalProperties": extra,
            },
            st.dictionaries(names, children, max_size=6),
            st.booleans(),
        ),
        st.builds(
            lambda key, subs: {key: subs},
            st.sampled_from(["anyOf", "oneOf", "allOf"]),
            st.lists(children, min_size=1, max_size=4),
        ),
    )


SCHEMAS = st.recursive(SCALARS, _compound, max_leaves=12)


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    spec = SandboxSpec(default_model_path(), 49152, 1 << 20, 1 << 30)
    sandboxes = SandboxPool(spec, spare=1, keep=2)
    yield sandboxes
    sandboxes.close()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schema=SCHEMAS)
def test_a_schema_is_refused_or_bounded(pool: SandboxPool, schema: dict[str, Any]) -> None:
    started = time.monotonic()
    try:
        grammar = schema_grammar(schema, "format")
    except ValidationError as exc:
        assert exc.param == "format" and exc.status_code == 400
        assert time.monotonic() - started < 2.0
        return
    assert len(grammar) <= LIMITS.grammar_bytes
    assert time.monotonic() - started < 2.0
    reason = pool.check(grammar, 2.0)
    assert reason is None or "compile" in reason, reason


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    proc = ServerProcess("--ctx", "2048", "--parallel", "2", env={"EDGELLM_GRAMMAR_TIMEOUT": "2"})
    yield proc
    proc.stop()


@settings(
    max_examples=30,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schema=SCHEMAS)
def test_a_constrained_generation_ends(srv: ServerProcess, schema: dict[str, Any]) -> None:
    max_tokens = 24
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    }
    started = time.monotonic()
    response = httpx.post(srv.base + "/v1/chat/completions", json=body, timeout=120)
    assert time.monotonic() - started < max_tokens * 2 + 10
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["param"] == "response_format.json_schema.schema", error
        return
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert response.json()["usage"]["completion_tokens"] <= max_tokens
    if choice["finish_reason"] == "stop":  # oneOf is enforced as anyOf (docs/security.md)
        as_any = json.loads(json.dumps(schema).replace('"oneOf"', '"anyOf"'))
        jsonschema.validate(json.loads(choice["message"]["content"]), as_any)


def test_a_sandbox_runs_in_its_own_session() -> None:
    """A terminal's Ctrl-C goes to the whole foreground process group: a sandbox in the
    server's group would die with it while the server drains its requests."""
    spec = SandboxSpec(default_model_path(), 49152, 1 << 20, 1 << 30)
    sandbox = Sandbox(spec)
    try:
        pid = sandbox._proc.pid
        assert os.getsid(pid) == pid != os.getsid(0)
    finally:
        sandbox.kill()
