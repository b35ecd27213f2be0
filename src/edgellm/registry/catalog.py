"""The model registry's rows: models, their versions and the tags that point at versions.

A *version* is one GGUF, identified by the SHA-256 of its plain bytes, with what it is
(architecture, size, quantization, context, template hash), where it came from (source, parent
version, the operation that made it and its parameters), how it measured (evaluations and gate
verdicts) and how to serve it (its `params`). A *tag* (`name:tag`) points at one version of
its model and may move; every move is kept in `tag_history`, so a rollback knows where a tag
pointed before. Versions no tag points to stay until `gc`, which keeps the last `keep` of each
model as well and marks the others removed (their rows stay: lineage and history name them).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import ValidationError
from edgellm.store import StoreError, utc_now

DEFAULT_TAG = "latest"
DEFAULT_KEEP = 3  # versions kept per model by gc beyond the tagged ones: rollback room
VERSION_CHARS = 12  # of the SHA-256: how a version is shown (and named in metrics)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def parse_ref(ref: str, *, param: str = "NAME[:TAG]") -> tuple[str, str]:
    """`name[:tag]` as (name, tag); a bare name means `latest`, as in Ollama."""
    name, sep, tag = ref.strip().rpartition(":")
    if not sep:
        name, tag = tag, DEFAULT_TAG
    if not _NAME.match(name) or ".." in name or name.endswith("/"):
        raise ValidationError(
            f"'{ref}' is not a model name: use letters, digits and . _ - / (at most 128), "
            "then optionally :TAG",
            param=param,
        )
    if not _TAG.match(tag):
        raise ValidationError(
            f"'{tag}' in '{ref}' is not a tag: use letters, digits and . _ - (at most 128)",
            param=param,
        )
    return name, tag


@dataclass(frozen=True, slots=True)
class Version:
    id: int  # the row id
    model: str  # the model's name
    sha256: str  # of the plain GGUF
    size: int  # bytes of the plain GGUF
    format: str
    architecture: str | None
    parameters: int | None  # weights
    file_type: str | None  # quantization, e.g. Q4_K_M
    context_length: int | None
    template_sha256: str | None
    parent_sha256: str | None
    operation: str  # how it was made
    operation_params: dict[str, Any]
    source: str | None
    evals: list[dict[str, Any]]
    gates: list[dict[str, Any]]
    params: dict[str, Any]  # serving defaults
    encrypted: bool
    blob: Path  # the file that holds it (encrypted when `encrypted`)
    created: str
    removed: str | None = None  # when gc removed its blob
    tags: tuple[str, ...] = field(default=())  # the tags of its model pointing at it

    @property
    def short(self) -> str:
        return self.sha256[:VERSION_CHARS]

    def as_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return data | {"blob": str(self.blob), "tags": list(self.tags), "version": self.short}


@dataclass(frozen=True, slots=True)
class TagMove:
    tag: str  # name:tag
    version: str | None  # where it pointed after: a short sha; None: removed
    previous: str | None  # where it pointed before
    operation: str
    at: str


_VERSION_COLUMNS = (
    "v.id, m.name, v.sha256, v.size, v.format, v.architecture, v.parameters, v.file_type, "
    "v.context_length, v.template_sha256, v.parent_sha256, v.operation, v.operation_params, "
    "v.source, v.evals, v.gates, v.params, v.encrypted, v.blob, v.created_at, v.removed_at"
)


class Catalog:
    """The registry's tables over one connection (edgellm.store.open_db)."""

    def __init__(self, conn: sqlite3.Connection, blob_dir: Path):
        self.conn = conn
        self.blob_dir = blob_dir

    @contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so two CLI processes queue on
        the busy timeout instead of failing half way."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # locked past the busy timeout, unreadable, ...
            raise StoreError(f"the registry's database cannot be written: {exc}") from exc
        try:
            yield self.conn
        except sqlite3.Error as exc:
            self.conn.execute("ROLLBACK")
            raise StoreError(f"the registry's database refused a change: {exc}") from exc
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:  # a full disk at commit
            self.conn.execute("ROLLBACK")
            raise StoreError(f"the registry's database could not save a change: {exc}") from exc

    # -- reading

    def _version(self, row: sqlite3.Row | tuple[Any, ...]) -> Version:
        (vid, model, sha, size, fmt, arch, n_params, ftype, ctx, tsha, parent, op, op_params,
         source, evals, gates, params, enc, blob, created, removed) = row  # fmt: skip
        tags = tuple(
            t
            for (t,) in self.conn.execute(
                "SELECT tag FROM tags WHERE version_id = ? ORDER BY tag", (vid,)
            )
        )
        return Version(
            id=vid, model=model, sha256=sha, size=size, format=fmt, architecture=arch,
            parameters=n_params, file_type=ftype, context_length=ctx, template_sha256=tsha,
            parent_sha256=parent, operation=op, operation_params=json.loads(op_params),
            source=source, evals=json.loads(evals), gates=json.loads(gates),
            params=json.loads(params), encrypted=bool(enc), blob=self.blob_dir / blob,
            created=created, removed=removed, tags=tags,
        )  # fmt: skip

    def versions(self, where: str = "1", args: tuple[Any, ...] = ()) -> list[Version]:
        sql = (
            f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN models m ON m.id = v.model_id "
            f"WHERE {where} ORDER BY m.name, v.id"
        )
        return [self._version(row) for row in self.conn.execute(sql, args)]

    def model_names(self) -> list[str]:
        return [n for (n,) in self.conn.execute("SELECT name FROM models ORDER BY name")]

    def tags(self) -> list[tuple[str, Version]]:
        """Every `name:tag` and the version it points at, by name then tag."""
        rows = self.conn.execute(
            "SELECT m.name, t.tag, t.version_id FROM tags t JOIN models m ON m.id = t.model_id "
            "ORDER BY m.name, t.tag"
        ).fetchall()
        out = []
        for name, tag, vid in rows:
            out.append((f"{name}:{tag}", self.versions("v.id = ?", (vid,))[0]))
        return out

    def resolve(self, ref: str) -> Version:
        """The version `name[:tag]` points at."""
        name, tag = parse_ref(ref)
        row = self.conn.execute(
            "SELECT t.version_id FROM tags t JOIN models m ON m.id = t.model_id "
            "WHERE m.name = ? AND t.tag = ?",
            (name, tag),
        ).fetchone()
        if row is None:
            raise ValidationError(self._not_found(name, tag), param="model")
        return self.versions("v.id = ?", (row[0],))[0]

    def _not_found(self, name: str, tag: str) -> str:
        model = self.conn.execute("SELECT id FROM models WHERE name = ?", (name,)).fetchone()
        if model is None:
            known = ", ".join(self.model_names()) or "none yet: add one with `edgellm models add`"
            return f"no model '{name}' in the registry (models: {known})"
        tags = [t for (t,) in self.conn.execute(
            "SELECT tag FROM tags WHERE model_id = ? ORDER BY tag", (model[0],))]  # fmt: skip
        shown = ", ".join(f"{name}:{t}" for t in tags) or "none: tag a version with `models tag`"
        return f"no tag '{name}:{tag}' in the registry (tags of {name}: {shown})"

    def find_version(self, name: str, spec: str) -> Version:
        """A version of `name` given as a tag of it or a SHA-256 prefix (6 hex digits at least)."""
        if re.fullmatch(r"[0-9a-f]{6,64}", spec):
            found = self.versions(
                "m.name = ? AND v.sha256 LIKE ? AND v.removed_at IS NULL", (name, spec + "%")
            )
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ValidationError(f"'{spec}' names several versions of {name}: give more")
        return self.resolve(f"{name}:{spec}")

    def history(self, name: str) -> list[TagMove]:
        rows = self.conn.execute(
            "SELECT h.tag, nv.sha256, pv.sha256, h.operation, h.at FROM tag_history h "
            "JOIN models m ON m.id = h.model_id "
            "LEFT JOIN versions nv ON nv.id = h.version_id "
            "LEFT JOIN versions pv ON pv.id = h.previous_id "
            "WHERE m.name = ? ORDER BY h.id",
            (name,),
        ).fetchall()
        return [TagMove(f"{name}:{t}", _short(v), _short(p), op, at) for t, v, p, op, at in rows]

    def lineage(self, version: Version) -> list[Version | str]:
        """`version`, its parent, its parent's parent ...: a parent the registry does not hold
        ends the chain as its SHA-256."""
        chain: list[Version | str] = [version]
        seen = {version.sha256}
        parent = version.parent_sha256
        while parent and parent not in seen:
            seen.add(parent)
            found = self.versions("v.sha256 = ?", (parent,))
            if not found:
                chain.append(parent)
                break
            chain.append(found[0])
            parent = found[0].parent_sha256
        return chain

    # -- writing (inside `writing()`)

    def model_id(self, name: str, create: bool = False) -> int | None:
        row = self.conn.execute("SELECT id FROM models WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        if not create:
            return None
        cur = self.conn.execute(
            "INSERT INTO models (name, created_at) VALUES (?, ?)", (name, utc_now())
        )
        return int(cur.lastrowid or 0)

    def insert_version(self, name: str, values: dict[str, Any]) -> int:
        """The version of `name` with `values["sha256"]`: the existing row if it has one
        (then only a missing blob is restored), else a new one."""
        model_id = self.model_id(name, create=True)
        row = self.conn.execute(
            "SELECT id, blob FROM versions WHERE model_id = ? AND sha256 = ?",
            (model_id, values["sha256"]),
        ).fetchone()
        if row is not None:
            missing = not (self.blob_dir / row[1]).exists()  # its file gone: take the new one
            self.conn.execute(
                "UPDATE versions SET blob = ?, encrypted = ?, removed_at = NULL "
                "WHERE id = ? AND (removed_at IS NOT NULL OR encrypted < ? OR ?)",
                (values["blob"], values["encrypted"], row[0], values["encrypted"], missing),
            )
            return int(row[0])
        columns = ["model_id", "created_at", *values]
        cur = self.conn.execute(
            f"INSERT INTO versions ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            (model_id, utc_now(), *_encoded(values).values()),
        )
        return int(cur.lastrowid or 0)

    def point(self, name: str, tag: str, version_id: int | None, operation: str) -> None:
        """Point `name:tag` at `version_id` (None: remove the tag), recording the move."""
        model_id = self.model_id(name, create=version_id is not None)
        if model_id is None:
            return
        row = self.conn.execute(
            "SELECT version_id FROM tags WHERE model_id = ? AND tag = ?", (model_id, tag)
        ).fetchone()
        previous = None if row is None else int(row[0])
        if previous == version_id:
            return
        if version_id is None:
            self.conn.execute("DELETE FROM tags WHERE model_id = ? AND tag = ?", (model_id, tag))
        else:
            self.conn.execute(
                "INSERT INTO tags (model_id, tag, version_id, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (model_id, tag) DO UPDATE SET version_id = excluded.version_id, "
                "updated_at = excluded.updated_at",
                (model_id, tag, version_id, utc_now()),
            )
        self.conn.execute(
            "INSERT INTO tag_history (model_id, tag, version_id, previous_id, operation, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (model_id, tag, version_id, previous, operation, utc_now()),
        )

    def deployment_rows(
        self, where: str = "1", args: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        """(name, tag, version_id, gate, candidate_id, weight, mirror, fallback_id, ttft_p99_s,
        window_s) of every tag matching `where`, by name then tag: a tag without settings has
        NULLs (edgellm.registry.deploy turns these into Deployments)."""
        return self.conn.execute(
            "SELECT m.name, t.tag, t.version_id, d.gate, d.candidate_id, d.weight, d.mirror, "
            "d.fallback_id, d.ttft_p99_s, d.window_s FROM tags t "
            "JOIN models m ON m.id = t.model_id "
            "LEFT JOIN deployments d ON d.model_id = t.model_id AND d.tag = t.tag "
            f"WHERE {where} ORDER BY m.name, t.tag",
            args,
        ).fetchall()

    def moves(self, name: str, tag: str) -> list[tuple[str, int | None, int | None]]:
        """(operation, version_id, previous_id) of every move of `name:tag`, oldest first."""
        rows = self.conn.execute(
            "SELECT h.operation, h.version_id, h.previous_id FROM tag_history h "
            "JOIN models m ON m.id = h.model_id WHERE m.name = ? AND h.tag = ? ORDER BY h.id",
            (name, tag),
        ).fetchall()
        return [(str(op), vid, prev) for op, vid, prev in rows]

    def save_deployment(self, name: str, tag: str, values: dict[str, Any]) -> None:
        """Write the whole settings row of `name:tag` (gate, candidate_id, weight, mirror,
        fallback_id, ttft_p99_s, window_s)."""
        columns = ["model_id", "tag", *values, "updated_at"]
        self.conn.execute(
            f"INSERT OR REPLACE INTO deployments ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})",
            (self.model_id(name), tag, *values.values(), utc_now()),
        )

    def drop_deployment(self, name: str, tag: str) -> None:
        self.conn.execute(
            "DELETE FROM deployments WHERE tag = ? AND model_id = "
            "(SELECT id FROM models WHERE name = ?)",
            (tag, name),
        )

    def deployed_version_ids(self) -> set[int]:
        """The versions a deployment names besides its target: candidates and fallbacks of
        tags that exist (gc keeps them)."""
        rows = self.conn.execute(
            "SELECT d.candidate_id, d.fallback_id FROM deployments d JOIN tags t "
            "ON t.model_id = d.model_id AND t.tag = d.tag"
        ).fetchall()
        return {vid for row in rows for vid in row if vid is not None}

    def blob_in_use(self, path: Path) -> bool:
        """Whether a version not removed keeps its bytes in `path`."""
        return any(v.blob == path for v in self.versions("v.removed_at IS NULL"))

    def update(self, version_id: int, **values: Any) -> None:
        encoded = _encoded(values)
        assignments = ", ".join(f"{k} = ?" for k in encoded)
        self.conn.execute(
            f"UPDATE versions SET {assignments} WHERE id = ?", (*encoded.values(), version_id)
        )


def _short(sha256: str | None) -> str | None:
    return sha256[:VERSION_CHARS] if sha256 else None


def _encoded(values: dict[str, Any]) -> dict[str, Any]:
    """Row values as SQLite stores them: JSON for the dict and list columns."""
    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in values.items()}
