"""Kernel dispatch: Triton kernels (kernels/<op>.py) for CUDA tensors, their PyTorch twins (kernels/reference.py)
elsewhere, or when Triton is not installed.

Dense paged attention, and prefill over the tiered cache (exact attention over the chunk's shadows and tails),
have no Triton kernel: their twins gather the blocks and call SDPA, which is already a fused kernel on CUDA.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.reference import decode_attention, finish_decode, paged_attention, prefill_attention

try:
    from kernels import certified_decode as _decode
    from kernels import quantize as _quantize
    from kernels import scatter as _scatter
except ImportError:  # no Triton: the twins everywhere
    _decode = _quantize = _scatter = None


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _decode is not None


def kernel_decodes(q: torch.Tensor, quantizer) -> bool:
    """Whether certified decode runs the Triton kernel here (else the twin). The kernel bounds each block's spread
    by the triangle form only: it cannot give O . P_b in its one pass (certificate.block_spread)."""
    return use_triton(q) and quantizer.triton


def decode_accumulators(q, layer, view, scale: float, quantizer) -> reference.DecodeAccumulators:
    """One pass of certified decode attention over tier 1 (the kernel reads min-max codes of 8/4 and 4/2 bits)."""
    if kernel_decodes(q, quantizer):
        return _decode.decode_accumulators(q, layer, view, scale, quantizer)
    return reference.decode_accumulators(q, layer, view, scale, quantizer)


def certified_decode(q, layer, view, scale: float, quantizer) -> reference.DecodeResult:
    """Certified paged decode attention: one pass over tier 1, then the certificate's terms."""
    return finish_decode(decode_accumulators(q, layer, view, scale, quantizer), q, layer, view, scale, quantizer)


def quantize_blocks(keys, values, quantizer) -> reference.QuantizedBlocks:
    if use_triton(keys) and quantizer.triton:
        return _quantize.quantize_blocks(keys.contiguous(), values.contiguous(), quantizer)
    return reference.quantize_blocks(keys, values, quantizer)


def scatter_blocks(dst, slots, src) -> None:
    (_scatter.scatter_blocks if use_triton(dst) else reference.scatter_blocks)(dst, slots, src)


__all__ = ["certified_decode", "decode_accumulators", "decode_attention", "paged_attention", "prefill_attention",
           "quantize_blocks", "scatter_blocks"]
