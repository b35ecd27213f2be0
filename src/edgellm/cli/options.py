"""Command-line options made from the settings models, so a default, a limit and a help text
are written once: in the settings field (its default or `shown_default`, its `ge`/`le`/`gt`/
`lt`, its `description`).

`@settings_options((ServerSettings, "Server"), (EngineSettings, "Engine"))` on a command that
takes `**flags` gives it one option per field, `--field-name` (`--x/--no-x` for a boolean), in a
help panel per model. Typer reads a command's parameters from `inspect.signature`, so the
options are added to the function's `__signature__`; Typer then passes them in `flags`. Each
defaults to None, so a flag not given leaves its field to the environment, the config file or
the model's default (`_LayerSettings.load` drops Nones).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def shown_default(field: FieldInfo) -> str:
    """The default as `--help` shows it: a field's own `shown_default` (for None or a factory,
    e.g. "all cores"), else on/off for booleans, else the value."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    return str(field.default)


def limits(field: FieldInfo) -> str:
    """The field's declared bounds as click writes a range: "64<=x<=1048576", "x>=1024"."""
    low: tuple[object, str] | None = None  # (bound, "<=" or "<"), read as bound <= x
    high: tuple[object, str] | None = None  # read as x <= bound
    for bound in field.metadata:
        match bound:
            case annotated_types.Ge(ge=value):
                low = (value, "<=")
            case annotated_types.Gt(gt=value):
                low = (value, "<")
            case annotated_types.Le(le=value):
                high = (value, "<=")
            case annotated_types.Lt(lt=value):
                high = (value, "<")
    if low and high:
        return f"{low[0]}{low[1]}x{high[1]}{high[0]}"
    if low:
        return f"x{low[1].replace('<', '>')}{low[0]}"
    return f"x{high[1]}{high[0]}" if high else ""


def help_text(field: FieldInfo) -> str:
    """The description, then "(default: D; LIMITS)". Parentheses, not brackets: Rich would
    read "[default: D]" as markup and drop it."""
    facts = "; ".join(part for part in (f"default: {shown_default(field)}", limits(field)) if part)
    return escape(f"{field.description or ''} ({facts})".strip())


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def _value_type(annotation: Any) -> Any:
    """The type the flag parses: the field's own for int, float, str, bool and Path; str for
    a Literal (the settings model checks the choice and says so in one line) and for a list
    (given comma-separated, split by the model's validator)."""
    if get_origin(annotation) in (Literal, list):
        return str
    if annotation in (int, float, str, bool, Path):
        return annotation
    raise TypeError(f"no command-line form for a setting of type {annotation!r}")


def _metavar(annotation: Any) -> str | None:
    if get_origin(annotation) is Literal:
        return "|".join(str(choice) for choice in get_args(annotation))
    if get_origin(annotation) is list:
        return "A,B,..."
    return None  # Typer's: <int>, <str>, ...


def settings_parameter(name: str, field: FieldInfo, panel: str) -> inspect.Parameter:
    """One keyword-only Typer option for one settings field, default None (not given)."""
    annotation = _without_none(field.annotation)
    value_type = _value_type(annotation)
    flag = flag_name(name)
    option = typer.Option(
        None,
        f"{flag}/--no-{flag[2:]}" if value_type is bool else flag,
        help=help_text(field),
        metavar=_metavar(annotation),
        rich_help_panel=panel,
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=value_type | None
    )


def settings_options(*models: tuple[type[BaseModel], str]) -> Callable[[F], F]:
    """Add an option per field of each (model, help panel) to a command taking `**flags`."""

    def add(command: F) -> F:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        own += [
            settings_parameter(name, field, panel)
            for model, panel in models
            for name, field in model.model_fields.items()
        ]
        command.__signature__ = signature.replace(parameters=own)  # type: ignore[attr-defined]
        return command

    return add
