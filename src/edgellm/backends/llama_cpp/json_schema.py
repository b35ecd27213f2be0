"""JSON schema to GBNF, by llama-cpp-python's port of llama.cpp's converter."""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema. Raises AssertionError, KeyError, ... on schemas it cannot
    translate (edgellm.structured wraps it)."""
    return str(json_schema_to_gbnf(json.dumps(schema)))
