"""A version's serving defaults: what `edgellm models set NAME:TAG KEY=VALUE ...` records.

They fill the fields a client leaves out of a request, as an Ollama Modelfile's PARAMETER and
SYSTEM lines do. For each field the server takes the first of (edgellm.server.defaults):

    the client's value > the version's parameter > the GGUF's general.sampling.* > the API's

`ServingParams` declares each parameter with its limits; values are stored under their
canonical names (`ctx` is `num_ctx`, `num_predict` is `max_tokens`) as JSON values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, get_args

import annotated_types
import pydantic
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from edgellm.errors import ValidationError

MAX_STOP_STRINGS = 16  # the server's own defaults for a client's stop list
MAX_STOP_CHARS = 256
MAX_SYSTEM_CHARS = 1 << 20  # the server's default --max-message-chars
MAX_TOKENS = 1 << 24  # far beyond any context, as the wire's bound

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class ServingParams(BaseModel):
    """The parameters a version may set, with their limits; None: not set."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus mass kept; 1: off")
    top_k: int | None = Field(None, ge=0, le=100_000, description="tokens kept; 0: off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="probability floor; 0: off")
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0, description="1: off")
    repeat_last_n: int | None = Field(
        None, ge=-1, le=1 << 16, description="tokens the penalty looks back at; -1: the context"
    )
    stop: list[StopString] | None = Field(
        None, min_length=1, max_length=MAX_STOP_STRINGS, description="strings that end output"
    )
    num_ctx: int | None = Field(None, ge=1, le=1 << 24, description="a request's context")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens generated")
    system: str | None = Field(
        None, max_length=MAX_SYSTEM_CHARS, description="system prompt of a chat without one"
    )
    reasoning: bool | None = Field(None, description="the default of `think`: on or off")


PARAM_NAMES: tuple[str, ...] = tuple(ServingParams.model_fields)
ALIASES = {"ctx": "num_ctx", "num_predict": "max_tokens"}  # Ollama's names and the serve flag's


def canonical(name: str) -> str:
    """The stored name of a parameter (an alias resolved); ValidationError if unknown."""
    key = ALIASES.get(name, name)
    if key not in ServingParams.model_fields:
        raise ValidationError(f"unknown parameter {name!r} (known: {_known()})", param=name)
    return key


def check_names(names: Iterable[str]) -> list[str]:
    """The canonical names of `names` (for `models unset KEY ...`), each once, in order."""
    out: list[str] = []
    for name in names:
        key = canonical(name.strip())
        if key not in out:
            out.append(key)
    return out


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """`["temperature=0.6", "system=You are terse."]` -> `{"temperature": 0.6, "system": ...}`.

    Values are text as typed on a command line: numbers, `on`/`off` for reasoning, `stop` one
    string or a JSON list of strings (`stop=["</s>", "User:"]`). One-line ValidationError
    naming the key for a missing `=`, an unknown key, a key given twice or a bad value."""
    values: dict[str, Any] = {}
    texts: dict[str, str] = {}  # canonical name -> the value as typed, for errors
    given: dict[str, str] = {}  # canonical name -> the name it was given as
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep:
            raise ValidationError(f"missing '=' in {pair!r} (write KEY=VALUE)", param=name)
        if not name:
            raise ValidationError(f"missing the key in {pair!r} (write KEY=VALUE)")
        key = canonical(name)
        if key in given:
            twice = f" (as {given[key]} and {name})" if given[key] != name else ""
            raise ValidationError(f"{key} is given twice{twice}", param=key)
        given[key], texts[key] = name, text
        values[key] = _typed(key, text)
    return _checked(values, texts)


def check_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed values (a stored row, an imported Ollama manifest) checked against the limits,
    under their canonical names; the parameters that are set, as JSON values."""
    renamed: dict[str, Any] = {}
    for name, value in values.items():
        key = canonical(name)
        if key in renamed:
            raise ValidationError(f"{key} is given twice", param=key)
        renamed[key] = value
    return _checked(renamed, {})


def _checked(values: dict[str, Any], texts: Mapping[str, str]) -> dict[str, Any]:
    try:
        checked = ServingParams.model_validate(values)
    except pydantic.ValidationError as exc:
        key = str(exc.errors()[0]["loc"][0])
        shown = _shown(texts[key] if key in texts else values[key])
        raise ValidationError(f"{key} must be {expected(key)}, not {shown}", param=key) from None
    return checked.model_dump(exclude_none=True)


def _typed(key: str, text: str) -> Any:
    """A command-line value as the JSON value pydantic then checks (it converts numbers and
    on/off itself); `stop` may be one string or a JSON list."""
    if key == "stop":
        if text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise ValidationError(
                    f"stop must be {expected('stop')}, not {_shown(text)}", param=key
                ) from None
        return [text]
    return text


def expected(key: str) -> str:
    """What a parameter takes, in words, from its declared type and limits."""
    if key == "stop":
        return (
            f"a string or a JSON list of 1 to {MAX_STOP_STRINGS} strings of 1 to "
            f"{MAX_STOP_CHARS} characters"
        )
    if key == "reasoning":
        return "on or off"
    info = ServingParams.model_fields[key]
    kinds = get_args(info.annotation)
    if str in kinds:
        return f"text of at most {MAX_SYSTEM_CHARS} characters"
    kind = "an integer" if int in kinds else "a number"
    low: Any = None
    high: Any = None
    low_word = "from"
    for limit in info.metadata:
        if isinstance(limit, annotated_types.Ge):
            low = limit.ge
        elif isinstance(limit, annotated_types.Gt):
            low, low_word = limit.gt, "above"
        elif isinstance(limit, annotated_types.Le):
            high = limit.le
    if low_word == "above":
        return f"{kind} above {_number(low)} and at most {_number(high)}"
    return f"{kind} between {_number(low)} and {_number(high)}"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _shown(value: Any) -> str:
    """A bad value as the error shows it: quoted, cut short."""
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _known() -> str:
    back = {v: k for k, v in ALIASES.items()}
    return ", ".join(f"{n} ({back[n]})" if n in back else n for n in PARAM_NAMES)
