"""The text of tokens as they are generated: cut at the first stop string, released in safe pieces.

A piece of text is released only once it can no longer turn out to be the start of a stop string, and
never while it ends in an incomplete UTF-8 sequence (which decodes to U+FFFD until its last byte token
arrives). `generate`'s printing, the server's streaming and harness stop strings all need exactly this.
"""

from __future__ import annotations

from collections.abc import Sequence

from mistral_lightning.tokenizer import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


class StopTextStream:
    """Decode a growing list of token ids; `add` returns the newly releasable text, `finish` the rest.

    After a stop string appears, `stopped` is True and `text` ends just before it (the stop string is
    not part of the output, as OpenAI's `stop` and `generate --stop` define it).
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self._released = 0
        self._holdback = max((len(stop) for stop in self.stops), default=1) - 1

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        stop_at = first_stop(text, self.stops)
        if stop_at is not None:
            self.text, self.stopped = text[:stop_at], True
            return ""
        self.text = text
        safe_end = len(text) - self._holdback
        if text.endswith(REPLACEMENT_CHARACTER) or safe_end <= self._released:
            return ""
        piece, self._released = text[self._released : safe_end], safe_end
        return piece

    def finish(self) -> str:
        """The text not yet released (nothing more will be added)."""
        piece, self._released = self.text[self._released :], len(self.text)
        return piece
