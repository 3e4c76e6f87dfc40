"""Gather of promoted blocks into the scratch (Triton): dst[slots[i]] = src[i] in dst's dtype, one program per block.
Twin: reference.scatter_blocks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scatter_kernel(dst, slots, src, SIZE: tl.constexpr, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slots + i)
    for start in tl.static_range(0, SIZE, CHUNK):
        at = start + tl.arange(0, CHUNK)
        keep = at < SIZE
        tl.store(dst + slot * SIZE + at, tl.load(src + i.to(tl.int64) * SIZE + at, mask=keep).to(dst.dtype.element_ty),
                 mask=keep)


def scatter_blocks(dst: torch.Tensor, slots: torch.Tensor, src: torch.Tensor) -> None:
    if src.dim() != dst.dim() or src.shape[1:] != dst.shape[1:] or slots.shape != src.shape[:1]:
        raise ValueError(f"scatter_blocks: src {tuple(src.shape)} into dst {tuple(dst.shape)} at slots "
                         f"{tuple(slots.shape)}")
    if not dst.is_contiguous() or len({dst.device, src.device, slots.device}) != 1:
        raise ValueError("scatter_blocks: dst must be contiguous, dst, slots and src on one device")
    src = src.contiguous()  # callers pass slices of the step's K/V (the filled tail blocks, strided)
    if slots.numel():
        size = dst[0].numel()
        _scatter_kernel[(slots.numel(),)](dst, slots.to(torch.int64), src, SIZE=size,
                                          CHUNK=min(triton.next_power_of_2(size), 4096))
