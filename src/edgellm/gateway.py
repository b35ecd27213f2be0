"""`edgellm gateway haproxy`: a complete HAProxy configuration for a fleet of edgellm workers.

The load balancer is HAProxy itself; edgellm only writes its configuration, choosing for LLM
traffic:

- health: an HTTP check of `/ready` (200 only when the box can take a request now) every
  `check_interval`, a worker out after `fall` failures and back after `rise` successes, and,
  with `agent_port`, HAProxy's agent check, by which each worker reports its free capacity as
  a weight (`up NN%`) or asks to be drained (`drain`, while it shuts down or swaps);
- affinity: a request with a key is balanced on a consistent hash of it, so a conversation
  keeps landing on the box whose prefix cache holds it (and adding or losing a box moves only
  its share of keys); a request without one goes to the box with the fewest connections. The
  key is the `X-Session-Id` header, else the API key (`Authorization`), so each client keeps
  its cache;
- streams: long client and server timeouts (a reasoning model can think for minutes), no
  compression, so server-sent events pass as they are written;
- retries only for requests whose client has received nothing (a refused or failed connection,
  a connection closed without a response, or a 503, edgellm's answer when it cannot take a
  request now: draining, queue full, not loaded), never for a stream a worker began: a
  generation is not idempotent;
- the stats socket for the runtime API (weights, drain without a reload) and a Prometheus
  endpoint (HAProxy's built-in exporter) on the stats port.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from edgellm.errors import ValidationError


@dataclass(frozen=True, slots=True)
class Worker:
    name: str
    host: str
    port: int
    tls: bool


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    workers: list[Worker]
    bind: str = "0.0.0.0:8080"
    affinity: Literal["session", "none"] = "session"
    check_interval_s: float = 30.0
    fall: int = 3
    rise: int = 2
    agent_port: int | None = None
    tls_cert: Path | None = None
    stats_bind: str = "127.0.0.1:8404"
    stats_socket: Path = Path("/run/haproxy/edgellm.sock")
    max_connections: int = 2048
    command: list[str] = field(default_factory=list)  # how it was made, for the header


def parse_worker(url: str, index: int) -> Worker:
    """A worker from `http://HOST:PORT` (https: the worker serves TLS)."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"--worker {url}: give http://HOST:PORT", param="worker")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValidationError(f"--worker {url}: the port is not a number", param="worker") from None
    if parts.path not in ("", "/"):
        raise ValidationError(f"--worker {url}: no path; the API is at the root", param="worker")
    host = parts.hostname
    name = f"w{index + 1}"  # short: it is also the X-Edgellm-Worker clients see, not the address
    return Worker(name, f"[{host}]" if ":" in host else host, port, parts.scheme == "https")


def check_bind(text: str, param: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"--{param} {text}: give ADDRESS:PORT", param=param)
    return f"{host or '0.0.0.0'}:{port}"


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def render(config: GatewayConfig) -> str:
    """The haproxy.cfg text, commented."""
    if not config.workers:
        raise ValidationError("give at least one --worker", param="worker")
    places = [(w.host, w.port) for w in config.workers]
    if len(set(places)) != len(places):
        raise ValidationError("a --worker is given twice", param="worker")
    inter = _ms(config.check_interval_s)
    ssl = f" ssl crt {config.tls_cert}" if config.tls_cert else ""
    lines = [
        "# HAProxy configuration for an edgellm fleet, written by:",
        f"#   {shlex.join(config.command) if config.command else 'edgellm gateway haproxy'}",
        "# Check it with `haproxy -c -f FILE`; reload HAProxy to apply it. Weights and states",
        "# change at run time through the stats socket, without a reload; to take a worker out",
        "# by hand, `disable agent BACKEND/SERVER` first (its agent's `ready` would undo it) or",
        "# POST /admin/drain to the worker.",
        "",
        "global",
        f"    maxconn {config.max_connections}",
        "    # a request is retried only if it fits a buffer (option http-buffer-request below):",
        "    # 64 KiB holds a prompt of some 16k tokens; HAProxy's buffers are taken per",
        "    # connection as needed, at most 2 x 64 KiB x maxconn (256 MiB)",
        "    tune.bufsize 65536",
        "    log stdout format raw local0 info",
        "    # the runtime API: `echo 'show servers state' | socat stdio UNIX:SOCKET`",
        f"    stats socket {config.stats_socket} mode 600 level admin",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 5s",
        "    # a generation can run for minutes (a reasoning model thinks before it answers);",
        "    # streams send tokens often, but a long prompt's prefill may be silent for a while",
        "    timeout client 10m",
        "    timeout server 10m",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 60s",
        "    # retry, on another worker, only requests whose client has received nothing: a",
        "    # refused or failed connection, a connection closed with no response at all (a",
        "    # worker that died as the request arrived), and a 503 (edgellm's answer when it",
        "    # cannot take a request now: draining, queue full, model not loaded or over its",
        "    # memory budget). A stream a worker began is never repeated; a body over",
        "    # tune.bufsize is not retried",
        "    # a worker whose name does not resolve yet starts as down instead of stopping",
        "    # HAProxy: the rest of the fleet serves",
        "    default-server init-addr last,libc,none",
        "    # L7 retries need the whole request in HAProxy's buffer before it is sent on",
        "    option http-buffer-request",
        "    retries 2",
        "    retry-on conn-failure empty-response 503",
        "    option redispatch 1",
        "",
        "frontend edgellm",
        f"    bind {config.bind}{ssl}",
        "    # server-sent events and NDJSON streams pass through as written: no compression,",
        "    # no buffering of responses (HAProxy forwards each chunk as it arrives)",
        "    option http-no-delay",
        "    # which worker answered, for logs and debugging (the server line's name)",
        "    http-response set-header X-Edgellm-Worker %s",
    ]
    if config.affinity == "session":
        lines += [
            "    # affinity: the conversation's key keeps it on the box that has its prefix cached",
            "    # (X-Session-Id, else the API key); requests without one: least connections",
            "    http-request set-var(txn.affinity) req.hdr(x-session-id) "
            "if { req.hdr(x-session-id) -m found }",
            "    http-request set-var(txn.affinity) req.hdr(authorization) "
            "if !{ var(txn.affinity) -m found } { req.hdr(authorization) -m found }",
            "    use_backend edgellm_affinity if { var(txn.affinity) -m found }",
        ]
    lines += ["    default_backend edgellm_workers", ""]

    def server_lines(track: str | None) -> list[str]:
        out = []
        agent = (
            f" agent-check agent-port {config.agent_port} agent-inter 2s"
            if config.agent_port is not None
            else ""
        )
        for w in config.workers:
            tls = " ssl verify none" if w.tls else ""
            if track is None:
                health = f" check inter {inter} fall {config.fall} rise {config.rise}{agent}"
            else:  # the same health and drain as the first backend's, not checked twice;
                # not its weights: a weight change moves keys round the ring, and with them
                # conversations away from their caches (bounded loads guard this backend)
                health = f" track {track}/{w.name}"
            # weight 100: an agent's 'up NN%' is a share of it, so NN maps one to one
            out.append(f"    server {w.name} {w.host}:{w.port} weight 100{tls}{health}")
        return out

    health = [
        "    # /ready is 200 only when the worker can take a request now (loaded, not",
        "    # draining, its audit log writable)",
        "    option httpchk GET /ready",
        "    http-check expect status 200",
    ]
    if config.agent_port is None:
        health.append("    # no agent check (give --agent-port to the workers and to this command)")
    else:
        health.append(
            f"    # agent check on port {config.agent_port}: 'up NN%' sets the weight from the "
            "worker's free capacity, 'drain' takes no new sessions, 'down' is out"
        )
    lines += [
        "backend edgellm_workers",
        "    balance leastconn",
        *health,
        *server_lines(None),
        "",
    ]
    if config.affinity == "session":
        lines += [
            "backend edgellm_affinity",
            "    # a consistent hash of the key: losing or adding a box moves only its keys",
            "    balance hash var(txn.affinity)",
            "    hash-type consistent",
            "    # bounded loads: a box takes at most 150% of the average connections; past",
            "    # that its keys go on round the ring (one busy conversation key, or one API key",
            "    # shared by a whole app, cannot pile everything on one box)",
            "    hash-balance-factor 150",
            *server_lines("edgellm_workers"),
            "",
        ]
    lines += [
        "frontend stats",
        f"    bind {config.stats_bind}",
        "    # HAProxy's own Prometheus metrics (servers up, sessions, queue, check results)",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 10s",
        "",
    ]
    return "\n".join(lines)
