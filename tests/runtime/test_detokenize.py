"""Streaming text with stop strings: the concatenated stream equals the final text, for stops of any length,
spanning tokens or starting inside one, and nothing past a stop string is ever sent."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optforge.runtime.detokenize import TextStream, cut_at_stop, safe_end


class PieceTokenizer:
    """Token i decodes to PIECES[i]: several characters per token, so stops can start mid-token."""

    PIECES = ["a", "b", ".", "\n", " Paris", ".\n", "ab", "ba", "b.", "\u00e9", " ", "xyz"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def simulate(tokens: list[int], stops: list[str]) -> tuple[str, str]:
    """What the engine answers in one piece, and what a stream of the same request sends: the engine ends the
    request at the first token after which a stop string appears in its text, and cuts the text there."""
    tokenizer, stream = PieceTokenizer(), TextStream(PieceTokenizer(), stops)
    sent, ids = [], []
    for token in tokens:
        ids.append(token)
        sent.append(stream.push(token))
        final_text = tokenizer.decode(ids)
        if any(s in final_text for s in stops):
            break
        assert final_text.startswith("".join(sent))  # never ahead of what is certain
    final = cut_at_stop(tokenizer.decode(ids), stops)
    sent.append(stream.finish(final))
    return final, "".join(sent)


TABLE = [
    ([4, 5], ["\n"], " Paris."),  # the stop is the tail of a token
    ([4, 2, 3], ["\n"], " Paris."),
    ([4, 5], [".\n"], " Paris"),  # a two-character stop in one token
    ([0, 1, 0, 1], ["bab"], "a"),  # a multi-token stop that starts mid-way
    ([6, 6, 7], ["bab"], "a"),  # ... and starts inside a token
    ([0, 8, 3], ["b.\n", "."], "ab"),  # the first stop to appear ends it
    ([4, 0, 1], ["Parisa."], " Parisab"),  # a long stop that is never completed: held text is sent once it cannot be one
    ([11, 11], ["zx"], "xy"),
    ([9, 9, 0], ["\u00e9a"], "\u00e9"),
    ([0, 1], [], "ab"),
]


@pytest.mark.parametrize("tokens,stops,expected", TABLE)
def test_stream_equals_final_text_table(tokens, stops, expected):
    final, streamed = simulate(tokens, stops)
    assert final == expected and streamed == expected


@settings(max_examples=400, deadline=None)
@given(tokens=st.lists(st.integers(0, len(PieceTokenizer.PIECES) - 1), min_size=1, max_size=14),
       stops=st.lists(st.text(alphabet="ab.\n Pxyz\u00e9", min_size=1, max_size=6), max_size=3))
def test_stream_equals_final_text(tokens, stops):
    final, streamed = simulate(tokens, stops)
    assert streamed == final
    assert not any(s in streamed for s in stops)


def test_safe_end_holds_back_exactly_the_possible_stop_prefix():
    assert safe_end("hello wor", ["world"]) == 6
    assert safe_end("hello wor", ["world", "or"]) == 6
    assert safe_end(" Paris.\n", ["\n"]) == 7
    assert safe_end("abc", []) == 3
    assert safe_end("xab", ["abc", "b"]) == 1  # text ends before "b"; its "a" may still begin "abc"


def test_half_a_character_is_held_back():
    class Utf8Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Utf8Bytes(), [])
    pieces = [stream.push(b) for b in "h\u00e9".encode()]
    assert pieces == ["h", "", "\u00e9"]
