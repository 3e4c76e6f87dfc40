"""The scratch: exact blocks of a layer kept on the device, promoted from tier 2 or kept when a block fills."""

from __future__ import annotations

import torch

from kernels import scatter_blocks, touch_scratch


class Scratch:
    """Exact (block, KV head) pieces of one layer kept on the device, keys and values apart.

    Each held piece has a score: the largest attention mass its block received at a recent step, decayed by DECAY at
    every step. A full scratch evicts the lowest scores, so heavy hitters (an attention sink) stay, recently filled
    blocks stay while they are attended, and the rest falls back to tier 1 and its certificate. slots[block, head]
    holds the piece's slot for keys and for values (-1: not held)."""

    DECAY = 0.9

    def __init__(self, capacity: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self.data = {kind: torch.zeros(capacity, block_size, head_dim, dtype=dtype, device=device) for kind in "kv"}
        self.norms = torch.zeros(capacity, block_size, device=device)  # float32 norms of the value pieces' tokens
        self.slots = torch.full((num_blocks, kv_heads, 2), -1, dtype=torch.int32, device=device)  # keys, values
        self.slot = {"k": self.slots[..., 0], "v": self.slots[..., 1]}
        self.score = {kind: torch.full((capacity,), -torch.inf, device=device) for kind in "kv"}  # -inf: free
        self.owner = {kind: torch.full((capacity, 2), -1, dtype=torch.int64, device=device) for kind in "kv"}

    def put(self, kind: str, blocks: torch.Tensor, heads: torch.Tensor, data: torch.Tensor, score: float = 1.0):
        """Holds exact pieces data [n, bs, D] (n <= capacity, distinct (block, head) pairs); the lowest scores make
        room. Returns the pieces' slots."""
        slot_map, scores, owner = self.slot[kind], self.score[kind], self.owner[kind]
        slots = slot_map[blocks, heads].long()
        new = slots < 0
        scores[slots[~new]] = torch.inf  # held pieces of this call are not victims
        count = int(new.sum())
        if count:
            victims = torch.topk(scores, count, largest=False).indices  # free slots (-inf) first
            evicted = owner[victims]
            held = evicted[:, 0] >= 0
            slot_map[evicted[held, 0], evicted[held, 1]] = -1
            slots[new] = victims
            slot_map[blocks[new], heads[new]] = victims.int()
            owner[victims] = torch.stack([blocks[new], heads[new]], dim=1)
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
            slots = self.slot[kind][blocks]  # [n, Hkv]
            held = slots[slots >= 0].long()
            if held.numel():
                self.score[kind][held] = -torch.inf
                self.owner[kind][held] = -1
                self.slot[kind][blocks] = -1

    def used(self) -> int:
        return sum(int((owner[:, 0] >= 0).sum()) for owner in self.owner.values())
