"""Structured output: JSON schemas turned into llama.cpp grammars (GBNF).

The sampler then only ever picks tokens that keep the output a prefix of a document the
grammar accepts, and only allows end-of-generation once it is complete, so a response that
finished with reason "stop" always parses and validates. The schema-to-GBNF translation is
llama-cpp-python's port of llama.cpp's own converter; schemas are checked with `jsonschema`
first so a malformed one is the client's error with a readable reason.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

from edgellm.backends.llama_cpp import json_schema_grammar
from edgellm.errors import ValidationError

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# The converter's string characters admit raw control characters, which strict JSON parsers
# refuse inside strings; llama.cpp's C++ converter excludes them, and so do we.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
_ROOT_RULE = re.compile(r"^root ::= ", re.MULTILINE)


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON schema the client sent, checked against its metaschema."""
    if not isinstance(schema, dict):
        raise ValidationError(f"{param} must be a JSON schema object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        at = f" at '{where}'" if where else ""
        raise ValidationError(
            f"{param} is not a valid JSON schema{at}: {exc.message}", param=param
        ) from exc
    return schema


# Validation keywords the converter does not enforce: a schema using them is refused rather
# than answered with documents that may not validate.
UNENFORCED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "contains",
        "minContains",
        "maxContains",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("oneOf", "anyOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


def unenforced_keyword(schema: Any, path: str = "") -> str | None:
    """The path of the first keyword in `schema` that grammars cannot enforce, if any."""
    if not isinstance(schema, dict):
        return None
    for key in schema:
        if key in UNENFORCED:
            return f"{path}/{key}" if path else key
    children: list[tuple[str, Any]] = []
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            children += [(f"{key}/{name}", sub) for name, sub in schema[key].items()]
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            children += [(f"{key}/{i}", sub) for i, sub in enumerate(schema[key])]
    children += [(key, schema[key]) for key in _SUBSCHEMAS if key in schema]
    for where, sub in children:
        found = unenforced_keyword(sub, f"{path}/{where}" if path else where)
        if found:
            return found
    return None


def schema_grammar(schema: Any, param: str) -> str:
    """GBNF accepting exactly the JSON documents valid under `schema` (root rule `root`)."""
    check_schema(schema, param)
    unenforced = unenforced_keyword(schema)
    if unenforced is not None:
        raise ValidationError(
            f"{param}: '{unenforced}' cannot be enforced while generating; supported are "
            "type, properties, required, additionalProperties, items, prefixItems, "
            "minItems, maxItems, enum, const, minLength, maxLength, pattern, oneOf, anyOf, "
            "allOf and $ref",
            param=param,
        )
    try:
        grammar = json_schema_grammar(schema)
    except (AssertionError, AttributeError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(
            f"{param}: this JSON schema cannot be enforced ({exc or type(exc).__name__})",
            param=param,
        ) from exc
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def json_object_grammar() -> str:
    """Any JSON object: `response_format: json_object` and Ollama's `format: "json"`."""
    return schema_grammar({"type": "object"}, "response_format")


def tool_call_grammar(tools: list[tuple[str, dict[str, Any]]], param: str) -> str:
    """One `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` for one of `tools`
    ((name, parameters schema) pairs): what `tool_choice` "required" or a named tool forces."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
        }
        for name, parameters in tools
    ]
    schema = alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}
    call = _ROOT_RULE.sub("call ::= ", schema_grammar(schema, param), count=1)
    return f'root ::= "{TOOL_CALL_START}" call "{TOOL_CALL_END}"\n{call}'
