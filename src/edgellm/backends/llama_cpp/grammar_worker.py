"""The grammar sandbox: a child process that compiles one request's grammar and samples its
tokens, so nothing a client's grammar does can reach the server process.

llama.cpp's grammar code aborts the process when no token is allowed (greedy, or an
end-of-generation the grammar refuses), throws C++ exceptions that ctypes cannot catch,
recurses on nesting in its parser, and can spend hours and gigabytes in one call on an
ambiguous grammar. Here that kills only this process, which runs only on otherwise idle CPU,
under a memory limit, and is killed by the server when it misses a deadline
(`edgellm.backends.llama_cpp.grammar`).

Protocol: one JSON object per line on stdin, one reply per line on stdout. Large payloads go
through a shared memory file (fd passed at spawn): the grammar's UTF-8 at [0, grammar_bytes),
the logits of the row to sample as float32 [n_vocab] after it.

    {"op": "compile", "n": N}               -> {"ok": true} | {"ok": false, "error": str}
    {"op": "start", "n": N, "sampling": {}} -> same; the grammar and a sampler chain are kept
    {"op": "sample"}                        -> {"token": int} | {"error": str}
    {"op": "end"}                           -> no reply; the kept chain is freed
First line out: {"ready": n_vocab}.

Sampling is llama.cpp's own "check the pick first" trick: the chain without the grammar picks
a token; if the grammar accepts that one token it is taken, which costs one token's check
instead of the whole vocabulary's. Otherwise the grammar filters the whole vocabulary first
and the chain picks among what is left; if nothing is left the request ends with an error
instead of reaching llama.cpp's abort. Tokens are only ever accepted after the grammar
allowed them, so the accept paths that abort or throw are unreachable.
"""

from __future__ import annotations

import os


def _lower_priority() -> None:
    """Run only when the CPU is otherwise idle (Linux's SCHED_IDLE; elsewhere nice 19), from
    the first instruction on: llama.cpp's decode threads meet at a spinning barrier per graph
    node, so a competitor that takes a core even briefly stalls every step of every request."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        os.nice(19)


if __name__ == "__main__":  # before the imports below, which take ~0.5 s of CPU
    _lower_priority()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import llama_cpp as ll  # noqa: E402
import numpy as np  # noqa: E402

from edgellm.backends.llama_cpp.samplers import build_chain  # noqa: E402
from edgellm.engine.request import SamplingParams  # noqa: E402

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@ll.llama_log_callback  # type: ignore[untyped-decorator]
def _quiet(_level: int, _text: bytes, _user_data: ctypes.c_void_p) -> None:
    pass


class NoToken(Exception):
    """The grammar allows no token here, or the chain picked one it does not allow."""


class Sandbox:
    def __init__(self, model: str, shm: mmap.mmap, grammar_bytes: int):
        ll.llama_log_set(_quiet, ctypes.c_void_p(0))
        ll.llama_backend_init()
        params = ll.llama_model_default_params()
        params.vocab_only = True
        self._model = ll.llama_model_load_from_file(model.encode(), params)
        if not self._model:
            raise SystemExit(f"grammar sandbox: cannot load the vocabulary of {model}")
        self.vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self._shm = shm
        self._grammar_bytes = grammar_bytes
        # logits: float32 [n_vocab], written by the server before each "sample"
        self._logits = np.frombuffer(
            shm, dtype=np.float32, count=self.n_vocab, offset=grammar_bytes
        )
        self._data = (ll.llama_token_data * self.n_vocab)()
        # [n_vocab] (id, logit, p), the same memory llama.cpp's samplers read
        self._view = np.frombuffer(memoryview(self._data), dtype=_TOKEN_DATA)
        self._cur = ll.llama_token_data_array(self._data, self.n_vocab, -1, False)
        self._one = (ll.llama_token_data * 1)()
        self._one_cur = ll.llama_token_data_array(self._one, 1, -1, False)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self.grammar: Any = None
        self.chain: Any = None

    def _compile(self, n: int) -> Any:
        text = bytes(self._shm[:n])
        grammar = ll.llama_sampler_init_grammar(self.vocab, text, b"root")
        if not grammar:
            raise ValueError("llama.cpp could not compile the grammar made from it")
        return grammar

    def compile(self, n: int) -> None:
        ll.llama_sampler_free(self._compile(n))

    def start(self, n: int, sampling: dict[str, Any]) -> None:
        self.end()
        self.grammar = self._compile(n)
        s = SamplingParams(
            **{
                **sampling,
                "stop": tuple(sampling.get("stop", ())),
                "logit_bias": tuple((int(t), float(b)) for t, b in sampling.get("logit_bias", ())),
            }
        )
        self.chain = build_chain(self.n_vocab, s)

    def end(self) -> None:
        for sampler in (self.grammar, self.chain):
            if sampler is not None:
                ll.llama_sampler_free(sampler)
        self.grammar = self.chain = None

    def _fill(self) -> None:
        self._view["id"] = self._ids
        self._view["logit"] = self._logits
        self._cur.size = self.n_vocab
        self._cur.selected = -1
        self._cur.sorted = False

    def _picked(self) -> int:
        if not 0 <= self._cur.selected < self._cur.size:
            raise NoToken("the sampler picked no token")
        return int(self._data[self._cur.selected].id)

    def _allows(self, token: int) -> bool:
        self._one[0] = ll.llama_token_data(token, float(self._logits[token]), 0.0)
        self._one_cur.size = 1
        self._one_cur.selected = -1
        ll.llama_sampler_apply(self.grammar, ctypes.byref(self._one_cur))
        return bool(np.isfinite(self._one[0].logit))

    def sample(self) -> int:
        if self.grammar is None or self.chain is None:
            raise NoToken("no grammar was started")
        self._fill()
        ll.llama_sampler_apply(self.chain, ctypes.byref(self._cur))
        token = self._picked()
        if not self._allows(token):
            self._fill()
            ll.llama_sampler_apply(self.grammar, ctypes.byref(self._cur))
            allowed = np.isfinite(self._view["logit"])  # [n_vocab] by token id, before the chain
            if not allowed.any():
                raise NoToken("the output format allows no token the model can write here")
            ll.llama_sampler_apply(self.chain, ctypes.byref(self._cur))
            token = self._picked()
            if not allowed[token]:
                raise NoToken("the sampler picked a token the output format does not allow")
        ll.llama_sampler_accept(self.grammar, token)
        ll.llama_sampler_accept(self.chain, token)
        return token


def _reply(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def _limit_memory(extra_bytes: int) -> None:
    """Cap the address space at what is mapped now plus `extra_bytes` (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
    except OSError:
        return
    limit = pages * os.sysconf("SC_PAGE_SIZE") + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def serve(sandbox: Sandbox, inp: Any, out: Any) -> None:
    _reply(out, {"ready": sandbox.n_vocab})
    for line in inp:
        command = json.loads(line)
        op = command.get("op")
        if op == "sample":
            try:
                _reply(out, {"token": sandbox.sample()})
            except NoToken as exc:
                _reply(out, {"error": str(exc)})
        elif op in ("compile", "start"):
            try:
                if op == "compile":
                    sandbox.compile(int(command["n"]))
                else:
                    sandbox.start(int(command["n"]), command["sampling"])
                _reply(out, {"ok": True})
            except (ValueError, TypeError, KeyError) as exc:
                _reply(out, {"ok": False, "error": str(exc)})
        elif op == "end":
            sandbox.end()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--grammar-bytes", type=int, required=True)
    parser.add_argument("--memory", type=int, required=True, help="bytes beyond the vocabulary")
    args = parser.parse_args(argv)
    shm = mmap.mmap(args.fd, args.size)
    sandbox = Sandbox(args.model, shm, args.grammar_bytes)
    _limit_memory(args.memory)
    serve(sandbox, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
