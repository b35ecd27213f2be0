"""`edgellm gateway haproxy`: the HAProxy configuration for a fleet of workers."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from edgellm.cli.console import err, user_errors

app = typer.Typer(
    name="gateway",
    help="Put a fleet of edgellm workers behind a load balancer (HAProxy).",
    no_args_is_help=True,
)


@app.command()
@user_errors
def haproxy(
    worker: list[str] = typer.Option(
        ..., "--worker", help="A worker's URL, http://HOST:PORT; repeat for each."
    ),
    affinity: str = typer.Option(
        "session",
        help="session: a request with X-Session-Id (else an API key) goes to the same worker "
        "(its prefix cache), the others to the least busy; none: least busy only.",
    ),
    bind: str = typer.Option("0.0.0.0:8080", help="ADDRESS:PORT clients connect to."),
    check_interval: str = typer.Option("30s", help="Health check interval (5s, 30s, 1m)."),
    fall: int = typer.Option(3, min=1, max=100, help="Failed checks before a worker is out."),
    rise: int = typer.Option(2, min=1, max=100, help="Passed checks before it is back."),
    agent_port: int | None = typer.Option(
        None, min=1, max=65535, help="The workers' --agent-port: their load as weights."
    ),
    tls_cert: Path | None = typer.Option(
        None, help="PEM with the certificate and key: clients connect with HTTPS."
    ),
    stats_bind: str = typer.Option("127.0.0.1:8404", help="ADDRESS:PORT of /stats, /metrics."),
    stats_socket: Path = typer.Option(
        Path("/run/haproxy/edgellm.sock"), help="The runtime API's socket."
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="Write here; default: stdout."),
) -> None:
    """Write a complete, commented haproxy.cfg: /ready health checks, agent checks, session
    affinity on a consistent hash, timeouts for long streams, retries only before a request
    reached a worker, the stats socket and HAProxy's Prometheus endpoint.

    Example: edgellm gateway haproxy --worker http://10.0.0.11:8000 --worker
    http://10.0.0.12:8000 --agent-port 8001 -o haproxy.cfg && haproxy -c -f haproxy.cfg
    """
    from edgellm.errors import ValidationError
    from edgellm.gateway import GatewayConfig, check_bind, parse_worker, render
    from edgellm.registry.deploy import parse_duration

    if affinity not in ("session", "none"):
        raise ValidationError("--affinity is session or none", param="affinity")
    if tls_cert is not None and not tls_cert.is_file():
        raise ValidationError(f"--tls-cert {tls_cert}: no such file", param="tls_cert")
    config = GatewayConfig(
        workers=[parse_worker(url, i) for i, url in enumerate(worker)],
        bind=check_bind(bind, "bind"),
        affinity="session" if affinity == "session" else "none",
        check_interval_s=parse_duration(check_interval, "check_interval"),
        fall=fall,
        rise=rise,
        agent_port=agent_port,
        tls_cert=tls_cert,
        stats_bind=check_bind(stats_bind, "stats-bind"),
        stats_socket=stats_socket,
        command=["edgellm", "gateway", "haproxy", *sys.argv[3:]],
    )
    text = render(config)
    if out is None:
        sys.stdout.write(text)
        return
    temporary = out.with_name(f".{out.name}.tmp")
    try:
        temporary.write_text(text)
        temporary.replace(out)  # never half a file
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ValidationError(f"-o {out}: cannot write it: {exc.strerror}", param="out") from None
    err.print(f"wrote {out} ({len(config.workers)} workers); check it: haproxy -c -f {out}")
