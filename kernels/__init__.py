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


def certified_decode(q, layer, view, scale: float, quantizer) -> reference.DecodeResult:
    """Certified paged decode attention: one pass over tier 1 (kernel or twin), then the certificate's terms."""
    fused = use_triton(q) and quantizer.name == "minmax"
    accumulate = _decode.decode_accumulators if fused else reference.decode_accumulators
    return finish_decode(accumulate(q, layer, view, scale, quantizer), q, layer, view, scale, quantizer)


def quantize_blocks(keys, values, quantizer) -> reference.QuantizedBlocks:
    fused = use_triton(keys) and quantizer.name == "minmax"
    return (_quantize.quantize_blocks if fused else reference.quantize_blocks)(keys.contiguous(), values.contiguous(),
                                                                               quantizer)


def scatter_blocks(dst, slots, src) -> None:
    (_scatter.scatter_blocks if use_triton(dst) else reference.scatter_blocks)(dst, slots, src)


__all__ = ["certified_decode", "decode_attention", "paged_attention", "prefill_attention", "quantize_blocks",
           "scatter_blocks"]
