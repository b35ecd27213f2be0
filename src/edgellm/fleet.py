"""Fleet operations: one operation applied to every worker of a fleet, through each worker's
admin API (edgellm.server.admin), for `edgellm fleet`.

A rolling operation (promote, rollback, canary) changes what a worker serves, so it goes one
worker at a time, in the workers file's order, and each worker is out of HAProxy's rotation
while it swaps:

    preflight   every worker answers, takes the admin key, is ready, and serves the same
                names, among them the tag; else nothing is changed
    per worker  drain on     POST /admin/drain: the agent check answers `drain`
                settle       wait while HAProxy reads the agent (its agent-inter: 2 s)
                OPERATION    POST /admin/promote | rollback | canary | canary/end
                healthy      /admin/models shows the new version loaded and serving (the
                             canary's candidate set, or gone) and /ready answers 200
                drain off    POST /admin/drain: back in the rotation
                then, after `settle` again (so two workers are never out at once), the next

A step that fails stops the rollout: the failed worker's drain is turned off again (it still
serves whatever it served: a failed promote leaves the old version, a failed swap in place the
old version reloaded), and the report names the failed worker and step, the workers done (at
which version) and those not touched. Nothing is undone on the workers done: run the same
promote or canary again once the cause is fixed (a worker already there is skipped, and its
drain turned off if a stopped run left it on), or roll back. A rollback is not idempotent
(again goes further back): continue one with a workers file of those not touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx

from edgellm.errors import EdgeLLMError, ValidationError

__all__ = [
    "FleetError",
    "Operation",
    "Report",
    "Worker",
    "WorkerError",
    "connect",
    "preflight",
    "read_workers",
    "roll",
]

REQUEST_TIMEOUT_S = 10.0  # a worker's answer to a look (status, drain); operations get longer
CONNECT_TIMEOUT_S = 5.0
POLL_S = 0.2  # how often a swapping worker is looked at
T = TypeVar("T")


class FleetError(EdgeLLMError):
    """A fleet operation refused or stopped; the message is one line."""


class WorkerError(EdgeLLMError):
    """One worker's answer was not what the step needs (or there was none)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.status = status  # the HTTP status; None: no answer


def read_workers(path: Path) -> list[str]:
    """The worker URLs of a workers file: one `http(s)://HOST:PORT` a line; blank lines and
    `#` comments are skipped."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(f"--workers {path}: {exc.strerror or exc}", param="workers") from None
    urls: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = urlsplit(line)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts = parts._replace(netloc="")
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
        ):
            raise ValidationError(
                f"{path}:{number}: {line!r} is not a worker URL: give http://HOST:PORT",
                param="workers",
            )
        url = line.rstrip("/")
        if url in urls:
            raise ValidationError(f"{path}:{number}: {url} is listed twice", param="workers")
        urls.append(url)
    if not urls:
        raise ValidationError(f"{path} lists no worker (one http://HOST:PORT a line)",
                              param="workers")  # fmt: skip
    return urls


class Worker:
    """One worker's admin API, over HTTP with the admin key."""

    def __init__(self, url: str, api_key: str | None, *, verify: str | bool = True):
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return self._json(self._send("GET", path, params=params))

    def post(
        self, path: str, body: dict[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        return self._json(self._send("POST", path, body, timeout_s))

    def ready(self) -> tuple[int, dict[str, Any]]:
        """/ready's status and body: 503 is an answer here (loading, draining), not an error."""
        response = self._send("GET", "/ready", accept=(200, 503))
        return response.status_code, _body(response)

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        accept: tuple[int, ...] = (200,),
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S) if timeout_s else None
        try:
            response = self._http.request(
                method, path, json=body, params=params, timeout=timeout or httpx.USE_CLIENT_DEFAULT
            )
        except httpx.TimeoutException:
            raise WorkerError(f"{self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as exc:
            raise WorkerError(f"{self.url} does not answer ({_why(exc)})") from None
        if response.status_code in accept:
            return response
        error = _body(response).get("error")
        error = error if isinstance(error, dict) else {}
        message, code = str(error.get("message") or response.reason_phrase), error.get("code")
        if response.status_code == 401:
            said = (f"{self.url} refused the API key (401): give an admin key with --api-key or "
                    "EDGELLM_API_KEY")  # fmt: skip
        elif response.status_code == 403:
            said = f"{self.url} refused the API key (403: {message}): it needs an admin key"
        else:
            said = f"{self.url}: {method} {path} answered {response.status_code}: {message}"
        raise WorkerError(said, status=response.status_code, code=code)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        body = _body(response)
        if not body:
            raise WorkerError(f"{self.url} answered {response.request.url.path} with no JSON "
                              "object: is it an edgellm worker?")  # fmt: skip
        return body


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _why(exc: httpx.HTTPError) -> str:
    """The innermost reason (ConnectionRefusedError's 'Connection refused'), one line."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return " ".join(str(text).split())


def connect(urls: Iterable[str], api_key: str | None, verify: str | bool = True) -> list[Worker]:
    return [Worker(url, api_key, verify=verify) for url in urls]


def each(workers: list[Worker], ask: Callable[[Worker], T]) -> list[T | WorkerError]:
    """`ask` of every worker at once (threads; a slow one does not hold the others up): the
    answers, or the WorkerError, in the workers' order."""

    def one(worker: Worker) -> T | WorkerError:
        try:
            return ask(worker)
        except WorkerError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(16, len(workers) or 1)) as pool:
        return list(pool.map(one, workers))


# -- preflight -------------------------------------------------------------------------------


def reachable(workers: list[Worker]) -> list[dict[str, Any]]:
    """Each worker's /admin/status; FleetError naming every worker that does not answer or
    refuses the key, before anything is changed."""
    answers = each(workers, lambda w: w.get("/admin/status"))
    failed = [a.message for a in answers if isinstance(a, WorkerError)]
    if failed:
        raise FleetError("; ".join(failed) + ": nothing was changed")
    return [a for a in answers if not isinstance(a, WorkerError)]


def preflight(workers: list[Worker], ref: str) -> tuple[str, list[dict[str, Any]]]:
    """Before a rolling operation on `ref` (NAME:TAG): every worker answers and takes the key,
    is ready (not loading, draining or failed), and serves the same names, `ref` among them.
    Returns the name `ref` is served as and each worker's entry for it (/admin/models');
    FleetError (one line) otherwise."""
    statuses = reachable(workers)
    readiness = each(workers, lambda w: w.ready())
    unready = []
    for worker, status, ready in zip(workers, statuses, readiness, strict=True):
        if isinstance(ready, WorkerError):
            unready.append(ready.message)
        elif status.get("problem"):
            unready.append(f"{worker.url} cannot serve: {status['problem']}")
        elif ready[0] != 200:
            unready.append(f"{worker.url} is not ready ({ready[1].get('status', ready[0])})")
    if unready:
        raise FleetError("; ".join(unready) + ": nothing was changed")
    groups: dict[frozenset[str], list[str]] = {}
    for worker, status in zip(workers, statuses, strict=True):
        groups.setdefault(frozenset(status.get("models", {})), []).append(worker.url)
    if len(groups) > 1:
        said = "; ".join(f"{', '.join(urls)} serve{'s' if len(urls) == 1 else ''} "
                         f"{', '.join(sorted(names)) or 'nothing'}"
                         for names, urls in groups.items())  # fmt: skip
        raise FleetError(f"the workers serve different models ({said}): give every worker "
                         "the same models first; nothing was changed")  # fmt: skip
    models: dict[str, Any] = statuses[0].get("models", {})
    full = ref if ":" in ref else f"{ref}:latest"
    for name, entry in models.items():
        if full in (entry.get("ref"), name) or ref == name:
            return name, [status["models"][name] for status in statuses]
    served = ", ".join(sorted(models)) or "nothing"
    raise FleetError(f"the workers do not serve {ref} (they serve {served}): nothing was changed")


def resolve(workers: list[Worker], operation: Operation) -> list[dict[str, Any]] | None:
    """For a promote or canary: the version its `to` names on each worker (/admin/resolve),
    all the same bytes; FleetError naming the workers that lack it or differ. None for the
    operations that name no version."""
    if operation.kind == "canary_end" or operation.verb == "rollback":
        return None
    params = {"model": operation.ref}
    if operation.body.get("to") is not None:
        params["to"] = str(operation.body["to"])
    answers = each(workers, lambda w: w.get("/admin/resolve", params))
    failed = [a.message for a in answers if isinstance(a, WorkerError)]
    found = [a for a in answers if not isinstance(a, WorkerError)]
    failed += [f"{w.url}: {operation.ref} has no canary running: say which version with --to"
               for w, a in zip(workers, answers, strict=True)
               if not isinstance(a, WorkerError) and a.get("to") is None]  # fmt: skip
    if failed:
        raise FleetError("; ".join(failed) + ": nothing was changed")
    versions: dict[str, list[str]] = {}
    for worker, answer in zip(workers, found, strict=True):
        versions.setdefault(str(answer["sha256"]), []).append(worker.url)
    if len(versions) > 1:
        said = "; ".join(f"{', '.join(urls)}: {sha[:12]}" for sha, urls in versions.items())
        raise FleetError(f"{operation.body.get('to') or 'the canary'} names different versions "
                         f"on the workers ({said}): nothing was changed")  # fmt: skip
    return found


# -- rolling ---------------------------------------------------------------------------------

Kind = Literal["move", "canary", "canary_end"]


@dataclass(frozen=True, slots=True)
class Operation:
    """A rolling operation: what is posted to each worker, and how its effect shows there."""

    verb: str  # promote | rollback | canary | canary --end (progress and the report say it)
    ref: str  # NAME:TAG
    path: str  # the admin route
    body: dict[str, Any]
    kind: Kind  # move: the tag's target changes; canary: its candidate; canary_end: none

    @classmethod
    def promote(cls, ref: str, to: str | None, *, force: bool = False) -> Operation:
        return cls("promote", ref, "/admin/promote", {"model": ref, "to": to, "force": force},
                   "move")  # fmt: skip

    @classmethod
    def rollback(cls, ref: str) -> Operation:
        return cls("rollback", ref, "/admin/rollback", {"model": ref}, "move")

    @classmethod
    def canary(
        cls, ref: str, to: str, *, weight: float, mirror: float, force: bool = False
    ) -> Operation:
        body = {"model": ref, "to": to, "weight": weight, "mirror": mirror, "force": force}
        return cls("canary", ref, "/admin/canary", body, "canary")

    @classmethod
    def end_canary(cls, ref: str) -> Operation:
        return cls("canary --end", ref, "/admin/canary/end", {"model": ref}, "canary_end")

    def expected(self, answer: dict[str, Any]) -> str | None:
        """The version the worker's entry must show: the new target, the canary's
        candidate; None for a canary's end (no candidate)."""
        if self.kind == "move":
            return str(answer["current"])
        return str(answer["candidate"]) if self.kind == "canary" else None

    def done_already(self, entry: dict[str, Any], resolved: dict[str, Any] | None) -> bool:
        """Whether a worker is where this operation would take it (a rollout run again after
        it stopped part-way skips the workers done). A rollback always moves."""
        canary = entry.get("canary")
        if self.kind == "canary_end":
            return canary is None
        if resolved is None:
            return False
        if self.kind == "move":
            return bool(resolved["current"] == resolved["to"])
        wanted = {"version": resolved["to"], "weight": self.body["weight"],
                  "mirror": self.body["mirror"]}  # fmt: skip
        return canary == wanted

    def shows(self, expected: str | None, entry: dict[str, Any]) -> bool:
        """Whether a served name's entry in /admin/models shows the operation done."""
        if self.kind == "move":
            return entry.get("version") == expected and "loading_version" not in entry
        return (entry.get("canary") or {}).get("version") == expected


@dataclass(slots=True)
class Outcome:
    """One worker's part in a rollout."""

    url: str
    state: Literal["done", "skipped", "failed", "untouched"] = "untouched"
    version: str | None = None  # done, skipped: what the tag serves there (a canary's candidate)
    step: str | None = None  # failed: the step that failed
    error: str | None = None  # failed: why, one line
    code: str | None = None  # failed: the worker's error code (gate_failed: the gate refused)
    drain_off: bool | None = None  # failed: whether its maintenance drain was turned off again

    def as_json(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "version": self.version,
                "step": self.step, "error": self.error, "code": self.code,
                "drain_off": self.drain_off}  # fmt: skip


@dataclass(slots=True)
class Report:
    operation: str
    ref: str
    workers: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> Outcome | None:
        return next((w for w in self.workers if w.state == "failed"), None)

    def as_json(self) -> dict[str, Any]:
        return {"operation": self.operation, "ref": self.ref, "ok": self.failed is None,
                "workers": [w.as_json() for w in self.workers]}  # fmt: skip

    def summary(self) -> list[str]:
        """What a stopped rollout left, one fact a line."""
        failed = self.failed
        if failed is None:
            skipped = sum(1 for w in self.workers if w.state == "skipped")
            return [f"{self.operation} {self.ref}: done on {len(self.workers)} workers"
                    + (f" ({skipped} were there already)" if skipped else "")]  # fmt: skip
        done = [f"{w.url} (at {w.version})" for w in self.workers
                if w.state in ("done", "skipped")]  # fmt: skip
        untouched = [w.url for w in self.workers if w.state == "untouched"]
        drain = {True: "its maintenance drain is off again", None: "",
                 False: "its maintenance drain could NOT be turned off: POST /admin/drain "
                        '{"on": false} to it'}[failed.drain_off]  # fmt: skip
        return [
            f"the rollout stopped at {failed.url}, step {failed.step!r}: {failed.error}"
            + (f"; {drain}" if drain else ""),
            f"done: {', '.join(done) or 'none'}",
            f"not touched: {', '.join(untouched) or 'none'}",
        ]


def roll(
    workers: list[Worker],
    operation: Operation,
    *,
    settle_s: float,
    timeout_s: float,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Report:
    """Run `operation` worker by worker as the module docstring says (after `preflight`)."""
    name, entries = preflight(workers, operation.ref)
    resolved = resolve(workers, operation)
    report = Report(operation.verb, operation.ref, [Outcome(w.url) for w in workers])
    moved = False
    for n, (worker, outcome) in enumerate(zip(workers, report.workers, strict=True), 1):

        def said(text: str, n: int = n, worker: Worker = worker) -> None:
            say(f"[{n}/{len(workers)}] {worker.url}: {text}")

        mine = resolved[n - 1] if resolved is not None else None
        if operation.done_already(entries[n - 1], mine):
            outcome.state = "skipped"
            outcome.version = mine["to"] if mine is not None else entries[n - 1].get("version")
            said(f"{operation.verb} {operation.ref}: there already ({outcome.version}), skipped")
            if entries[n - 1].get("maintenance"):  # left drained by a run that stopped
                outcome.drain_off = _undrain(worker)
                said("maintenance drain off (left on by an earlier run)")
            continue
        if moved and settle_s:
            # the last worker is back in HAProxy's rotation before this one leaves it: with
            # two workers, both could otherwise be out for an agent interval
            sleep(settle_s)
        moved = True

        step = "drain on"
        drained = False
        try:
            worker.post("/admin/drain", {"on": True})
            drained = True
            said("maintenance drain on (the agent answers drain)")
            step = "settle"
            sleep(settle_s)
            said(f"settled {settle_s:g}s")
            step = operation.verb
            answer = worker.post(operation.path, operation.body, timeout_s=timeout_s)
            expected = operation.expected(answer)
            said(f"{operation.verb} {operation.ref}: {_change(operation, answer)}")
            step = "healthy"
            outcome.version = _healthy(worker, name, operation, expected, timeout_s, sleep)
            said(f"healthy: {name} serves {outcome.version}, /ready 200")
            step = "drain off"
            worker.post("/admin/drain", {"on": False})
            said("maintenance drain off")
        except (Exception, KeyboardInterrupt) as exc:  # whatever stopped it: not left drained
            outcome.state, outcome.step = "failed", step
            if isinstance(exc, WorkerError):
                outcome.error, outcome.code = exc.message, exc.code
            elif isinstance(exc, KeyboardInterrupt):
                outcome.error = "interrupted"
            else:  # an answer this version does not understand (another edgellm version?)
                outcome.error = f"{worker.url}: unexpected answer ({type(exc).__name__}: {exc})"
            outcome.drain_off = _undrain(worker) if drained else None
            break
        outcome.state = "done"
    return report


def _change(operation: Operation, answer: dict[str, Any]) -> str:
    if operation.kind == "move":
        return f"{answer.get('previous') or '-'} -> {answer.get('current')}"
    if operation.kind == "canary":
        return (f"candidate {answer.get('candidate')} ({answer.get('weight'):g}% of "
                f"conversations, a copy of {answer.get('mirror'):g}% of requests)")  # fmt: skip
    return "canary ended"


def _undrain(worker: Worker) -> bool:
    try:
        worker.post("/admin/drain", {"on": False})
    except WorkerError:
        return False
    return True


def _healthy(
    worker: Worker,
    name: str,
    operation: Operation,
    expected: str | None,
    timeout_s: float,
    sleep: Callable[[float], None],
) -> str:
    """Wait until the worker's entry for `name` shows the operation done, its target is
    loaded (a load is asked for once if it is not: the worker takes traffic warm) and /ready
    answers 200. Returns the version it serves (a canary's: its candidate)."""
    deadline = time.monotonic() + timeout_s
    asked_load = False
    last = "nothing yet"
    while True:
        entry = worker.get("/admin/models").get("models", {}).get(name)
        if entry is None:
            raise WorkerError(f"{worker.url} no longer serves {name}")
        if operation.shows(expected, entry):
            if operation.kind == "move" and not entry.get("loaded"):
                if not asked_load:
                    asked_load = True
                    worker.post(f"/admin/models/{name}/load", timeout_s=timeout_s)
                    continue
                last = f"{name}: {expected} not loaded"
            else:
                status, body = worker.ready()
                if status == 200:
                    return expected or str(entry.get("version"))
                last = f"/ready {status} ({body.get('status')})"
        elif "loading_version" not in entry and entry.get("problem"):
            # the swap failed: the old version serves on, with the reason (at once, or after
            # the load was seen under way)
            raise WorkerError(f"{worker.url}: {name}: {entry['problem']}")
        else:
            last = f"{name} at {entry.get('version')}"
            if "loading_version" in entry:
                last += f", loading {entry['loading_version']}"
            if entry.get("problem"):
                last += f": {entry['problem']}"
        if time.monotonic() > deadline:
            wanted = expected or "without a canary"
            raise WorkerError(f"{worker.url}: {name} did not serve {wanted} within "
                              f"{timeout_s:g}s (last: {last})")  # fmt: skip
        sleep(POLL_S)
