"""Structured output: JSON schemas turned into llama.cpp grammars (GBNF).

The sampler then only ever picks tokens that keep the output a prefix of a document the
grammar accepts, and only allows end-of-generation once it is complete, so a response that
finished with reason "stop" always parses and validates. The schema-to-GBNF translation is
llama-cpp-python's port of llama.cpp's own converter; schemas are checked with `jsonschema`
first so a malformed one is the client's error with a readable reason.

A grammar spells out every repetition (`maxLength: N` becomes N nested optional groups, which
llama.cpp's recursive parser descends one C stack frame at a time) and every alternative, so
`SchemaLimits` bounds what a schema may ask for before any grammar text exists; the grammar
is then compiled and run only in a sandbox process (edgellm.backends.llama_cpp.grammar).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from edgellm.backends import json_schema_grammar
from edgellm.errors import ValidationError

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# The converter's string characters admit raw control characters, which strict JSON parsers
# refuse inside strings; llama.cpp's C++ converter excludes them, and so do we.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
_ROOT_RULE = re.compile(r"^root ::= ", re.MULTILINE)


@dataclass(slots=True, frozen=True)
class SchemaLimits:
    """What one schema may ask of a grammar. Each bound is far above what real schemas use."""

    depth: int = 32  # nesting of the schema document (objects and lists)
    nodes: int = 4096  # JSON values in the schema document
    repeat: int = 1000  # any one count: minLength, maxLength, minItems, maxItems, {m,n}
    repeat_total: int = 20_000  # those counts summed over the schema
    alternatives: int = 256  # enum values; anyOf / oneOf / allOf / prefixItems; properties
    pattern_chars: int = 1000  # one `pattern`
    pattern_depth: int = 16  # nested groups in one `pattern`
    grammar_bytes: int = 256 << 10  # the GBNF text made from it


LIMITS = SchemaLimits()
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_LISTS = ("enum", "anyOf", "oneOf", "allOf", "prefixItems")
_QUANTIFIER = re.compile(r"\{(\d*)(?:,(\d*))?\}")


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_ONE = (
    "items",
    "additionalProperties",
    "additionalItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)


def check_bounds(schema: Any, param: str, limits: SchemaLimits = LIMITS) -> None:
    """Refuse a schema whose grammar would be too large, deep or repetitive, naming the
    keyword's path. Iterative, so a deeply nested schema cannot exhaust the stack here."""
    total = 0
    nodes = 0
    grammar = 0  # bytes the grammar will have at least (`_grammar_bytes`)
    # (value, path, depth, whether the value sits where a subschema goes, its rule name's length)
    todo: list[tuple[Any, str, int, bool, int]] = [(schema, "", 0, True, 0)]
    while todo:
        value, path, depth, is_schema, name = todo.pop()
        nodes += 1
        if nodes > limits.nodes:
            raise _too(param, path, f"has more than {limits.nodes} values")
        if depth > limits.depth:
            raise _too(param, path, f"nests deeper than {limits.depth} levels")
        if isinstance(value, list):
            todo += [(v, f"{path}/{i}", depth + 1, False, 0) for i, v in enumerate(value)]
            continue
        if not isinstance(value, dict):
            continue
        if not is_schema:
            todo += [(v, f"{path}/{k}", depth + 1, False, 0) for k, v in value.items()]
            continue
        total += _check_keywords(value, param, path, limits)
        if total > limits.repeat_total:
            raise _too(param, path, f"its repetition counts add up to over {limits.repeat_total}")
        grammar += _grammar_bytes(value, name)
        if grammar > limits.grammar_bytes:
            raise _too(
                param,
                path,
                f"would make a grammar of over {limits.grammar_bytes} bytes (max_grammar_bytes; "
                "a grammar spells out each repetition under its rule's name, which grows with "
                "each property name on the way)",
            )
        todo += _children(value, path, depth, name)


# Bytes one repetition takes besides its item's rule name, at least (measured: a string's
# `char ` 5 bytes in all, an array item with its separator 11 plus the name).
_REPEATS = (("minLength", "maxLength", 5), ("minItems", "maxItems", 11))


def _child_name(parent: int, container: str, key: str) -> int:
    """Length of the rule name the converter gives a subschema: `container` is the keyword it
    sits under, `key` its property name or index there ("" under a one-schema keyword)."""
    if container in ("$defs", "definitions"):
        return len(key)  # named by its key alone, where a $ref uses it
    if container == "allOf":
        return parent  # members' properties are merged into the parent's rule
    steps = {"prefixItems": "tuple-" + key, "additionalProperties": "additional"}
    if container == "items":
        steps["items"] = "tuple-" + key if key else "item"
    step = steps.get(container, key or container)
    return parent + (1 if parent else 0) + len(step)


def _grammar_bytes(node: dict[str, Any], name: int) -> int:
    """A lower bound on the grammar bytes one schema object makes, from its repetitions (each
    spelled out) and its properties (each named twice, with its full rule name), so that a
    schema is refused before the converter writes megabytes (a 10,000-character property
    name with `pattern` "(ab){0,1000}" makes a 10 MB grammar in 0.06 s)."""
    cost = 0
    for low, high, each in _REPEATS:  # the item is written max(low, high) times
        count = max(_int(node.get(low)), _int(node.get(high)))
        if low == "minItems":  # a primitive's rule ("null", "string", ...) or "NAME-item"
            each += 4 if _primitive(node.get("items")) or not name else name + 5
        cost += count * each
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        literal, grouped = _pattern_repeats(pattern)
        cost += literal * 7 + grouped * (name + 6)
    properties = node.get("properties")
    if isinstance(properties, dict):
        for key in properties:
            cost += 2 * (name + 1 + len(key)) + 20
    return cost


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _primitive(items: Any) -> bool:
    """Whether the converter writes array items as a shared primitive rule (no name)."""
    return isinstance(items, dict) and set(items) <= {"type"} | _ANNOTATIONS


def _children(
    node: dict[str, Any], path: str, depth: int, name: int
) -> list[tuple[Any, str, int, bool, int]]:
    """Every value under a schema object, marked with whether it is itself a subschema, and
    with its rule name's length."""
    out: list[tuple[Any, str, int, bool, int]] = []
    for key, value in node.items():
        where = f"{path}/{key}"
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out.append(({}, where, depth + 1, False, 0))  # the map itself, counted
            out += [
                (v, f"{where}/{k}", depth + 2, True, _child_name(name, key, k))
                for k, v in value.items()
            ]
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out.append(([], where, depth + 1, False, 0))
            out += [
                (v, f"{where}/{i}", depth + 2, True, _child_name(name, key, str(i)))
                for i, v in enumerate(value)
            ]
        else:
            is_schema = key in _SCHEMA_ONE
            out.append((value, where, depth + 1, is_schema, _child_name(name, key, "")))
    return out


# Keywords that only describe; allowed beside anything.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "$id",
        "$schema",
        "$defs",
        "definitions",
        "$anchor",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
# The converter handles these by themselves and ignores whatever stands beside them.
_ALONE = ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")


def _check_combination(node: dict[str, Any], param: str, path: str) -> None:
    """Refuse keyword combinations the converter would enforce only in part, so that an
    answer that ends with "stop" always validates (oneOf is enforced as anyOf)."""
    alone = [k for k in _ALONE if k in node]
    if alone:
        allowed = _ANNOTATIONS | ({"type"} if alone[0] in ("enum", "const", "allOf") else set())
        extra = sorted(set(node) - allowed - set(alone[:1]))
        if extra:
            raise _too(param, f"{path}/{extra[0]}", f"cannot be enforced beside '{alone[0]}'")
        if alone[0] == "allOf":
            _check_all_of(node, param, path)
        if alone[0] in ("enum", "const") and _has_control_char(node[alone[0]]):
            # the converter writes control characters raw (the output is then not JSON) and
            # characters beyond U+FFFF as UTF-8 surrogates (the output is then not that text)
            raise _too(
                param,
                f"{path}/{alone[0]}",
                "has a control character (U+0000-U+001F) or one beyond U+FFFF (an emoji, say), "
                "which cannot be enforced yet",
            )
        if alone[0] in ("enum", "const") and "type" in node:
            values = node["enum"] if alone[0] == "enum" else [node["const"]]
            typed = jsonschema.Draft202012Validator({"type": node["type"]})
            if not isinstance(values, list) or not all(typed.is_valid(v) for v in values):
                raise _too(param, f"{path}/{alone[0]}", "has a value that is not of its 'type'")
    if "pattern" in node:
        for key in ("minLength", "maxLength", "format"):
            if key in node:
                raise _too(param, f"{path}/{key}", "cannot be enforced beside 'pattern'")
    if "format" in node and ("minLength" in node or "maxLength" in node):
        raise _too(param, f"{path}/format", "cannot be enforced beside minLength/maxLength")
    if "prefixItems" in node:
        for key in ("items", "minItems", "maxItems"):
            if key in node:
                raise _too(param, f"{path}/{key}", "cannot be enforced beside 'prefixItems'")
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
        both = isinstance(node.get(low), int) and isinstance(node.get(high), int)
        if both and node[low] > node[high]:
            raise _too(param, f"{path}/{low}", f"exceeds {high}: nothing can satisfy it")
    required = node.get("required")
    if isinstance(required, list):
        properties = node.get("properties")
        names: dict[str, Any] = properties if isinstance(properties, dict) else {}
        missing = [r for r in required if r not in names]
        if missing:
            raise _too(param, f"{path}/required", f"names {missing[0]!r}, which is not a property")


_CONTROL = re.compile("[\x00-\x1f\U00010000-\U0010ffff]")


def _has_control_char(value: Any) -> bool:
    """Whether any string in `value` (a JSON value, nesting already bounded) has one."""
    if isinstance(value, str):
        return bool(_CONTROL.search(value))
    if isinstance(value, list):
        return any(_has_control_char(v) for v in value)
    if isinstance(value, dict):
        return any(_has_control_char(k) or _has_control_char(v) for k, v in value.items())
    return False


def _check_all_of(node: dict[str, Any], param: str, path: str) -> None:
    """allOf is enforced as one object with every member's properties."""
    if node.get("type", "object") != "object" or not isinstance(node["allOf"], list):
        raise _too(param, f"{path}/allOf", "is enforced only over object schemas")
    for i, member in enumerate(node["allOf"]):
        keys = set(member) if isinstance(member, dict) else {"?"}
        if keys <= {"$ref"} | _ANNOTATIONS:
            continue
        if "properties" not in keys or keys - {"type", "properties", "required"} - _ANNOTATIONS:
            raise _too(param, f"{path}/allOf/{i}", "must be an object schema with properties")


def _check_keywords(node: dict[str, Any], param: str, path: str, limits: SchemaLimits) -> int:
    """Bounds of one schema object's own keywords; returns its repetition count."""
    _check_combination(node, param, path)
    total = 0
    for key in _COUNTS:
        if key in node:
            count = node[key]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise _too(param, f"{path}/{key}", "must be a non-negative integer")
            if count > limits.repeat:
                raise _too(
                    param,
                    f"{path}/{key}",
                    f"is {count}; at most {limits.repeat} (a grammar spells out each repetition)",
                )
            total += count
    for key in _LISTS:
        if isinstance(node.get(key), list) and len(node[key]) > limits.alternatives:
            raise _too(param, f"{path}/{key}", f"has over {limits.alternatives} entries")
    properties = node.get("properties")
    if isinstance(properties, dict) and len(properties) > limits.alternatives:
        raise _too(param, f"{path}/properties", f"has over {limits.alternatives} entries")
    if "$schema" in node and not isinstance(node["$schema"], str):
        raise _too(param, f"{path}/$schema", "must be a string (a metaschema URI)")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        total += _check_pattern(pattern, param, f"{path}/pattern", limits)
    return total


def _check_pattern(pattern: str, param: str, path: str, limits: SchemaLimits) -> int:
    """Length, group nesting and {m,n} counts of a regular expression."""
    if len(pattern) > limits.pattern_chars:
        raise _too(param, path, f"is over {limits.pattern_chars} characters")
    depth = deepest = total = 0
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == "{" and (match := _QUANTIFIER.match(pattern, i)):
            for digits in match.groups():
                if digits and (len(digits) > 6 or int(digits) > limits.repeat):
                    raise _too(param, path, f"repeats more than {limits.repeat} times")
                total += int(digits) if digits else 0
        i += 1
    if deepest > limits.pattern_depth:
        raise _too(param, path, f"nests groups deeper than {limits.pattern_depth}")
    return total


def _pattern_repeats(pattern: str) -> tuple[int, int]:
    """How many times a pattern's `{m,n}` write their item (max(m, n) each): those repeating
    one literal character, and those repeating a group, a class or `.`, which the converter
    writes as a rule named after the pattern's own rule."""
    literal = grouped = 0
    item = ""  # what a quantifier here repeats: a character, an escape, ")", "]" or "."
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            item = pattern[i : i + 2]
            i += 2
            continue
        if in_class:
            in_class = c != "]"
            item = c
        elif c == "[":
            in_class = True
        elif c == "{" and (match := _QUANTIFIER.match(pattern, i)):
            count = max((int(d) for d in match.groups() if d and len(d) <= 6), default=0)
            if item in (")", "]", ".") or (len(item) == 2 and item[1] in "dDwWsS"):
                grouped += count
            else:
                literal += count
            i = match.end()
            continue
        else:
            item = c
        i += 1
    return literal, grouped


def _too(param: str, path: str, why: str) -> ValidationError:
    steps = [s if len(s) <= 64 else f"{s[:16]}...({len(s)} characters)" for s in path.split("/")]
    where = f" at '{'/'.join(steps).lstrip('/')}'" if path else ""
    return ValidationError(f"{param}: the schema{where} {why}", param=param)


def check_schema(schema: Any, param: str, limits: SchemaLimits = LIMITS) -> dict[str, Any]:
    """A JSON schema the client sent, bounded, then checked against its metaschema."""
    if not isinstance(schema, dict):
        raise ValidationError(f"{param} must be a JSON schema object", param=param)
    check_bounds(schema, param, limits)
    try:
        validator = jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator
        )
        validator.check_schema(schema)
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


def schema_grammar(schema: Any, param: str, limits: SchemaLimits = LIMITS) -> str:
    """GBNF accepting exactly the JSON documents valid under `schema` (root rule `root`)."""
    check_schema(schema, param, limits)
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
    grammar = grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)
    if len(grammar) > limits.grammar_bytes:
        raise ValidationError(
            f"{param}: the grammar made from this schema is {len(grammar)} bytes; at most "
            f"{limits.grammar_bytes} (fewer properties, alternatives or repetitions)",
            param=param,
        )
    return grammar


def json_object_grammar() -> str:
    """Any JSON object: `response_format: json_object` and Ollama's `format: "json"`."""
    return schema_grammar({"type": "object"}, "response_format")


def tool_call_grammar(
    tools: list[tuple[str, dict[str, Any]]], param: str, limits: SchemaLimits = LIMITS
) -> str:
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
    call = _ROOT_RULE.sub("call ::= ", schema_grammar(schema, param, limits), count=1)
    return f'root ::= "{TOOL_CALL_START}" call "{TOOL_CALL_END}"\n{call}'
