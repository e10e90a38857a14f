"""Incremental detokenization with stop strings, one `TextStream` per request.

Tokens arrive one by one; `push` returns the new text that is safe to show: complete characters
(a byte-level BPE may split a character over tokens), and never any part of a stop string (text
that could still become a stop string is held back until it cannot). Knows a tokenizer's
`decode`, nothing about models, batches or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_TOKENS = 5  # prompt tokens decoded along, so the first token's leading space survives


@dataclass
class Piece:
    text: str
    stopped: bool = False


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStream:
    def __init__(self, tokenizer, prompt_ids: tuple[int, ...], stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all decoded generated text
        self.emitted = 0  # characters of `text` already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def push(self, token_id: int) -> Piece:
        """Text to emit after `token_id`; `stopped` when a stop string ended the generation."""
        self.text += self._new_text(token_id)
        if self.stops:
            start = max(0, self.emitted - max(len(s) for s in self.stops))
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                end = min(hits)
                piece = self.text[self.emitted : end] if end > self.emitted else ""
                self.emitted = max(self.emitted, end)
                return Piece(piece, stopped=True)
        safe = len(self.text) - held_back(self.text, self.stops)
        piece = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return Piece(piece)

    def flush(self) -> str:
        """At the end (length / EOS): the held-back text, which can no longer become a stop."""
        if self.read_offset < len(self.ids):  # trailing tokens that never made a whole character
            before = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(before) :]
            self.read_offset = len(self.ids)
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece
