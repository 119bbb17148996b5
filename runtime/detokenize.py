"""Output text and stop strings: where the final text ends, and what a stream may send before it knows.

Pure Python (no torch). The engine finishes a request as soon as a stop string appears anywhere in its decoded
output, and the final text is cut before the earliest one (`cut_at_stop`). A stream sends text as tokens
arrive, so it must never send a character that the final text will not have: it holds back any tail that
could still grow into a stop string (a stop may span several tokens or start in the middle of one), and text
that ends in half a UTF-8 character.
"""

from __future__ import annotations


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it where none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else text


def safe_end(text: str, stops: tuple[str, ...] | list[str]) -> int:
    """How much of `text` is final whatever comes next: up to the earliest stop string, and short of any tail
    that is a prefix of a stop string (more tokens could complete it)."""
    end = len(cut_at_stop(text, stops))
    hold = 0
    for stop in stops:
        # the longest tail of text[:end] that this stop string starts with (shorter ones lie inside it)
        k = next((k for k in range(min(len(stop) - 1, end), hold, -1) if text.endswith(stop[:k], 0, end)), 0)
        hold = max(hold, k)
    return end - hold


class TextStream:
    """Incremental detokenization of one request's output for streaming.

    `push(token)` returns the new text that is safe to send (maybe ""); `finish(final_text)` returns the rest
    of the engine's final text. Everything sent is a prefix of the final text, so the concatenated stream
    equals the text of the same request answered in one piece."""

    def __init__(self, tokenizer, stops: tuple[str, ...] | list[str]):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text sent so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a UTF-8 character: the next token completes it
            return ""
        end = safe_end(text, self.stops)
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta

    def finish(self, final_text: str) -> str:
        return final_text[self.sent :]
