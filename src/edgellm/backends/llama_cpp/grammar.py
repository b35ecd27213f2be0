"""Grammar-constrained sampling in sandbox processes, driven from the engine thread.

Each running request with a grammar is bound to one sandbox process
(`edgellm.backends.llama_cpp.grammar_worker`) holding its compiled grammar and sampler chain.
After a step's decode the engine copies the request's logits row into the sandbox's shared
memory and asks for a token; it waits for the step's answers only up to `wait_s`. An answer
that comes later is picked up by a later step (the request simply decodes one step later), so a
slow grammar delays only its own request. A sandbox that has not answered within `timeout_s`
is killed and its request ends with an error; so is one that dies (a crash, its memory limit).

The pool keeps `spare` sandboxes started ahead (a start costs ~0.7 s of CPU on a 2-core box,
and sandboxes only get idle CPU), keeps up to `keep` idle after a burst, and also serves
`check()`: compiling a client's grammar in a sandbox before it is accepted.
Nothing here imports llama.cpp; this module only starts processes and moves bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import mmap
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.engine.request import SamplingParams

log = logging.getLogger("edgellm.grammar")

STARTUP_S = 30.0  # most seconds a new sandbox may take to load the vocabulary


class SandboxDied(Exception):
    pass


@dataclass(slots=True, frozen=True)
class SandboxSpec:
    model: Path  # GGUF whose vocabulary the grammar is matched against
    n_vocab: int
    max_grammar_bytes: int  # largest grammar text accepted
    memory_bytes: int  # address space a sandbox may add beyond its vocabulary


def _model_fds(model: Path) -> tuple[int, ...]:
    """The descriptor a model in memory is read through (`/proc/self/fd/N`: a decrypted
    registry model), so the worker's same path names the same memory."""
    parent, name = model.parent, model.name
    return (int(name),) if str(parent) == "/proc/self/fd" and name.isdigit() else ()


# secrets of the server's environment a sandbox has no use for: a grammar that breaks out of
# its sandbox must not find the model key (it opens every encrypted blob) or a hub token
_SECRETS = ("EDGELLM_MODEL_KEY", "EDGELLM_API_KEY", "HF_TOKEN")


def _sandbox_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SECRETS}


class Sandbox:
    """One sandbox process and its shared memory (grammar text, then float32 logits)."""

    def __init__(self, spec: SandboxSpec):
        self.spec = spec
        size = spec.max_grammar_bytes + 4 * spec.n_vocab
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("edgellm-grammar")
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        os.ftruncate(fd, size)
        self._shm = mmap.mmap(fd, size)
        command = [
            sys.executable,
            "-m",
            "edgellm.backends.llama_cpp.grammar_worker",
            "--model",
            str(spec.model),
            "--fd",
            str(fd),
            "--size",
            str(size),
            "--grammar-bytes",
            str(spec.max_grammar_bytes),
            "--memory",
            str(spec.memory_bytes),
        ]
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # llama.cpp's parser prints there; we log deaths
                pass_fds=(fd, *_model_fds(spec.model)),
                env=_sandbox_env(),
                bufsize=0,
                # its own session: a terminal's Ctrl-C (or a signal to the server's process
                # group) must not kill sandboxes the server still needs while it drains; the
                # worker ends on its own when its stdin closes with the server
                start_new_session=True,
            )
        finally:
            os.close(fd)  # the mapping and the child keep it alive
        assert self._proc.stdin is not None and self._proc.stdout is not None  # PIPE above
        self._stdin = self._proc.stdin
        self._stdout = self._proc.stdout.fileno()
        os.set_blocking(self._stdout, False)
        self._buffer = b""
        self.ready = False
        self.started_at = time.monotonic()
        self.dead = False

    def fileno(self) -> int:
        return self._stdout

    def send(self, op: str, **fields: Any) -> None:
        try:
            self._stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        except OSError as exc:  # BrokenPipeError: it died
            self.dead = True
            raise SandboxDied(str(exc)) from exc

    def put_grammar(self, grammar: bytes) -> int:
        if len(grammar) > self.spec.max_grammar_bytes:
            raise ValueError("grammar larger than the sandbox's buffer")
        self._shm[: len(grammar)] = grammar
        return len(grammar)

    def put_logits(self, source: int) -> None:
        """Copy n_vocab float32 logits from the address `source` into shared memory."""
        import ctypes

        target = ctypes.addressof(ctypes.c_char.from_buffer(self._shm, self.spec.max_grammar_bytes))
        ctypes.memmove(target, source, 4 * self.spec.n_vocab)

    def replies(self) -> list[dict[str, Any]]:
        """Replies that have arrived (not blocking). The first, {"ready"}, is consumed here."""
        while True:
            try:
                chunk = os.read(self._stdout, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.dead = True
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        out = []
        for line in lines:
            message = json.loads(line)
            if "ready" in message:
                self.ready = True
            else:
                out.append(message)
        if self.dead and not out:
            raise SandboxDied(f"exit code {self._proc.poll()}")
        return out

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Block up to `timeout` seconds for at least one reply (after the ready line)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.replies()
            if got:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            select.select([self._stdout], [], [], left)

    def kill(self) -> None:
        self.dead = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stdin.close()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._shm.close()


class SandboxPool:
    """Started sandboxes waiting for work; thread-safe."""

    def __init__(self, spec: SandboxSpec, spare: int, keep: int, max_checks: int = 2):
        self.spec = spec
        self.spare = spare  # started ahead of need
        self.keep = max(keep, spare)  # idle ones kept after a burst, so the next pays no start
        self._idle: list[Sandbox] = []
        self._lock = threading.Lock()
        self._checks = threading.BoundedSemaphore(max_checks)
        self._closed = False
        self.top_up()

    def top_up(self) -> None:
        """Start sandboxes until `spare` are idle (the start itself runs in the child)."""
        with self._lock:
            self._idle = [s for s in self._idle if not s.dead]
            while not self._closed and len(self._idle) < self.spare:
                self._idle.append(Sandbox(self.spec))

    def acquire(self) -> Sandbox:
        """An idle sandbox, a started one first; a new one if none is idle. Never blocks."""
        with self._lock:
            for sandbox in self._idle:
                if not sandbox.ready:
                    with contextlib.suppress(SandboxDied):
                        sandbox.replies()  # reads its "ready" line once it has come
            ready = [s for s in self._idle if s.ready and not s.dead]
            pick = ready[0] if ready else next((s for s in self._idle if not s.dead), None)
            if pick is not None:
                self._idle.remove(pick)
        if pick is None:
            pick = Sandbox(self.spec)
        self.top_up()
        return pick

    def release(self, sandbox: Sandbox) -> None:
        with self._lock:
            if not sandbox.dead and not self._closed and len(self._idle) < self.keep:
                self._idle.append(sandbox)
                return
        sandbox.kill()

    def check(self, grammar: str, timeout_s: float) -> str | None:
        """Compile `grammar` in a sandbox: None if it compiles within `timeout_s`, else why
        not. Blocking; call it from a worker thread."""
        data = grammar.encode()
        if len(data) > self.spec.max_grammar_bytes:
            return (
                f"its grammar is {len(data)} bytes; at most {self.spec.max_grammar_bytes} are "
                "accepted"
            )
        with self._checks:
            sandbox = self.acquire()
            try:
                n = sandbox.put_grammar(data)
                sandbox.send("compile", n=n)
                waited = 0.0 if sandbox.ready else STARTUP_S
                replies = sandbox.wait(timeout_s + waited)
            except SandboxDied:
                sandbox.kill()
                return "its grammar crashed the grammar compiler"
            if not replies:
                sandbox.kill()
                return f"its grammar did not compile within {timeout_s:g} s"
            self.release(sandbox)
        reply = replies[0]
        return None if reply.get("ok") else str(reply.get("error", "it does not compile"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sandbox in idle:
            sandbox.kill()


@dataclass(slots=True)
class _Binding:
    """One request's sandbox and what it owes us."""

    sandbox: Sandbox
    expect: deque[str] = field(default_factory=deque)  # ops whose replies are due, in order
    deadline: float = 0.0  # monotonic seconds by which the pending sample must be answered
    failed: str | None = None  # why `start` failed, reported with the sample


class GrammarSamplers:
    """Per-request sandboxes for the engine thread: submit after a decode, collect answers."""

    def __init__(self, pool: SandboxPool, wait_s: float, timeout_s: float):
        self.pool = pool
        self.wait_s = wait_s
        self.timeout_s = timeout_s
        self._bound: dict[str, _Binding] = {}  # request_id -> its sandbox
        self._draining: list[_Binding] = []  # released while a sample was pending

    @property
    def pending(self) -> bool:
        return any(b.expect for b in self._bound.values()) or bool(self._draining)

    def submit(self, request_id: str, sampling: SamplingParams, logits: int) -> str | None:
        """Ask for the next token from the logits row at address `logits`. Returns an error
        message when the request cannot be sampled (its sandbox is gone)."""
        binding = self._bound.get(request_id)
        now = time.monotonic()
        try:
            if binding is None:
                binding = self._bound[request_id] = _Binding(self.pool.acquire())
                grammar = (sampling.grammar or "").encode()
                fields = dataclasses.asdict(sampling)
                fields.pop("grammar")
                binding.sandbox.send(
                    "start", n=binding.sandbox.put_grammar(grammar), sampling=fields
                )
                binding.expect.append("start")
            binding.sandbox.put_logits(logits)
            binding.sandbox.send("sample")
        except (SandboxDied, ValueError):
            self.release(request_id)
            return "the output format's sandbox stopped"
        binding.expect.append("sample")
        startup = 0.0 if binding.sandbox.ready else STARTUP_S
        binding.deadline = now + startup + self.timeout_s * len(binding.expect)
        return None

    def collect(self, wait_for: set[str] | None) -> tuple[dict[str, int], dict[str, str]]:
        """Answers that have arrived: (request_id -> token, request_id -> error). First block
        up to `wait_s` for the answers of `wait_for` (None: of every pending request); answers
        still out are collected by a later call."""
        sampled: dict[str, int] = {}
        failed: dict[str, str] = {}
        deadline = time.monotonic() + self.wait_s
        while True:
            self._read_all(sampled, failed)
            owing = [
                b.sandbox
                for rid, b in self._bound.items()
                if b.expect and (wait_for is None or rid in wait_for)
            ]
            left = deadline - time.monotonic()
            if not owing or left <= 0:
                break
            select.select(owing, [], [], left)
        self._expire(failed)
        return sampled, failed

    def release(self, request_id: str) -> None:
        """The request is done: its sandbox goes back to the pool, once it owes nothing."""
        binding = self._bound.pop(request_id, None)
        if binding is None:
            return
        if binding.expect and not binding.sandbox.dead:
            self._draining.append(binding)
        else:
            self._recycle(binding)

    def close(self) -> None:
        for binding in [*self._bound.values(), *self._draining]:
            binding.sandbox.kill()
        self._bound.clear()
        self._draining.clear()

    def _recycle(self, binding: _Binding) -> None:
        if binding.sandbox.dead:
            binding.sandbox.kill()
            return
        try:
            binding.sandbox.send("end")
        except SandboxDied:
            binding.sandbox.kill()
            return
        self.pool.release(binding.sandbox)

    def _read_all(self, sampled: dict[str, int], failed: dict[str, str]) -> None:
        for request_id, binding in list(self._bound.items()):
            if not binding.expect:
                continue
            try:
                replies = binding.sandbox.replies()
            except SandboxDied:
                log.warning("grammar sandbox of request %s died", request_id)
                failed[request_id] = (
                    "the output format could not be enforced: its sandbox stopped (a grammar "
                    "this complex needs more memory than a request may use)"
                )
                self._bound.pop(request_id)
                binding.sandbox.kill()
                continue
            for reply in replies:
                op = binding.expect.popleft()
                if op == "start" and not reply.get("ok"):
                    binding.failed = str(reply.get("error", "the grammar does not compile"))
                elif op == "sample":
                    if "token" in reply and binding.failed is None:
                        sampled[request_id] = int(reply["token"])
                    else:
                        failed[request_id] = binding.failed or str(reply.get("error"))
        for binding in list(self._draining):
            try:
                for _ in binding.sandbox.replies():
                    binding.expect.popleft()
            except SandboxDied:
                binding.expect.clear()
            if not binding.expect:
                self._draining.remove(binding)
                self._recycle(binding)

    def _expire(self, failed: dict[str, str]) -> None:
        now = time.monotonic()
        for request_id, binding in list(self._bound.items()):
            if binding.expect and now > binding.deadline:
                log.warning("grammar sandbox of request %s missed its deadline; killed", request_id)
                failed[request_id] = (
                    f"the output format could not be enforced: choosing one token took over "
                    f"{self.timeout_s:g} s (simplify the schema)"
                )
                self._bound.pop(request_id)
                binding.sandbox.kill()
        for binding in list(self._draining):
            if now > binding.deadline:
                self._draining.remove(binding)
                binding.sandbox.kill()
