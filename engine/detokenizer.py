"""Incremental detokenization with stop strings.

Text is decoded over a sliding window of token ids (the window's earlier part gives the tokenizer its context for
spaces and merges) and released only when it does not end in an incomplete UTF-8 sequence. Stop strings are
searched in the accumulated output; the last `max(len(stop)) - 1` characters are held back until they can no longer
be the start of a stop string, so a matched stop string is never streamed. The matched string and everything after
it are dropped.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # output text so far, cut at a matched stop string
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def add(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if self.stopped:
                return
            self.ids.append(token)
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self._append(full[len(prefix) :])
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                if self.prefix_offset > 4 * _CONTEXT_TOKENS:  # keep the window, not the whole output
                    del self.ids[: self.prefix_offset - _CONTEXT_TOKENS]
                    shift = self.prefix_offset - _CONTEXT_TOKENS
                    self.prefix_offset -= shift
                    self.read_offset -= shift

    def take(self, final: bool = False) -> str:
        """Text not yet released; on the final call everything that is left (never an incomplete character)."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        chunk, self.sent = self.text[self.sent : end], end
        return chunk

    def _append(self, new: str) -> None:
        search_from = max(0, len(self.text) - self.hold)
        self.text += new
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
