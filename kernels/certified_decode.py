"""Certified paged decode attention (Triton), FlashDecoding-style: one program per (sequence, KV head, split).

Each program walks its share of the sequence's blocks (the full ones, then the partial one): per block the
precision gate (exact keys/values from the scratch slot, else codes dequantized in registers), scores for the
group's G query heads, the online softmax of O, and the certificate's per-block accumulators referenced to the
block's own maximum (reference.DecodeAccumulators), so splits never need each other's; a short merge of the
splits' (O, max, sum) finishes O. Twin: reference.decode_accumulators.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.certificate import gamma, norm_shrink
from kernels.reference import DecodeAccumulators, DecodeView, QuantizedLayer

BLOCKS_PER_SPLIT = 16  # blocks of 16 tokens a program walks, at most
# One warp a program: measured on an H100 (fp16 tier 1, 8 KV heads, 4 query heads each, head dim 128), batch 16 at
# 16K tokens took 1.46 ms with 1 warp, 2.36 ms with 2, 4.1 ms with 4 and 6.5 ms with 8; pipelining depth and 8 to 32
# blocks a split changed it by less than 10%.
LAUNCH = {"num_warps": 1, "num_stages": 3}


@triton.jit
def _finite_or_zero(m):
    """A running maximum as an exp reference: -inf (nothing attended yet) becomes 0, so exp(-inf - 0) = 0."""
    return tl.where(m > -float("inf"), m, 0.0)


@triton.jit
def _decode_kernel(q_ptr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, token_notes, slots, scratch_k,
                   scratch_v, scratch_norms, tail_k, tail_v, tables, num_full, tail_lens, seq_slots, use_scratch, starts,
                   out_ptr, split_max, split_sum, block_max, block_sums, key_dots, value_max,
                   scale, shrink, exact_shrink, widen, nb, splits, blocks_per_split, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   D: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                   GROUP: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    seq, h = pid // HKV, pid % HKV
    g, d, t = tl.arange(0, GP), tl.arange(0, D), tl.arange(0, BS)
    live = g < G
    q = tl.load(q_ptr + (seq * HKV * G + h * G + g)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    q = q.to(tl.float32)
    q_abs = tl.abs(q)
    full = tl.load(num_full + seq).to(tl.int32)
    filled = tl.load(tail_lens + seq).to(tl.int32)
    first = tl.load(starts + seq).to(tl.int32)  # sliding window: the first attended token from the table's start
    scratch_on = tl.load(use_scratch + seq) != 0
    KPB: tl.constexpr = 8 // K_BITS
    VPB: tl.constexpr = 8 // V_BITS
    k_shift = ((d % KPB) * K_BITS)[None, :]
    v_shift = ((d % VPB) * V_BITS)[None, :]
    m_i = tl.full([GP], -float("inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    head_row = (seq * HKV + h) * G + g  # rows of the per-head outputs
    start = split * blocks_per_split
    end = tl.minimum(start + blocks_per_split, full + 1)
    for b in range(start, end):
        if b < full:
            block = tl.load(tables + seq * nb + b)
            piece = block * HKV + h
            k_slot = tl.where(scratch_on, tl.load(slots + piece * 2), -1)
            v_slot = tl.where(scratch_on, tl.load(slots + piece * 2 + 1), -1)
            ks = tl.load(k_scale + piece * D + d).to(tl.float32)
            kz = tl.load(k_zero + piece * D + d).to(tl.float32)
            dots = (head_row * nb + b) * 2
            tl.store(key_dots + dots, tl.sum(q_abs * ks[None, :], axis=1), mask=live)
            tl.store(key_dots + dots + 1, tl.sum(q_abs * tl.abs(kz)[None, :], axis=1), mask=live)
            if k_slot >= 0:
                k = tl.load(scratch_k + (k_slot * BS + t[:, None]) * D + d[None, :]).to(tl.float32)
            else:
                k_byte = tl.load(k_codes + (piece * BS + t[:, None]) * (D // KPB) + (d // KPB)[None, :]).to(tl.int32)
                k = ((k_byte >> k_shift) & ((1 << K_BITS) - 1)).to(tl.float32) * ks[None, :] + kz[None, :]
            eta = tl.load(token_notes + (piece * BS + t) * 2).to(tl.float32)
            norm = tl.load(token_notes + (piece * BS + t) * 2 + 1).to(tl.float32)
            low = tl.maximum(norm * shrink - 2.0**-24 - eta, 0.0)  # certificate.lower_norm minus eta
            if v_slot >= 0:
                v = tl.load(scratch_v + (v_slot * BS + t[:, None]) * D + d[None, :]).to(tl.float32)
                exact = tl.load(scratch_norms + v_slot * BS + t)
                norm = exact * widen
                low = exact * exact_shrink
                eta = tl.zeros_like(eta)
            else:
                token = piece * BS + t[:, None]
                v_byte = tl.load(v_codes + token * (D // VPB) + (d // VPB)[None, :]).to(tl.int32)
                vs = tl.load(v_scale + token * (D // GROUP) + (d // GROUP)[None, :]).to(tl.float32)
                vz = tl.load(v_zero + token * (D // GROUP) + (d // GROUP)[None, :]).to(tl.float32)
                v = ((v_byte >> v_shift) & ((1 << V_BITS) - 1)).to(tl.float32) * vs + vz
            valid = b * BS + t >= first
        else:
            valid = (t < filled) & (full * BS + t >= first)
            at = ((tl.load(seq_slots + seq) * BS + t) * HKV + h)[:, None] * D + d[None, :]
            k = tl.load(tail_k + at, mask=valid[:, None], other=0.0).to(tl.float32)
            v = tl.load(tail_v + at, mask=valid[:, None], other=0.0).to(tl.float32)
            exact = tl.sqrt(tl.sum(v * v, axis=1))
            norm = exact * widen
            low = exact * exact_shrink
            eta = tl.zeros_like(norm)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        s = tl.where(valid[None, :], s, -float("inf"))
        m_b = tl.max(s, axis=1)
        e = tl.where(valid[None, :], tl.exp(s - _finite_or_zero(m_b)[:, None]), 0.0)
        eta = tl.where(valid, eta, 0.0)
        norm = tl.where(valid, norm, 0.0)
        low = tl.where(valid, low, 0.0)
        at_b = tl.where(b < full, b, nb)  # the partial block is reported last, after the nb full ones
        sums = (head_row * (nb + 1) + at_b) * 5
        tl.store(block_max + head_row * (nb + 1) + at_b, m_b, mask=live)
        tl.store(block_sums + sums, tl.sum(e, axis=1), mask=live)
        tl.store(block_sums + sums + 1, tl.sum(e * eta[None, :], axis=1), mask=live)
        tl.store(block_sums + sums + 2, tl.sum(e * norm[None, :], axis=1), mask=live)
        tl.store(block_sums + sums + 3, tl.sum(e * (norm * norm)[None, :], axis=1), mask=live)
        tl.store(block_sums + sums + 4, tl.sum(e * (low * low)[None, :], axis=1), mask=live)
        tl.store(value_max + (seq * HKV + h) * (nb + 1) + at_b, tl.max(norm, axis=0))
        m_new = tl.maximum(m_i, m_b)
        alpha = tl.exp(m_i - _finite_or_zero(m_new))
        p = tl.where(valid[None, :], tl.exp(s - _finite_or_zero(m_new)[:, None]), 0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    part = head_row * splits + split
    tl.store(split_max + part, m_i, mask=live)
    tl.store(split_sum + part, l_i, mask=live)
    tl.store(out_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])


def decode_accumulators(q, layer: QuantizedLayer, view: DecodeView, scale: float, quantizer) -> DecodeAccumulators:
    batch, heads, dim = q.shape
    slots_count, bs, kv_heads, _ = layer.tail_k.shape
    nb = view.block_tables.shape[1]
    _check(q, layer, view, quantizer)
    groups = heads // kv_heads
    splits = max(1, triton.cdiv(nb + 1, BLOCKS_PER_SPLIT))
    per_split = triton.cdiv(nb + 1, splits)
    new = dict(device=q.device, dtype=torch.float32)
    out = torch.empty(batch, kv_heads, groups, splits, dim, **new)
    split_max = torch.empty(batch, kv_heads, groups, splits, **new)
    split_sum = torch.empty(batch, kv_heads, groups, splits, **new)
    block_max = torch.full((batch, kv_heads, groups, nb + 1), -torch.inf, **new)
    block_sums = torch.zeros(batch, kv_heads, groups, nb + 1, 5, **new)
    key_dots = torch.zeros(batch, kv_heads, groups, nb, 2, **new)
    value_max = torch.zeros(batch, kv_heads, nb + 1, **new)
    if batch:
        _decode_kernel[(batch * kv_heads, splits)](
            q, layer.k_codes, layer.k_scale, layer.k_zero, layer.v_codes, layer.v_scale, layer.v_zero,
            layer.token_notes, layer.slots, layer.scratch_k, layer.scratch_v, layer.scratch_norms, layer.tail_k,
            layer.tail_v,
            view.block_tables, view.num_full, view.tail_lens, view.slots, view.use_scratch, view.start,
            out, split_max, split_sum, block_max, block_sums, key_dots, value_max,
            scale, norm_shrink(dim), 1 - gamma(dim + 2), 1 + gamma(dim + 2), nb, splits, per_split, HKV=kv_heads, G=groups, GP=max(triton.next_power_of_2(groups), 2), D=dim,
            BS=bs, K_BITS=quantizer.k_bits, V_BITS=quantizer.v_bits, GROUP=16, **LAUNCH)
    top = split_max.amax(dim=-1, keepdim=True)
    weight = torch.where(split_sum > 0, torch.exp(split_max - top), 0.0)
    merged = (out * weight[..., None]).sum(dim=3) / (split_sum * weight).sum(dim=-1)[..., None]
    return DecodeAccumulators(out=merged, block_max=block_max, block_sums=block_sums, key_dots=key_dots,
                              value_max=value_max)


def _check(q, layer: QuantizedLayer, view: DecodeView, quantizer) -> None:
    batch, heads, dim = q.shape
    kv_heads, bs = layer.tail_k.shape[2], layer.tail_k.shape[1]
    if quantizer.name != "minmax":
        raise ValueError(f"certified decode: no Triton kernel for quantizer {quantizer.name!r}")
    if heads % kv_heads or dim & (dim - 1) or bs & (bs - 1) or dim % 16:
        raise ValueError(f"certified decode: {heads} heads over {kv_heads} KV heads, head dim {dim}, block {bs}")
    tensors = [q, *(getattr(layer, name) for name in layer.__slots__),
               *(getattr(view, name) for name in view.__slots__)]
    if any(x.device != q.device for x in tensors):
        raise ValueError("certified decode: every tensor must be on the query's device")
    if not all(x.is_contiguous() for x in tensors):
        raise ValueError("certified decode: the query, the cache and the view must be contiguous")
    if view.block_tables.shape[0] != batch or layer.k_scale.shape[-1] != dim or layer.tail_k.shape[-1] != dim:
        raise ValueError("certified decode: the query, the block tables and the cache disagree in shape")
