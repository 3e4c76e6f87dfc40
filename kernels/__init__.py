"""Kernel dispatch, one predicate per op: Triton kernels (kernels/<op>.py) for CUDA tensors, the compiled CPU path
(kernels/cpu.py, numba) for CPU tensors it supports, their PyTorch twins (kernels/reference.py) elsewhere, or when
Triton or numba is not installed. The twins are the definition; tests compare every path with them.

Dense paged attention, and prefill over the tiered cache (exact attention over the chunk's shadows and tails),
have no kernel of their own: their twins gather the blocks and call SDPA, which is already a fused kernel.
"""

from __future__ import annotations

import torch

from kernels import cpu, reference
from kernels.reference import decode_attention, finish_decode, paged_attention, prefill_attention

try:
    from kernels import certified_decode as _decode
    from kernels import certified_finish as _finish
    from kernels import quantize as _quantize
    from kernels import scatter as _scatter
except ImportError:  # no Triton: the twins everywhere
    _decode = _finish = _quantize = _scatter = None


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _decode is not None


def decode_path(q: torch.Tensor, quantizer) -> str:
    """Which certified decode runs for this query: "triton", "cpu" (compiled) or "twin"."""
    if use_triton(q) and quantizer.triton and q.shape[-1] <= _decode.MAX_HEAD_DIM:
        return "triton"
    return "cpu" if cpu.runs(q, quantizer) else "twin"


def kernel_decodes(q: torch.Tensor, quantizer) -> bool:
    """Whether certified decode runs the Triton kernel here. The kernel bounds each block's spread by the triangle
    form only: it cannot give O . P_b in its one pass (certificate.block_spread)."""
    return decode_path(q, quantizer) == "triton"


def decode_accumulators(q, layer, view, scale: float, quantizer) -> reference.DecodeAccumulators:
    """One pass of certified decode attention over tier 1 (the kernel reads min-max codes of 8/4 and 4/2 bits)."""
    if kernel_decodes(q, quantizer):
        return _decode.decode_accumulators(q, layer, view, scale, quantizer)
    return reference.decode_accumulators(q, layer, view, scale, quantizer)


def certified_decode(q, layer, view, scale: float, quantizer, radius=None, tolerance=None) -> reference.DecodeResult:
    """Certified paged decode attention: one pass over tier 1, then the certificate's terms. Given the layer's
    radius [S, Hkv] and the rows' tolerances [Bd], the compiled CPU path also returns the bound and the limit
    (DecodeResult.bound, .limit) and the largest block masses for the scratch (DecodeResult.mass)."""
    if radius is not None and decode_path(q, quantizer) == "cpu":
        return cpu.certified_decode(q, layer, view, scale, quantizer, radius, tolerance)
    return finish_decode(decode_accumulators(q, layer, view, scale, quantizer), q, layer, view, scale, quantizer)


def certify_layer(q, layer, view, scale: float, quantizer, radius, tolerance, certifying=None, margin: float = 1.0):
    """The Triton path's certified decode of a layer with the certificate's finish on the device (the bound, the
    limit, the flags: certified_finish.Finished). Only where decode_path says "triton"."""
    return _finish.decode_layer(q, layer, view, scale, quantizer, radius, tolerance, certifying, margin)


def quantize_blocks(keys, values, quantizer) -> reference.QuantizedBlocks:
    if use_triton(keys) and quantizer.triton:
        return _quantize.quantize_blocks(keys.contiguous(), values.contiguous(), quantizer)
    return reference.quantize_blocks(keys, values, quantizer)


def scatter_blocks(dst, slots, src) -> None:
    (_scatter.scatter_blocks if use_triton(dst) else reference.scatter_blocks)(dst, slots, src)


def touch_scratch(score_k, score_v, slots, tables, num_full, mass, decay: float) -> None:
    (cpu.touch_scratch if cpu.available() and score_k.device.type == "cpu" else reference.touch_scratch)(
        score_k, score_v, slots, tables, num_full, mass, decay)


__all__ = ["certified_decode", "certify_layer", "decode_accumulators", "decode_attention", "decode_path",
           "paged_attention", "prefill_attention", "quantize_blocks", "scatter_blocks", "touch_scratch"]
