"""The server's TLS context: TLS 1.2 at least, 1.3 whenever the client can, forward-secret AEAD
ciphers only, and the certificate files checked at start with one clear line.

uvicorn builds its own `SSLContext` from `Config` fields and offers no minimum version, so
`uvicorn_options` hands it ours through `ssl_context_factory` (uvicorn >= 0.47). OpenSSL picks
the highest version both sides offer: a modern client gets TLS 1.3; a client that offers only
TLS 1.0 or 1.1 fails its handshake (`protocol_version` alert) before any HTTP is read. Plain HTTP
sent to the port is not a TLS record: the handshake fails and the connection is closed with no
HTTP answer at all.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError, ValidationError

log = logging.getLogger("edgellm.server")

# TLS 1.2 suites (1.3's are all AEAD with forward secrecy and are OpenSSL's defaults): ECDHE key
# exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305 (AEAD), for ECDSA and RSA keys.
# No CBC (Lucky13, padding oracles), no static RSA key exchange (no forward secrecy), no SHA-1.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The context for `--tls-cert CERT --tls-key KEY`; None when neither is given.

    Raises an EdgeLLMError with one clear line when only one is given, a file cannot be read, a
    file is not PEM, the key is encrypted, or the key is not the certificate's."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise ValidationError(f"{given} needs {missing}: give both or neither", param="tls")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise EdgeLLMError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    _check_certificate(cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION  # CRIME; renegotiation DoS
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])  # uvicorn's h11 protocol speaks only HTTP/1.1
    try:
        context.load_cert_chain(cert, key, password=_no_password(key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise EdgeLLMError(f"--tls-key {key} is not the key of --tls-cert {cert}") from None
        why = f" ({exc.reason})" if exc.reason else ""
        raise EdgeLLMError(f"--tls-key {key} is not a PEM private key{why}") from None
    return context


def _check_certificate(cert: Path) -> None:
    """One clear line when `cert` holds no PEM certificate (before OpenSSL's mixed message)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        why = f" ({exc.reason})" if exc.reason else ""
        raise EdgeLLMError(f"--tls-cert {cert} is not a PEM certificate{why}") from None


def _no_password(key: Path) -> Callable[[], str]:
    """OpenSSL's password callback: an encrypted key is refused instead of prompting on the
    terminal (a server starts unattended)."""

    def refuse() -> str:
        raise EdgeLLMError(
            f"--tls-key {key} is encrypted; give the key unencrypted, in a file only the "
            "server's user can read (chmod 600)"
        )

    return refuse


def warn_if_key_readable(key: Path | None) -> None:
    """Log a warning when every user of the machine may read the key (a group, such as
    Debian's ssl-cert, is a deliberate choice)."""
    if key is not None and os.stat(key).st_mode & stat.S_IRWXO:
        mode = stat.S_IMODE(os.stat(key).st_mode)
        log.warning("the TLS key %s can be read by any user (mode %o): chmod 600 it", key, mode)


def uvicorn_options(context: ssl.SSLContext | None) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` serving over `context` (none: plain HTTP)."""
    if context is None:
        return {}
    return {"ssl_context_factory": lambda config, default: context}
