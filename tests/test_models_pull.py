"""`edgellm models pull` against a local HTTP server the tests start: ranges, ETags, a hub
with a redirect to its CDN, a connection dropped half way, 404, a body that is no GGUF, wrong
hashes, a full disk. `download` is tested directly; the end-to-end tests go through the CLI."""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgellm.cli.main import app
from edgellm.errors import ModelFileError, ValidationError
from edgellm.registry.pull import DownloadError, download, resolve_source

BODY = b"GGUF" + random.Random(18).randbytes(3 << 20)  # starts like a GGUF; 3 MiB
BODY_SHA = hashlib.sha256(BODY).hexdigest()


@dataclass
class Route:
    """What the server answers on one path."""

    body: bytes = BODY
    etag: str | None = None  # sent quoted as ETag; also the If-Range validator
    linked_etag: str | None = None  # X-Linked-Etag, as the hub sends on its redirect
    redirect: str | None = None  # 302 to this URL instead of a body
    drop_after: int | None = None  # once: close the connection after this many body bytes
    stall_s: float = 0.0  # ... having been silent this long first
    length: bool = True  # send Content-Length (else the body ends when the connection does)
    content_type: str = "application/octet-stream"
    delay_s: float = 0.0  # wait this long before answering


@dataclass
class Seen:
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    other_origin: str  # http://localhost:PORT: the same server under another origin
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def gets(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


class _Handler(BaseHTTPRequestHandler):
    server_state: Server

    def do_GET(self) -> None:
        state = self.server_state
        state.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = state.routes.get(self.path)
        if route is None:
            return self._plain(404, b"no such file\n")
        time.sleep(route.delay_s)
        if route.redirect:
            self.send_response(302)
            self.send_header("Location", route.redirect)
            if route.linked_etag:
                self.send_header("X-Linked-Etag", f'"{route.linked_etag}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        start = self._range_start(route)
        if start is not None and start >= len(route.body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(route.body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self._body(route, start or 0, partial=start is not None)
        return None

    def _range_start(self, route: Route) -> int | None:
        wanted = self.headers.get("Range", "")
        if not wanted.startswith("bytes=") or not wanted.endswith("-"):
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and (route.etag is None or if_range != f'"{route.etag}"'):
            return None  # the validator does not match: the whole file, 200
        return int(wanted[len("bytes=") : -1])

    def _body(self, route: Route, start: int, *, partial: bool) -> None:
        body = route.body[start:]
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", route.content_type)
        if route.etag:
            self.send_header("ETag", f'"{route.etag}"')
        if partial:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}"
            )
        if route.length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if route.drop_after is not None:
            self.wfile.write(body[: route.drop_after])
            route.drop_after = None  # once
            self.wfile.flush()
            time.sleep(route.stall_s)
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _plain(self, status: int, text: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up first (the timeout test's) is expected, not news


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    port = httpd.server_address[1]
    state = Server(f"http://127.0.0.1:{port}", f"http://localhost:{port}")
    httpd.RequestHandlerClass = type("Handler", (_Handler,), {"server_state": state})
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def partial(tmp_path: Path) -> Path:
    return tmp_path / "partial"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- resolve_source -------------------------------------------------------------------------


def test_urls_are_fetched_as_given_and_hf_resolves_like_the_hub_clients() -> None:
    assert resolve_source("https://example.com/m.gguf", {}).url == "https://example.com/m.gguf"
    hub = resolve_source("hf://org/repo/m.gguf", {})
    assert hub.url == "https://huggingface.co/org/repo/resolve/main/m.gguf"
    assert hub.headers == {} and hub.display == "hf://org/repo/m.gguf"
    mirror = resolve_source(
        "hf://org/repo/sub dir/m.Q4.gguf@refs/pr/1", {"HF_ENDPOINT": "https://mirror.example/"}
    )
    assert mirror.url == "https://mirror.example/org/repo/resolve/refs%2Fpr%2F1/sub%20dir/m.Q4.gguf"


def test_hf_token_goes_to_the_hub_endpoint_only() -> None:
    env = {"HF_TOKEN": "hf_secret", "HF_ENDPOINT": "https://mirror.example"}
    bearer = {"Authorization": "Bearer hf_secret"}
    assert resolve_source("hf://org/repo/m.gguf", env).headers == bearer
    assert resolve_source("https://mirror.example/org/repo/resolve/main/m.gguf", env).headers == (
        bearer
    )
    assert resolve_source("https://elsewhere.example/m.gguf", env).headers == {}
    assert "hf_secret" not in repr(resolve_source("hf://org/repo/m.gguf", env))


def test_hf_parts_are_percent_encoded_segment_by_segment() -> None:
    """`?`, `#` or `%` in ORG, REPO, FILE or REVISION stay in their own path segment."""
    url = resolve_source("hf://org?x/re#po/sub%/m#1.gguf@v?1", {}).url
    assert url == "https://huggingface.co/org%3Fx/re%23po/resolve/v%3F1/sub%25/m%231.gguf"


def test_a_bad_hf_endpoint_is_one_line() -> None:
    with pytest.raises(ValidationError, match="HF_ENDPOINT must be an https:// or http:// URL"):
        resolve_source("hf://org/repo/m.gguf", {"HF_ENDPOINT": "mirror.example"})


@pytest.mark.parametrize(
    "source",
    ["ftp://host/m.gguf", "/tmp/m.gguf", "https:///m.gguf", "hf://org/m.gguf",
     "hf://org/repo/m.bin", "hf://org//m.gguf", "hf://org/repo/../m.gguf", "hf://org/repo/m.gguf@",
     "http://host:port/m.gguf"],
)  # fmt: skip
def test_bad_sources_are_one_line(source: str) -> None:
    with pytest.raises(ValidationError, match="cannot pull") as caught:
        resolve_source(source, {})
    assert "\n" not in caught.value.message


# --- download -------------------------------------------------------------------------------


def test_plain_url_checked_against_a_sha256_etag(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA)
    done = download(f"{server.base}/m.gguf", partial, env={})
    assert (done.sha256, done.size, done.checked_against) == (BODY_SHA, len(BODY), "ETag")
    assert done.path.read_bytes() == BODY
    assert leftovers(partial) == [done.path.name]  # no .part, no sidecar
    assert server.seen[0].headers["accept-encoding"] == "identity"


def test_hf_through_a_mirror_with_a_redirect_to_its_cdn(server: Server, partial: Path) -> None:
    """The hub's shape: /resolve/ answers 302 with X-Linked-Etag (the SHA-256) to a CDN on
    another host whose ETag is no SHA-256; HF_TOKEN reaches the hub, not the CDN."""
    cdn = "/cdn/blob?signature=abc"
    server.routes["/org/repo/resolve/v1/sub/m.gguf"] = Route(
        redirect=server.other_origin + cdn, linked_etag=BODY_SHA
    )
    server.routes[cdn] = Route(etag="0123456789abcdef0123456789abcdef")
    env = {"HF_ENDPOINT": server.base, "HF_TOKEN": "hf_secret"}
    done = download("hf://org/repo/sub/m.gguf@v1", partial, env=env)
    assert (done.sha256, done.checked_against) == (BODY_SHA, "X-Linked-Etag")
    hub, to_cdn = server.seen
    assert hub.headers["authorization"] == "Bearer hf_secret"
    assert to_cdn.path == cdn and "authorization" not in to_cdn.headers


def test_the_token_is_not_sent_to_a_plain_url_elsewhere(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA)
    download(f"{server.base}/m.gguf", partial, env={"HF_ENDPOINT": server.other_origin,
                                                    "HF_TOKEN": "hf_secret"})  # fmt: skip
    assert "authorization" not in server.seen[0].headers


def test_a_dropped_connection_resumes_with_a_range_request(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA, drop_after=len(BODY) // 2)
    url = f"{server.base}/m.gguf"
    with pytest.raises(DownloadError, match="run the same pull again to resume") as caught:
        download(url, partial, env={})
    assert "connection lost after 1.5 MiB of 3.0 MiB" in caught.value.message
    kept = sorted(partial.iterdir())
    assert [p.suffix for p in kept] == [".json", ".part"]
    assert [oct(p.stat().st_mode & 0o777) for p in kept] == ["0o600", "0o600"]
    done = download(url, partial, env={})
    second = server.seen[1].headers
    assert second["range"] == f"bytes={len(BODY) // 2}-" and second["if-range"] == f'"{BODY_SHA}"'
    assert (done.sha256, done.size) == (BODY_SHA, len(BODY))
    assert done.path.read_bytes() == BODY and leftovers(partial) == [done.path.name]


def test_a_server_gone_silent_mid_body_is_resumed_too(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA, drop_after=1 << 20, stall_s=1.5)
    url = f"{server.base}/m.gguf"
    with pytest.raises(
        DownloadError, match=r"after 1\.0 MiB of 3\.0 MiB \(the server went silent\)"
    ):
        download(url, partial, env={}, timeout_s=0.3)
    done = download(url, partial, env={})
    assert server.seen[1].headers["range"] == f"bytes={1 << 20}-" and done.sha256 == BODY_SHA


def test_a_file_that_changed_meanwhile_starts_over(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag="v1", drop_after=1 << 20)
    url = f"{server.base}/m.gguf"
    with pytest.raises(DownloadError):
        download(url, partial, env={})
    new = b"GGUF" + bytes(2 << 20)
    server.routes["/m.gguf"] = Route(body=new, etag="v2")  # If-Range "v1" no longer holds: 200
    done = download(url, partial, env={})
    assert server.seen[1].headers["if-range"] == '"v1"'
    assert done.sha256 == hashlib.sha256(new).hexdigest() and done.checked_against is None


def test_kept_bytes_the_server_refuses_are_fetched_again(server: Server, partial: Path) -> None:
    """A part as long as the file (a pull killed between its last byte and the rename):
    the server answers 416 to its range, and the pull starts again with a plain request."""
    url = f"{server.base}/m.gguf"
    server.routes["/m.gguf"] = Route(etag=BODY_SHA)
    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    partial.mkdir()
    (partial / f"{key}.part").write_bytes(BODY)
    (partial / f"{key}.json").write_text(
        json.dumps({"url": url, "etag": f'"{BODY_SHA}"', "last_modified": None, "size": len(BODY)})
    )
    done = download(url, partial, env={})
    assert done.sha256 == BODY_SHA and leftovers(partial) == [done.path.name]
    assert [s.headers.get("range") for s in server.seen] == [f"bytes={len(BODY)}-", None]


def test_without_a_validator_a_dropped_download_starts_over(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(drop_after=1 << 20)
    url = f"{server.base}/m.gguf"
    with pytest.raises(
        DownloadError, match="no ETag or Last-Modified, so the next pull starts over"
    ):
        download(url, partial, env={})
    done = download(url, partial, env={})
    assert "range" not in server.seen[1].headers and done.sha256 == BODY_SHA


def test_404_is_one_line_and_leaves_nothing(server: Server, partial: Path) -> None:
    with pytest.raises(DownloadError) as caught:
        download(f"{server.base}/missing.gguf", partial, env={})
    assert caught.value.message == (
        f"{server.base}/missing.gguf: HTTP 404 Not Found from {server.base}/missing.gguf"
    )
    with pytest.raises(DownloadError, match=r"HTTP 404 .*check the repo, the file name"):
        download("hf://org/repo/missing.gguf", partial, env={"HF_ENDPOINT": server.base})
    assert leftovers(partial) == []


def test_a_body_that_is_no_gguf_is_refused_at_its_first_bytes(
    server: Server, partial: Path
) -> None:
    server.routes["/login"] = Route(body=b"<!DOCTYPE html><p>sign in</p>", content_type="text/html")
    with pytest.raises(ModelFileError) as caught:
        download(f"{server.base}/login", partial, env={})
    assert (
        "is not a GGUF file (the server sent text/html, starting b'<!DO')" in caught.value.message
    )
    assert leftovers(partial) == []


def test_a_wrong_sha256_keeps_nothing(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA)
    wrong = "ab" * 32
    with pytest.raises(ValidationError) as caught:
        download(f"{server.base}/m.gguf", partial, sha256=wrong, env={})
    assert caught.value.message == (
        f"{server.base}/m.gguf: the downloaded file's sha256 is {BODY_SHA}, expected {wrong} "
        "(from --sha256); nothing was kept"
    )
    assert leftovers(partial) == []
    done = download(f"{server.base}/m.gguf", partial, sha256=BODY_SHA.upper(), env={})
    assert done.checked_against == "--sha256"


def test_an_etag_that_disagrees_with_the_bytes_keeps_nothing(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag="cd" * 32)
    with pytest.raises(ValidationError, match=r"expected cdcd.* \(from ETag\)"):
        download(f"{server.base}/m.gguf", partial, env={})
    assert leftovers(partial) == []


def test_a_malformed_sha256_is_refused_before_any_request(server: Server, partial: Path) -> None:
    with pytest.raises(ValidationError, match="--sha256 must be 64 hex characters, not 'xyz'"):
        download(f"{server.base}/m.gguf", partial, sha256="xyz", env={})
    assert server.seen == []


def test_no_answer_in_time_is_one_line(server: Server, partial: Path) -> None:
    server.routes["/slow"] = Route(delay_s=2)
    with pytest.raises(DownloadError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.3 s$"):
        download(f"{server.base}/slow", partial, env={}, timeout_s=0.3)
    assert leftovers(partial) == []


def test_nothing_listening_is_one_line(partial: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(DownloadError, match=rf"cannot reach 127\.0\.0\.1:{port}: "):
        download(f"http://127.0.0.1:{port}/m.gguf", partial, env={})


def test_a_second_pull_of_the_same_url_waits_for_none(server: Server, partial: Path) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA, drop_after=1 << 20)
    with pytest.raises(DownloadError):
        download(f"{server.base}/m.gguf", partial, env={})
    (part,) = partial.glob("*.part")
    with part.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another pull of this URL is running"):
            download(f"{server.base}/m.gguf", partial, env={})
    assert part.stat().st_size == 1 << 20  # untouched


def test_progress_shows_size_and_rate_on_stderr(
    server: Server, partial: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA)
    download(f"{server.base}/m.gguf", partial, progress=True, env={})
    out = capsys.readouterr()
    assert out.out == "" and "3.1/3.1 MB" in out.err


# --- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a 3 MiB download cannot fit."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_too_small_is_said_before_anything_is_written(
    server: Server, small_disk: Path
) -> None:
    server.routes["/m.gguf"] = Route(etag=BODY_SHA)
    with pytest.raises(DownloadError, match=r"needs 3\.0 MiB free in .*, which has 1\.0 MiB"):
        download(f"{server.base}/m.gguf", small_disk / "partial", env={})
    assert leftovers(small_disk / "partial") == []


def test_a_disk_that_fills_up_midway_gets_its_space_back(server: Server, small_disk: Path) -> None:
    """No Content-Length: the size is unknown until the end, so the disk fills while writing.
    The partial file is removed (ENOSPC), the message is one line."""
    server.routes["/m.gguf"] = Route(etag=BODY_SHA, length=False)
    with pytest.raises(DownloadError) as caught:
        download(f"{server.base}/m.gguf", small_disk / "partial", env={})
    message = caught.value.message
    assert "disk full in" in message and "the partial file was removed" in message
    assert "\n" not in message
    assert leftovers(small_disk / "partial") == []


# --- edgellm models pull: download, then the registry, on a real SQLite file -------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("EDGELLM_HOME", str(path))
    for name in ("HF_ENDPOINT", "HF_TOKEN", "EDGELLM_MODEL_KEY"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture(scope="module")
def real_model(model_path: Path) -> tuple[bytes, str]:
    """The default model's bytes (SmolLM2-135M Q4_1, ~94 MiB) and their SHA-256."""
    data = model_path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def models(*args: str) -> Any:
    return CliRunner().invoke(app, ["models", *args])


def one_line_error(result: Any) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def registered(home: Path) -> list[Any]:
    listed = models("list", "--json")
    assert listed.exit_code == 0, listed.stderr
    return list(json.loads(listed.stdout))


def store_files(home: Path) -> list[str]:
    """What lies in the blob and partial directories (the database aside)."""
    return [*leftovers(home / "models" / "blobs"), *leftovers(home / "models" / "partial")]


def test_pull_a_url_registers_the_real_model(
    server: Server, home: Path, real_model: tuple[bytes, str]
) -> None:
    data, digest = real_model
    server.routes["/smollm2.Q4_1.gguf"] = Route(body=data, etag=digest)
    url = f"{server.base}/smollm2.Q4_1.gguf"
    result = models("pull", url, "--name", "smollm2:q4", "--json")
    assert result.exit_code == 0, result.stderr
    pulled = json.loads(result.stdout)
    assert (pulled["sha256"], pulled["size"], pulled["source"]) == (digest, len(data), url)
    assert pulled["architecture"] == "llama" and pulled["file_type"] == "Q4_1"
    assert Path(pulled["blob"]).read_bytes() == data
    assert store_files(home) == [f"sha256-{digest}"]  # moved in: nothing left in partial/
    assert [row["name"] for row in registered(home)] == ["smollm2:q4"]


def test_pull_hf_through_a_mirror(
    server: Server, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_gguf(1 << 20)
    digest = hashlib.sha256(data).hexdigest()
    cdn = "/cdn/smollm2?sig=1"
    server.routes["/HuggingFaceTB/SmolLM2-GGUF/resolve/main/q4/smollm2.gguf"] = Route(
        redirect=server.other_origin + cdn, linked_etag=digest
    )
    server.routes[cdn] = Route(body=data)
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    source = "hf://HuggingFaceTB/SmolLM2-GGUF/q4/smollm2.gguf"
    result = models("pull", source, "--name", "smollm2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sha256"] == digest
    assert json.loads(result.stdout)["source"] == source
    hub, to_cdn = server.seen
    assert hub.headers["authorization"] == "Bearer hf_secret"
    assert "authorization" not in to_cdn.headers


def test_a_pull_cut_half_way_resumes_on_the_next_pull(
    server: Server, home: Path, real_model: tuple[bytes, str]
) -> None:
    data, digest = real_model
    server.routes["/m.gguf"] = Route(body=data, etag=digest, drop_after=len(data) // 2)
    url = f"{server.base}/m.gguf"
    line = one_line_error(models("pull", url, "--name", "m"))
    assert "connection lost after" in line and "run the same pull again to resume" in line
    assert registered(home) == []
    result = models("pull", url, "--name", "m", "--json")
    assert result.exit_code == 0, result.stderr
    assert server.seen[1].headers["range"] == f"bytes={len(data) // 2}-"
    assert json.loads(result.stdout)["sha256"] == digest
    assert store_files(home) == [f"sha256-{digest}"]


def test_a_wrong_sha256_registers_nothing_and_leaves_nothing(
    server: Server, home: Path, real_model: tuple[bytes, str]
) -> None:
    data, digest = real_model
    server.routes["/m.gguf"] = Route(body=data, etag=digest)
    line = one_line_error(models("pull", f"{server.base}/m.gguf", "--name", "m", "--sha256",
                                 "0" * 64))  # fmt: skip
    assert line.endswith(
        f"sha256 is {digest}, expected {'0' * 64} (from --sha256); nothing was kept"
    )
    assert registered(home) == [] and store_files(home) == []


@pytest.mark.parametrize(
    ("route", "says"),
    [
        (None, "HTTP 404 Not Found from http://"),
        (Route(body=b"<html>sign in</html>", content_type="text/html"),
         "is not a GGUF file (the server sent text/html, starting b'<htm')"),
        (Route(body=b"GGUF" + bytes(64)), "/m.gguf: unsupported GGUF version 0; nothing was kept"),
    ],
)  # fmt: skip
def test_what_is_no_model_is_one_line(
    server: Server, home: Path, route: Route | None, says: str
) -> None:
    if route is not None:
        server.routes["/m.gguf"] = route
    assert says in one_line_error(models("pull", f"{server.base}/m.gguf", "--name", "m"))
    assert registered(home) == [] and store_files(home) == []


def test_a_bad_name_is_said_before_downloading(server: Server, home: Path) -> None:
    line = one_line_error(models("pull", f"{server.base}/m.gguf", "--name", "no good:x:y"))
    assert "is not a model name" in line and server.seen == []


def test_a_disk_full_during_pull_registers_nothing(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$EDGELLM_HOME on a 2 MiB tmpfs; a 3 MiB GGUF whose size the server does not say."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        monkeypatch.setenv("EDGELLM_HOME", str(disk / "home"))
        server.routes["/m.gguf"] = Route(body=tiny_gguf(3 << 20), length=False)
        line = one_line_error(models("pull", f"{server.base}/m.gguf", "--name", "m"))
        assert "disk full in" in line and "the partial file was removed" in line
        assert registered(disk / "home") == [] and store_files(disk / "home") == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def tiny_gguf(size: int) -> bytes:
    """A well-formed GGUF of about `size` bytes (one F32 tensor)."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "tiny.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_tensor("token_embd.weight", np.ones(size // 4, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def test_pull_encrypt_keeps_the_plain_download_in_memory_only(
    server: Server, home: Path, tmp_path: Path
) -> None:
    """--encrypt: the download goes to /dev/shm (tmpfs), the blob is stored encrypted, and
    no plain copy is left behind anywhere once the pull is done."""
    from edgellm.registry import memory_partial_dir

    try:
        shm = memory_partial_dir()
    except ValidationError as exc:
        pytest.skip(exc.message)
    data = tiny_gguf(1 << 20)
    server.routes["/m.gguf"] = Route(body=data, etag=hashlib.sha256(data).hexdigest())
    key = tmp_path / "model.key"
    assert models("keygen", "--out", str(key)).exit_code == 0
    url = f"{server.base}/m.gguf"
    result = models("pull", url, "--name", "m", "--encrypt", "--key-file", str(key), "--json")
    assert result.exit_code == 0, result.stderr
    pulled = json.loads(result.stdout)
    assert pulled["encrypted"] and Path(pulled["blob"]).name.endswith(".enc")
    assert data[:4096] not in Path(pulled["blob"]).read_bytes()
    assert store_files(home) == [Path(pulled["blob"]).name]
    ours = hashlib.sha256(url.encode()).hexdigest()[:32]
    assert [p.name for p in shm.iterdir() if p.name.startswith(ours)] == []


def test_an_unverified_pull_says_so(server: Server, home: Path) -> None:
    """No --sha256 and no SHA-256 from the server: registered, with a warning and the
    lineage saying nothing checked it; with a SHA-256 ETag no warning."""
    data = tiny_gguf(1 << 16)
    server.routes["/plain.gguf"] = Route(body=data, etag="not-a-digest")
    result = models("pull", f"{server.base}/plain.gguf", "--name", "u", "--json")
    assert result.exit_code == 0, result.stderr
    assert "was not verified" in result.stderr and "--sha256" in result.stderr
    assert json.loads(result.stdout)["operation_params"] == {"sha256_checked_against": None}
    server.routes["/checked.gguf"] = Route(body=data, etag=hashlib.sha256(data).hexdigest())
    result = models("pull", f"{server.base}/checked.gguf", "--name", "c", "--json")
    assert result.exit_code == 0 and "not verified" not in result.stderr
    assert json.loads(result.stdout)["operation"] == "pull"


def test_the_stored_source_holds_no_secret_of_the_url(server: Server, home: Path) -> None:
    """User and password (user:pass@) and the query (a signed URL's signature) are sent to the
    server but never stored in the version's source, which models show and list print."""
    data = tiny_gguf(1 << 16)
    query = "X-Amz-Signature=s3cret&token=t0ken"
    server.routes[f"/m.gguf?{query}"] = Route(body=data, etag=hashlib.sha256(data).hexdigest())
    url = f"http://user:pa55@{server.base.removeprefix('http://')}/m.gguf?{query}#frag"
    result = models("pull", url, "--name", "m", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["source"] == f"{server.base}/m.gguf"
    assert server.seen[0].headers["authorization"].startswith("Basic ")  # still sent
    shown, listed = models("show", "m", "--json"), models("list", "--json")
    stored = (home / "edgellm.db").read_bytes()
    for secret in ("pa55", "s3cret", "t0ken"):
        assert secret not in shown.stdout and secret not in listed.stdout
        assert secret.encode() not in stored


def test_the_warning_is_about_this_pull_not_an_earlier_one(server: Server, home: Path) -> None:
    """The same bytes pulled again under the same name are the same version (its lineage is
    the first pull's): whether this pull was verified decides the warning."""
    data = tiny_gguf(1 << 16)
    server.routes["/checked.gguf"] = Route(body=data, etag=hashlib.sha256(data).hexdigest())
    server.routes["/plain.gguf"] = Route(body=data, etag="not-a-digest")
    checked, plain = f"{server.base}/checked.gguf", f"{server.base}/plain.gguf"
    for name, urls in (("m", (checked, plain)), ("n", (plain, checked))):
        for url in urls:
            result = models("pull", url, "--name", name)
            assert result.exit_code == 0, result.stderr
            assert ("was not verified" in result.stderr) == (url == plain), (name, url)
