"""Side-by-side throughput: edgellm vs llama-cpp-python's server, same GGUF, same threads.

Each server is started alone (never two at once: they would share the CPU), warmed up, then
sent `--requests` chat completions at `--concurrency` with `max_tokens` output tokens each
(end-of-generation suppressed, so every request does the same work). Rounds alternate between
servers; the table reports the median round and the ratio edgellm / peer.

    ./dev bench --concurrency 8 --max-tokens 128 --requests 16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgellm.modelfile import default_model_path

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a steam engine works.",
    "Describe a journey across the desert.",
    "Write an essay about the history of bread.",
    "Tell me everything you know about the moon.",
    "Describe a busy market in the morning.",
    "Write a letter to a friend about your garden.",
    "Explain how rivers shape the land.",
]
EOG_TOKENS = (0, 2)  # SmolLM2's <|endoftext|> and <|im_end|>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    argv: list[str]  # with {port} and {model} placeholders
    model_name: str
    body_extra: dict[str, object]  # how to make this server ignore EOS


def servers(threads: int, ctx: int, parallel: int) -> list[Server]:
    bias = {str(t): -100 for t in EOG_TOKENS}
    return [
        Server(
            "edgellm",
            [
                sys.executable,
                "-m",
                "edgellm.cli",
                "serve",
                "{model}",
                "--port",
                "{port}",
                "--ctx",
                str(ctx),
                "--parallel",
                str(parallel),
                "--threads",
                str(threads),
            ],
            "smollm2-135m-instruct",
            {"ignore_eos": True},
        ),
        # llama-cpp-python's server has no batching across requests: its settings are the
        # same context and threads; it serves one request at a time behind a lock.
        Server(
            "llama-cpp-python",
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                "{model}",
                "--port",
                "{port}",
                "--n_ctx",
                str(ctx),
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
            ],
            "{model}",
            {"logit_bias": bias},
        ),
    ]


class Running:
    def __init__(self, server: Server, model: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [a.format(port=self.port, model=model) for a in server.argv]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited; log: {self.log.name}")
            try:
                if self._ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{server.name} did not start; log: {self.log.name}")

    def _ready(self) -> bool:
        """edgellm says so on /ready (503 while loading); a peer without /ready, on /v1/models."""
        ready = httpx.get(self.base + "/ready", timeout=1).status_code
        if ready != 404:
            return ready == 200
        return httpx.get(self.base + "/v1/models", timeout=1).status_code == 200

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def load(
    base: str, server: Server, model: Path, requests: int, concurrency: int, max_tokens: int
) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)
    tokens: list[int] = []
    errors = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal errors
        body = {
            "model": server.model_name.format(model=model),
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "seed": i,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            **server.body_extra,
        }
        async with sem:
            r = await client.post(base + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            errors += 1
            return
        tokens.append(int(r.json()["usage"]["completion_tokens"]))

    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, 10_000)  # warm-up
        tokens.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        elapsed = time.perf_counter() - start
    return {
        "output_tokens": sum(tokens),
        "seconds": elapsed,
        "errors": errors,
        "output_tok_s": sum(tokens) / elapsed,
        "mean_tokens": statistics.mean(tokens or [0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    args = ap.parse_args()
    model = args.model or default_model_path()
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    for rnd in range(args.rounds):
        for server in servers(args.threads, args.ctx, max(args.concurrency)):
            try:
                running = Running(server, model)
            except RuntimeError as exc:
                print(f"{server.name}: could not start: {exc}", file=sys.stderr)
                continue
            try:
                for c in args.concurrency:
                    r = asyncio.run(
                        load(running.base, server, model, args.requests, c, args.max_tokens)
                    )
                    results.setdefault(server.name, {}).setdefault(c, []).append(r)
                    print(
                        f"round {rnd + 1} {server.name:>17} c={c:<3} "
                        f"{r['output_tok_s']:7.1f} output tok/s "
                        f"({r['output_tokens']:.0f} tokens, {r['seconds']:.1f} s, "
                        f"{r['errors']:.0f} errors)",
                        flush=True,
                    )
            finally:
                running.stop()
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; model: {model.name}; "
        f"threads {args.threads}, ctx {args.ctx}, {args.requests} requests x "
        f"{args.max_tokens} tokens, median of {args.rounds} rounds\n"
    )
    print("| concurrency | edgellm tok/s | llama-cpp-python tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    for c in args.concurrency:
        ours = statistics.median(
            r["output_tok_s"]
            for r in results.get("edgellm", {}).get(c, []) or [{"output_tok_s": 0}]
        )
        peer_runs = results.get("llama-cpp-python", {}).get(c, [])
        peer = statistics.median(r["output_tok_s"] for r in peer_runs) if peer_runs else 0.0
        ratio = f"{ours / peer:.2f}x" if peer else "peer did not run"
        print(f"| {c} | {ours:.1f} | {peer:.1f} | {ratio} |")
    if args.json:
        args.json.write_text(
            json.dumps({k: {str(c): v for c, v in d.items()} for k, d in results.items()}, indent=2)
        )


if __name__ == "__main__":
    main()
