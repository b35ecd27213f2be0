"""A real fleet on one machine, for tests: test hosts, `edgellm serve` workers on them, and
Debian's HAProxy in front, configured only by `edgellm gateway haproxy`.

Hosts are network namespaces, each joined to this one by a veth link on its own /30 (as root,
with iproute2); where namespaces cannot be made they fall back to distinct loopback addresses
(127.0.N.2), and `Hosts.kind` says which. Every address is a test host's or loopback.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import EDGELLM, free_port

WORKER_PORT, AGENT_PORT = 8000, 8001
SUBNET = "10.213"  # host N: 10.213.N.1 here, 10.213.N.2 inside its namespace


def haproxy_path() -> str:
    path = shutil.which("haproxy")
    if path is None:
        pytest.fail("haproxy is missing: ./dev check installs it (Debian package haproxy)")
    return path


@dataclass
class Host:
    name: str | None  # the namespace; None: a loopback address of this one
    address: str

    def command(self, argv: list[str]) -> list[str]:
        # `ip netns exec` execs the command in place: the pid is the worker's own
        return ["ip", "netns", "exec", self.name, *argv] if self.name else argv


class Hosts:
    """`count` test hosts, removed on exit."""

    def __init__(self, count: int):
        self.tag = f"e{os.getpid() % 100000}"
        self.hosts: list[Host] = []
        self.kind = "netns"
        try:
            for n in range(1, count + 1):
                self.hosts.append(self._namespace(n))
        except (OSError, subprocess.CalledProcessError) as exc:
            self.close()
            self.kind = f"loopback (network namespaces unavailable: {exc})"
            self.hosts = [Host(None, f"127.0.{n}.2") for n in range(1, count + 1)]

    def _namespace(self, n: int) -> Host:
        ns, outer, inner = f"{self.tag}n{n}", f"{self.tag}h{n}", f"{self.tag}c{n}"
        steps = [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
            ["ip", "link", "set", inner, "netns", ns],
            ["ip", "addr", "add", f"{SUBNET}.{n}.1/30", "dev", outer],
            ["ip", "link", "set", outer, "up"],
            ["ip", "-n", ns, "addr", "add", f"{SUBNET}.{n}.2/30", "dev", inner],
            ["ip", "-n", ns, "link", "set", inner, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ]
        host = Host(ns, f"{SUBNET}.{n}.2")
        self.hosts.append(host)  # removed by close() even when a later step fails
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)
        return self.hosts.pop()

    def close(self) -> None:
        for host in self.hosts:
            if host.name:  # deleting the namespace deletes its end of the link, and so both
                subprocess.run(["ip", "netns", "del", host.name], capture_output=True, timeout=10)
        for n in range(1, len(self.hosts) + 2):
            subprocess.run(
                ["ip", "link", "del", f"{self.tag}h{n}"], capture_output=True, timeout=10
            )


class Worker:
    """`edgellm serve` on one test host, with its own data directory."""

    def __init__(self, host: Host, home: Path, args: list[str], api_key: str):
        self.host, self.home, self.args, self.api_key = host, home, args, api_key
        self.base = f"http://{host.address}:{WORKER_PORT}"
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = home / "serve.log"

    def start(self) -> None:
        where = ["--host", self.host.address, "--port", str(WORKER_PORT)]
        argv = [*EDGELLM, "serve", *self.args, *where, "--agent-port", str(AGENT_PORT),
                "--threads", "1"]  # fmt: skip
        env = {**os.environ, "EDGELLM_HOME": str(self.home), "EDGELLM_API_KEY": self.api_key}
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            self.host.command(argv), stdout=log, stderr=subprocess.STDOUT, env=env, text=True
        )
        log.close()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.output()[-3000:]}")
            try:
                if httpx.get(self.base + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.base} did not become ready: {self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive:
            self.signal(signal.SIGINT)
            try:
                self.wait_exit(30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.wait_exit(10)

    def agent(self) -> str:
        """The agent check's answer now ('' when nothing listens)."""
        try:
            with socket.create_connection((self.host.address, AGENT_PORT), timeout=2) as s:
                return s.recv(100).decode().strip()
        except OSError:
            return ""

    def wait_busy(self, timeout: float = 20) -> None:
        """Until the worker has a request running (its agent reports less than all free)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            said = self.agent()
            if said.startswith("up") and not said.endswith(" 100%"):
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.base} never had a request running")

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metric(self, name: str) -> float:
        """The sum of a counter's or gauge's samples on this worker's /metrics."""
        text = httpx.get(
            self.base + "/metrics", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=5
        ).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in "{ "
        )


class Gateway:
    """Debian's HAProxy in front of the workers, configured only by `edgellm gateway haproxy`."""

    def __init__(self, place: Path, workers: list[Worker], *options: str):
        self.place = place
        place.mkdir(parents=True, exist_ok=True)
        self.port, self.stats_port = free_port(), free_port()
        self.socket = place / "haproxy.sock"
        self.config = place / "haproxy.cfg"
        urls = [a for w in workers for a in ("--worker", w.base)]
        made = subprocess.run(
            [*EDGELLM, "gateway", "haproxy", *urls, "--agent-port", str(AGENT_PORT),
             "--bind", f"127.0.0.1:{self.port}", "--stats-bind", f"127.0.0.1:{self.stats_port}",
             "--stats-socket", str(self.socket), *options, "-o", str(self.config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        self.names = [line.split()[1] for line in self.config.read_text().splitlines()
                      if line.strip().startswith("server ")][: len(workers)]  # fmt: skip
        self.log = (place / "haproxy.log").open("w")
        self.proc = subprocess.Popen(
            [haproxy_path(), "-db", "-f", str(self.config)], stdout=self.log, stderr=self.log
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def ask(self, command: str) -> str:
        """One runtime API command on the stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self, backend: str = "edgellm_workers") -> dict[str, dict[str, str]]:
        """`show stat` for one backend's servers: status, weight, stot (sessions so far) ..."""
        text = self.ask("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == backend and r["svname"] not in
                ("FRONTEND", "BACKEND")}  # fmt: skip

    def wait_status(self, name: str, wanted: str, timeout: float) -> float:
        """Seconds until server `name` shows a status starting with `wanted` (UP, DOWN, DRAIN)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if self.servers()[name]["status"].startswith(wanted):
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{name} never {wanted} in {timeout} s: {self.servers()[name]}")

    def log_text(self) -> str:
        return (self.place / "haproxy.log").read_text()[-4000:]

    def wait_all_up(self, timeout: float = 60) -> None:
        """Until every server's first check has passed: HAProxy starts a server as up but one
        failure from down (`UP 1/3`), and only a passed check gives it its full `fall`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                states = [self.servers()[n] for n in self.names]
                if all(s["status"] == "UP" and s["check_status"] == "L7OK" for s in states):
                    return
            time.sleep(0.1)
        raise AssertionError(f"not every worker came up: {self.servers()}\n{self.log_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Watch:
    """A thread that records each change of one server's state on a gateway's stats socket:
    (monotonic seconds, status, check status, failed checks, last check, last agent answer)."""

    def __init__(self, gateway: Gateway, name: str):
        self.gateway, self.name = gateway, name
        self.changes: list[tuple[float, str, str, str, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a reading that failed: the next one
                s = self.gateway.servers()[self.name]
                state = (s["status"], s["check_status"], s["chkfail"], s["last_chk"], s["last_agt"])
                if not self.changes or self.changes[-1][1:] != state:
                    self.changes.append((time.monotonic(), *state))
            self._stop.wait(0.05)

    def first(self, status: str, after: float) -> float | None:
        """When the server first showed a status starting with `status` after `after`."""
        return next((c[0] for c in self.changes if c[0] >= after and c[1].startswith(status)), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Outcome:
    sent: float  # monotonic seconds
    done: float = 0.0
    error: str | None = None
    worker: str | None = None  # X-Edgellm-Worker
    version: str | None = None  # X-Edgellm-Model-Version


@dataclass
class Load:
    """`streams` chat streams in a loop through `base`, with the official openai client, each
    request its own conversation (X-Session-Id), until `stop()`."""

    base: str
    api_key: str
    model: str
    streams: int = 6
    max_tokens: int = 24
    results: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, daemon=True) for _ in range(self.streams)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        return self.results

    def _loop(self) -> None:
        client = openai.OpenAI(
            base_url=self.base + "/v1", api_key=self.api_key, max_retries=0, timeout=60
        )
        while not self._stop.is_set():
            outcome = Outcome(time.monotonic())
            try:
                with client.chat.completions.with_streaming_response.create(
                    model=self.model,
                    messages=[
                        {"role": "user", "content": f"Say something about {uuid.uuid4().hex[:6]}."}
                    ],
                    max_tokens=self.max_tokens,
                    stream=True,
                    extra_headers={"X-Session-Id": uuid.uuid4().hex},
                ) as response:
                    outcome.worker = response.headers.get("x-edgellm-worker")
                    outcome.version = response.headers.get("x-edgellm-model-version")
                    finished = False
                    for chunk in response.parse():
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finished = True
                    if not finished:
                        outcome.error = "stream ended without a finish reason"
            except Exception as exc:  # every failure counts, whatever its kind
                outcome.error = f"{type(exc).__name__}: {exc}"[:300]
            outcome.done = time.monotonic()
            with self._lock:
                self.results.append(outcome)


@contextmanager
def throttled(pid: int, share: float) -> Iterator[None]:
    """Limit a process to `share` of one core with a cgroup (v1 cpu controller, or v2)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    group = Path(
        tempfile.mkdtemp(prefix="edgellm-slow-", dir=v1 if v1.is_dir() else "/sys/fs/cgroup")
    )
    period = 100_000
    if v1.is_dir():
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(int(period * share)))
    else:
        (group / "cpu.max").write_text(f"{int(period * share)} {period}")
    members = "tasks" if v1.is_dir() else "cgroup.procs"
    for tid in os.listdir(f"/proc/{pid}/task"):
        (group / members).write_text(tid)
    try:
        yield
    finally:  # every thread back, those made while throttled too, then the group goes
        for _ in range(10):
            left = (group / members).read_text().split()
            if not left:
                break
            for tid in left:
                with contextlib.suppress(OSError):  # the thread ended
                    (group.parent / members).write_text(tid)
        group.rmdir()
