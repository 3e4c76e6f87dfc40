"""CopyEngine: tier-2 traffic. Fetches of exact (block, KV head) pieces from the host shadows into the device, and
prefetches issued ahead of need so that the transfer overlaps compute.

Pieces move in batches: one host gather and one transfer for all the pieces of a fetch, or of a layer's prefetches
of one kind. CUDA: the gathered pieces are staged in pinned memory and copied without blocking the host; prefetches
run on a dedicated copy stream with an event per transfer, and a fetch that finds its piece prefetched waits on that
event only (never on the device); fetch times are measured with CUDA events. CPU: prefetches run on one worker
thread (torch releases the GIL while copying), timed with the wall clock; a fetch that finds its piece prefetched
takes the finished copy. Every fetched piece counts as a prefetch hit or a
miss. Pieces of a block that is freed or re-quantized are dropped, so a reused block never receives stale data.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

Key = tuple[str, int, int]  # kind ("k" or "v"), block, KV head (pending pieces are kept per layer)
# a pending piece: its batch's transfer (a Future on CPU, (tensor, event) on CUDA) and its row in the batch
Pending = tuple[object, int]


@dataclass(slots=True)
class TransferStats:
    fetch_bytes: int = 0
    fetch_seconds: float = 0.0
    prefetch_bytes: int = 0
    transfers: int = 0  # host-to-device transfers: one per fetch that missed, one per batch of prefetches
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
        self._pending: defaultdict[int, dict[Key, Pending]] = defaultdict(dict)  # per layer, oldest first
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
            self.stats.transfers += 1
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

    def prefetch(self, layer: int, kind: str, shadow: torch.Tensor, pieces: list[tuple[int, int]]) -> None:
        """Starts copying (block, KV head) pieces that a later fetch will probably ask for: one transfer for those
        not already pending."""
        if not self.enabled:
            return
        pending = self._pending[layer]
        wanted = list(dict.fromkeys(p for p in pieces if (kind, *p) not in pending))[-self.limit:]
        if not wanted:
            return
        while len(pending) + len(wanted) > self.limit:  # a dropped piece's batch still lands: nothing waits for it
            del pending[next(iter(pending))]
        if self._cuda:
            with torch.cuda.stream(self._stream):
                data = self._copy(shadow, wanted)
                event = torch.cuda.Event()
                event.record(self._stream)
            batch = (data, event)
        else:
            batch = self._worker.submit(self._copy, shadow, wanted)
        for row, (block, head) in enumerate(wanted):
            pending[(kind, block, head)] = (batch, row)
        self.stats.transfers += 1
        self.stats.prefetch_bytes += len(wanted) * shadow[0, :, 0].numel() * shadow.element_size()

    def invalidate(self, layer: int, blocks: list[int]) -> None:
        """Blocks freed or re-quantized: drop their prefetched pieces."""
        pending = self._pending.get(layer)
        if not pending:
            return
        stale = set(blocks)
        for key in [k for k in pending if k[1] in stale]:
            del pending[key]

    def pending(self) -> int:
        return sum(len(pending) for pending in self._pending.values())

    def close(self) -> None:
        self._pending.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _take(self, item: Pending | None) -> torch.Tensor | None:
        if item is None:
            return None
        batch, row = item
        if isinstance(batch, Future):
            return batch.result()[row].to(self.device)
        data, event = batch
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        data.record_stream(stream)  # allocated on the copy stream, read on this one
        return data[row]

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
        """One gather on the host, one transfer: [n, bs, D]. On CUDA the gather lands in pinned memory (PyTorch's
        caching host allocator keeps it until the copy is done), so the transfer does not block the host."""
        blocks, heads = (torch.tensor(x, dtype=torch.int64) for x in zip(*pieces))
        gathered = shadow[blocks, :, heads]
        return gathered.pin_memory().to(self.device, non_blocking=True) if self._cuda else gathered

