"""`edgellm models compare` through the real CLI against a local HTTP server that serves a
scripted exposition (the figures known in advance) behind a key: the numbers it prints, and its
one-line refusals (no key, a name the server never served)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.test_models_registry import cli, one_line_error

KEY = "metrics-key"
A, B = "0a0a0a0a0a0a", "0b0b0b0b0b0b"  # the primary and the mirror candidate


def _histogram(name: str, version: str, buckets: dict[str, int], total: float) -> str:
    lines = [f'{name}_bucket{{model="m:prod",version="{version}",le="{le}"}} {n}'
             for le, n in buckets.items()]  # fmt: skip
    count = list(buckets.values())[-1]
    lines += [f'{name}_count{{model="m:prod",version="{version}"}} {count}',
              f'{name}_sum{{model="m:prod",version="{version}"}} {total}']  # fmt: skip
    return "\n".join(lines)


# A: 100 client requests (2 of them 500), TTFT half under 0.1 s and half in (0.1, 0.5], E2E
# all in (1, 2] with 200 s of request time for 1000 tokens. B: 98 mirrored copies (90 match,
# 8 differ) and 10 conversations of its own as a canary, all TTFT under 0.1 s. Another model's
# series must not count.
EXPOSITION = "\n".join([
    "# TYPE edgellm_requests_total counter",
    f'edgellm_requests_total{{model="m:prod",version="{A}",api="openai",status="200"}} 90',
    f'edgellm_requests_total{{model="m:prod",version="{A}",api="ollama",status="200"}} 8',
    f'edgellm_requests_total{{model="m:prod",version="{A}",api="openai",status="500"}} 2',
    f'edgellm_requests_total{{model="m:prod",version="{B}",api="openai",status="200"}} 10',
    f'edgellm_requests_total{{model="m:prod",version="{B}",api="mirror",status="200"}} 98',
    'edgellm_requests_total{model="other",version="0c0c0c0c0c0c",api="openai",status="200"} 7',
    "# TYPE edgellm_generation_tokens_total counter",
    f'edgellm_generation_tokens_total{{model="m:prod",version="{A}"}} 1000',
    f'edgellm_generation_tokens_total{{model="m:prod",version="{B}"}} 1080',
    "# TYPE edgellm_mirror_requests_total counter",
    f'edgellm_mirror_requests_total{{model="m:prod",version="{B}",result="match"}} 90',
    f'edgellm_mirror_requests_total{{model="m:prod",version="{B}",result="differ"}} 8',
    "# TYPE edgellm_time_to_first_token_seconds histogram",
    _histogram("edgellm_time_to_first_token_seconds", A,
               {"0.1": 50, "0.5": 100, "+Inf": 100}, 20.0),
    _histogram("edgellm_time_to_first_token_seconds", B,
               {"0.1": 108, "0.5": 108, "+Inf": 108}, 5.0),
    "# TYPE edgellm_e2e_request_latency_seconds histogram",
    _histogram("edgellm_e2e_request_latency_seconds", A,
               {"1.0": 0, "2.0": 100, "+Inf": 100}, 200.0),
    _histogram("edgellm_e2e_request_latency_seconds", B,
               {"1.0": 108, "2.0": 108, "+Inf": 108}, 54.0),
    "",
])  # fmt: skip


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self._answer(401, b'{"error": {"message": "no API key"}}', "application/json")
        elif self.path == "/metrics":
            self._answer(200, EXPOSITION.encode(), "text/plain; version=0.0.4")
        else:
            self._answer(404, b"{}", "application/json")

    def _answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_compare_prints_each_version_from_the_metrics(url: str) -> None:
    done = cli("models", "compare", "m:prod", "--url", url, "--api-key", KEY, "--json")
    assert done.exit_code == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["name"] == "m:prod"
    b, a = out["versions"]  # most requests first, mirrored copies counted: B's 108
    assert (a["version"], b["version"]) == (A, B)
    assert (a["requests"], a["errors"], a["mirrored"]) == (100, 2, 0)
    assert (b["requests"], b["errors"], b["mirrored"]) == (10, 0, 98)
    # histogram_quantile: rank 50 ends the first bucket; rank 99 is 49/50 into the second
    assert a["ttft_p50_s"] == pytest.approx(0.1)
    assert a["ttft_p99_s"] == pytest.approx(0.1 + 0.4 * 49 / 50)
    assert a["e2e_p50_s"] == pytest.approx(1.5) and a["e2e_p99_s"] == pytest.approx(1.99)
    assert a["tokens_per_s"] == pytest.approx(1000 / 200)
    assert a["mirror_agreement"] is None
    assert b["mirror_agreement"] == pytest.approx(90 / 98)
    assert b["ttft_p99_s"] == pytest.approx(0.099)

    table = cli("models", "compare", "m:prod", "--url", url, "--api-key", KEY)
    assert table.exit_code == 0, table.stderr
    assert A in table.stdout and B in table.stdout and "92%" in table.stdout


def test_compare_refusals_are_one_line(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGELLM_API_KEY", raising=False)
    refused = one_line_error(cli("models", "compare", "m:prod", "--url", url))
    assert "401" in refused and "--api-key" in refused
    monkeypatch.setenv("EDGELLM_API_KEY", KEY)  # the key from the environment
    never = one_line_error(cli("models", "compare", "nosuch:tag", "--url", url))
    assert "no request of nosuch:tag" in never
    assert cli("models", "compare", "m:prod", "--url", url).exit_code == 0
