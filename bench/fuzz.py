"""Fuzz a running edgellm's chat endpoints with random bytes, random JSON and mutated valid
bodies (tests/fuzzing.py), and count what came back. Exit 1 on any 5xx or a dead server.

    python bench/fuzz.py --url http://127.0.0.1:8000 --cases 50000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzzing import MODEL, cases


async def run(url: str, n: int, concurrency: int, seed: int) -> int:
    statuses: Counter[str] = Counter()
    bad: list[str] = []
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        queue: asyncio.Queue[tuple[int, object] | None] = asyncio.Queue(maxsize=concurrency * 4)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                i, case = item
                assert hasattr(case, "path")
                try:
                    response = await client.post(
                        case.path, content=case.body, headers={"content-type": case.content_type}
                    )
                except httpx.HTTPError as exc:
                    statuses["transport error"] += 1
                    bad.append(f"case {i}: {type(exc).__name__} {exc}")
                    continue
                statuses[f"{case.kind} {response.status_code}"] += 1
                if response.status_code >= 500:
                    bad.append(f"case {i} {case.path} {case.body[:200]!r}: {response.text[:200]}")

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        for i, case in enumerate(cases(seed, n)):
            await queue.put((i, case))
            if i and i % 5000 == 0:
                print(f"{i} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        alive = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
    print(f"{n} cases in {time.monotonic() - started:.0f} s (seed {seed})")
    for key, count in sorted(statuses.items()):
        print(f"  {key}: {count}")
    print(f"  5xx or transport errors: {len(bad)}; alive afterwards: {alive.status_code == 200}")
    for line in bad[:20]:
        print("  " + line)
    return 0 if not bad and alive.status_code == 200 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.url, args.cases, args.concurrency, args.seed)))


if __name__ == "__main__":
    main()
