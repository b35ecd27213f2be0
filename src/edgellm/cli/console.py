"""What every command shares: the stderr console, and one clear line for a user's error."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import pydantic
import typer
from rich.console import Console
from rich.markup import escape

from edgellm.errors import EdgeLLMError

err = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn the errors a user can cause into one clear line and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeLLMError as exc:
            err.print(f"[red]error:[/red] {escape(exc.message)}")
            raise typer.Exit(1) from None
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            err.print(f"[red]error:[/red] invalid setting {escape(where)}: {escape(first['msg'])}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
