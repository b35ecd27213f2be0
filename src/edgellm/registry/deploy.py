"""Deployment operations on a tag: promote, rollback, canary, fallback, and its quality gate.

A tag (`name:tag`) points at its *target* version (edgellm.registry.catalog); its deployment
adds how it is served beyond that, in one `deployments` row (migration 0004): a gate that a
version must pass to be promoted or canaried, a canary or mirror *candidate* with the share of
conversations (`weight`) or requests (`mirror`) it gets, and an SLO *fallback* taken while the
target's p99 time to first token over `window_s` exceeds `ttft_p99_s`. The running server
reads every deployment four times a second (`Registry.deployments`), so each operation here is
one transaction that reads, checks everything, then writes: an operation that is refused
changes nothing, and the server sees either all of it or none.

A gate refuses a version unless one of its recorded evaluations (`edgellm eval`) passes every
check of the tag's gate; a tag without a gate refuses a version whose newest recorded gate
verdict failed. `force` goes past either, and the audit log records it (edgellm.audit.oplog)
in the same transaction: a forced move the log cannot record does not happen.

Rollback walks the tag's history as a stack: each move pushes (previous, new), each rollback
pops the move it undid, so the next rollback undoes the move before that one; a removal (`rm`)
starts the stack anew.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgellm.errors import EdgeLLMError, ModelNotFound, ValidationError
from edgellm.evaluate.gate import parse_gate
from edgellm.registry.catalog import Catalog, Version, parse_ref

if TYPE_CHECKING:
    from edgellm.registry import Registry

MAX_PERCENT = 100.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class GateRefused(EdgeLLMError):
    """A promote or canary refused because the version does not pass the tag's gate (the CLI
    exits 3; `force` goes past it, recorded in the audit log)."""

    rejection = "invalid"
    status_code = 409
    error_type = "invalid_request_error"
    shown = True

    def __init__(self, message: str):
        super().__init__(message, param="to", code="gate_failed")


class TagNotFound(ModelNotFound):
    """No such `name:tag` in the registry (404), with the tags there are."""

    def __init__(self, message: str):
        EdgeLLMError.__init__(self, message, param="model", code="model_not_found")


@dataclass(frozen=True, slots=True)
class Deployment:
    """How one tag is served: where it points and what goes beside it."""

    name: str
    tag: str
    target: Version  # where the tag points
    gate: str | None = None  # a gate expression (edgellm.evaluate.gate.parse_gate syntax)
    candidate: Version | None = None  # canary / mirror candidate
    weight: float = 0.0  # percent of conversations routed to the candidate, 0 < w <= 100
    mirror: float = 0.0  # percent of requests copied to the candidate, 0 < m <= 100
    fallback: Version | None = None
    ttft_p99_s: float | None = None  # the fallback's objective (p99 TTFT, seconds)
    window_s: float = 60.0  # the fallback's window, seconds

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.ref, "target": self.target.short, "gate": self.gate,
            "candidate": _short(self.candidate), "weight": self.weight, "mirror": self.mirror,
            "fallback": _short(self.fallback), "ttft_p99_s": self.ttft_p99_s,
            "window_s": self.window_s,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Move:
    """A promote or rollback: where the tag pointed before and now."""

    ref: str
    operation: str  # "promote" | "rollback"
    previous: Version | None
    current: Version
    forced: bool = False  # promoted past a failing gate (recorded in the audit log)
    gate_failure: str | None = None  # why the gate refused it, when forced

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.ref, "operation": self.operation, "previous": _short(self.previous),
            "current": self.current.short, "sha256": self.current.sha256,
            "forced": self.forced, "gate_failure": self.gate_failure,
        }  # fmt: skip


def _short(version: Version | None) -> str | None:
    return None if version is None else version.short


# -- reading


def read_deployments(
    catalog: Catalog, where: str = "1", args: tuple[Any, ...] = ()
) -> list[Deployment]:
    """The deployments of the tags matching `where`: one query for the rows, one for the
    versions they name (the server's watcher calls this four times a second)."""
    rows = catalog.deployment_rows(where, args)
    ids = sorted({vid for row in rows for vid in (row[2], row[4], row[7]) if vid is not None})
    marks = ", ".join("?" * len(ids))
    versions = {v.id: v for v in catalog.versions(f"v.id IN ({marks})", tuple(ids))} if ids else {}
    out = []
    for name, tag, target, gate, candidate, weight, mirror, fallback, ttft, window in rows:
        out.append(Deployment(
            name=name, tag=tag, target=versions[target], gate=gate,
            candidate=versions.get(candidate), weight=weight or 0.0, mirror=mirror or 0.0,
            fallback=versions.get(fallback), ttft_p99_s=ttft,
            window_s=60.0 if window is None else window,
        ))  # fmt: skip
    return out


def read_deployment(catalog: Catalog, ref: str) -> Deployment:
    """The deployment of `ref` (name[:tag]); TagNotFound naming the tags there are."""
    name, tag = parse_ref(ref)
    found = read_deployments(catalog, "m.name = ? AND t.tag = ?", (name, tag))
    if not found:
        raise TagNotFound(catalog._not_found(name, tag))
    return found[0]


# -- gates


def gate_failure(gate: str, version: Version) -> str | None:
    """None when one of `version`'s recorded evaluations (or gate verdicts) passes every check
    of `gate`; else why not, in one line."""
    parsed = parse_gate(gate)
    where = f"{version.model}@{version.short}"
    recorded = [dict(e.get("metrics") or {}) for e in version.evals] + [
        {c.get("metric"): c.get("value") for c in g.get("checks") or []} for g in version.gates
    ]
    if not recorded:
        return (
            f"{where} has no recorded evaluation to check the gate {parsed.expr} on (run "
            "`edgellm eval` on it)"
        )
    misses = []
    for metrics in recorded:
        miss = [_miss(c.metric, c.op, c.threshold, metrics.get(c.metric)) for c in parsed.checks]
        if not any(miss):
            return None
        misses.append(next(m for m in miss if m))
    newest = misses[len(version.evals) - 1] if version.evals else misses[-1]
    return f"no recorded evaluation of {where} passes the gate {parsed.expr} (newest: {newest})"


def _miss(metric: str, op: str, threshold: float, value: Any) -> str | None:
    """Why `value` fails `metric op threshold` (None: it passes)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return f"{metric} not measured" + (" (evaluate with --ref)" if metric != "ppl" else "")
    from edgellm.evaluate.gate import Check

    if Check(metric, op, threshold).holds(float(value)):
        return None
    return f"{metric}={value:.4g}, needs {op}{threshold:g}"


def refusal(deployment: Deployment, version: Version) -> str | None:
    """Why the tag's gate refuses `version` (None: it may be promoted or canaried): the tag's
    gate when it has one, else the version's own newest recorded verdict."""
    if deployment.gate:
        return gate_failure(deployment.gate, version)
    if version.gates and not version.gates[-1].get("passed"):
        last = version.gates[-1]
        return (
            f"the newest recorded gate of {version.model}@{version.short}, "
            f"{last.get('expr')} (on eval {last.get('eval')}), failed"
        )
    return None


# -- durations


def parse_duration(text: str, param: str) -> float:
    """Seconds from "800ms", "0.8s", "60s", "5m", "1h" or a plain number (seconds)."""
    match = _DURATION.match(str(text))
    seconds = float(match.group(1)) * _SECONDS[match.group(2)] if match else 0.0
    if match is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValidationError(
            f"{param}: {text!r} is not a duration: give more than 0 as 800ms, 0.8s, 60s or 5m "
            "(a plain number is seconds)",
            param=param.lstrip("-").replace("-", "_"),
        )
    return seconds


# -- operations


def promote(
    registry: Registry,
    ref: str,
    to: str | None,
    *,
    force: bool = False,
    actor: str | None = None,
    method: str = "CLI",
) -> Move:
    """Point `ref` at `to` (a version, OTHER_TAG, or NAME:TAG; None: the running canary's
    candidate), ending the tag's canary. GateRefused when the gate refuses it, unless `force`
    (then recorded in the audit log, `actor` the key name; `method` "CLI" or "POST")."""
    with registry.catalog.writing():
        dep = read_deployment(registry.catalog, ref)
        if to is None:
            if dep.candidate is None:
                raise ValidationError(
                    f"{dep.ref} has no canary running: say which version with --to",
                    param="to",
                )  # fmt: skip
            version = dep.candidate
        else:
            version = find_target(registry, dep.name, to)
        if version.sha256 == dep.target.sha256:
            raise ValidationError(f"{dep.ref} points at {version.short} already", param="to")
        if dep.fallback is not None and version.sha256 == dep.fallback.sha256:
            raise ValidationError(
                f"{version.short} is the fallback of {dep.ref}: turn it off first "
                f"(edgellm models fallback {dep.ref} --off)",
                param="to",
            )
        failure = _gate(registry, dep, version, "models promote", force, actor, method)
        version = _own(registry, dep.name, version)
        registry.catalog.point(dep.name, dep.tag, version.id, "promote")
        _save(registry.catalog, replace(dep, candidate=None, weight=0.0, mirror=0.0))
    current = registry.catalog.versions("v.id = ?", (version.id,))[0]
    return Move(dep.ref, "promote", dep.target, current, failure is not None, failure)


def rollback(registry: Registry, ref: str) -> Move:
    """Point `ref` back where it pointed before its last move not yet undone. A canary or
    fallback on the version it returns to ends (a tag cannot be its own candidate)."""
    with registry.catalog.writing():
        dep = read_deployment(registry.catalog, ref)
        stack: list[tuple[int | None, int]] = []
        for operation, version_id, previous_id in registry.catalog.moves(dep.name, dep.tag):
            if operation == "rollback":
                if stack:
                    stack.pop()
            elif version_id is None:
                stack.clear()
            else:
                stack.append((previous_id, version_id))
        if not stack or stack[-1][0] is None:
            raise ValidationError(f"{dep.ref} has no earlier version to roll back to")
        found = registry.catalog.versions("v.id = ?", (stack[-1][0],))
        if not found or found[0].removed:
            raise ValidationError(
                f"the version {dep.ref} pointed at before was removed by gc: promote another"
            )
        back = found[0]
        registry.catalog.point(dep.name, dep.tag, back.id, "rollback")
        changed = dep
        if dep.candidate is not None and dep.candidate.sha256 == back.sha256:
            changed = replace(changed, candidate=None, weight=0.0, mirror=0.0)
        if dep.fallback is not None and dep.fallback.sha256 == back.sha256:
            changed = replace(changed, fallback=None, ttft_p99_s=None)
        _save(registry.catalog, changed)
    current = registry.catalog.versions("v.id = ?", (back.id,))[0]
    return Move(dep.ref, "rollback", dep.target, current)


def start_canary(
    registry: Registry,
    ref: str,
    to: str,
    *,
    weight: float = 0.0,
    mirror: float = 0.0,
    force: bool = False,
    actor: str | None = None,
    method: str = "CLI",
) -> Deployment:
    """Send `weight` percent of conversations to `to` and/or copy `mirror` percent of requests
    to it (replacing a canary running). The gate applies as to promote."""
    check_percent(weight, "weight", allow_zero=mirror > 0)
    check_percent(mirror, "mirror", allow_zero=True)
    with registry.catalog.writing():
        dep = read_deployment(registry.catalog, ref)
        version = find_target(registry, dep.name, to)
        if version.sha256 == dep.target.sha256:
            raise ValidationError(
                f"{dep.ref} points at {version.short} already: a canary needs another version",
                param="to",
            )
        _gate(registry, dep, version, "models canary", force, actor, method)
        version = _own(registry, dep.name, version)
        _save(registry.catalog, replace(dep, candidate=version, weight=weight, mirror=mirror))
    return read_deployment(registry.catalog, ref)


def end_canary(registry: Registry, ref: str) -> Deployment:
    """Stop the tag's canary and mirror: every request goes to its target again."""
    with registry.catalog.writing():
        dep = read_deployment(registry.catalog, ref)
        if dep.candidate is None:
            raise ValidationError(f"{dep.ref} has no canary running")
        _save(registry.catalog, replace(dep, candidate=None, weight=0.0, mirror=0.0))
    return read_deployment(registry.catalog, ref)


def set_fallback(
    registry: Registry, ref: str, to: str, *, ttft_p99_s: float, window_s: float = 60.0
) -> Deployment:
    """Fall back to `to` while the target's p99 TTFT over `window_s` exceeds `ttft_p99_s`."""
    for value, param in ((ttft_p99_s, "ttft_p99"), (window_s, "window")):
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValidationError(f"--{param.replace('_', '-')} must be more than 0", param=param)
    with registry.catalog.writing():
        dep = read_deployment(registry.catalog, ref)
        version = find_target(registry, dep.name, to)
        if version.sha256 == dep.target.sha256:
            raise ValidationError(
                f"{dep.ref} points at {version.short}: a fallback to itself is no fallback",
                param="to",
            )
        version = _own(registry, dep.name, version)
        _save(registry.catalog, replace(dep, fallback=version, ttft_p99_s=float(ttft_p99_s),
                                        window_s=float(window_s)))  # fmt: skip
    return read_deployment(registry.catalog, ref)


def clear_fallback(registry: Registry, ref: str) -> Deployment:
    with registry.catalog.writing():
        dep = read_deployment(registry.catalog, ref)
        if dep.fallback is None:
            raise ValidationError(f"{dep.ref} has no fallback")
        _save(registry.catalog, replace(dep, fallback=None, ttft_p99_s=None, window_s=60.0))
    return read_deployment(registry.catalog, ref)


def set_gate(registry: Registry, ref: str, expr: str | None) -> Deployment:
    """The gate a version must pass to be promoted or canaried on `ref` (None: none)."""
    gate = parse_gate(expr).expr if expr is not None else None
    with registry.catalog.writing():
        dep = read_deployment(registry.catalog, ref)
        _save(registry.catalog, replace(dep, gate=gate))
    return read_deployment(registry.catalog, ref)


# -- inside an operation's transaction


def find_target(registry: Registry, name: str, to: str) -> Version:
    """The version `to` names for a tag of `name`: a SHA-256 prefix or a tag of `name`, or
    NAME:TAG (of any model)."""
    spec = to.strip()
    try:
        if ":" in spec:
            return registry.resolve(spec)
        return registry.find_version(name, spec)
    except ValidationError as exc:
        if ":" in spec or "several" in exc.message:
            raise ValidationError(exc.message, param="to") from None
    tags = ", ".join(ref for ref, v in registry.tags() if v.model == name) or "none"
    shorts = [v.short for v in registry.versions(name)][-5:]
    raise ValidationError(
        f"no version or tag '{spec}' of {name} (tags: {tags}; newest versions: "
        f"{', '.join(shorts) or 'none'})",
        param="to",
    )


def _own(registry: Registry, name: str, version: Version) -> Version:
    """`version` as a version of `name` (another model's bytes are recorded under it too,
    as `models tag` does)."""
    if version.model == name:
        return version
    from edgellm.registry import _copied

    version_id = registry.catalog.insert_version(name, _copied(version, registry.blob_dir))
    return registry.catalog.versions("v.id = ?", (version_id,))[0]


def _gate(
    registry: Registry, dep: Deployment, version: Version, route: str, force: bool,
    actor: str | None, method: str,
) -> str | None:  # fmt: skip
    """GateRefused when the gate refuses `version`, unless `force`: then the audit record of
    the forced operation, in the open transaction. Returns the refusal (None: it passed)."""
    failure = refusal(dep, version)
    if failure is None:
        return None
    if not force:
        raise GateRefused(f"{dep.ref} refuses {version.short}: {failure}; --force to go past it "
                          "(recorded in the audit log)")  # fmt: skip
    from edgellm.audit.oplog import record_operation

    record_operation(
        route, model=dep.ref, version=version.short, actor=actor, method=method, error=failure,
        arguments={"ref": dep.ref, "to": version.sha256, "force": True},
        home=registry.home, conn=registry.catalog.conn,
    )  # fmt: skip
    return failure


def check_percent(value: float, param: str, *, allow_zero: bool) -> None:
    """ValidationError naming `param` unless `value` is a percent in (0, 100] (or 0)."""
    ok = isinstance(value, int | float) and math.isfinite(value)
    if ok and (0 < value <= MAX_PERCENT or (allow_zero and value == 0)):
        return
    what = "more than 0 and at most 100" if not allow_zero else "from 0 to 100"
    hint = "; give --weight or --mirror" if param == "weight" and value == 0 else ""
    raise ValidationError(f"--{param} {value:g} is not a percent {what}{hint}", param=param)


def _save(catalog: Catalog, dep: Deployment) -> None:
    """Write `dep`'s settings (a tag with none keeps no row)."""
    values = {
        "gate": dep.gate, "candidate_id": dep.candidate.id if dep.candidate else None,
        "weight": dep.weight, "mirror": dep.mirror,
        "fallback_id": dep.fallback.id if dep.fallback else None,
        "ttft_p99_s": dep.ttft_p99_s, "window_s": dep.window_s,
    }  # fmt: skip
    if values == {"gate": None, "candidate_id": None, "weight": 0.0, "mirror": 0.0,
                  "fallback_id": None, "ttft_p99_s": None, "window_s": 60.0}:  # fmt: skip
        catalog.drop_deployment(dep.name, dep.tag)
    else:
        catalog.save_deployment(dep.name, dep.tag, values)
