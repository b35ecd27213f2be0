"""What HAProxy's hop adds to one request, apart from the engine: the same edgellm worker asked
directly and through HAProxy configured by `edgellm gateway haproxy` (one worker, health and
agent checks, affinity, buffered requests for retries), on one keep-alive connection each,
alternating. Two requests: `GET /health` (no engine work: the hop and HTTP alone) and a chat
completion of one token (the request path a client sees, prefill included). Medians of N.

    python bench/gateway_hop.py [--n 400]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.compare import free_port
from edgellm.modelfile import default_model_path


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def timed(client: httpx.Client, method: str, url: str, body: dict[str, object] | None) -> float:
    started = time.perf_counter()
    response = client.request(method, url, json=body)
    response.read()
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="requests of each kind, each way")
    args = ap.parse_args()
    place = Path(tempfile.mkdtemp(prefix="edgellm-hop-"))
    back, agent, front = free_port(), free_port(), free_port()
    serve = [sys.executable, "-m", "edgellm.cli", "serve", str(default_model_path()),
             "--port", str(back), "--agent-port", str(agent), "--threads", "2"]  # fmt: skip
    config = place / "haproxy.cfg"
    subprocess.run(
        [sys.executable, "-m", "edgellm.cli", "gateway", "haproxy", "--worker",
         f"http://127.0.0.1:{back}", "--agent-port", str(agent), "--check-interval", "2s",
         "--bind", f"127.0.0.1:{front}", "--stats-bind", f"127.0.0.1:{free_port()}",
         "--stats-socket", str(place / "haproxy.sock"), "-o", str(config)],
        check=True, capture_output=True,
    )  # fmt: skip
    log = (place / "log").open("w")
    worker = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=log)
    try:
        wait_ready(f"http://127.0.0.1:{back}")
        wait_ready(f"http://127.0.0.1:{front}")
        chat = {"model": "smollm2-135m-instruct", "max_tokens": 1,
                "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
        results: dict[str, dict[str, list[float]]] = {}
        with httpx.Client(timeout=30) as client:
            for kind, method, path, body in (
                ("GET /health", "GET", "/health", None),
                ("chat, 1 token", "POST", "/v1/chat/completions", chat),
            ):
                times: dict[str, list[float]] = {"direct": [], "haproxy": []}
                n = args.n if body is None else max(20, args.n // 4)
                for i in range(n):
                    for way, port in (("direct", back), ("haproxy", front))[:: 1 if i % 2 else -1]:
                        times[way].append(timed(client, method, f"http://127.0.0.1:{port}{path}",
                                                body))  # fmt: skip
                results[kind] = times
    finally:
        proxy.terminate()
        proxy.wait(10)
        worker.terminate()
        worker.wait(30)
        log.close()
    print("| request | direct p50 ms | through HAProxy p50 ms | the hop adds |")
    print("| --- | --- | --- | --- |")
    for kind, times in results.items():
        direct, hop = statistics.median(times["direct"]), statistics.median(times["haproxy"])
        print(f"| {kind} (n={len(times['direct'])}) | {direct * 1e3:.2f} | {hop * 1e3:.2f} | "
              f"{(hop - direct) * 1e3:+.2f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
