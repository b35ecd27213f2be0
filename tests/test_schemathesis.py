"""Schemathesis against the server's own OpenAPI document (GET /openapi.json), in-process: the
real app, pipeline and engine around the scripted runner (tests/inprocess.py), with auth on,
once with a valid key and once with none. Every case, positive (valid per the document) and
negative (not), must get no 5xx and an answer its operation declares: status code, content type
and schema (each SSE event too).

Half the cases are steered towards the served model (a generated model name is never one), so
they reach the pipeline rather than a 404. The suite's run is 368 cases (and ~180 more on the
real model); a large run: `EDGELLM_SCHEMATHESIS_EXAMPLES=150 pytest tests/test_schemathesis.py`
(docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edgellm.server import create_app
from edgellm.serving import prepare_model
from edgellm.settings import EngineSettings, ServerSettings
from tests.conftest import MODEL_ID
from tests.inprocess import MODEL, TextRunner, scripted_model

KEY = "edg-schemathesis-key"
AUTH = {"authorization": f"Bearer {KEY}"}
DEADLINE_S = 5  # --request-timeout: a long generation ends with "length" well before the client's
EXAMPLES = int(os.environ.get("EDGELLM_SCHEMATHESIS_EXAMPLES", "10"))  # per operation and mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def make_app() -> FastAPI:
    """Auth on; schemathesis' client says Host: testserver; generations stay short. One app per
    run: schemathesis ends an app's lifespan (its engine) after each test."""
    settings = ServerSettings(
        api_key=KEY, allowed_hosts=["testserver"], max_tokens_default=8, request_timeout=DEADLINE_S
    )
    # no batch records (the scripted runner keeps every batch otherwise: thousands here)
    return create_app(settings, [scripted_model(QuietRunner(n_ctx=2048, seq_cells=512))])


class QuietRunner(TextRunner):
    def execute(self, work: Any) -> Any:
        output = super().execute(work)
        self.batches.clear()
        return output


def _steer(case: Any, model: str) -> None:
    """Towards a request the server can serve: the served model, text where the document
    lets content be null, no fields this server refuses whatever their value."""
    body = case.body
    if case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = model
    if not isinstance(body, dict):
        return
    body["model"] = model
    for name in ("n", "logprobs", "images", "suffix", "dimensions", "echo", "think"):
        body.pop(name, None)
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            message.pop("images", None)
            if message.get("content") is None:
                message["content"] = "hi"


def _fuzz(
    app: FastAPI, headers: dict[str, str], model: str = MODEL
) -> tuple[Counter[str], list[str]]:
    # the document itself needs a key (every route but /, /health and /ready does); loading it
    # starts the app's lifespan
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    for served in app.state.models:
        served.engine.wait_loaded()
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = _operation_test(result.ok(), mode, headers, model, statuses, failures)
            with contextlib.suppress(Unsatisfiable):  # an operation without input has no negative
                run()
    return statuses, failures


def _operation_test(
    operation: Any,
    mode: GenerationMode,
    headers: dict[str, str],
    model: str,
    statuses: Counter[str],
    failures: list[str],
) -> Any:
    """Hypothesis' test of one operation: each case sent, its answer checked."""

    @given(case=operation.as_strategy(generation_mode=mode), steer=st.booleans())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Any, steer: bool) -> None:
        if steer:
            _steer(case, model)
        response = case.call(headers=headers, timeout=4 * DEADLINE_S)
        statuses[f"{operation.label} {response.status_code}"] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, FailureGroup) as exc:  # each failure, not just hypothesis' first
            failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])

    return one


@pytest.mark.parametrize("with_key", [True, False], ids=["valid key", "no key"])
def test_schemathesis_finds_no_server_error_and_no_undeclared_answer(with_key: bool) -> None:
    headers = AUTH if with_key else {}
    started = time.monotonic()
    try:
        statuses, failures = _fuzz(make_app(), headers)
    finally:
        shutdown_lifespans()  # the app's engine (schemathesis' plugin does it too, after a test)
    cases = sum(statuses.values())
    print(f"\n[schemathesis] {cases} cases in {time.monotonic() - started:.1f} s: {dict(statuses)}")
    assert not failures, "\n\n".join(failures[:5])
    assert cases >= 150 * EXAMPLES // 10
    if with_key:  # the steered half reached the model: generations were served
        assert statuses["POST /v1/chat/completions 200"] + statuses["POST /api/chat 200"] > 0
    else:
        assert set(statuses) >= {"POST /v1/chat/completions 401", "GET /health 200"}
    assert not any(label.endswith(" 500") for label in statuses)


@pytest.mark.model
@pytest.mark.slow
def test_schemathesis_on_the_real_model() -> None:
    """The same with a valid key against the real default model: real tokens, and the
    schemas schemathesis writes compiled and run as grammars in their sandboxes."""
    settings = ServerSettings(
        api_key=KEY, allowed_hosts=["testserver"], max_tokens_default=8, request_timeout=DEADLINE_S
    )
    model = prepare_model(settings, EngineSettings.load(ctx=2048, parallel=4))
    started = time.monotonic()
    try:
        statuses, failures = _fuzz(create_app(settings, [model]), AUTH, MODEL_ID)
    finally:
        shutdown_lifespans()
    cases = sum(statuses.values())
    print(f"\n[schemathesis] {cases} cases in {time.monotonic() - started:.1f} s: {dict(statuses)}")
    assert not failures, "\n\n".join(failures[:5])
    assert statuses["POST /v1/chat/completions 200"] + statuses["POST /api/chat 200"] > 0
