"""Ollama's `keep_alive`: how long a model stays loaded after a request.

Ollama takes a number of seconds or a Go duration ("5m", "1h30m", "300ms", "10s"); any
negative value keeps the model loaded until the server stops, and 0 unloads it as soon as the
request is done.
"""

from __future__ import annotations

import math
import re

from edgellm.errors import ValidationError

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: str | int | float | None, param: str = "keep_alive") -> float | None:
    """Seconds (math.inf: forever), or None when not given."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValidationError("keep_alive is a duration, not a boolean", param=param)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _PART.findall(body)
            if not body or "".join(a + u for a, u in parts) != body:
                raise ValidationError(
                    f"keep_alive '{value}' is not a duration; write e.g. 5m, 30s, 0 or -1",
                    param=param,
                ) from None
            seconds = sign * sum(float(a) * _UNITS[u] for a, u in parts)
    if math.isnan(seconds):
        raise ValidationError("keep_alive is not a number", param=param)
    return math.inf if seconds < 0 else seconds
