"""TLS: `edgellm tls self-signed` writes a name-constrained lab CA and a server certificate
(modes, SANs, a chain that verifies); `edgellm serve --tls-cert --tls-key` checks its files at
start in one line, and a real server speaks HTTPS to the official openai client trusting the CA,
TLS 1.3 to a default client, refuses TLS 1.1, and gives plain HTTP no answer."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from edgellm.certificates import parse_host
from edgellm.cli.main import app
from edgellm.errors import EdgeLLMError
from edgellm.server.tls import server_context, warn_if_key_readable
from tests.conftest import MODEL_ID, ServerProcess

HOSTS = ["localhost", "127.0.0.1", "box.lan"]
runner = CliRunner()


def self_signed(out: Path, *hosts: str, extra: tuple[str, ...] = ()) -> Any:
    args = [arg for host in hosts for arg in ("--host", host)]
    return runner.invoke(app, ["tls", "self-signed", *args, "--out", str(out), *extra])


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verifier(ca: Path, name: x509.DNSName | x509.IPAddress) -> Any:
    return PolicyBuilder().store(Store([load_cert(ca)])).build_server_verifier(name)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "tls"
    result = self_signed(out, *HOSTS)
    assert result.exit_code == 0, result.output
    return out


# --- edgellm tls self-signed ---------------------------------------------------------------


def test_files_and_modes_even_with_an_open_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys are created 0600 with O_EXCL (never another mode, not even for a moment), whatever
    the umask; certificates are 0644; the new directory is 0700."""
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)
    try:
        result = self_signed(tmp_path / "tls", *HOSTS)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "tls").iterdir()}
    assert modes == {
        "ca.pem": 0o644,
        "ca-key.pem": 0o600,
        "server.pem": 0o644,
        "server-key.pem": 0o600,
    }
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    key_opens = [(flags, mode) for path, flags, mode in opened if "key" in Path(path).name]
    assert len(key_opens) == 2
    assert all(
        flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600 for flags, mode in key_opens
    )


def test_sans_and_a_chain_that_verifies(lab: Path) -> None:
    leaf, ca = load_cert(lab / "server.pem"), load_cert(lab / "ca.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "box.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert leaf.issuer == ca.subject
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in (x509.DNSName("box.lan"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = verifier(lab / "ca.pem", name).verify(leaf, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        verifier(lab / "ca.pem", x509.DNSName("other.lan")).verify(leaf, [])
    # and OpenSSL, as every Python client loads it, accepts the CA
    ssl.create_default_context(cafile=lab / "ca.pem")
    days = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(days=825) <= days <= datetime.timedelta(days=825, minutes=6)


def test_the_ca_cannot_vouch_for_other_names(lab: Path, tmp_path: Path) -> None:
    """A certificate the lab CA's key signs for a name it was not made for is refused by
    cryptography's verifier and by OpenSSL: a stolen ca-key.pem cannot impersonate the bank."""
    ca_key = serialization.load_pem_private_key((lab / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = load_cert(lab / "ca.pem")
    for rogue_name_text in ("bank.example", "::1"):
        rogue_name = parse_host(rogue_name_text)
        rogue, rogue_key = _rogue_certificate(ca, ca_key, rogue_name)
        with pytest.raises(VerificationError, match="name constraint"):
            verifier(lab / "ca.pem", rogue_name).verify(rogue, [])
        # OpenSSL (every Python client) refuses it in a real handshake too
        cert, key = _write_pair(tmp_path, rogue, rogue_key)
        with pytest.raises(ssl.SSLCertVerificationError, match="subtree violation"):
            handshake_with(permissive_server(cert, key), client_context(lab), rogue_name_text)


def _write_pair(
    directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / "rogue.pem", directory / "rogue-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _rogue_certificate(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: x509.GeneralName
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([name]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    ), key


def test_it_prints_how_to_trust_the_ca(tmp_path: Path) -> None:
    result = self_signed(tmp_path / "tls", "box.lan")
    assert result.exit_code == 0, result.output
    ca = tmp_path / "tls" / "ca.pem"
    for needle in (
        f"curl --cacert {ca} https://box.lan:8000/v1/models",
        f'verify=ssl.create_default_context(cafile="{ca}")',
        f"SSL_CERT_FILE={ca}",
        "update-ca-certificates",
        "security add-trusted-cert",
        f"--tls-cert {tmp_path / 'tls' / 'server.pem'}",
    ):
        assert needle in result.output


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert self_signed(out, "localhost").exit_code == 0
    before = (out / "ca.pem").read_bytes()
    refused = self_signed(out, "localhost")
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1
    assert refused.output.startswith(f"error: will not replace {out / 'ca.pem'}, ")
    assert refused.output.endswith(" (pass --force)\n")
    assert (out / "ca.pem").read_bytes() == before
    forced = self_signed(out, "localhost", extra=("--force",))
    assert forced.exit_code == 0, forced.output
    assert (out / "ca.pem").read_bytes() != before
    assert stat.S_IMODE((out / "server-key.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "server-key.pem",
        "server.pem",
    ]


@pytest.mark.parametrize(
    "host",
    [
        "",
        "  ",
        "bad_name",
        "a..lan",
        "-x.lan",
        "x-.lan",
        "10.0.0.300",
        "*.lan",
        "bøx.lan",
        "a" * 64,
    ],
)
def test_bad_names_are_one_clear_line(tmp_path: Path, host: str) -> None:
    result = self_signed(tmp_path / "tls", "localhost", host)
    assert result.exit_code == 1
    assert result.output.startswith("error: --host")
    assert result.output.count("\n") == 1
    assert not (tmp_path / "tls").exists()


def test_ipv6_and_wildcard_names(tmp_path: Path) -> None:
    result = self_signed(tmp_path / "tls", "::1", "*.lab.lan", "Box.Lan.")
    assert result.exit_code == 0, result.output
    san = load_cert(tmp_path / "tls" / "server.pem").extensions
    names = san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["*.lab.lan", "box.lan"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    verify = verifier(tmp_path / "tls" / "ca.pem", x509.DNSName("gpu1.lab.lan"))
    verify.verify(load_cert(tmp_path / "tls" / "server.pem"), [])


# --- edgellm serve --tls-cert --tls-key: checked at start ----------------------------------


def _other_key(tmp_path: Path, *, password: bytes | None = None) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path = tmp_path / ("encrypted.pem" if password else "other-key.pem")
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


def test_a_mismatched_pair_is_one_clear_error_at_start(lab: Path, tmp_path: Path) -> None:
    other = _other_key(tmp_path)
    result = runner.invoke(
        app, ["serve", "--tls-cert", str(lab / "server.pem"), "--tls-key", str(other)]
    )
    assert result.exit_code == 1
    assert result.output == (
        f"error: --tls-key {other} is not the key of --tls-cert {lab / 'server.pem'}\n"
    )


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("server.pem", None, "--tls-cert needs --tls-key: give both or neither"),
        (None, "server-key.pem", "--tls-key needs --tls-cert: give both or neither"),
        ("missing.pem", "server-key.pem", "cannot read --tls-cert {dir}/missing.pem: No such file"),
        ("server.pem", "missing.pem", "cannot read --tls-key {dir}/missing.pem: No such file"),
        ("server-key.pem", "server-key.pem", "--tls-cert {dir}/server-key.pem is not a PEM cert"),
        ("server.pem", "ca.pem", "--tls-key {dir}/ca.pem is not a PEM private key"),
        ("ca.pem", "server-key.pem", "--tls-key {dir}/server-key.pem is not the key of"),
    ],
)
def test_bad_tls_files_are_one_clear_line(
    lab: Path, cert: str | None, key: str | None, message: str
) -> None:
    args = ["serve"]
    args += ["--tls-cert", str(lab / cert)] if cert else []
    args += ["--tls-key", str(lab / key)] if key else []
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.output.startswith("error: " + message.format(dir=lab)), result.output
    assert result.output.count("\n") == 1


def test_an_encrypted_key_is_refused_without_a_prompt(lab: Path, tmp_path: Path) -> None:
    encrypted = _other_key(tmp_path, password=b"secret")
    with pytest.raises(EdgeLLMError, match="is encrypted; give the key unencrypted"):
        server_context(lab / "server.pem", encrypted)


def test_a_world_readable_key_is_warned_about(
    lab: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes((lab / "server-key.pem").read_bytes())
    key.chmod(0o640)  # a group such as Debian's ssl-cert: deliberate, no warning
    warn_if_key_readable(key)
    key.chmod(0o644)
    warn_if_key_readable(key)
    assert [r.getMessage() for r in caplog.records] == [
        f"the TLS key {key} can be read by any user (mode 644): chmod 600 it"
    ]


def test_a_public_bind_over_tls_still_needs_keys(lab: Path) -> None:
    tls = ["--tls-cert", str(lab / "server.pem"), "--tls-key", str(lab / "server-key.pem")]
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", *tls])
    assert result.exit_code == 1
    assert "refusing to bind 0.0.0.0 without API keys" in result.output


def test_the_context_refuses_old_versions_and_weak_suites(lab: Path) -> None:
    context = server_context(lab / "server.pem", lab / "server-key.pem")
    assert context is not None
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    suites = {c["name"]: c for c in context.get_ciphers()}
    tls12 = [name for name, c in suites.items() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(name.startswith("ECDHE-") for name in tls12)
    assert all(c["aead"] for c in suites.values())
    assert server_context(None, None) is None


# --- a real edgellm serve over HTTPS -------------------------------------------------------


def client_context(lab: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=lab / "ca.pem")


@pytest.fixture(scope="module")
def tls_server(lab: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        "--ctx",
        "2048",
        "--parallel",
        "2",
        "--tls-cert",
        str(lab / "server.pem"),
        "--tls-key",
        str(lab / "server-key.pem"),
        tls=client_context(lab),
    )
    yield proc
    proc.stop()


def handshake(port: int, context: ssl.SSLContext, name: str = "localhost") -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(sock, server_hostname=name)
    except BaseException:
        sock.close()
        raise


@pytest.mark.model
def test_the_openai_client_over_https_trusting_the_lab_ca(
    lab: Path, tls_server: ServerProcess
) -> None:
    http_client = httpx.Client(verify=client_context(lab))
    with openai.OpenAI(
        base_url=f"https://localhost:{tls_server.port}/v1",
        api_key="unused",
        http_client=http_client,
        max_retries=0,
    ) as client:
        assert [m.id for m in client.models.list()] == [MODEL_ID]
        answer = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
        )
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    # the announce line names the scheme clients must use
    assert f"at https://127.0.0.1:{tls_server.port}/v1" in tls_server.output()
    # a client that does not trust the lab CA is refused by its own verification
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://localhost:{tls_server.port}/v1/models")


@pytest.mark.model
def test_a_default_client_gets_tls_1_3_and_http_1_1(lab: Path, tls_server: ServerProcess) -> None:
    context = client_context(lab)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with handshake(tls_server.port, context) as tls:
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "http/1.1"
    tls12 = client_context(lab)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # the minimum is still served, forward-secret
    with handshake(tls_server.port, tls12, "127.0.0.1") as tls:
        assert tls.version() == "TLSv1.2"
        cipher = tls.cipher()
        assert cipher is not None and cipher[0].startswith("ECDHE-ECDSA-") and "GCM" in cipher[0]


def tls11_client(lab: Path) -> ssl.SSLContext:
    """A client that offers only TLS 1.0 and 1.1. OpenSSL 3's default security level refuses
    to offer them at all; level 0 makes it offer them, so the refusal is the server's."""
    context = client_context(lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl deprecates the old versions
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def handshake_with(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str | None:
    """The TLS version `client` reaches with a one-connection server on `server`'s context."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def accept() -> None:
            conn, _ = listener.accept()
            with (
                contextlib.suppress(ssl.SSLError, OSError),
                server.wrap_socket(conn, server_side=True),
            ):
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            with handshake(listener.getsockname()[1], client, name) as tls:
                return tls.version()
        finally:
            thread.join(10)


def permissive_server(cert: Path, key: Path) -> ssl.SSLContext:
    """A server still allowing TLS 1.0: the control that shows a client really offers 1.1."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    server.load_cert_chain(cert, key)
    return server


@pytest.mark.model
def test_a_tls_1_1_client_is_refused(lab: Path, tls_server: ServerProcess) -> None:
    control = permissive_server(lab / "server.pem", lab / "server-key.pem")
    assert handshake_with(control, tls11_client(lab), "localhost") == "TLSv1.1"
    with pytest.raises(ssl.SSLError):
        handshake(tls_server.port, tls11_client(lab)).close()
    # the refusal cost the server nothing: it still serves
    assert httpx.get(tls_server.base + "/ready", verify=tls_server.verify).status_code == 200


@pytest.mark.model
def test_plain_http_to_the_tls_port_gets_no_answer(tls_server: ServerProcess) -> None:
    """A plain request is not a TLS record: the handshake fails and the connection closes,
    with no HTTP status line, no header and no body."""
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):  # until the server closes; a timeout fails the test
            received += chunk
    assert received == b""  # no status line, no header, no body: not one byte
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/v1/models", timeout=10)
    assert httpx.get(tls_server.base + "/ready", verify=tls_server.verify).status_code == 200
