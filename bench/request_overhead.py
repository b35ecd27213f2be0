"""Per-request overhead of the HTTP path: sequential one-token chats, then /health.

python bench/request_overhead.py --url http://127.0.0.1:8000 --requests 150
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

BODY = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 1,
    "temperature": 0,
}


def timed(client: httpx.Client, n: int, method: str, path: str, **kw: object) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.request(method, path, **kw)  # type: ignore[arg-type]
        out.append(time.perf_counter() - started)
        response.raise_for_status()
    return sorted(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=150)
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=30) as client:
        timed(client, 5, "POST", "/v1/chat/completions", json=BODY)  # warm-up
        chats = timed(client, args.requests, "POST", "/v1/chat/completions", json=BODY)
        health = timed(client, args.requests, "GET", "/health")
    p90 = chats[int(0.9 * (len(chats) - 1))]
    print(
        f"one-token chat: median {1000 * statistics.median(chats):.2f} ms, "
        f"p90 {1000 * p90:.2f} ms; "
        f"/health median {1000 * statistics.median(health):.2f} ms"
    )


if __name__ == "__main__":
    main()
