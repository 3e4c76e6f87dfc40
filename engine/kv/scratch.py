"""The scratch: exact blocks of a layer kept on the device, promoted from tier 2 or kept when a block fills."""

from __future__ import annotations

import torch

from kernels import scatter_blocks, touch_scratch


class Scratch:
    """Exact (block, KV head) pieces of one layer kept on the device, keys and values apart.

    Each held piece has a score: the largest attention mass its block received at a recent step, decayed by DECAY at
    every step. A full scratch evicts the lowest scores, so heavy hitters (an attention sink) stay, recently filled
    blocks stay while they are attended, and the rest falls back to tier 1 and its certificate. slots[block, head]
    holds the piece's slot for keys and for values (-1: not held).

    No method reads device data on the host (a sync on CUDA): updates that concern no piece are sent to one spare
    entry past the end of each table (slot `capacity`, block row `num_blocks`) instead of being masked out."""

    DECAY = 0.9

    def __init__(self, capacity: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self.data = {kind: torch.zeros(capacity, block_size, head_dim, dtype=dtype, device=device) for kind in "kv"}
        self.norms = torch.zeros(capacity, block_size, device=device)  # float32 norms of the value pieces' tokens
        self._slots = torch.full((num_blocks + 1, kv_heads, 2), -1, dtype=torch.int32, device=device)
        self.slots = self._slots[:num_blocks]  # [NB, Hkv, 2]: keys, values
        self.slot = {"k": self._slots[..., 0], "v": self._slots[..., 1]}
        # -inf: free; the spare last entry is never chosen (topk reads the first `capacity`)
        self.score = {kind: torch.full((capacity + 1,), -torch.inf, device=device) for kind in "kv"}
        self.owner = {kind: torch.full((capacity + 1, 2), -1, dtype=torch.int64, device=device) for kind in "kv"}

    def put(self, kind: str, blocks: torch.Tensor, heads: torch.Tensor, data: torch.Tensor, score: float = 1.0):
        """Holds exact pieces data [n, bs, D] (n <= capacity, distinct (block, head) pairs); the lowest scores make
        room. Returns the pieces' slots [n]."""
        slot_map, scores, owner, spare = self.slot[kind], self.score[kind], self.owner[kind], self.capacity
        slots = slot_map[blocks, heads].long()
        new = slots < 0
        scores.index_put_((torch.where(new, spare, slots),), torch.tensor(torch.inf, device=scores.device))
        victims = torch.topk(scores[:spare], len(blocks), largest=False).indices  # free slots (-inf) first
        chosen = victims[(new.cumsum(0) - 1).clamp(min=0)]  # the k-th new piece takes the k-th victim
        used = torch.where(new, chosen, spare)
        evicted = owner[used]  # previous owners ((-1, -1): none, which is the spare row and head)
        slot_map.index_put_((evicted[:, 0], evicted[:, 1]), torch.tensor(-1, dtype=torch.int32, device=owner.device))
        slots = torch.where(new, chosen, slots)
        slot_map[blocks, heads] = slots.int()
        owner.index_put_((used,), torch.where(new[:, None], torch.stack([blocks, heads], dim=1), -1))
        scatter_blocks(self.data[kind], slots, data)
        if kind == "v":
            self.norms[slots] = self.data["v"][slots].float().norm(dim=-1)
        scores[slots] = score
        return slots

    def touch(self, tables: torch.Tensor, num_full: torch.Tensor, mass: torch.Tensor) -> None:
        """One decode step of attention: decay every score, raise the held pieces of `tables` [Bd, nb] (the first
        num_full of each row) to their block's mass [Bd, nb, Hkv] (max over the group's query heads)."""
        touch_scratch(self.score["k"], self.score["v"], self.slots, tables, num_full, mass, self.DECAY)

    def invalidate(self, blocks: torch.Tensor) -> None:
        """Blocks freed or re-quantized for a new owner: their pieces are stale."""
        for kind in "kv":
            held = self.slot[kind][blocks]  # [n, Hkv]
            index = torch.where(held >= 0, held, self.capacity).long().flatten()
            self.score[kind].index_put_((index,), torch.tensor(-torch.inf, device=index.device))
            self.owner[kind].index_put_((index,), torch.tensor(-1, device=index.device))
            self.slot[kind][blocks] = -1

    def used(self) -> int:
        return sum(int((owner[:self.capacity, 0] >= 0).sum()) for owner in self.owner.values())
