"""Tokenizer work for the front end, bounded: a sound lower bound on a text's token count, so that a prompt that
cannot fit the context is refused before any tokenizer work, and a pool of tokenizer threads with its own queue limit,
so that tokenization and chat templating never run on the event loop, never pile up without bound, and one client's backlog
never stands in front of another client's job.

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
import math
import threading
from collections import Counter, deque
from collections.abc import Callable
from functools import lru_cache

from engine.errors import CapacityExceeded

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
    """`threads` tokenizer threads, each owning a copy of the tokenizer (a fast tokenizer must not be used by two
    threads at once). Jobs wait per client (the caller's peer address) and a free thread takes the job of the waiting
    client that started a job least recently, so a newcomer goes ahead of another client's backlog. At most
    `queue_limit` jobs wait or run in all, and `per_client` for one client: beyond either, run() raises
    CapacityExceeded (RESOURCE_EXHAUSTED with a retry hint). A job whose caller goes away before it starts is dropped."""

    def __init__(self, tokenizer, threads: int, queue_limit: int, per_client: int | None = None):
        self.queue_limit, self.per_client = queue_limit, per_client or queue_limit
        self.jobs: Counter[str] = Counter()  # waiting or running, per client (event-loop side)
        self._waiting: dict[str, deque] = {}  # client -> its jobs not yet started
        self._last_start: dict[str, int] = {}  # client -> when (in jobs started) it last started one
        self._started = 0
        self._wake = threading.Condition()
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._work, args=(copy.deepcopy(tokenizer),), name=f"certkv-tokenize-{i}",
                             daemon=True).start()

    async def run(self, job: Callable, *args, client: str = ""):
        """job(tokenizer, *args) on a tokenizer thread, queued as `client`'s."""
        if (total := sum(self.jobs.values())) >= self.queue_limit:
            raise CapacityExceeded(f"the tokenizer queue is full ({total} jobs; limit {self.queue_limit}, "
                                   "--tokenizer-queue)")
        if self.jobs[client] >= self.per_client:
            raise CapacityExceeded(f"this client has {self.jobs[client]} tokenizer jobs waiting or running (limit "
                                   f"{self.per_client}, --tokenizer-queue-per-peer)")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs[client] += 1
        with self._wake:
            self._waiting.setdefault(client, deque()).append((future, job, args, loop))
            self._wake.notify()
        try:
            return await future
        finally:
            self.jobs[client] -= 1
            if not self.jobs[client]:
                del self.jobs[client]

    def _work(self, tokenizer) -> None:
        while (item := self._next()) is not None:
            future, job, args, loop = item
            if future.cancelled():  # its caller went away while it waited
                continue
            try:
                outcome = (job(tokenizer, *args), None)
            except Exception as exc:
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the event loop is closed: nobody waits for the answer
                pass

    def _next(self):
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            client = min(self._waiting, key=lambda c: self._last_start.get(c, -1))
            jobs = self._waiting[client]
            item = jobs.popleft()
            if not jobs:
                del self._waiting[client]
            self._started += 1
            self._last_start[client] = self._started
            if len(self._last_start) > 4 * self.queue_limit:  # forget the clients that started longest ago
                recent = sorted(self._last_start.items(), key=lambda kv: kv[1])[-self.queue_limit:]
                self._last_start = dict(recent)
            return item

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._waiting.clear()
            self._wake.notify_all()


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if not future.cancelled():
        future.set_exception(error) if error is not None else future.set_result(result)
