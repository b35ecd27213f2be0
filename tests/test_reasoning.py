"""The reasoning splitter and the tool-call scanner on hand-written streams, cut at every
position: reasoning never leaks into the answer, nor the answer into the reasoning."""

from __future__ import annotations

import pytest

from edgellm.reasoning import ReasoningFormat, ReasoningSplitter, detect_reasoning
from edgellm.tools import ToolCallScanner

FMT = ReasoningFormat()


def oracle(text: str, in_reasoning: bool) -> tuple[str, str]:
    """The expected split, computed differently: whole-string operations only."""
    if not in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith("<think>"):
            return "", stripped
        text = stripped[len("<think>") :]
    reasoning, tag, answer = text.partition("</think>")
    if not tag:
        return reasoning.strip(), ""
    return reasoning.strip(), answer.lstrip()


STREAMS = [
    ("<think>\nLet me add: 2 and 2.\n</think>\n\nThe answer is 4.", False),
    ("  <think>a < b, so </thin is not a tag</think>Yes.", False),
    ("No reasoning here, <think> is just text.</think>", False),
    ("<thi", False),
    ("<think>never closed, the budget ran out", False),
    ("<think></think>", False),
    ("", False),
    ("Reasoning opened by the template.\n</think>\n\nAnswer with </think> in it.", True),
    ("</think>Only an answer.", True),
    ("Still thinking at the end </", True),
    ("\n\n  \n", True),
    ("reasoning \n </think> \n", True),
]


def run(pieces: list[str], in_reasoning: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(FMT, in_reasoning=in_reasoning)
    reasoning, answer = "", ""
    for piece in pieces:
        r, a = splitter.push(piece)
        reasoning, answer = reasoning + r, answer + a
    r, a = splitter.flush()
    return reasoning + r, answer + a


@pytest.mark.parametrize(("text", "in_reasoning"), STREAMS)
def test_every_single_cut_gives_the_whole_text_split(text: str, in_reasoning: bool) -> None:
    expected = oracle(text, in_reasoning)
    for cut in range(len(text) + 1):
        assert run([text[:cut], text[cut:]], in_reasoning) == expected, cut


@pytest.mark.parametrize(("text", "in_reasoning"), STREAMS)
def test_every_two_cuts_and_one_character_at_a_time(text: str, in_reasoning: bool) -> None:
    expected = oracle(text, in_reasoning)
    assert run(list(text), in_reasoning) == expected
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert run([text[:i], text[i:j], text[j:]], in_reasoning) == expected, (i, j)


def test_nothing_is_released_while_a_tag_is_still_possible() -> None:
    splitter = ReasoningSplitter(FMT, in_reasoning=True)
    assert splitter.push("I think so. </th") == ("I think so.", "")
    assert splitter.push("ink>") == ("", "")
    assert splitter.push(" Yes") == ("", "Yes")
    start = ReasoningSplitter(FMT)
    assert start.push("<thi") == ("", "")
    assert start.push("nk>hm") == ("hm", "")


def test_reasoning_is_detected_from_the_template_and_can_be_forced() -> None:
    r1 = "{% if '</think>' in content %}...{% endif %}"
    assert detect_reasoning(r1) == FMT
    assert detect_reasoning("{{ messages }}") is None
    assert detect_reasoning(None, "on") == FMT
    assert detect_reasoning(r1, "off") is None


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (f"Let me check. {CALL}", "Let me check. ", 1),
        (f"{CALL}\n{CALL}", "\n", 2),
        ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", 0),
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', None, 0),
        ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', "", 1),
        ("a <tool_ca", "a <tool_ca", 0),
    ],
)
def test_tool_calls_are_found_however_the_text_is_cut(
    text: str, content: str | None, calls: int
) -> None:
    for cut in range(len(text) + 1):
        scanner = ToolCallScanner({"get_weather", "get_time"})
        out = scanner.push(text[:cut]) + scanner.push(text[cut:]) + scanner.flush()
        assert out == (text if content is None else content), cut
        assert len(scanner.calls) == calls
        assert all(c.name == "get_weather" and "city" in c.arguments for c in scanner.calls)
