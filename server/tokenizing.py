"""Tokenizer work for the front end, bounded: a sound lower bound on a text's token count, so that a prompt that
cannot fit the context is refused before any tokenizer work, and a pool of tokenizer threads with its own queue limit,
so that tokenization and chat templating never run on the event loop and never pile up without bound.

The bound. A tokenizer of the BPE family covers the (normalized) text with tokens, each spanning at most the bytes
of its own vocabulary entry. Sort bytes into classes (whitespace, ASCII letters and digits, other ASCII, bytes of
non-ASCII characters): for any set S of classes, the text's bytes in S are covered by tokens holding at most
L_S of them each, so the text needs at least (its bytes in S) / L_S tokens. The bound is the largest of these over a
few sets (all bytes, all but whitespace, word bytes, ...): long entries are runs of spaces or of one punctuation
mark, entries with words in them are short (25 word bytes at most in SmolLM2's vocabulary, against 81 bytes in
all), so ordinary text gets a bound near a quarter of its word bytes. Added and special tokens are entries too;
a Metaspace "▁" counts as the three bytes it is. The bound holds only where no step deletes text: it is used for
fast tokenizers whose model is BPE (no fused unknown token; byte fallback or an unknown token unless byte-level)
and whose pre-tokenizers keep every byte (ByteLevel, Metaspace, Split, Digits, Punctuation, not "Removed"); bytes
that a byte-level vocabulary has no token for (BPE drops them silently) are not counted, and a normalizer, if any,
is applied first. Elsewhere the bound is 0.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from engine.errors import CapacityExceeded

log = logging.getLogger(__name__)

_WHITESPACE = b" \t\n\r\x0b\x0c"
_ALNUM = bytes(b for b in range(128) if chr(b).isalnum())
_HIGH = bytes(range(128, 256))
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "Sequence"})
# Sets of byte classes the bound divides by; classes: 0 whitespace, 1 ASCII letters and digits, 2 other ASCII, 3 high
_SETS = ((0, 1, 2, 3), (1, 2, 3), (1, 3), (1,), (3,), (2,))


def _classes(data: bytes) -> tuple[int, int, int, int]:
    """(whitespace, letters and digits, other ASCII, non-ASCII) byte counts; one C-speed pass each."""
    space = len(data) - len(data.translate(None, _WHITESPACE))
    alnum = len(data) - len(data.translate(None, _ALNUM))
    high = len(data) - len(data.translate(None, _HIGH))
    return space, alnum, len(data) - space - alnum - high, high


class TokenCountBound:
    """tokens_at_least(text): a lower bound on len(tokenizer(text)["input_ids"]) that costs a few passes over the
    text's bytes (no tokenization)."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else None
        self.sound = spec is not None and _keeps_every_byte(spec)
        self.normalizer = backend.normalizer if self.sound else None
        byte_level = self.sound and _mentions(spec, "ByteLevel")
        vocab = tokenizer.get_vocab()
        if not byte_level and self.sound:  # a character with no token and no byte fallback is dropped or <unk>
            model = spec["model"]
            self.sound = bool(model.get("byte_fallback") or model.get("unk_token"))
        # Byte-level BPE silently drops a byte that has no token of its own: such bytes are not counted.
        self.dropped = bytes(b for c, b in _byte_level_alphabet().items() if c not in vocab) if byte_level else b""
        entries = [*vocab, *(t.content for t in tokenizer.added_tokens_decoder.values())]
        counts = [_classes(_span_bytes(entry, byte_level)) for entry in entries] if self.sound else []
        self.most = [max((sum(c[i] for i in group) for c in counts), default=0) for group in _SETS]

    @property
    def cheap(self) -> bool:
        """No normalizer: the bound takes a few milliseconds per MiB and may run on the event loop."""
        return self.normalizer is None

    def tokens_at_least(self, text: str) -> int:
        if not self.sound:
            return 0
        if self.normalizer is not None:
            text = self.normalizer.normalize_str(text)
        counts = _classes(text.encode("utf-8", "surrogatepass").translate(None, self.dropped))
        return max((math.ceil(sum(counts[i] for i in group) / most) for group, most in zip(_SETS, self.most) if most),
                   default=0)


def _keeps_every_byte(spec: dict) -> bool:
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return False
    return _keeping(spec.get("pre_tokenizer"))


def _keeping(node) -> bool:
    if node is None:
        return True
    if node.get("type") not in _KEEPING_PRE_TOKENIZERS or node.get("behavior") == "Removed":
        return False
    return all(_keeping(child) for child in node.get("pretokenizers", ()))


def _mentions(spec: dict, kind: str) -> bool:
    return any(json.dumps(spec.get(part)).count(f'"type": "{kind}"') for part in ("pre_tokenizer", "decoder"))


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character map (the inverse: character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _span_bytes(entry: str, byte_level: bool) -> bytes:
    """The most text bytes one vocabulary entry can cover (an upper bound: byte fallback and marks count fully)."""
    if not byte_level:
        return entry.encode("utf-8", "surrogatepass")
    alphabet = _byte_level_alphabet()
    return b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8", "surrogatepass") for c in entry)


class TokenizerPool:
    """`threads` tokenizer threads, each with its own copy of the tokenizer (a fast tokenizer must not be used by two
    threads at once), and at most `queue_limit` jobs waiting or running: beyond it, run() raises CapacityExceeded
    (RESOURCE_EXHAUSTED with a retry hint). A job whose caller goes away before it starts is dropped."""

    def __init__(self, tokenizer, threads: int, queue_limit: int):
        self.queue_limit = queue_limit
        self.jobs = 0  # waiting or running (event-loop side)
        self._copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            self._copies.put(copy.deepcopy(tokenizer))
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="certkv-tokenize")

    async def run(self, job: Callable, *args):
        """job(tokenizer, *args) on a tokenizer thread."""
        if self.jobs >= self.queue_limit:
            raise CapacityExceeded(f"the tokenizer queue is full ({self.jobs} jobs; limit {self.queue_limit}, "
                                   "--tokenizer-queue)")
        self.jobs += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(self._call, job, args))
        finally:
            self.jobs -= 1

    def _call(self, job: Callable, args: tuple):
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = self._copies.get_nowait()
        return job(tokenizer, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
