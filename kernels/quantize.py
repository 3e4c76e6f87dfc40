"""Quantize-on-write (Triton): one program per (block, KV head) of whole 16-token blocks.

k^_jc = code_jc scale_c + zero_c with min-max codes per channel over the block's tokens; v^_jc the same per token and
16-channel group; eps_b = max_j ||k_j - k^_j||, kappa_b = max_jc |k_jc - k^_jc| / step_c, eta_j = ||v_j - v^_j||
and ||v^_j||, all measured against the stored float16 metadata and rounded up. Twin: reference.quantize_blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.formats import META_DTYPE, VALUE_GROUP, Codes
from kernels.reference import QuantizedBlocks


@triton.jit
def _round_up(x, GROWTH: tl.constexpr):
    """x (>= 0, float32) -> the next float32 above x * GROWTH (covers the rounding of the norm's own sum)."""
    y = x * GROWTH
    bumped = (y.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    return tl.where(y < float("inf"), bumped, y)


@triton.jit
def _round_up_half(y):
    """float32 y >= 0 -> the smallest float16 >= y."""
    h = y.to(tl.float16)
    bumped = (h.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    return tl.where(h.to(tl.float32) < y, bumped, h)


@triton.jit
def _code(x, scale, zero, LEVELS: tl.constexpr):
    """Round-to-nearest min-max code of x on the grid zero + code * scale (float32, clamped to [0, LEVELS])."""
    code = tl.floor((x - zero) / tl.maximum(scale, 1.1754943508222875e-38) + 0.5)
    return tl.minimum(tl.maximum(code, 0.0), LEVELS)


@triton.jit
def _non_finite(x, axis: tl.constexpr):
    return tl.sum(((tl.abs(x) >= float("inf")) | (x != x)).to(tl.int32), axis=axis)


@triton.jit
def _quantize_kernel(k_ptr, v_ptr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, block_notes, token_notes,
                     BS: tl.constexpr, D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                     GROUP: tl.constexpr):
    pid = tl.program_id(0)  # (block, KV head) pairs, flattened: every tensor is [N * Hkv, ...] contiguous
    t = tl.arange(0, BS)
    growth: tl.constexpr = 1 + 2**-20
    # keys: channel c * KPB + i sits in byte c at bit i * K_BITS
    KPB: tl.constexpr = 8 // K_BITS
    KW: tl.constexpr = D // KPB
    K_LEVELS: tl.constexpr = (1 << K_BITS) - 1
    c = tl.arange(0, KW)
    packed = tl.zeros([BS, KW], dtype=tl.int32)
    err_sq = tl.zeros([BS], dtype=tl.float32)
    kappa = tl.zeros([KW], dtype=tl.float32)
    bad = tl.zeros([KW], dtype=tl.int32)
    for i in tl.static_range(KPB):
        channel = c * KPB + i
        k = tl.load(k_ptr + pid * BS * D + t[:, None] * D + channel[None, :]).to(tl.float32)
        bad += _non_finite(k, 0)
        scale16 = ((tl.max(k, axis=0) - tl.min(k, axis=0)) / K_LEVELS).to(tl.float16)
        zero16 = tl.min(k, axis=0).to(tl.float16)
        tl.store(k_scale + pid * D + channel, scale16)
        tl.store(k_zero + pid * D + channel, zero16)
        scale, zero = scale16.to(tl.float32), zero16.to(tl.float32)
        code = _code(k, scale[None, :], zero[None, :], K_LEVELS)
        err = k - (code * scale[None, :] + zero[None, :])
        err_sq += tl.sum(err * err, axis=1)
        step = tl.abs(zero) * 2**-10 + scale + 2**-24
        kappa = tl.maximum(kappa, tl.max(tl.abs(err), axis=0) / step)
        packed = packed | (code.to(tl.int32) << (i * K_BITS))
    tl.store(k_codes + pid * BS * KW + t[:, None] * KW + c[None, :], packed.to(tl.uint8))
    eps = tl.where(tl.sum(bad, axis=0) > 0, float("inf"), _round_up(tl.sqrt(tl.max(err_sq, axis=0)), growth))
    tl.store(block_notes + pid * 2, eps)
    tl.store(block_notes + pid * 2 + 1, _round_up(tl.max(kappa, axis=0), growth))

    # values: per token and group of GROUP channels; channel c * VPB + i is in group c // (GROUP // VPB)
    VPB: tl.constexpr = 8 // V_BITS
    VW: tl.constexpr = D // VPB
    GROUPS: tl.constexpr = D // GROUP
    PER: tl.constexpr = GROUP // VPB
    V_LEVELS: tl.constexpr = (1 << V_BITS) - 1
    w = tl.arange(0, VW)
    rows = pid * BS * D + t[:, None] * D
    lo = tl.full([BS, GROUPS], float("inf"), tl.float32)
    hi = tl.full([BS, GROUPS], -float("inf"), tl.float32)
    for i in tl.static_range(VPB):
        v = tl.reshape(tl.load(v_ptr + rows + (w * VPB + i)[None, :]).to(tl.float32), [BS, GROUPS, PER])
        lo = tl.minimum(lo, tl.min(v, axis=2))
        hi = tl.maximum(hi, tl.max(v, axis=2))
    scale16 = ((hi - lo) / V_LEVELS).to(tl.float16)
    zero16 = lo.to(tl.float16)
    g = tl.arange(0, GROUPS)
    tl.store(v_scale + pid * BS * GROUPS + t[:, None] * GROUPS + g[None, :], scale16)
    tl.store(v_zero + pid * BS * GROUPS + t[:, None] * GROUPS + g[None, :], zero16)
    scale = tl.reshape(tl.broadcast_to(scale16.to(tl.float32)[:, :, None], [BS, GROUPS, PER]), [BS, VW])
    zero = tl.reshape(tl.broadcast_to(zero16.to(tl.float32)[:, :, None], [BS, GROUPS, PER]), [BS, VW])
    packed = tl.zeros([BS, VW], dtype=tl.int32)
    err_sq = tl.zeros([BS], dtype=tl.float32)
    norm_sq = tl.zeros([BS], dtype=tl.float32)
    bad = tl.zeros([BS], dtype=tl.int32)
    for i in tl.static_range(VPB):
        v = tl.load(v_ptr + rows + (w * VPB + i)[None, :]).to(tl.float32)
        bad += _non_finite(v, 1)
        code = _code(v, scale, zero, V_LEVELS)
        v_hat = code * scale + zero
        err_sq += tl.sum((v - v_hat) * (v - v_hat), axis=1)
        norm_sq += tl.sum(v_hat * v_hat, axis=1)
        packed = packed | (code.to(tl.int32) << (i * V_BITS))
    tl.store(v_codes + pid * BS * VW + t[:, None] * VW + w[None, :], packed.to(tl.uint8))
    eta = tl.where(bad > 0, float("inf"), _round_up(tl.sqrt(err_sq), growth))
    tl.store(token_notes + pid * BS * 2 + t * 2, _round_up_half(eta))
    tl.store(token_notes + pid * BS * 2 + t * 2 + 1, _round_up_half(_round_up(tl.sqrt(norm_sq), growth)))


def quantize_blocks(keys: torch.Tensor, values: torch.Tensor, quantizer) -> QuantizedBlocks:
    if quantizer.name != "minmax":
        raise ValueError(f"quantize_blocks: no Triton kernel for quantizer {quantizer.name!r}")
    if keys.shape != values.shape or keys.dim() != 4:
        raise ValueError(f"quantize_blocks: keys {tuple(keys.shape)} and values {tuple(values.shape)} must be "
                         "the same [N, Hkv, bs, D]")
    n, kv_heads, bs, dim = keys.shape
    if dim % VALUE_GROUP or bs & (bs - 1) or dim & (dim - 1):
        raise ValueError(f"quantize_blocks: block size {bs} and head dim {dim} must be powers of two, dim >= 16")
    if keys.device != values.device or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("quantize_blocks: keys and values must be contiguous on one device")
    kb, vb = quantizer.k_bits, quantizer.v_bits
    new = dict(device=keys.device)
    k_codes = torch.empty(n, kv_heads, bs, dim * kb // 8, dtype=torch.uint8, **new)
    k_scale, k_zero = (torch.empty(n, kv_heads, dim, dtype=META_DTYPE, **new) for _ in range(2))
    v_codes = torch.empty(n, kv_heads, bs, dim * vb // 8, dtype=torch.uint8, **new)
    v_scale, v_zero = (torch.empty(n, kv_heads, bs, dim // VALUE_GROUP, dtype=META_DTYPE, **new) for _ in range(2))
    block_notes = torch.empty(n, kv_heads, 2, dtype=torch.float32, **new)
    token_notes = torch.empty(n, kv_heads, bs, 2, dtype=META_DTYPE, **new)
    if n:
        _quantize_kernel[(n * kv_heads,)](keys, values, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                          block_notes, token_notes, BS=bs, D=dim, K_BITS=kb, V_BITS=vb,
                                          GROUP=VALUE_GROUP)
    return QuantizedBlocks(Codes(k_codes, k_scale, k_zero), Codes(v_codes, v_scale, v_zero), block_notes, token_notes)
