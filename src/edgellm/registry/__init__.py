"""The model registry: named, tagged, versioned GGUF files under `$EDGELLM_HOME/models/`, with
their lineage, evaluations and serving defaults in the database the key store and the audit
log share (edgellm.store, migration 0003_model_registry).

    reg = Registry.open()
    version = reg.add_file(Path("m.Q4_K_M.gguf"), "smollm2:q4")   # checked, hashed, stored
    reg.resolve("smollm2:q4").blob                                 # the file that serves it

Adding is all or nothing: the file is checked (edgellm.modelfile), hashed, written to its blob
(temporary name, fsync, rename; or hard-linked, or encrypted) and only then, in one
transaction, recorded with its tag. A crash or a full disk at any point leaves either nothing
or the whole version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError, ModelFileError, ValidationError
from edgellm.home import home_dir
from edgellm.modelfile import ModelInfo, file_type_name, inspect_gguf
from edgellm.registry import blobs
from edgellm.registry.catalog import (
    DEFAULT_KEEP,
    DEFAULT_TAG,
    VERSION_CHARS,
    Catalog,
    TagMove,
    Version,
    parse_ref,
)
from edgellm.registry.deploy import (
    Deployment,
    GateRefused,
    Move,
    TagNotFound,
    read_deployment,
    read_deployments,
)
from edgellm.store import open_db

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_TAG",
    "VERSION_CHARS",
    "Deployment",
    "GateRefused",
    "GcReport",
    "Move",
    "Registry",
    "TagMove",
    "TagNotFound",
    "VerifyResult",
    "Version",
    "check_blob",
    "looks_like_ref",
    "memory_partial_dir",
    "model_file",
    "parse_ref",
]


@dataclass(frozen=True, slots=True)
class GcReport:
    versions: list[str]  # name@short of the versions removed
    blobs: int  # blob files deleted
    bytes: int  # bytes freed


@dataclass(frozen=True, slots=True)
class VerifyResult:
    version: Version
    problem: str | None  # None: the blob holds exactly its bytes


class Registry:
    """The registry of one data directory. Open, use, close (or `with`)."""

    def __init__(self, home: Path):
        self.home = home
        self.root = home / "models"
        self.blob_dir = self.root / "blobs"
        self.partial_dir = self.root / "partial"  # downloads in progress (edgellm.registry.pull)
        for directory in (self.home, self.root, self.blob_dir, self.partial_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
        self.catalog = Catalog(open_db(home / "edgellm.db"), self.blob_dir)

    @classmethod
    def open(cls, home: Path | None = None) -> Registry:
        return cls(home or home_dir())

    def close(self) -> None:
        self.catalog.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    def resolve(self, ref: str) -> Version:
        return self.catalog.resolve(ref)

    def tags(self) -> list[tuple[str, Version]]:
        return self.catalog.tags()

    def versions(self, name: str | None = None, *, removed: bool = False) -> list[Version]:
        where = "1" if removed else "v.removed_at IS NULL"
        if name is None:
            return self.catalog.versions(where)
        return self.catalog.versions(f"m.name = ? AND {where}", (name,))

    def find_version(self, name: str, spec: str) -> Version:
        return self.catalog.find_version(name, spec)

    def history(self, name: str) -> list[TagMove]:
        return self.catalog.history(name)

    def lineage(self, version: Version) -> list[Version | str]:
        return self.catalog.lineage(version)

    def deployment(self, ref: str) -> Deployment:
        """How the tag `ref` is served: target, gate, canary, fallback (edgellm.registry.deploy,
        which has the operations that change it). TagNotFound for a tag that is not there."""
        return read_deployment(self.catalog, ref)

    def deployments(self) -> list[Deployment]:
        """Every tag's deployment, with or without settings, by name then tag."""
        return read_deployments(self.catalog)

    def by_sha256(self, sha256: str) -> list[Version]:
        return self.catalog.versions("v.sha256 = ? AND v.removed_at IS NULL", (sha256,))

    # -- adding

    def add_file(
        self,
        path: Path,
        ref: str,
        *,
        link: bool = False,
        in_place: bool = False,
        move: bool = False,
        encrypt_key: bytes | None = None,
        source: str | None = None,
        manifest: dict[str, Any] | None = None,
        operation: tuple[str, dict[str, Any]] | None = None,
        parent_sha256: str | None = None,
        progress: bool = False,
        sha256: str | None = None,
    ) -> Version:
        """Register the GGUF at `path` as `ref` (name[:tag]) and point the tag at it.

        `link`: hard-link instead of copying when the filesystem allows (else copy, or with
        `in_place` register the file where it is);
        `move`: the file is the registry's own download: rename it in and remove it;
        `encrypt_key`: store it encrypted. The lineage comes from `manifest` (default: the
        manifest beside `path`, when there is one), or `operation` and `parent_sha256`.
        `sha256`, when the caller already hashed the file, saves reading it twice.
        """
        name, tag = parse_ref(ref)
        info = inspect_gguf(path)  # the checks first: nothing of a bad file is stored
        digest = sha256 or _hash_with_progress(path, info.size_bytes, progress, "hashing")
        lineage = _lineage(path, digest, manifest, operation, parent_sha256)
        stored = self._store_blob(path, digest, info.size_bytes, link=link, in_place=in_place,
                                  move=move, key=encrypt_key, progress=progress)  # fmt: skip
        values = _version_values(info, digest, lineage, source or str(path.resolve()))
        values |= {"encrypted": int(encrypt_key is not None), "blob": stored}
        try:
            with self.catalog.writing():
                if not (self.blob_dir / stored).exists():  # a gc ran between store and here
                    raise blobs.BlobError(
                        "an `edgellm models gc` running meanwhile removed the file being "
                        "added: nothing was added; run the add again"
                    )
                version_id = self.catalog.insert_version(name, values)
                self.catalog.point(name, tag, version_id, "pull" if move else "add")
        except BaseException:
            self._remove_unused(stored)  # nothing recorded: no blob of ours is left without a row
            raise
        if move:
            blobs.remove(path)  # moved already, or copied across filesystems
        version = self.catalog.versions("v.id = ?", (version_id,))[0]
        if version.blob != self.blob_dir / stored:
            self._remove_unused(stored)  # the version kept its own (encrypted) blob
        if encrypt_key is not None:
            self._remove_unused(blobs.blob_name(digest, encrypted=False))
        return version

    def _remove_unused(self, stored: str) -> None:
        """Remove the blob `stored` unless a version uses it (never a file registered in place:
        the registry did not write it)."""
        path = self.blob_dir / stored
        if path.parent == self.blob_dir and not self.catalog.blob_in_use(path):
            blobs.remove(path)

    def _store_blob(
        self, path: Path, digest: str, size: int, *, link: bool, in_place: bool, move: bool,
        key: bytes | None, progress: bool,
    ) -> str:  # fmt: skip
        """Put `path`'s bytes in the blob directory; returns the blob's name (or, for a file
        registered in place, its absolute path). A blob of these bytes that is there already
        is kept when intact, else replaced: adding the bytes again repairs it."""
        name = blobs.blob_name(digest, encrypted=key is not None)
        final = self.blob_dir / name
        if final.exists():
            if key is not None:
                _check_same_key(final, key)
            if _intact(final, digest, size, key):
                return name  # the same bytes are stored already (another name, an earlier add)
        if key is not None:
            from edgellm.registry import crypto

            crypto.encrypt_file(path, final, key, digest, progress=progress)
            return name
        if move and blobs.move_into(path, final):
            return name
        if link and blobs.link_into(path, final):
            return name
        if link and in_place:
            return str(path.resolve())  # another filesystem: registered where it is
        _check_room(self.blob_dir, path.stat().st_size)
        with _progress(progress, path.stat().st_size, "copying") as advance:
            blobs.copy_into(path, final, advance)
        return name

    # -- changing tags

    def tag(self, src: str, dst: str) -> Version:
        """Point `dst` at the version `src` names (another name gets the version too)."""
        version = self.resolve(src)
        name, tag = parse_ref(dst)
        with self.catalog.writing():
            if name == version.model:
                version_id = version.id
            else:
                values = _copied(version, self.blob_dir)
                version_id = self.catalog.insert_version(name, values)
            self.catalog.point(name, tag, version_id, "tag")
        return self.resolve(dst)

    def point(self, ref: str, version: Version, operation: str) -> None:
        """Move the tag `ref` (of `version`'s model) to `version` (promote, rollback)."""
        name, tag = parse_ref(ref)
        if name != version.model:
            raise ValidationError(f"{version.short} is a version of {version.model}, not {name}")
        with self.catalog.writing():
            self.catalog.point(name, tag, version.id, operation)

    def untag(self, ref: str) -> Version:
        """Remove the tag `ref` and its deployment settings; its version stays until gc."""
        version = self.resolve(ref)
        name, tag = parse_ref(ref)
        with self.catalog.writing():
            self.catalog.point(name, tag, None, "rm")
            self.catalog.drop_deployment(name, tag)
        return version

    # -- per-version data

    def set_params(
        self, ref: str, values: dict[str, Any], *, only_missing: bool = False
    ) -> Version:
        """Merge `values` into the version's serving defaults (`only_missing`: keep the values
        it has). Read and written in one transaction: two `models set` at once both count."""
        self.resolve(ref)  # a name that is not there is said before the write lock is taken
        with self.catalog.writing():
            version = self.resolve(ref)
            params = (values | version.params) if only_missing else (version.params | values)
            self.catalog.update(version.id, params=params)
        return self.resolve(ref)

    def unset_params(self, ref: str, names: list[str]) -> Version:
        self.resolve(ref)
        with self.catalog.writing():
            version = self.resolve(ref)
            params = {k: v for k, v in version.params.items() if k not in names}
            self.catalog.update(version.id, params=params)
        return self.resolve(ref)

    def record_eval(
        self, sha256: str, evaluation: dict[str, Any], verdict: dict[str, Any] | None
    ) -> list[Version]:
        """Append an evaluation (and the gate verdict on it) to every version with these
        bytes; returns those versions."""
        with self.catalog.writing():
            for version in self.by_sha256(sha256):  # read under the lock: no eval is lost
                evals = [*version.evals, evaluation]
                gates = version.gates
                if verdict is not None:
                    gates = [*gates, verdict | {"eval": len(evals) - 1}]
                self.catalog.update(version.id, evals=evals, gates=gates)
        return self.by_sha256(sha256)

    def encrypt(self, ref: str, key: bytes, *, progress: bool = False) -> Version:
        """Encrypt the blob of `ref`'s version in place: the plain blob is removed once no
        plain version uses it."""
        from edgellm.registry import crypto

        version = self.resolve(ref)
        if version.encrypted:
            raise ValidationError(f"{ref} ({version.short}) is encrypted already")
        check_blob(version)
        name = blobs.blob_name(version.sha256, encrypted=True)
        if (self.blob_dir / name).exists():
            _check_same_key(self.blob_dir / name, key)
        else:
            crypto.encrypt_file(version.blob, self.blob_dir / name, key, version.sha256,
                                progress=progress)  # fmt: skip
        plain = version.blob
        with self.catalog.writing():
            for same in self.by_sha256(version.sha256):
                self.catalog.update(same.id, blob=name, encrypted=1)
        if plain.parent == self.blob_dir:
            blobs.remove(plain)
        return self.resolve(ref)

    def rekey(self, old_key: bytes, new_key: bytes, *, progress: bool = False) -> list[str]:
        """Re-encrypt every encrypted blob under `new_key` (each through a temporary file
        renamed over it: a crash leaves every blob under one key or the other, both readable
        with the keys given). Returns the blobs' names."""
        from edgellm.registry import crypto

        done = []
        for blob, sha256 in sorted({(v.blob, v.sha256) for v in self.versions() if v.encrypted}):
            if crypto.read_header(blob).key_id == crypto.key_id(new_key):
                continue  # rotated by an earlier run that was cut short
            staging = blob.with_name(f".{blob.name}.rekey")
            crypto.reencrypt_file(blob, staging, old_key, new_key, sha256, progress=progress)
            try:
                os.replace(staging, blob)
                blobs.fsync_dir(blob.parent)
            except OSError as exc:
                blobs.remove(staging)
                raise blobs.BlobError(f"cannot replace {blob}: {exc.strerror or exc}") from exc
            done.append(blob.name)
        return done

    # -- maintenance

    def gc(
        self, keep: int = DEFAULT_KEEP, *, dry_run: bool = False, stray_age_s: float = 3600
    ) -> GcReport:
        """Remove the versions no tag points to beyond the newest `keep` of each model (never
        a canary's candidate or a fallback a deployment names), then every blob no remaining
        version uses (a stray from a crash included, once it is an
        hour old). All under the database's write lock, so a `tag` or an `add` at the same
        time sees the versions either before or after, never half removed."""
        if keep < 0:
            raise ValidationError("--keep must be 0 or more", param="--keep")
        with self.catalog.writing():
            deployed = self.catalog.deployed_version_ids()
            doomed = [v for name in self.catalog.model_names() for v in self._beyond(name, keep)
                      if v.id not in deployed]  # fmt: skip
            gone = {v.id for v in doomed}
            in_use = {v.blob for v in self.versions() if v.id not in gone}
            orphans = {v.blob for v in doomed if v.blob.exists()} | self._strays(stray_age_s)
            orphans = {p for p in orphans - in_use if p.parent == self.blob_dir}
            freed = sum(p.stat().st_size for p in orphans)
            if not dry_run:
                for version in doomed:
                    self.catalog.update(version.id, removed_at=_now())
                for path in orphans:
                    blobs.remove(path)
        return GcReport([f"{v.model}@{v.short}" for v in doomed], len(orphans), freed)

    def _beyond(self, name: str, keep: int) -> list[Version]:
        """The versions of `name` no tag points to, beyond its newest `keep`."""
        versions = self.versions(name)
        newest = {v.id for v in sorted(versions, key=lambda v: v.id, reverse=True)[:keep]}
        return [v for v in versions if not v.tags and v.id not in newest]

    def _strays(self, min_age_s: float) -> set[Path]:
        """Files in the blob directory no version names (a crash between a blob's rename and
        its row, an interrupted write's temporary file), unchanged for `min_age_s`: younger
        ones may belong to an add in progress."""
        named = {v.blob for v in self.versions()}
        now = time.time()
        return {
            p
            for p in self.blob_dir.iterdir()
            if p.is_file() and p not in named and now - p.stat().st_ctime > min_age_s
        }

    def verify(self, key: bytes | None = None) -> Iterator[VerifyResult]:
        """Re-hash every stored version's blob (decrypting encrypted ones with `key`)."""
        for version in self.versions():
            yield VerifyResult(version, blob_problem(version, key))


def check_blob(version: Version, key: bytes | None = None) -> None:
    """ModelFileError, one line, when `version`'s blob is missing or not its bytes."""
    problem = blob_problem(version, key)
    if problem is not None:
        raise ModelFileError(problem)


def blob_problem(version: Version, key: bytes | None = None) -> str | None:
    """Why `version`'s blob is not its bytes (None: it is)."""
    where = f"{version.model}@{version.short}"
    if not version.blob.exists():
        return f"{where}: its file {version.blob} is missing"
    if version.encrypted:
        if key is None:
            return f"{where} is encrypted: give its key (EDGELLM_MODEL_KEY or --key-file)"
        from edgellm.registry import crypto

        try:
            actual = crypto.verify_encrypted(version.blob, key, version.sha256)
        except EdgeLLMError as exc:
            return f"{where}: {exc.message}"
    else:
        actual = blobs.hash_file(version.blob)
    if actual != version.sha256:
        return (
            f"{where}: its file {version.blob} changed on disk (sha256 {actual[:VERSION_CHARS]}, "
            f"registered {version.short}); pull or add it again"
        )
    return None


def _lineage(
    path: Path,
    digest: str,
    manifest: dict[str, Any] | None,
    operation: tuple[str, dict[str, Any]] | None,
    parent_sha256: str | None,
) -> dict[str, Any]:
    """The lineage columns, from `manifest` (or the one beside `path`) or the caller."""
    if manifest is None and operation is None:
        from edgellm.compress.manifest import load_manifest, manifest_path

        if manifest_path(path).exists():
            manifest = load_manifest(path, digest)
    if manifest is not None:
        parent = manifest.get("parent") or {}
        return {
            "operation": str(manifest.get("method", "external")),
            "operation_params": dict(manifest.get("params") or {}),
            "parent_sha256": parent.get("sha256") if isinstance(parent, dict) else None,
            "evals": list(manifest.get("evals") or []),
            "gates": list(manifest.get("gates") or []),
        }
    op, params = operation or ("external", {})
    return {"operation": op, "operation_params": params, "parent_sha256": parent_sha256,
            "evals": [], "gates": []}  # fmt: skip


def _version_values(
    info: ModelInfo, digest: str, lineage: dict[str, Any], source: str
) -> dict[str, Any]:
    template = info.chat_template
    return {
        "sha256": digest,
        "size": info.size_bytes,
        "format": "gguf",
        "architecture": info.architecture,
        "parameters": info.n_params or None,
        "file_type": file_type_name(info.metadata),
        "context_length": info.context_length,
        "template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "source": source,
        "params": {},
        **lineage,
    }


def _copied(version: Version, blob_dir: Path) -> dict[str, Any]:
    """A version's values, for the same bytes under another name."""
    keep = ("sha256", "size", "format", "architecture", "parameters", "file_type",
            "context_length", "template_sha256", "parent_sha256", "operation",
            "operation_params", "source", "evals", "gates", "params")  # fmt: skip
    values = {k: getattr(version, k) for k in keep}
    blob = version.blob.name if version.blob.parent == blob_dir else str(version.blob)
    return values | {"encrypted": int(version.encrypted), "blob": blob}


def _intact(blob: Path, digest: str, size: int, key: bytes | None) -> bool:
    """Whether the stored blob holds these bytes (re-read: a blob changed on disk is not)."""
    if key is None:
        return blob.stat().st_size == size and blobs.hash_file(blob) == digest
    from edgellm.registry import crypto

    try:
        crypto.verify_encrypted(blob, key, digest)
    except EdgeLLMError:
        return False
    return True


def _check_same_key(blob: Path, key: bytes) -> None:
    """An encrypted blob of these bytes exists: refuse to reuse it under another key (the
    version would be unreadable with the key the operator just gave)."""
    from edgellm.registry import crypto

    if crypto.read_header(blob).key_id != crypto.key_id(key):
        raise ValidationError(
            f"these bytes are stored encrypted already ({blob.name}) under another model key: "
            "use that key, or remove the versions using it and gc first"
        )


def _check_room(directory: Path, needed: int) -> None:
    free = blobs.free_bytes(directory)
    if free < needed:
        raise blobs.BlobError(
            f"the disk holding {directory} has {free / 1e9:.2f} GB free, the model needs "
            f"{needed / 1e9:.2f} GB: nothing was added"
        )


def _now() -> str:
    from edgellm.store import utc_now

    return utc_now()


@contextlib.contextmanager
def _progress(shown: bool, total: int, what: str) -> Iterator[blobs.Advance | None]:
    """A rich progress bar on stderr (bytes, rate, ETA) while the body runs, when `shown`."""
    if not shown:
        yield None
        return
    from edgellm.progress import byte_progress

    with byte_progress(what, total) as advance:
        yield advance


def _hash_with_progress(path: Path, size: int, shown: bool, what: str) -> str:
    with _progress(shown, size, what) as advance:
        return blobs.hash_file(path, advance)


@contextlib.contextmanager
def model_file(
    text: Path | str, *, writes_weights: bool = False
) -> Iterator[tuple[Path, Version | None]]:
    """The GGUF a command's MODEL argument names: an existing file as it is, else the
    registry's `name[:tag]`, checked against its hash (an encrypted one decrypted into memory
    with $EDGELLM_MODEL_KEY, for as long as the block runs). `writes_weights`: the command
    writes a model made from it (convert, quantize), which an encrypted one must not feed."""
    path = Path(text)
    if path.exists() or not looks_like_ref(str(text)):
        yield path, None
        return
    with Registry.open() as registry:
        version = registry.resolve(str(text))
    if not version.encrypted:
        check_blob(version)
        yield version.blob, version
        return
    if writes_weights:
        raise ValidationError(
            f"{text} is stored encrypted, and this command writes the weights it makes from it "
            "in plain: not done (decrypting an encrypted model onto a disk defeats it)"
        )
    from edgellm.registry.crypto import decrypt_to_memory, load_key

    with decrypt_to_memory(version.blob, load_key(None), version.sha256) as memory:
        yield memory.path, version


def looks_like_ref(text: str) -> bool:
    """A registry name rather than a path: it does not start like a path, has no GGUF
    suffix, and parses as name[:tag]."""
    if text.startswith((".", "/", "~")) or text.lower().endswith(".gguf"):
        return False
    try:
        parse_ref(text)
    except ValidationError:
        return False
    return True


def memory_partial_dir(root: Path = Path("/dev/shm")) -> Path:
    """Where an encrypted pull keeps its download until it is verified and encrypted: a 0700
    directory on a RAM filesystem (tmpfs), so the plain weights never reach a disk; it
    survives a failed pull (resume), not a reboot."""
    if not _on_tmpfs(root):
        raise ValidationError(
            f"pull --encrypt keeps the download in memory until it is encrypted, and {root} is "
            "not a RAM filesystem (tmpfs) here: pull without --encrypt on a trusted disk, then "
            "`edgellm models encrypt`"
        )
    path = root / f"edgellm-partial-{os.getuid()}"
    if not path.is_symlink():
        path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()  # never followed: another user's link could lead the bytes to a disk
    if path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ValidationError(f"{path} is not this user's private directory: remove it")
    return path


def _on_tmpfs(path: Path) -> bool:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    types = {
        fields[1]: fields[2] for fields in (line.split() for line in mounts) if len(fields) > 2
    }
    return types.get(str(path)) == "tmpfs"
