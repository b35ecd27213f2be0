"""`edgellm tls ...`: certificates for serving HTTPS on a lab network."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgellm.cli.console import user_errors

if TYPE_CHECKING:  # cryptography loads only for this command, not for every `edgellm` start
    from edgellm.certificates import Issued

app = typer.Typer(
    name="tls",
    help="Certificates for `edgellm serve --tls-cert --tls-key`.",
    no_args_is_help=True,
)


@app.command("self-signed")
@user_errors
def self_signed(
    host: list[str] = typer.Option(
        ...,
        "--host",
        help="A DNS name or IP address clients will use; repeat for each (localhost, "
        "127.0.0.1, box.lan).",
    ),
    out: Path = typer.Option(
        ..., help="Directory for ca.pem, ca-key.pem, server.pem, server-key.pem."
    ),
    days: int | None = typer.Option(
        None,
        help="Days the certificates are valid (default and most: 825, the longest Apple's "
        "clients accept).",
        show_default=False,
    ),
    force: bool = typer.Option(False, help="Replace files already in --out."),
) -> None:
    """Make a private CA and a server certificate it signed, for a lab network.

    Clients trust ca.pem; the server gets server.pem and server-key.pem. The CA may vouch only
    for the hosts given (name constraints). Key files are created 0600.

    Example: edgellm tls self-signed --host localhost --host 127.0.0.1 --host box.lan --out tls/
    """
    from edgellm import certificates

    chosen = {} if days is None else {"days": days}  # the default is certificates.DEFAULT_DAYS
    issued = certificates.self_signed(host, out, force=force, **chosen)
    typer.echo(trust_instructions(issued))


def trust_instructions(issued: Issued) -> str:
    """What was written, how to serve with it, and how each kind of client trusts the CA."""
    from edgellm.certificates import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY

    paths = issued.paths
    ca, host = paths[CA_CERT], _url_host(issued.hosts[0])
    url = f"https://{host}:8000/v1"
    return f"""\
Wrote a private CA and a server certificate for {", ".join(issued.hosts)}, valid until \
{issued.not_after:%Y-%m-%d}:
  {ca}  the CA's certificate: give it to clients
  {paths[CA_KEY]}  the CA's key (0600): it can issue certificates; keep it offline
  {paths[SERVER_CERT]}  the server's certificate
  {paths[SERVER_KEY]}  the server's key (0600)

Serve:
  edgellm serve --tls-cert {paths[SERVER_CERT]} --tls-key {paths[SERVER_KEY]}
  (a non-loopback --host still needs API keys or --insecure)

Trust the CA on each client (copy ca.pem only, never a key):
  curl           curl --cacert {ca} {url}/models
  openai         openai.OpenAI(base_url="{url}", api_key=KEY, http_client=httpx.Client(
    (Python)         verify=ssl.create_default_context(cafile="{ca}")))
  one process    SSL_CERT_FILE={ca} (OpenSSL, httpx, openai; it replaces the system's
                 roots for that process); requests: REQUESTS_CA_BUNDLE; Node: NODE_EXTRA_CA_CERTS
  Debian/Ubuntu  sudo cp {ca} /usr/local/share/ca-certificates/edgellm-lab-ca.crt
                 sudo update-ca-certificates
  macOS          sudo security add-trusted-cert -d -r trustRoot \\
                   -k /Library/Keychains/System.keychain {ca}
The CA is valid only for these hosts: trusting it lets it vouch for nothing else."""


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
