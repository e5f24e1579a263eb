"""Incremental detokenization and stop-sequence matching for one request.

Text is released only once it is final: a token that ends inside a multi-byte character
decodes to U+FFFD and waits for the next one, and text that could still grow into a stop
sequence is held back, so a streaming client never receives text that is later taken away.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self._prefix_offset = 0  # ids before this are decoded into self._text for good
        self._read_offset = 0
        self._text = ""  # all final text decoded so far
        self._released = 0  # characters of _text already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly releasable text ('' if none yet)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        if self.stop:
            self._check_stop()
        return self._release()

    def _check_stop(self) -> None:
        # Search only where a new match can start: the tail that could overlap the new text.
        window = max(len(s) for s in self.stop)
        start = max(0, self._released - window)
        hits = [i for i in (self._text.find(s, start) for s in self.stop) if i != -1]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        """Characters at the end of the text that are a proper prefix of some stop sequence."""
        if self.stopped or not self.stop:
            return 0
        longest = 0
        last = self._text[-1:]
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text)), longest, -1):
                # s[k - 1] == last rules out almost every k without building s[:k]
                if s[k - 1] == last and self._text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _release(self) -> str:
        end = len(self._text) - self._holdback()
        if end <= self._released:
            return ""
        out = self._text[self._released : end]
        self._released = end
        return out

    def flush(self) -> str:
        """At the end of generation: release whatever is left (held-back stop prefixes too)."""
        out = self._text[self._released :]
        self._released = len(self._text)
        return out
