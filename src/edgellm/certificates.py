"""A private certificate authority and a server certificate for a lab network
(`edgellm tls self-signed`), made with `cryptography`.

Four files go into the output directory: `ca.pem` (the CA's certificate: what clients trust),
`ca-key.pem` (its key: keep it offline, it can issue more certificates), `server.pem` (the
server's certificate) and `server-key.pem` (the server's key). Keys are ECDSA P-256,
unencrypted (the server starts unattended); every key file is created 0600 with O_EXCL: never
readable by others, not even between its creation and a chmod.

The CA is name-constrained to the hosts it was made for (RFC 5280 4.2.1.10): a client that
trusts it trusts it only for those names and addresses, so a stolen `ca-key.pem` cannot be used
to impersonate any other site to that client. An address family (IPv4, IPv6) with no address
among the hosts is excluded whole; with no DNS name, only names under the reserved `.invalid`
are permitted.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgellm.errors import ValidationError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca-key.pem", "server.pem", "server-key.pem"
FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)
KEY_FILES = (CA_KEY, SERVER_KEY)

# Apple's clients refuse a TLS server certificate valid for more than 825 days, even from a
# private CA; the default stays under it.
DEFAULT_DAYS = 825
MAX_DAYS = 825
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")

Host = x509.DNSName | x509.IPAddress


@dataclass(frozen=True, slots=True)
class Issued:
    """What `self_signed` wrote."""

    paths: dict[str, Path]  # file name (ca.pem, ...) -> where it was written
    hosts: tuple[str, ...]  # the names and addresses, as the certificate holds them
    not_after: datetime.datetime  # UTC; both certificates end then


def parse_host(text: str) -> Host:
    """A subject alternative name: an IP address, else a DNS name (a leading `*.` allowed).

    Raises ValidationError with one clear line for anything else."""
    name = text.strip()
    if not name:
        raise ValidationError("--host must not be empty", param="host")
    with contextlib.suppress(ValueError):
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    lowered = name.lower().removesuffix(".")
    if not lowered.isascii():
        raise ValidationError(
            f"--host {name!r}: not an IP address or an ASCII DNS name (write an international "
            "name in its xn-- form)",
            param="host",
        )
    labels = lowered.split(".")
    if labels[0] == "*" and len(labels) > 2:  # a wildcard for one level, never for a whole TLD
        labels = labels[1:]
    if (
        len(lowered) > 253
        or not all(_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()  # 10.0.0.300 is a mistyped address, not a name
    ):
        raise ValidationError(
            f"--host {name!r}: not an IP address or a DNS name (letters, digits and hyphens in "
            "dot-separated labels of at most 63 characters)",
            param="host",
        )
    return x509.DNSName(lowered)


def self_signed(
    hosts: list[str], out: Path, days: int = DEFAULT_DAYS, force: bool = False
) -> Issued:
    """Write a private CA and a server certificate for `hosts` into `out`.

    Refuses (ValidationError) to overwrite any of the four files unless `force`."""
    if not hosts:
        raise ValidationError("give at least one --host", param="host")
    if not 1 <= days <= MAX_DAYS:
        raise ValidationError(f"--days must be from 1 to {MAX_DAYS}", param="days")
    names = list(dict.fromkeys(parse_host(host) for host in hosts))
    paths = {name: out / name for name in FILES}
    existing = [str(path) for path in paths.values() if path.exists() or path.is_symlink()]
    if existing and not force:
        raise ValidationError(f"will not replace {', '.join(existing)} (pass --force)", param="out")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, names, not_before, not_after)
    server_cert = _server_certificate(server_key, ca_key, ca_cert, names, not_before, not_after)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(paths[CA_KEY], _pem_key(ca_key), secret=True)
        _write(paths[SERVER_KEY], _pem_key(server_key), secret=True)
        _write(paths[CA_CERT], _pem(ca_cert), secret=False)
        _write(paths[SERVER_CERT], _pem(server_cert), secret=False)
    except OSError as exc:
        where = exc.filename or out
        raise ValidationError(f"cannot write {where}: {exc.strerror or exc}", param="out") from None
    return Issued(paths, tuple(_shown(name) for name in names), not_after)


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    names: list[Host],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgellm"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"edgellm lab CA {not_before:%Y-%m-%d}"),
        ]
    )
    return (
        _builder(subject, subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(_name_constraints(names), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[Host],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    # clients match the SAN; the CN is for people. Never an address: OpenSSL may read a CN
    # with dots as a DNS name and hold it against the CA's name constraints
    dns = [name.value for name in names if isinstance(name, x509.DNSName) and len(name.value) <= 64]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else "edgellm")])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, ca_cert.subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(secrets.randbits(159) + 1)  # positive, at most 20 bytes (RFC 5280)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _name_constraints(names: list[Host]) -> x509.NameConstraints:
    """Permit exactly `names` (a DNS name covers its subdomains); an address family with no
    address given is excluded whole, and with no DNS name only `.invalid` names are permitted."""
    permitted: list[x509.GeneralName] = []
    excluded: list[x509.GeneralName] = []
    for name in names:
        if isinstance(name, x509.DNSName):
            permitted.append(x509.DNSName(name.value.removeprefix("*.")))
        else:
            permitted.append(x509.IPAddress(ipaddress.ip_network(name.value)))
    if not any(isinstance(name, x509.DNSName) for name in names):
        permitted.append(x509.DNSName("invalid"))
    for family in (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")):
        if not any(
            isinstance(n, x509.IPAddress) and n.value.version == family.version for n in names
        ):
            excluded.append(x509.IPAddress(family))
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded or None)


def _shown(name: Host) -> str:
    return str(name.value)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write `data` to a new file beside `path` (0600 for a secret, 0644 otherwise, created with
    that mode and O_EXCL so no other file or link is written through), then move it over `path`."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
