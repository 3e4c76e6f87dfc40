"""Dense paged KV cache: per layer, K and V as [num_blocks, block_size, Hkv, D] in the model's dtype. A block shared
by prefix caching needs nothing here: it is only read (the scheduler never lets a sequence write into it)."""

from __future__ import annotations

import torch

from engine.batch import ForwardBatch
from kernels import paged_attention


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def prepare(self, batch: ForwardBatch) -> None:
        pass

    def end_step(self, batch: ForwardBatch) -> None:
        pass

    def forward(self, layer, q, k, v, batch, scale, window: int | None = None):
        k_flat = self.k[layer].view(-1, *k.shape[1:])
        v_flat = self.v[layer].view(-1, *v.shape[1:])
        k_flat.index_copy_(0, batch.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, batch.slot_mapping, v.to(v_flat.dtype))
        return paged_attention(q, self.k[layer], self.v[layer], batch, scale, window)

    def release(self, request_id: str) -> None:
        pass

    def pop_stats(self, request_id: str) -> None:
        return None

    def drain_records(self) -> list:
        return []

    def corrupt_blocks(self) -> list[int]:
        return []

    def prefetch_counts(self) -> tuple[int, int]:
        return 0, 0

    def tier_bytes(self, blocks_used: int) -> dict[str, int]:
        per_block = self.k[0][0].numel() * self.k[0].element_size() * 2 * len(self.k)
        return {"dense": blocks_used * per_block}
