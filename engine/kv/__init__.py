"""KV caches behind one seam. A cache owns its tensors per layer and answers, for one layer of one forward pass,
`forward(layer, q, k, v, batch, scale)`: store this step's K/V and return the attention output. The dense paged
cache lives in paged.py; the tiered, certified cache (tiers.py) plugs in through the same methods."""

from __future__ import annotations

from typing import Protocol

import torch

from engine.batch import ForwardBatch


class KVCache(Protocol):
    def prepare(self, batch: ForwardBatch) -> None:
        """Called once per forward pass before any layer runs (per-step metadata goes into batch.cache_meta)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                scale: float, window: int | None = None) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] (post-RoPE) -> attention output [T, H, D]; with a sliding window each
        query attends only the last `window` positions up to its own."""

    def end_step(self, batch: ForwardBatch) -> None:
        """Called once after the forward pass (per-step bookkeeping)."""

    def release(self, request_id: str) -> None:
        """The request finished or was preempted: drop any per-sequence state (its blocks are freed elsewhere)."""

    def pop_stats(self, request_id: str) -> object | None:
        """The request's certificate aggregates (engine.kv.stats.CertificateStats), or None for a dense cache."""

    def drain_records(self) -> list:
        """Escalation records since the last call (engine.kv.stats.EscalationRecord)."""

    def corrupt_blocks(self) -> list[int]:
        """Blocks whose stored data failed a check since the last call: the prefix cache must not share them again."""

    def tier_bytes(self, blocks_used: int) -> dict[str, int]:
        """Bytes held per tier with `blocks_used` blocks allocated (for metrics)."""

    def prefetch_counts(self) -> tuple[int, int]:
        """Tier-2 pieces fetched so far that a prefetch had (hits) and had not (misses)."""
