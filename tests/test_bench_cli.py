"""`edgellm bench` as a user runs it, against a real `edgellm serve`."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EDGELLM, MODEL_ID, ServerProcess, free_port


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGELLM, "bench", *args], capture_output=True, text=True, timeout=timeout
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stdout + result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_levels_json_and_plot(server: ServerProcess, tmp_path: Path) -> None:
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    result = bench(
        "--url", server.base, "--concurrency", "1,3", "--requests", "6", "--input-len", "8:16",
        "--output-len", "8", "--ignore-eos", "--slo", "ttft=60s,tpot=10s",
        "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "TTFT" in result.stdout and "goodput" in result.stdout
    record = json.loads(out.read_text())
    assert record["config"]["model"] == MODEL_ID  # found on /v1/models
    assert [level["concurrency"] for level in record["levels"]] == [1, 3]
    for level in record["levels"]:
        s = level["summary"]
        assert (s["completed"], s["failed"], s["output_tokens"]) == (6, 0, 48)
        assert s["goodput"] == pytest.approx(s["request_throughput"])  # loose SLOs: all meet
        for r in level["requests"]:
            assert r["output_tokens"] == 8 and len(r["itls"]) == 7  # ignore_eos: exactly 8
            assert 0 < r["ttft"] < r["e2e"] and r["tpot"] > 0
            assert r["input_tokens"] > 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_workload_resends_the_history(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "chat.json"
    result = bench(
        "--url", server.base + "/v1/", "--workload", "chat", "--concurrency", "2",
        "--turns", "3", "--requests", "6", "--system-len", "40", "--input-len", "10",
        "--output-len", "6", "--ignore-eos", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())["levels"][0]["requests"]
    assert len(records) == 6 and all(r["error"] is None for r in records)
    for conversation in (0, 1):
        turns = sorted(
            (r["turn"], r["input_tokens"]) for r in records if r["conversation"] == conversation
        )
        assert [t for t, _ in turns] == [0, 1, 2]
        sizes = [n for _, n in turns]
        # each turn resends the system prompt, earlier turns and replies: ~10 + 6 tokens more
        assert sizes[0] > 40 and all(b - a >= 16 for a, b in itertools.pairwise(sizes))


def test_unreachable_url_is_one_line() -> None:
    result = bench("--url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--requests", "2")
    assert result.returncode == 1
    assert len(error_lines(result)) == 1 and "connect" in error_lines(result)[0]
    result = bench("--url", f"http://127.0.0.1:{free_port()}", "--requests", "2")  # no --model
    assert result.returncode == 1 and "cannot reach" in error_lines(result)[0]


def test_wrong_model_is_reported_per_kind(server: ServerProcess) -> None:
    result = bench("--url", server.base, "--model", "nope", "--requests", "3", "--warmup", "0")
    assert result.returncode == 1
    assert "http_404 x3" in result.stdout  # the per-kind report
    assert len(error_lines(result)) == 1 and "every request failed" in error_lines(result)[0]
    result = bench("--url", server.base, "--model", "nope", "--requests", "3")  # warm-up fails
    assert result.returncode == 1 and "http_404" in error_lines(result)[0]


def test_server_errors_mid_run_are_counted_and_the_run_goes_on() -> None:
    busy = ServerProcess("--parallel", "1", "--max-queue", "1", "--ctx", "1024")
    try:
        result = bench(
            "--url", busy.base, "--concurrency", "6", "--requests", "6", "--warmup", "0",
            "--output-len", "32", "--ignore-eos",
        )  # fmt: skip
    finally:
        busy.stop()
    assert result.returncode == 0, result.stderr  # some succeeded
    assert "http_503 x4" in result.stdout  # one running, one queued, four turned away
    assert "2/6" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0"], "bad --concurrency"),
        (["--concurrency", "1,x"], "bad --concurrency"),
        (["--rate", "-2"], "bad --rate"),
        (["--slo", "ttft=fast"], "bad SLO"),
        (["--workload", "nope"], "unknown workload"),
        (["--workload", "file"], "needs --file"),
        (["--workload", "file", "--file", "/nonexistent.jsonl"], "cannot read"),
        (["--input-len", "9:3"], "bad input_len"),
        (["--extra-body", "[1]"], "bad --extra-body"),
        (["--url", "ftp://x"], "bad URL"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], message: str) -> None:
    result = bench("--url", "http://127.0.0.1:9", "--model", "m", *args)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and message in lines[0], result.stderr
