"""Certified paged decode attention (Triton), FlashDecoding-style: one program per (sequence, KV head, split).

Each program walks its share of the sequence's full blocks in tiles of TILE_TOKENS tokens (several 16-token blocks),
then the partial block if it is its split's. Per tile: the precision gate per token (exact keys/values from the
scratch slot, else codes dequantized in registers as code * scale + zero, the twin's arithmetic), the scores of the
group's query heads as one tensor-core dot (the group padded to 16 rows), the certificate's per-block accumulators
from the score tile reshaped by block (reference.DecodeAccumulators, each block referenced to its own maximum, so
splits never need each other's), and the online softmax of O with a second dot. A short merge of the splits'
(O, max, sum) finishes O. Twin: reference.decode_accumulators.

Numerics: the dots run as "tf32x3" (three TF32 tensor-core products that recover float32 accuracy); their error is
not IEEE float32's, and the accumulators say so: DecodeAccumulators.extra_terms widens every rounding term of the
certificate (certificate.tensor_core_terms derives it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.certificate import gamma, norm_shrink, tensor_core_terms
from kernels.reference import DecodeAccumulators, DecodeView, QuantizedLayer

TILE_TOKENS = 64  # tokens a tile: blocks of 16 tokens, four at a time
BLOCKS_PER_SPLIT = 16  # without a GPU to size the grid by: blocks of 16 tokens a program walks, at most
PRECISION = "tf32x3"  # float32 accuracy from tensor cores (tl.dot on float32 defaults to plain TF32)
# Warps and pipeline stages: the benchmark's sweep (bench_kernels.py --benches sweep) picks them on the GPU that runs
# it; this is the choice before any sweep.
LAUNCH = {"num_warps": 4, "num_stages": 2}
MAX_HEAD_DIM = 128  # 90 KB of shared memory at 128 (sm_90, K8/V4); 172 KB at 256, more than an A100 has


@triton.jit
def _finite_or_zero(m):
    """A running maximum as an exp reference: -inf (nothing attended yet) becomes 0, so exp(-inf - 0) = 0."""
    return tl.where(m > -float("inf"), m, 0.0)


@triton.jit
def _block_terms(s, valid, eta, norm, low, head_row, at_b, live, block_live, seq_head, nb, block_max, block_sums,
                 value_max, NBT: tl.constexpr, BS: tl.constexpr, GP: tl.constexpr):
    """The certificate's accumulators of the NBT blocks of a tile: scores s [GP, NBT * BS] (-inf where not valid),
    per-token eta, norm and lower norm [NBT * BS]; the blocks' indices at_b [NBT] (nb: the partial block)."""
    scores = tl.reshape(s, (GP, NBT, BS))
    ok = tl.reshape(valid, (NBT, BS))
    m_b = tl.max(scores, axis=2)
    e = tl.where(ok[None, :, :], tl.exp(scores - _finite_or_zero(m_b)[:, :, None]), 0.0)
    eta = tl.reshape(tl.where(valid, eta, 0.0), (NBT, BS))[None, :, :]
    norm = tl.reshape(tl.where(valid, norm, 0.0), (NBT, BS))
    low = tl.reshape(tl.where(valid, low, 0.0), (NBT, BS))[None, :, :]
    row = head_row[:, None] * (nb + 1) + at_b[None, :]
    mask = live[:, None] & block_live[None, :]
    tl.store(block_max + row, m_b, mask=mask)
    tl.store(block_sums + row * 5, tl.sum(e, axis=2), mask=mask)
    tl.store(block_sums + row * 5 + 1, tl.sum(e * eta, axis=2), mask=mask)
    tl.store(block_sums + row * 5 + 2, tl.sum(e * norm[None, :, :], axis=2), mask=mask)
    tl.store(block_sums + row * 5 + 3, tl.sum(e * (norm * norm)[None, :, :], axis=2), mask=mask)
    tl.store(block_sums + row * 5 + 4, tl.sum(e * (low * low), axis=2), mask=mask)
    tl.store(value_max + seq_head * (nb + 1) + at_b, tl.max(norm, axis=1), mask=block_live)


@triton.jit
def _per_token(x, TB: tl.constexpr, BS: tl.constexpr):
    """A tile's per-block values [TB] repeated for each of the block's BS tokens: [TB * BS]."""
    return tl.reshape(tl.broadcast_to(x[:, None], (TB, BS)), (TB * BS,))


@triton.jit
def _attend(acc, m_i, l_i, s, valid, v, PRECISION: tl.constexpr):
    """One step of the online softmax: O's accumulator [GP, D], running max and sum [GP], a tile's scores s and
    values v [tokens, D]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - _finite_or_zero(m_new))
    p = tl.where(valid[None, :], tl.exp(s - _finite_or_zero(m_new)[:, None]), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _decode_kernel(q_ptr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, token_notes, slots, scratch_k,
                   scratch_v, scratch_norms, tail_k, tail_v, tables, num_full, tail_lens, seq_slots, use_scratch, starts,
                   out_ptr, split_max, split_sum, block_max, block_sums, key_dots, value_max,
                   scale, shrink, exact_shrink, widen, nb, splits, blocks_per_split, HKV: tl.constexpr, G: tl.constexpr,
                   GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr, PB: tl.constexpr,
                   K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
                   CERTIFY: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    seq, h = pid // HKV, pid % HKV
    seq_head = seq * HKV + h
    g, d = tl.arange(0, GP), tl.arange(0, D)
    j = tl.arange(0, TB * BS)  # a tile's tokens: block j // BS of the tile, offset j % BS
    t = j % BS
    live = g < G
    q = tl.load(q_ptr + (seq_head * G + g)[:, None] * D + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
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
    head_row = seq_head * G + g  # rows of the per-head outputs
    start = split * blocks_per_split
    end = tl.minimum(start + blocks_per_split, full)
    for b0 in range(start, end, TB):
        tile_b = b0 + tl.arange(0, TB)  # the tile's blocks
        in_b = tile_b < end
        piece_b = tl.load(tables + seq * nb + tile_b, mask=in_b, other=0) * HKV + h
        ks_b = tl.load(k_scale + piece_b[:, None] * D + d[None, :], mask=in_b[:, None], other=0.0).to(tl.float32)
        kz_b = tl.load(k_zero + piece_b[:, None] * D + d[None, :], mask=in_b[:, None], other=0.0).to(tl.float32)
        if CERTIFY:
            dots = (head_row[:, None] * nb + tile_b[None, :]) * 2
            dots_ok = live[:, None] & in_b[None, :]
            tl.store(key_dots + dots, tl.sum(q_abs[:, None, :] * ks_b[None, :, :], axis=2), mask=dots_ok)
            tl.store(key_dots + dots + 1, tl.sum(q_abs[:, None, :] * tl.abs(kz_b)[None, :, :], axis=2), mask=dots_ok)
        b = b0 + j // BS  # each token's block
        in_t = b < end
        k_slot_b = tl.where(scratch_on & in_b, tl.load(slots + piece_b * 2, mask=in_b, other=-1), -1)
        v_slot_b = tl.where(scratch_on & in_b, tl.load(slots + piece_b * 2 + 1, mask=in_b, other=-1), -1)
        piece = _per_token(piece_b, TB, BS)
        k_slot, v_slot = _per_token(k_slot_b, TB, BS), _per_token(v_slot_b, TB, BS)
        token = piece * BS + t
        coded = (in_t & (k_slot < 0))[:, None]
        k_byte = tl.load(k_codes + token[:, None] * (D // KPB) + (d // KPB)[None, :], mask=coded, other=0).to(tl.int32)
        k = ((k_byte >> k_shift) & ((1 << K_BITS) - 1)).to(tl.float32)
        k = tl.reshape(tl.reshape(k, (TB, BS, D)) * ks_b[:, None, :] + kz_b[:, None, :], (TB * BS, D))
        exact = (in_t & (k_slot >= 0))[:, None]
        k = tl.where(exact, tl.load(scratch_k + (k_slot * BS + t)[:, None] * D + d[None, :], mask=exact,
                                    other=0.0).to(tl.float32), k)
        eta = tl.load(token_notes + token * 2, mask=in_t, other=0.0).to(tl.float32)
        norm = tl.load(token_notes + token * 2 + 1, mask=in_t, other=0.0).to(tl.float32)
        low = tl.maximum(norm * shrink - 2.0**-24 - eta, 0.0)  # certificate.lower_norm minus eta
        coded = (in_t & (v_slot < 0))[:, None]
        v_byte = tl.load(v_codes + token[:, None] * (D // VPB) + (d // VPB)[None, :], mask=coded, other=0).to(tl.int32)
        vs = tl.load(v_scale + token[:, None] * (D // GROUP) + (d // GROUP)[None, :], mask=coded, other=0.0)
        vz = tl.load(v_zero + token[:, None] * (D // GROUP) + (d // GROUP)[None, :], mask=coded, other=0.0)
        v = ((v_byte >> v_shift) & ((1 << V_BITS) - 1)).to(tl.float32) * vs.to(tl.float32) + vz.to(tl.float32)
        exact_v = in_t & (v_slot >= 0)
        v = tl.where(exact_v[:, None], tl.load(scratch_v + (v_slot * BS + t)[:, None] * D + d[None, :],
                                               mask=exact_v[:, None], other=0.0).to(tl.float32), v)
        exact_norm = tl.load(scratch_norms + v_slot * BS + t, mask=exact_v, other=0.0)
        norm = tl.where(exact_v, exact_norm * widen, norm)
        low = tl.where(exact_v, exact_norm * exact_shrink, low)
        eta = tl.where(exact_v, 0.0, eta)
        valid = in_t & (b * BS + t >= first)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, -float("inf"))
        if CERTIFY:
            _block_terms(s, valid, eta, norm, low, head_row, tile_b, live, in_b, seq_head, nb, block_max, block_sums,
                         value_max, TB, BS, GP)
        acc, m_i, l_i = _attend(acc, m_i, l_i, s, valid, v, PRECISION)
    if (start <= full) & (full < start + blocks_per_split):  # the partial block, exact, reported last (index nb)
        # a new name: a variable of the loop above cannot change its shape inside this branch (Triton's compiler)
        r = tl.arange(0, PB)  # the block's BS tokens, padded to a dot's 16 rows
        valid = (r < filled) & (full * BS + r >= first)
        at = ((tl.load(seq_slots + seq) * BS + r) * HKV + h)[:, None] * D + d[None, :]
        k = tl.load(tail_k + at, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(tail_v + at, mask=valid[:, None], other=0.0).to(tl.float32)
        exact = tl.sqrt(tl.sum(v * v, axis=1))
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, -float("inf"))
        if CERTIFY:
            at_b = tl.full([1], 0, tl.int32) + nb
            _block_terms(s, valid, tl.zeros_like(exact), exact * widen, exact * exact_shrink, head_row, at_b, live,
                         at_b >= 0, seq_head, nb, block_max, block_sums, value_max, 1, PB, GP)
        acc, m_i, l_i = _attend(acc, m_i, l_i, s, valid, v, PRECISION)
    part = head_row * splits + split
    tl.store(split_max + part, m_i, mask=live)
    tl.store(split_sum + part, l_i, mask=live)
    tl.store(out_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_grid(batch: int, kv_heads: int, nb: int, tile: int, device: torch.device) -> tuple[int, int]:
    """(splits, blocks a split) for nb full blocks and the partial one: on a GPU about two programs per
    multiprocessor over the whole grid, else BLOCKS_PER_SPLIT blocks a split; whole tiles a split either way."""
    tiles = triton.cdiv(nb + 1, tile)
    wanted = (triton.cdiv(2 * _processors(device), max(batch * kv_heads, 1)) if device.type == "cuda"
              else triton.cdiv(nb + 1, BLOCKS_PER_SPLIT))
    per_split = triton.cdiv(tiles, max(1, min(wanted, tiles))) * tile
    return triton.cdiv(nb + 1, per_split), per_split


def _constants(kv_heads: int, groups: int, dim: int, bs: int, k_bits: int, v_bits: int, certify: bool) -> dict:
    """The kernel's compile-time arguments: the group padded to a dot's 16 rows, tiles of TILE_TOKENS, the partial
    block padded to 16 rows."""
    return dict(HKV=kv_heads, G=groups, GP=max(triton.next_power_of_2(groups), 16), D=dim, BS=bs,
                TB=max(1, TILE_TOKENS // bs), PB=max(bs, 16), K_BITS=k_bits, V_BITS=v_bits, GROUP=16,
                PRECISION=PRECISION, CERTIFY=certify)


class Splits(NamedTuple):
    """What the kernel writes: each split's unnormalised O and its softmax (max, sum), and the certificate's
    per-block accumulators (reference.DecodeAccumulators' layout)."""

    out: torch.Tensor  # [Bd, Hkv, G, splits, D]
    split_max: torch.Tensor  # [Bd, Hkv, G, splits]
    split_sum: torch.Tensor  # [Bd, Hkv, G, splits]
    block_max: torch.Tensor
    block_sums: torch.Tensor
    key_dots: torch.Tensor
    value_max: torch.Tensor
    extra_terms: int  # certificate.tensor_core_terms of the kernel's dots


def decode_splits(q, layer: QuantizedLayer, view: DecodeView, scale: float, quantizer, launch: dict | None = None,
                  certify: bool = True) -> Splits:
    """The kernel's one pass over tier 1, its splits not yet merged. `launch`: num_warps and num_stages other than
    LAUNCH's (the benchmark's sweep); certify=False computes O alone and leaves the certificate's accumulators empty
    (the benchmark's measure of what the certificate costs)."""
    batch, heads, dim = q.shape
    slots_count, bs, kv_heads, _ = layer.tail_k.shape
    nb = view.block_tables.shape[1]
    _check(q, layer, view, quantizer)
    groups = heads // kv_heads
    constants = _constants(kv_heads, groups, dim, bs, quantizer.k_bits, quantizer.v_bits, certify)
    tile = constants["TB"]
    splits, per_split = split_grid(batch, kv_heads, nb, tile, q.device)
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
            scale, norm_shrink(dim), 1 - gamma(dim + 2), 1 + gamma(dim + 2), nb, splits, per_split, **constants,
            **(launch or LAUNCH))
    return Splits(out, split_max, split_sum, block_max, block_sums, key_dots, value_max,
                  tensor_core_terms(dim, tile * bs))


def decode_accumulators(q, layer: QuantizedLayer, view: DecodeView, scale: float, quantizer,
                        launch: dict | None = None, certify: bool = True) -> DecodeAccumulators:
    """decode_splits with the splits merged in PyTorch (certified_finish merges them in its kernel)."""
    done = decode_splits(q, layer, view, scale, quantizer, launch, certify)
    top = done.split_max.amax(dim=-1, keepdim=True)
    weight = torch.where(done.split_sum > 0, torch.exp(done.split_max - top), 0.0)
    merged = (done.out * weight[..., None]).sum(dim=3) / (done.split_sum * weight).sum(dim=-1)[..., None]
    return DecodeAccumulators(out=merged, block_max=done.block_max, block_sums=done.block_sums,
                              key_dots=done.key_dots, value_max=done.value_max, extra_terms=done.extra_terms)


def compile_for(arch: int, bs: int, groups: int, certify: bool = True, dim: int = 128) -> int:
    """Compiles the kernel to a cubin for CUDA compute capability `arch` (90: Hopper) without a GPU, with K8/V4 codes,
    float16 tier 1 and 8 KV heads; returns the shared memory it needs. Needs a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"k_codes": "*u8", "v_codes": "*u8", "slots": "*i32", "scratch_norms": "*fp32", "use_scratch": "*i1"}
    pointers |= dict.fromkeys(("tables", "num_full", "tail_lens", "seq_slots", "starts"), "*i64")
    pointers |= dict.fromkeys(("out_ptr", "split_max", "split_sum", "block_max", "block_sums", "key_dots",
                               "value_max"), "*fp32")
    scalars = dict.fromkeys(("scale", "shrink", "exact_shrink", "widen"), "fp32")
    scalars |= dict.fromkeys(("nb", "splits", "blocks_per_split"), "i32")
    constants = _constants(8, groups, dim, bs, 8, 4, certify)
    signature = {name: "constexpr" if name in constants else scalars.get(name, pointers.get(name, "*fp16"))
                 for name in _decode_kernel.arg_names}
    source = ASTSource(_decode_kernel, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=LAUNCH).metadata.shared


def _check(q, layer: QuantizedLayer, view: DecodeView, quantizer) -> None:
    batch, heads, dim = q.shape
    kv_heads, bs = layer.tail_k.shape[2], layer.tail_k.shape[1]
    if quantizer.name != "minmax":
        raise ValueError(f"certified decode: no Triton kernel for quantizer {quantizer.name!r}")
    if heads % kv_heads or dim & (dim - 1) or bs & (bs - 1) or not 16 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"certified decode: {heads} heads over {kv_heads} KV heads, head dim {dim}, block {bs}")
    tensors = [q, *(getattr(layer, name) for name in layer.__slots__),
               *(getattr(view, name) for name in view.__slots__)]
    if any(x.device != q.device for x in tensors):
        raise ValueError("certified decode: every tensor must be on the query's device")
    if not all(x.is_contiguous() for x in tensors):
        raise ValueError("certified decode: the query, the cache and the view must be contiguous")
    if view.block_tables.shape[0] != batch or layer.k_scale.shape[-1] != dim or layer.tail_k.shape[-1] != dim:
        raise ValueError("certified decode: the query, the block tables and the cache disagree in shape")
