"""Dense paged KV cache: per layer, K and V as [num_blocks, block_size, Hkv, D] in the model's dtype. A block shared
by prefix caching needs nothing here: it is only read (the scheduler never lets a sequence write into it)."""

from __future__ import annotations

import torch

from engine.batch import ForwardBatch
from kernels import paged_attention
from kernels.reference import decode_mask


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
        batch.cache_meta = {}  # window -> the decodes' attention mask, made once a step for every layer

    def end_step(self, batch: ForwardBatch) -> None:
        pass

    def forward(self, layer, q, k, v, batch, scale, window: int | None = None):
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache.view(-1, *new.shape[1:]).index_copy_(0, batch.slot_mapping, new)
        masks = batch.cache_meta
        if batch.decode_lens and window not in masks:
            masks[window] = decode_mask(batch.decode_lens, batch.context_lens[batch.decode_seqs], window)
        return paged_attention(q, self.k[layer], self.v[layer], batch, scale, window, masks.get(window))

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
