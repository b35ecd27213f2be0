"""`edgellm gateway haproxy` with Debian's haproxy: every generated configuration passes
`haproxy -c`, bad input is one line, and a real HAProxy configured only by it carries the
official openai client's requests (a stream included) to a real worker whose agent check sets
its weight."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import EDGELLM, ServerProcess, free_port

MODEL_ID = "smollm2-135m-instruct"


def haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        pytest.fail("haproxy is missing: ./dev check installs it (Debian package haproxy)")
    return path


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGELLM, "gateway", "haproxy", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--affinity", "none"],
        ["--agent-port", "8001", "--check-interval", "5s", "--fall", "2", "--rise", "1"],
        ["--bind", "127.0.0.1:9000", "--stats-bind", "127.0.0.1:9404"],
    ],
)
def test_every_generated_config_passes_haproxy_check(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "haproxy.cfg"
    workers = ["--worker", "http://10.0.0.11:8000", "--worker", "http://10.0.0.12:8000"]
    workers += ["--worker", "https://box.lan:8443"]
    made = gateway(*workers, *extra, "--stats-socket", str(tmp_path / "s.sock"), "-o", str(out))
    assert made.returncode == 0, made.stderr
    checked = subprocess.run(
        [haproxy(), "-c", "-f", str(out)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = out.read_text()
    assert text.count("option httpchk GET /ready") == 1
    assert ("balance hash var(txn.affinity)" in text) == ("none" not in extra)
    assert ("agent-check agent-port 8001" in text) == ("--agent-port" in extra)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--worker", "ftp://x:1"], "http://HOST:PORT"),
        (["--worker", "http://x:notaport"], "port"),
        (["--worker", "http://x:1", "--bind", "nowhere"], "ADDRESS:PORT"),
        (["--worker", "http://x:1", "--affinity", "sticky"], "session or none"),
        (["--worker", "http://x:1", "--worker", "http://x:1"], "twice"),
        (["--worker", "http://x:1", "--check-interval", "soon"], "check_interval"),
        (["--worker", "http://x:1", "-o", "/nonexistent/dir/haproxy.cfg"], "cannot write"),
    ],
)
def test_bad_gateway_input_is_one_line(args: list[str], says: str) -> None:
    done = gateway(*args)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr


def test_a_real_haproxy_carries_requests_to_a_worker(tmp_path: Path) -> None:
    agent = free_port()
    worker = ServerProcess("--ctx", "2048", "--parallel", "4", "--agent-port", str(agent))
    front, stats = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    made = gateway(
        "--worker", worker.base, "--agent-port", str(agent), "--check-interval", "1s",
        "--bind", f"127.0.0.1:{front}", "--stats-bind", f"127.0.0.1:{stats}",
        "--stats-socket", str(tmp_path / "s.sock"), "-o", str(cfg),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    log = (tmp_path / "haproxy.log").open("w")
    proxy = subprocess.Popen([haproxy(), "-db", "-f", str(cfg)], stdout=log, stderr=log)
    try:
        metrics = ""
        for _ in range(100):  # the first checks pass within a few seconds
            try:
                metrics = httpx.get(f"http://127.0.0.1:{stats}/metrics", timeout=2).text
            except httpx.HTTPError:
                metrics = ""
            if 'haproxy_server_status{proxy="edgellm_workers"' in metrics and (
                'haproxy_server_check_status{proxy="edgellm_workers"' in metrics
            ):
                up = [
                    line for line in metrics.splitlines()
                    if line.startswith('haproxy_server_status{proxy="edgellm_workers"')
                    and 'state="UP"' in line
                ]  # fmt: skip
                if up and up[0].endswith(" 1"):
                    break
            time.sleep(0.1)
        else:
            shown = (tmp_path / "haproxy.log").read_text()[-2000:]
            raise AssertionError(f"the worker never came up in HAProxy:\n{shown}")
        weights = [
            line for line in metrics.splitlines()
            if line.startswith('haproxy_server_weight{proxy="edgellm_workers"')
        ]  # fmt: skip
        assert weights and weights[0].endswith(" 100"), weights  # the idle agent: up 100%
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{front}/v1", api_key="unused")
        chunks = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=12,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert raw.headers["x-edgellm-model-version"]
        client.close()
        # three long streams on the worker (4 sequences): its agent says up 25%, and HAProxy
        # sets that weight at its next agent check (every 2 s)
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 250, "ignore_eos": True}  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            busy = [
                pool.submit(
                    httpx.post, worker.base + "/v1/chat/completions", json=body, timeout=120
                )
                for _ in range(3)
            ]
            seen = []
            for _ in range(60):
                text = httpx.get(f"http://127.0.0.1:{stats}/metrics", timeout=2).text
                seen = [
                    line.rsplit(" ", 1)[1] for line in text.splitlines()
                    if line.startswith('haproxy_server_weight{proxy="edgellm_workers"')
                ]  # fmt: skip
                if seen and float(seen[0]) < 100:
                    break
                time.sleep(0.1)
            assert seen and float(seen[0]) <= 50, seen  # the agent's share, not the configured 100
            for done in busy:
                assert done.result().status_code == 200
    finally:
        proxy.terminate()
        proxy.wait(10)
        log.close()
        worker.stop()
