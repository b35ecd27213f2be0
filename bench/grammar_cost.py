"""What one grammar request costs everyone else: inter-token latency of plain streaming chats
(bystanders) alone, beside one more plain request, beside a structured-output request, and
beside a grammar built to explode
(each attempt is cut off by the server's grammar timeout, and is sent again at once).

    python bench/grammar_cost.py --url http://127.0.0.1:8000 --bystanders 3 --tokens 120 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzzing import MODEL, explosive_schema


def body(tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


async def bystander(client: httpx.AsyncClient, tokens: int) -> list[float]:
    """Seconds between consecutive content chunks of one stream."""
    stamps: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body(tokens, stream=True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


async def neighbour(client: httpx.AsyncClient, kind: str, tokens: int, stop: asyncio.Event) -> int:
    """Send grammar requests of `kind` until `stop`; return how many were sent."""
    sent = 0
    while not stop.is_set():
        if kind == "plain":
            extra: dict[str, Any] = {"ignore_eos": True}
        elif kind == "json":
            fmt = {
                "type": "json_schema",
                "json_schema": {
                    "name": "a",
                    "schema": {"type": "array", "items": {"type": "string"}},
                },
            }
            extra = {"response_format": fmt}
        else:  # "[" forced by logit_bias: llama.cpp's grammar stacks grow 4x per bracket
            fmt = {
                "type": "json_schema",
                "json_schema": {"name": "e", "schema": explosive_schema()},
            }
            extra = {"response_format": fmt, "logit_bias": {"75": 100}}
        await client.post(
            "/v1/chat/completions", json={**body(tokens, **extra), "ignore_eos": False}
        )
        sent += 1
    return sent


async def scenario(url: str, kind: str, bystanders: int, tokens: int) -> tuple[list[float], int]:
    """Bystanders' inter-token gaps beside a neighbour of `kind`, and its request count."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        stop = asyncio.Event()
        other = (
            asyncio.create_task(neighbour(client, kind, tokens, stop)) if kind != "alone" else None
        )
        await asyncio.sleep(0.5 if other else 0)
        gaps = await asyncio.gather(*(bystander(client, tokens) for _ in range(bystanders)))
        stop.set()
        sent = await other if other else 0
    return [g for gs in gaps for g in gs], sent


KINDS = ("alone", "plain", "json", "explosive")


async def main_async(args: argparse.Namespace) -> None:
    kinds = args.kinds.split(",")
    gaps: dict[str, list[float]] = {k: [] for k in kinds}
    sent = dict.fromkeys(kinds, 0)
    await scenario(args.url, "alone", args.bystanders, 16)  # warm-up
    for round_ in range(args.rounds):  # interleaved: a shared machine drifts
        for kind in kinds:
            got, n = await scenario(args.url, kind, args.bystanders, args.tokens)
            gaps[kind] += got
            sent[kind] += n
            median = 1000 * statistics.median(got)
            print(f"round {round_} {kind}: median gap {median:.1f} ms", file=sys.stderr)
    print("| neighbour | bystander ITL p50 ms | p99 ms | max ms | grammar requests sent |")
    print("| --- | --- | --- | --- | --- |")
    for kind in kinds:
        flat = sorted(gaps[kind])
        p50, p99 = statistics.median(flat), flat[int(0.99 * (len(flat) - 1))]
        print(
            f"| {kind} | {1000 * p50:.1f} | {1000 * p99:.1f} | {1000 * flat[-1]:.1f} | "
            f"{sent[kind]} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--bystanders", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="neighbours, of " + ",".join(KINDS)
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
