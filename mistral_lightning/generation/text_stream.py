"""The text of tokens as they are generated: cut at the first stop string, released in safe pieces.

A piece of text is released only once it can no longer turn out to be the start of a stop string, and
never while it ends in an incomplete UTF-8 sequence (which decodes to U+FFFD until its last byte token
arrives). `generate`'s printing, the server's streaming and harness stop strings all need exactly this.

Each token costs a constant amount of work, however long the text: the new text is the decoding of the
last few tokens minus the decoding of the ones before them (a decoding depends on where it starts, e.g. a
leading space is dropped, so both start at the same token), and stop strings are looked for only in the
text not released yet.
"""

from __future__ import annotations

from collections.abc import Sequence

from mistral_lightning.tokenizer import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"
# Tokens a window grows to over tokens without text (control tokens) before it restarts anyway; a word
# right after such a run may then lose its leading space.
MAX_WINDOW = 32


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
        self.stopped = False
        self._released: list[str] = []  # the text given out so far, in pieces
        self._held = ""  # decoded text not given out yet: it may be the start of a stop string
        self._holdback = max((len(stop) for stop in self.stops), default=1) - 1
        # tokens[_window_start:_decoded_end] were decoded last as `_window_text`; tokens from _decoded_end on
        # are not decoded into the text yet (they end in an incomplete character).
        self._window_start = 0
        self._decoded_end = 0
        self._window_text = ""

    @property
    def text(self) -> str:
        """The text so far (after a stop string: the text before it)."""
        return "".join(self._released) + self._held

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        window_text = self.tokenizer.decode(self.tokens[self._window_start :])
        if window_text.endswith(REPLACEMENT_CHARACTER):
            return ""  # wait for the rest of the character
        self._take(window_text)
        safe_end = len(self._held) - self._holdback
        if self.stopped or safe_end <= 0:
            return ""
        piece, self._held = self._held[:safe_end], self._held[safe_end:]
        self._released.append(piece)
        return piece

    def finish(self) -> str:
        """The text not yet released (nothing more will be added)."""
        if not self.stopped and self._decoded_end < len(self.tokens):
            self._take(self.tokenizer.decode(self.tokens[self._window_start :]))
        piece, self._held = self._held, ""
        self._released.append(piece)
        return piece

    def _take(self, window_text: str) -> None:
        """Add the decoding of tokens[_window_start:] to the held text, cut at a stop string."""
        new_text = window_text[len(self._window_text) :]
        new_tokens_text = self.tokenizer.decode(self.tokens[self._decoded_end :])
        if new_tokens_text or len(self.tokens) - self._window_start > MAX_WINDOW:
            # The next window starts at this one's new tokens. Their text is not empty, so what a decoding
            # does at the start of a text (drop a leading space) happens within them, as in the whole text.
            self._window_start, self._window_text = self._decoded_end, new_tokens_text
        else:  # control tokens, a lone space: the window keeps its start
            self._window_text = window_text
        self._decoded_end = len(self.tokens)
        # No stop string starts in the released text (it is released only once none can), and the held
        # text is at most the longest stop string plus the new text: a constant to search.
        self._held += new_text
        stop_at = first_stop(self._held, self.stops)
        if stop_at is not None:
            self._held, self.stopped = self._held[:stop_at], True
