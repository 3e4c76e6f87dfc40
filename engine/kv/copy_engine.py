"""CopyEngine: tier-2 traffic. Fetches of exact (block, KV head) pieces from the host shadows into the device, and
prefetches issued ahead of need so that the transfer overlaps compute.

CUDA: prefetches run on a dedicated copy stream from pinned memory, with an event per transfer; a fetch that finds
its piece prefetched waits on that event only (never on the device), and its transfer time is measured with CUDA
events. CPU: prefetches run on one worker thread (torch releases the GIL while copying), timed with the wall clock;
a fetch that finds its piece prefetched takes the finished copy. Every fetched piece counts as a prefetch hit or a
miss. Pieces of a block that is freed or re-quantized are dropped, so a reused block never receives stale data.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

Key = tuple[int, str, int, int]  # layer, kind ("k" or "v"), block, KV head


@dataclass(slots=True)
class TransferStats:
    fetch_bytes: int = 0
    fetch_seconds: float = 0.0
    prefetch_bytes: int = 0
    hits: int = 0
    misses: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per fetch call, for benchmarks (bounded)

    def record(self, seconds: float) -> None:
        if len(self.latencies) < 100_000:
            self.latencies.append(seconds)


@dataclass(frozen=True, slots=True)
class Fetch:
    data: torch.Tensor  # [n, bs, D] on the device
    bytes: int
    seconds: float  # transfer time of the pieces that were not prefetched (0 when all were)
    hits: int  # pieces that were prefetched


class CopyEngine:
    """limit: prefetched pieces held per layer (device memory beside the scratch); past it the oldest are dropped."""

    def __init__(self, device: torch.device, prefetch: bool = True, limit: int = 1 << 30):
        self.device = device
        self.enabled = prefetch
        self.limit = limit
        self.stats = TransferStats()
        self._pending: dict[Key, object] = {}  # Future on CPU, (tensor, event) on CUDA; oldest first
        self._held: dict[int, int] = {}  # pending pieces per layer
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certkv-prefetch") if prefetch else None

    def fetch(self, layer: int, kind: str, shadow: torch.Tensor, blocks: list[int], head: int) -> Fetch:
        """shadow [NB, bs, Hkv, D] on the host -> the pieces [len(blocks), bs, D] on the device."""
        pieces, missing = [None] * len(blocks), []
        for i, block in enumerate(blocks):
            ready = self._take((layer, kind, block, head))
            if ready is None:
                missing.append(i)
            else:
                pieces[i] = ready
        seconds, nbytes = 0.0, 0
        if missing:
            start = time.perf_counter()
            data = self._copy(shadow, [blocks[i] for i in missing], head)
            if self._cuda:
                torch.cuda.current_stream(self.device).synchronize()
            seconds = time.perf_counter() - start
            for j, i in enumerate(missing):
                pieces[i] = data[j]
        hits = len(blocks) - len(missing)
        out = torch.stack(pieces)
        nbytes = out.numel() * out.element_size()
        self.stats.fetch_bytes += nbytes
        self.stats.fetch_seconds += seconds
        self.stats.hits += hits
        self.stats.misses += len(missing)
        self.stats.record(seconds)
        return Fetch(out, nbytes, seconds, hits)

    def prefetch(self, layer: int, kind: str, shadow: torch.Tensor, blocks: list[int], head: int) -> None:
        """Starts copying pieces that a later fetch will probably ask for."""
        if not self.enabled:
            return
        for block in blocks:
            key = (layer, kind, block, head)
            if key in self._pending:
                continue
            if self._held.get(layer, 0) >= self.limit:
                self._drop(self._pop(next(k for k in self._pending if k[0] == layer)))
            self._held[layer] = self._held.get(layer, 0) + 1
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    data = shadow[block, :, head].to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                self._pending[key] = (data, event)
            else:
                self._pending[key] = self._worker.submit(lambda b=block: shadow[b, :, head].clone())
            self.stats.prefetch_bytes += shadow[block, :, head].numel() * shadow.element_size()

    def invalidate(self, layer: int, blocks: list[int]) -> None:
        """Blocks freed or re-quantized: drop their prefetched pieces."""
        if not self._pending:
            return
        stale = set(blocks)
        for key in [k for k in self._pending if k[0] == layer and k[2] in stale]:
            self._drop(self._pop(key))

    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        for item in self._pending.values():
            self._drop(item)
        self._pending.clear()
        self._held.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _pop(self, key: Key):
        item = self._pending.pop(key, None)
        if item is not None:
            self._held[key[0]] -= 1
        return item

    def _take(self, key: Key) -> torch.Tensor | None:
        item = self._pop(key)
        if item is None:
            return None
        if isinstance(item, Future):
            return item.result().to(self.device)
        data, event = item
        torch.cuda.current_stream(self.device).wait_event(event)
        return data

    def _copy(self, shadow: torch.Tensor, blocks: list[int], head: int) -> torch.Tensor:
        return shadow[torch.tensor(blocks), :, head].to(self.device, non_blocking=True)

    @staticmethod
    def _drop(item) -> None:
        if isinstance(item, Future):
            item.cancel() or item.result()  # a running copy finishes before its memory goes
