"""Token ids -> streamed text deltas for one request: incremental detokenization plus stop strings.

Invariant: the concatenation of the deltas equals the decoded output, cut before the first stop string.
A delta never ends inside a multi-byte character (decoding that still ends in U+FFFD waits for the next
token), and text that could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output: tokenizers that drop a leading space need them
_REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        # TGI-style offsets into _ids: text of _ids[prefix:read] is already part of `text`.
        self._prefix = 0
        self._read = len(context)
        self.text = ""  # decoded output so far (cut at a stop string once one is found)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that is safe to emit now. Sets `stopped`."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # an incomplete UTF-8 sequence (or nothing printable yet): wait for more tokens
        before = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self.stop:
            # Only a stop string that ends in the new text can be new: search from just before it.
            start = max(0, before - self._longest_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        return self._take(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The request is over: emit everything not emitted yet."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
