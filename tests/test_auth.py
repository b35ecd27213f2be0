"""API keys, in-process with the official clients on the app's ASGI transport (moved from the
real-server tests: a key is checked before any model work, so no real tokens are needed)."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

from edgellm.settings import ServerSettings
from tests.conftest import MODEL_ID
from tests.inprocess import scripted_server

pytestmark = pytest.mark.anyio


async def test_api_key_from_either_header() -> None:
    async with scripted_server(ServerSettings(api_key="s3cret"), model_id=MODEL_ID) as srv:
        http, base = srv.client, "http://127.0.0.1"
        url = "/v1/models"
        assert (await http.get(url)).status_code == 401
        wrong = await http.get(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert (await http.get(url, headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await http.get(url, headers={"X-Api-Key": "s3cret"})).status_code == 200
        ollama_401 = await http.get("/api/tags")
        assert ollama_401.status_code == 401 and isinstance(ollama_401.json()["error"], str)
        assert (await http.get("/health")).status_code == 200
        transport = httpx.ASGITransport(app=srv.app)
        async with openai.AsyncOpenAI(
            base_url=base + "/v1",
            api_key="s3cret",
            http_client=httpx.AsyncClient(transport=transport),
        ) as client:
            assert [m.id async for m in client.models.list()] == [MODEL_ID]
        oc = ollama.AsyncClient(
            host=base, headers={"Authorization": "Bearer s3cret"}, transport=transport
        )
        assert (await oc.list()).models


async def test_official_clients_read_a_401() -> None:
    async with scripted_server(ServerSettings(api_key="s3cret"), model_id=MODEL_ID) as srv:
        transport = httpx.ASGITransport(app=srv.app)
        async with openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1",
            api_key="wrong",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport),
        ) as client:
            with pytest.raises(openai.AuthenticationError, match="not valid"):
                await client.models.list()
        oc = ollama.AsyncClient(host="http://127.0.0.1", transport=transport)
        with pytest.raises(ollama.ResponseError, match="no API key") as raised:
            await oc.list()
        assert raised.value.status_code == 401
