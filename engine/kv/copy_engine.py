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
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

Key = tuple[str, int, int]  # kind ("k" or "v"), block, KV head (pending pieces are kept per layer)


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
    hit: tuple[bool, ...] = ()  # per piece: it was prefetched


class CopyEngine:
    """limit: prefetched pieces held per layer (device memory beside the scratch); past it the oldest are dropped."""

    def __init__(self, device: torch.device, prefetch: bool = True, limit: int = 1 << 30):
        self.device = device
        self.enabled = prefetch
        self.limit = limit
        self.stats = TransferStats()
        # per layer, oldest first: a Future on CPU, (tensor, event) on CUDA
        self._pending: defaultdict[int, dict[Key, object]] = defaultdict(dict)
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certkv-prefetch") if prefetch else None

    def fetch(self, layer: int, kind: str, shadow: torch.Tensor, pieces: list[tuple[int, int]]) -> Fetch:
        """shadow [NB, bs, Hkv, D] on the host -> the (block, KV head) pieces [n, bs, D] on the device, the ones not
        prefetched in one transfer."""
        found, missing = [None] * len(pieces), []
        for i, (block, head) in enumerate(pieces):
            ready = self._take(self._pending[layer].pop((kind, block, head), None))
            if ready is None:
                missing.append(i)
            else:
                found[i] = ready
        seconds, nbytes = 0.0, 0
        if missing:
            data, seconds = self._timed_copy(shadow, [pieces[i] for i in missing])
            for j, i in enumerate(missing):
                found[i] = data[j]
        hits = len(pieces) - len(missing)
        out = torch.stack(found)
        nbytes = out.numel() * out.element_size()
        self.stats.fetch_bytes += nbytes
        self.stats.fetch_seconds += seconds
        self.stats.hits += hits
        self.stats.misses += len(missing)
        self.stats.record(seconds)
        absent = set(missing)
        return Fetch(out, nbytes, seconds, hits, tuple(i not in absent for i in range(len(pieces))))

    def prefetch(self, layer: int, kind: str, shadow: torch.Tensor, blocks: list[int], head: int) -> None:
        """Starts copying pieces that a later fetch will probably ask for."""
        if not self.enabled:
            return
        pending = self._pending[layer]
        for block in blocks:
            key = (kind, block, head)
            if key in pending:
                continue
            if len(pending) >= self.limit:
                self._drop(pending.pop(next(iter(pending))))
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    data = shadow[block, :, head].to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                pending[key] = (data, event)
            else:
                pending[key] = self._worker.submit(lambda b=block: shadow[b, :, head].clone())
            self.stats.prefetch_bytes += shadow[block, :, head].numel() * shadow.element_size()

    def invalidate(self, layer: int, blocks: list[int]) -> None:
        """Blocks freed or re-quantized: drop their prefetched pieces."""
        pending = self._pending.get(layer)
        if not pending:
            return
        stale = set(blocks)
        for key in [k for k in pending if k[1] in stale]:
            self._drop(pending.pop(key))

    def pending(self) -> int:
        return sum(len(pending) for pending in self._pending.values())

    def close(self) -> None:
        for pending in self._pending.values():
            for item in pending.values():
                self._drop(item)
        self._pending.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _take(self, item) -> torch.Tensor | None:
        if item is None:
            return None
        if isinstance(item, Future):
            return item.result().to(self.device)
        data, event = item
        torch.cuda.current_stream(self.device).wait_event(event)
        return data

    def _timed_copy(self, shadow: torch.Tensor, pieces: list[tuple[int, int]]) -> tuple[torch.Tensor, float]:
        """The pieces on the device and the transfer's seconds: between two CUDA events around the copy (the work
        queued before it on the stream does not count), or the wall clock on CPU."""
        if not self._cuda:
            start = time.perf_counter()
            data = self._copy(shadow, pieces)
            return data, time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        data = self._copy(shadow, pieces)
        end.record()
        end.synchronize()
        return data, start.elapsed_time(end) / 1000

    def _copy(self, shadow: torch.Tensor, pieces: list[tuple[int, int]]) -> torch.Tensor:
        """One gather on the host, one transfer: [n, bs, D]."""
        blocks, heads = (torch.tensor(x, dtype=torch.int64) for x in zip(*pieces))
        return shadow[blocks, :, heads].to(self.device, non_blocking=True)

    @staticmethod
    def _drop(item) -> None:
        if isinstance(item, Future):
            item.cancel() or item.result()  # a running copy finishes before its memory goes
