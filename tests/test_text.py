"""TextStream: UTF-8 reassembly and stop-string hold-back, on hand-made byte streams."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgellm.engine.text import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        text, hit = stream.push(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(stream.flush())
    return out, False


def test_multibyte_character_split_across_tokens() -> None:
    data = "héllo ✓".encode()
    out, _ = feed(TextStream(()), [data[i : i + 1] for i in range(len(data))])
    assert "".join(out) == "héllo ✓"
    assert all("\ufffd" not in part for part in out)


def test_partial_stop_is_held_then_released() -> None:
    stream = TextStream(("</s>",))
    assert stream.push(b"a<") == ("a", False)
    assert stream.push(b"/") == ("", False)
    assert stream.push(b"x") == ("</x", False)


def test_stop_cuts_text_and_reports() -> None:
    out, hit = feed(TextStream(("STOP", "END")), [b"one ", b"two S", b"TO", b"P three"])
    assert hit and "".join(out) == "one two "


@given(
    st.text(min_size=0, max_size=40),
    st.lists(st.integers(1, 5), max_size=20),
    st.sampled_from(["ab", "\n\n", "xyz", "é!"]),
)
def test_no_partial_stop_ever_released(text: str, cuts: list[int], stop: str) -> None:
    data = text.encode()
    pieces, i = [], 0
    for c in cuts:
        pieces.append(data[i : i + c])
        i += c
    pieces.append(data[i:])
    out, hit = feed(TextStream((stop,)), pieces)
    shown = "".join(out)
    assert stop not in shown
    expected = text.split(stop)[0] if stop in text else text
    assert shown == expected
    assert hit == (stop in text)
