"""`edgellm models pull`: fetch a GGUF over HTTP(S) or from the Hugging Face hub, resumably.

A download lives in the registry's partial directory as two files named by the URL's hash:
`<key>.part` (the bytes so far, locked by the pull writing it) and `<key>.json` (the sidecar:
URL, the server's validators, the size). Algorithm, one pull:

1. Keep the `.part` only if its sidecar names this URL and a validator (a strong ETag or a
   Last-Modified date); then ask for the rest: `Range: bytes=N-` with `If-Range: <validator>`.
2. 206 from byte N (same ETag): re-hash the kept N bytes, append. 200: the file changed or the
   server ignores ranges: start again from byte 0 on the same answer. 416, or a 206 for other
   bytes or another ETag: start again with a fresh request (once).
3. Hash while streaming. The expected SHA-256 is `--sha256`, else the hub's `X-Linked-Etag`,
   else an `ETag` that is 64 hex characters. A mismatch removes both files.
4. Nothing is registered here: `pull` hands the verified file to `Registry.add_file`.

What is kept when a pull fails: a dropped connection or a timeout in the body keeps both files
so that the same pull resumes; anything that proves the bytes wrong (hash, not a GGUF) removes
them. A full disk removes them too: the partial directory shares its disk with the database and
the audit log, and a pull must not leave that disk full behind it (the space the pull needs is
checked first when the server gives the size, so usually nothing is written at all).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from edgellm import __version__
from edgellm.errors import EdgeLLMError, ModelFileError, ValidationError
from edgellm.progress import Advance, byte_progress
from edgellm.registry.catalog import parse_ref

if TYPE_CHECKING:
    from hashlib import _Hash

    from edgellm.registry import Registry, Version

__all__ = [
    "DownloadError",
    "Downloaded",
    "Resolved",
    "download",
    "pull",
    "resolve_source",
    "stored_source",
]

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 30.0  # connect, and the longest silence while reading, before a pull gives up
CHUNK = 1 << 20  # bytes of a kept part re-read (and hashed) at a time
GGUF_MAGIC = b"GGUF"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(EdgeLLMError):
    """A download that could not finish: the server refused, could not be reached, or the
    connection or the disk gave out. The message is one line, for the CLI."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where a pull SOURCE is fetched from."""

    url: str  # the URL requested (redirects are followed from here)
    headers: dict[str, str] = field(repr=False)  # sent first: Authorization: Bearer $HF_TOKEN
    display: str  # the source as the user wrote it, for messages; never holds the token


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A complete download whose hash was checked (when anything said what it should be)."""

    path: Path  # the file, in the partial directory; the caller moves it into the store
    sha256: str  # hex, of the whole file
    size: int  # bytes
    checked_against: str | None  # "--sha256", "X-Linked-Etag", "ETag"; None: nothing to check


def pull(
    registry: Registry,
    source: str,
    ref: str,
    *,
    sha256: str | None = None,
    encrypt_key: bytes | None = None,
    progress: bool = False,
    env: Mapping[str, str] = os.environ,
    notice: Callable[[str], None] | None = None,
) -> Version:
    """Download SOURCE into the registry's partial directory, verify it, and register it as
    `ref` (NAME[:TAG]). Nothing is registered unless the whole file arrived and its hash
    matched; a file the registry refuses (not a GGUF) is removed.

    `notice` is told, once the file is registered, when nothing could verify this download
    (no `sha256`, no digest from the server). The returned version's lineage cannot say so:
    bytes the model has already are its existing version, with that version's lineage."""
    parse_ref(ref)  # a bad name is said before the download, not after it
    done = download(source, registry.partial_dir, sha256=sha256, progress=progress, env=env)
    try:
        version = registry.add_file(
            done.path,
            ref,
            move=True,
            encrypt_key=encrypt_key,
            source=stored_source(source),
            progress=progress,
            sha256=done.sha256,  # hashed while it streamed: no second read
            operation=("pull", {"sha256_checked_against": done.checked_against}),
        )
    except ModelFileError as exc:  # said of the download's temporary name: say the source
        raise ModelFileError(
            f"{exc.message.replace(str(done.path), source)}; nothing was kept"
        ) from None
    finally:
        done.path.unlink(missing_ok=True)  # moved into the store, or refused: never kept here
    if done.checked_against is None and notice is not None:
        notice(
            "nothing said what its SHA-256 should be, so it was not verified "
            f"(it is {done.sha256}): pass --sha256 to check a download"
        )
    return version


def stored_source(source: str) -> str:
    """SOURCE as the version records it (`models show` and `list` print it): an `hf://`
    source as written; a URL without its user and password (`user:pass@`), its query (a signed
    URL's signature, a token) and its fragment."""
    if source.startswith("hf://"):
        return source
    parts = urlsplit(source)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def resolve_source(source: str, env: Mapping[str, str]) -> Resolved:
    """`https://...` and `http://...` as they are; `hf://ORG/REPO/FILE.gguf[@REVISION]` as the
    hub's own clients resolve it: `{HF_ENDPOINT}/{ORG}/{REPO}/resolve/{REVISION}/{FILE}`
    (FILE may name a subfolder; REVISION defaults to main; each part percent-encoded).
    `HF_TOKEN` is sent as a bearer token to HF_ENDPOINT's origin only, so a mirror named there
    receives it (httpx drops it on a redirect to another host)."""
    endpoint = (env.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    if not (endpoint.startswith(("https://", "http://")) and urlsplit(endpoint).hostname):
        raise ValidationError(f"HF_ENDPOINT must be an https:// or http:// URL, not {endpoint!r}")
    if source.startswith("hf://"):
        url = _hub_url(source, endpoint)
    elif source.startswith(("https://", "http://")) and urlsplit(source).hostname:
        url = source
    else:
        raise ValidationError(
            f"cannot pull {source!r}: give an https:// or http:// URL, "
            "or hf://ORG/REPO/FILE.gguf[@REVISION]",
            param="source",
        )
    token = env.get("HF_TOKEN", "").strip()
    to_hub = _origin(url) == _origin(endpoint)
    headers = {"Authorization": f"Bearer {token}"} if token and to_hub else {}
    return Resolved(url=url, headers=headers, display=source)


def _hub_url(source: str, endpoint: str) -> str:
    path, at, revision = source.removeprefix("hf://").rpartition("@")
    if not at:
        path, revision = revision, "main"
    parts = path.split("/")
    if (
        len(parts) < 3
        or not revision
        or any(p in ("", ".", "..") for p in parts)
        or not parts[-1].lower().endswith(".gguf")
    ):
        raise ValidationError(
            f"cannot pull {source!r}: expected hf://ORG/REPO/FILE.gguf[@REVISION]",
            param="source",
        )
    repo, file = (_segments(parts[:2]), _segments(parts[2:]))  # `?`, `#`, `%` stay in them
    return f"{endpoint}/{repo}/resolve/{quote(revision, safe='')}/{file}"


def _segments(parts: list[str]) -> str:
    """Path segments, each percent-encoded, joined by `/`."""
    return "/".join(quote(p, safe="") for p in parts)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        raise ValidationError(f"cannot pull from {url!r}: bad port", param="source") from None
    return parts.scheme, (parts.hostname or "").lower(), port


def download(
    source: str,
    partial_dir: Path,
    *,
    sha256: str | None = None,
    progress: bool = False,
    env: Mapping[str, str] = os.environ,
    timeout_s: float = TIMEOUT_S,
) -> Downloaded:
    """Fetch SOURCE into `partial_dir`, resuming what an earlier call with the same URL left,
    and check its hash. Every failure is one line (DownloadError, ValidationError for a bad
    source or a hash mismatch, ModelFileError for a body that is not a GGUF)."""
    resolved = resolve_source(source, env)
    wanted = _hex_sha256(sha256) if sha256 is not None else None
    partial_dir.mkdir(parents=True, exist_ok=True)
    client = httpx.Client(
        follow_redirects=True,
        timeout=httpx.Timeout(timeout_s),
        headers={"User-Agent": f"edgellm/{__version__}", "Accept-Encoding": "identity"},
    )
    with client, _Partial.open(partial_dir, resolved) as part:
        received = _fetch(client, resolved, part, progress)
        if received is None:  # the kept bytes were refused: one fresh try from byte 0
            received = _fetch(client, resolved, part, progress)
        if received is None:
            raise DownloadError(f"{resolved.display}: the server keeps changing the file")
        expected, origin = (wanted, "--sha256") if wanted else received.announced
        if expected is not None and received.sha256 != expected:
            part.discard()
            raise ValidationError(
                f"{resolved.display}: the downloaded file's sha256 is {received.sha256}, "
                f"expected {expected} (from {origin}); nothing was kept",
                param="sha256",
            )
        path = part.complete()
    return Downloaded(path, received.sha256, received.size, origin)


def _hex_sha256(value: str) -> str:
    value = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(value):
        raise ValidationError(f"--sha256 must be 64 hex characters, not {value!r}", param="sha256")
    return value


@dataclass(slots=True)
class _Received:
    sha256: str  # hex, of every byte of the file (kept prefix included)
    size: int  # bytes in the file
    announced: tuple[str | None, str | None]  # (sha256 the server gave, the header it came in)


def _fetch(
    client: httpx.Client, resolved: Resolved, part: _Partial, progress: bool
) -> _Received | None:
    """One GET: the rest of the file when the kept bytes are still good, else all of it.
    None when the answer says to start again with a fresh request."""
    offset, validator = part.resumable()
    headers = dict(resolved.headers)
    if offset:
        headers |= {"Range": f"bytes={offset}-", "If-Range": validator}
    with _answer(client, resolved, headers, ranged=offset > 0) as response:
        if offset and not _continues(response, offset, part.etag):
            if response.status_code != 200:
                part.reset()
                return None
            offset = 0  # a 200 is the whole file: take it from here
        total = _total_size(response, offset)
        with _bar(progress and offset > 0, "checking the kept part", offset) as advance:
            hasher = part.hash_kept(offset, advance)
        part.begin(offset, response, total)
        with _bar(progress, resolved.display, total, done=offset) as advance:
            size = _stream(response, part, hasher, advance, resolved, offset, total)
    return _Received(hasher.hexdigest(), size, _announced(response))


@contextmanager
def _answer(
    client: httpx.Client, resolved: Resolved, headers: dict[str, str], *, ranged: bool
) -> Iterator[httpx.Response]:
    """The response, its status line and headers read; a one-line DownloadError when there
    are none or the status is an error. (Errors in the body are _stream's: none reach here.)"""
    host = urlsplit(resolved.url).netloc
    try:
        with client.stream("GET", resolved.url, headers=headers) as response:
            _check_status(response, resolved, ranged=ranged)
            yield response
    except httpx.TimeoutException:
        raise DownloadError(
            f"{resolved.display}: no answer from {host} within {client.timeout.read:g} s"
        ) from None
    except httpx.TooManyRedirects:
        raise DownloadError(f"{resolved.display}: too many redirects from {host}") from None
    except (httpx.RequestError, httpx.InvalidURL) as exc:
        raise DownloadError(f"{resolved.display}: cannot reach {host}: {_short(exc)}") from None


def _check_status(response: httpx.Response, resolved: Resolved, *, ranged: bool) -> None:
    code = response.status_code
    if code in (200, 206) or (code == 416 and ranged):
        return
    hint = ""
    if resolved.display.startswith("hf://"):
        if code in (401, 403):
            hint = (
                " (HF_TOKEN was sent: does it have access to this repo?)"
                if resolved.headers
                else " (a private or gated repo needs HF_TOKEN)"
            )
        elif code == 404:
            hint = " (check the repo, the file name and the revision)"
    raise DownloadError(
        f"{resolved.display}: HTTP {code} {response.reason_phrase} from {resolved.url}{hint}"
    )


def _continues(response: httpx.Response, offset: int, etag: str | None) -> bool:
    """Whether a 206 carries the file's bytes from `offset` on, of the version kept."""
    if response.status_code != 206:
        return False
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
    same = etag is None or response.headers.get("etag") in (None, etag)
    return match is not None and int(match[1]) == offset and same


def _total_size(response: httpx.Response, offset: int) -> int | None:
    """The whole file's size in bytes, when the server says it."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if match and match[3] != "*":
            return int(match[3])
        return None
    length = response.headers.get("content-length", "")
    return int(length) + offset if length.isdigit() else None


def _announced(response: httpx.Response) -> tuple[str | None, str | None]:
    """The SHA-256 the server says the file has: the hub's X-Linked-Etag (on its redirect to
    the CDN), else an ETag that is one (64 hex characters), on any response of the chain."""
    chain = [*response.history, response]
    for header in ("x-linked-etag", "etag"):
        for answer in chain:
            value = _unquote_etag(answer.headers.get(header, "")).lower()
            if _SHA256.fullmatch(value):
                return value, "X-Linked-Etag" if header == "x-linked-etag" else "ETag"
    return None, None


def _unquote_etag(value: str) -> str:
    return value.strip().removeprefix("W/").strip('"')


def _stream(
    response: httpx.Response,
    part: _Partial,
    hasher: _Hash,
    advance: Advance,
    resolved: Resolved,
    offset: int,
    total: int | None,
) -> int:
    """Append the body to the part file; returns the file's size. A body that does not start
    like a GGUF is refused at its first bytes, not after the whole download."""
    size, head = offset, b"" if offset == 0 else GGUF_MAGIC
    try:
        for chunk in response.iter_bytes():  # as they arrive: a drop loses none
            if len(head) < len(GGUF_MAGIC):
                head += chunk[: len(GGUF_MAGIC) - len(head)]
                _check_magic(head, response, part, resolved, final=False)
            part.write(chunk, total)
            hasher.update(chunk)
            size += len(chunk)
            advance(len(chunk))
    except httpx.RequestError as exc:
        part.flush(total)
        raise DownloadError(_dropped(resolved, part, size, total, _why(exc))) from None
    part.flush(total)
    _check_magic(head, response, part, resolved, final=True)
    if total is not None and size != total:
        raise DownloadError(_dropped(resolved, part, size, total, "the body ended early"))
    return size


def _check_magic(
    head: bytes, response: httpx.Response, part: _Partial, resolved: Resolved, *, final: bool
) -> None:
    if head == GGUF_MAGIC[: len(head)] and (len(head) == len(GGUF_MAGIC) or not final):
        return
    part.discard()
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    what = f"the server sent {kind}, starting {head!r}" if kind else f"it starts {head!r}"
    raise ModelFileError(f"{resolved.display} is not a GGUF file ({what}); nothing was kept")


def _dropped(resolved: Resolved, part: _Partial, size: int, total: int | None, why: str) -> str:
    got = f"{_mib(size)} of {_mib(total)}" if total is not None else _mib(size)
    if part.resumable()[0]:
        then = "run the same pull again to resume"
    else:
        then = "the server gives no ETag or Last-Modified, so the next pull starts over"
    return f"{resolved.display}: connection lost after {got} ({why}); {then}"


def _why(exc: httpx.RequestError) -> str:
    """Why a body stopped, in a few words."""
    if isinstance(exc, httpx.TimeoutException):
        return "the server went silent"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the server closed it"
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def _key(url: str) -> str:
    """The partial files' name: the URL's hash (a URL is no file name)."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


class _Partial:
    """A download in progress: `<key>.part` (locked while a pull writes it) and its sidecar
    `<key>.json`, in the partial directory."""

    def __init__(self, directory: Path, resolved: Resolved, file: IO[bytes]):
        self.directory = directory
        self.resolved = resolved
        key = _key(resolved.url)
        self.part = directory / f"{key}.part"
        self.sidecar = directory / f"{key}.json"
        self.sidecar_tmp = directory / f"{key}.json.tmp"
        self.done = directory / f"{key}.gguf"
        self.file = file
        self.meta = self._read_sidecar()

    @classmethod
    @contextmanager
    def open(cls, directory: Path, resolved: Resolved) -> Iterator[_Partial]:
        path = directory / f"{_key(resolved.url)}.part"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DownloadError(
                    f"{resolved.display}: another pull of this URL is running (it holds {path})"
                ) from None
            partial = cls(directory, resolved, file)
            try:
                yield partial
            finally:
                if partial.part.exists() and not os.fstat(fd).st_size:
                    partial.discard()  # failed before its first byte: leave nothing behind

    @property
    def etag(self) -> str | None:
        value = self.meta.get("etag")
        return value if isinstance(value, str) else None

    def resumable(self) -> tuple[int, str]:
        """(bytes kept, the If-Range validator); (0, "") when nothing kept can be trusted."""
        size = os.fstat(self.file.fileno()).st_size
        last_modified = self.meta.get("last_modified")
        validator = self.etag or (last_modified if isinstance(last_modified, str) else "")
        total = self.meta.get("size")
        longer = isinstance(total, int) and size > total
        if not size or longer or not validator or self.meta.get("url") != self.resolved.url:
            return 0, ""
        return size, validator

    def hash_kept(self, offset: int, advance: Advance) -> _Hash:
        """A SHA-256 hasher fed the first `offset` bytes of the part file."""
        hasher = hashlib.sha256()
        self.file.seek(0)
        while self.file.tell() < offset:
            block = self.file.read(min(CHUNK, offset - self.file.tell()))
            if not block:
                break
            hasher.update(block)
            advance(len(block))
        return hasher

    def begin(self, offset: int, response: httpx.Response, total: int | None) -> None:
        """Ready to append at `offset` (0: a new download); records the server's validators
        first, so that bytes on disk always have a sidecar saying what they are."""
        if offset == 0:
            etag = response.headers.get("etag")
            self.meta = {
                "url": self.resolved.url,
                "etag": etag if etag and not etag.startswith("W/") else None,  # If-Range: strong
                "last_modified": response.headers.get("last-modified"),
                "size": total,
            }
        self._check_room(offset, total)
        self._disk(total, self._write_sidecar)
        self.file.seek(offset)
        self._disk(total, lambda: self.file.truncate(offset))

    def write(self, chunk: bytes, total: int | None) -> None:
        self._disk(total, lambda: self.file.write(chunk))

    def flush(self, total: int | None) -> None:
        self._disk(total, lambda: self.file.flush())

    def reset(self) -> None:
        """Forget the kept bytes (the server no longer has that version)."""
        self.file.truncate(0)
        self.meta = {}
        self.sidecar.unlink(missing_ok=True)

    def discard(self) -> None:
        for path in (self.part, self.sidecar, self.sidecar_tmp):
            path.unlink(missing_ok=True)

    def complete(self) -> Path:
        """The verified file, on disk (fsynced) under its final name in the directory."""
        self.file.flush()
        os.fsync(self.file.fileno())
        os.replace(self.part, self.done)
        self.sidecar.unlink(missing_ok=True)
        return self.done

    def _check_room(self, offset: int, total: int | None) -> None:
        free = os.statvfs(self.directory)
        room = free.f_bavail * free.f_frsize
        if total is not None and total - offset > room:
            raise DownloadError(
                f"{self.resolved.display}: needs {_mib(total - offset)} free in "
                f"{self.directory}, which has {_mib(room)}; nothing new was written"
            )

    def _disk(self, total: int | None, step: Callable[[], object]) -> None:
        try:
            step()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadError(
                    f"{self.resolved.display}: cannot write {self.part}: {exc.strerror}"
                ) from None
            size = self.part.stat().st_size if self.part.exists() else 0
            self.discard()  # give the space back: the database and audit log share this disk
            need = f"; it needs {_mib(total)}" if total is not None else ""
            raise DownloadError(
                f"{self.resolved.display}: disk full in {self.directory} after "
                f"{_mib(size)}{need}; the partial file was removed, free space and pull again"
            ) from None

    def _read_sidecar(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def _write_sidecar(self) -> None:
        """Atomically; 0600 like the part (a URL may carry a signature in its query)."""
        fd = os.open(self.sidecar_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as tmp:
            tmp.write(json.dumps(self.meta))
        os.replace(self.sidecar_tmp, self.sidecar)


@contextmanager
def _bar(shown: bool, what: str, total: int | None, done: int = 0) -> Iterator[Advance]:
    """The progress bar on stderr (size, rate, time left) while the block runs, when shown."""
    if not shown:
        yield lambda n: None
        return
    with byte_progress(what, total, done=done) as advance:
        yield advance
