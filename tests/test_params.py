"""A version's serving defaults as `edgellm models set` / `unset` take them: `KEY=VALUE`
text parsed to stored values under canonical names, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from edgellm.errors import ValidationError
from edgellm.registry.params import PARAM_NAMES, check_names, check_params, parse_assignments


def test_assignments_parse_to_stored_values() -> None:
    assert parse_assignments(
        [
            "temperature=0.6",
            "top_p=0.95",
            "top_k=40",
            "min_p=0",
            "repeat_penalty=1.1",
            "repeat_last_n=-1",
            "ctx=4096",
            "num_predict=256",
            "system=You are terse. Answer = one line.",
            "reasoning=off",
        ]
    ) == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 40,
        "min_p": 0.0,
        "repeat_penalty": 1.1,
        "repeat_last_n": -1,
        "num_ctx": 4096,
        "max_tokens": 256,
        "system": "You are terse. Answer = one line.",
        "reasoning": False,
    }
    assert parse_assignments(["stop=</s>"]) == {"stop": ["</s>"]}
    assert parse_assignments(['stop=["User:", "\\n\\n"]']) == {"stop": ["User:", "\n\n"]}
    assert parse_assignments(["reasoning=on", "max_tokens=9"]) == {
        "reasoning": True,
        "max_tokens": 9,
    }
    assert parse_assignments([]) == {}


@pytest.mark.parametrize(
    ("pairs", "param", "message"),
    [
        (["tempr=1"], "tempr", "unknown parameter 'tempr' (known: temperature, top_p"),
        (["temperature=hot"], "temperature", "temperature must be a number between 0 and 2"),
        (["temperature=2.5"], "temperature", "not '2.5'"),
        (["temperature=nan"], "temperature", "temperature must be a number"),
        (["top_p=0"], "top_p", "top_p must be a number above 0 and at most 1, not '0'"),
        (["top_k=1.5"], "top_k", "top_k must be an integer between 0 and 100000"),
        (["ctx=0"], "num_ctx", "num_ctx must be an integer between 1 and"),
        (["max_tokens=-3"], "max_tokens", "max_tokens must be an integer"),
        (["reasoning=maybe"], "reasoning", "reasoning must be on or off, not 'maybe'"),
        (["stop=[1]"], "stop", "stop must be a string or a JSON list of 1 to 16 strings"),
        (["stop=[oops"], "stop", "not '[oops'"),
        (["stop="], "stop", "stop must be"),
        (["stop=" + "x" * 300], "stop", "of 1 to 256 characters"),
        (["temperature"], "temperature", "missing '=' in 'temperature' (write KEY=VALUE)"),
        (["=0.6"], None, "missing the key in '=0.6'"),
        (["ctx=1", "num_ctx=2"], "num_ctx", "num_ctx is given twice (as ctx and num_ctx)"),
        (["top_k=1", "top_k=2"], "top_k", "top_k is given twice"),
    ],
)
def test_bad_assignments_are_one_line_naming_the_key(
    pairs: list[str], param: str | None, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_assignments(pairs)
    assert message in caught.value.message
    assert "\n" not in caught.value.message
    assert caught.value.param == param


def test_names_for_unset_and_typed_values() -> None:
    assert check_names(["ctx", "temperature", "num_ctx", "num_predict"]) == [
        "num_ctx",
        "temperature",
        "max_tokens",
    ]
    with pytest.raises(ValidationError, match="unknown parameter 'seed'"):
        check_names(["seed"])
    # typed values, as an Ollama manifest's params hold them
    assert check_params({"num_predict": 5, "temperature": 1, "stop": ["a"]}) == {
        "temperature": 1.0,
        "stop": ["a"],
        "max_tokens": 5,
    }
    with pytest.raises(ValidationError, match="top_k must be an integer"):
        check_params({"top_k": "many"})
    assert set(PARAM_NAMES) >= {"temperature", "system", "reasoning", "num_ctx", "max_tokens"}
