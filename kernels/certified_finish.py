"""The certificate's finish in one Triton kernel, after the certified decode kernel: one program per (sequence, KV
head) merges the splits' O, normalises the blocks' sums, computes every term of the bound (the whole-tail forms and
the per-block one), the limit, and whether each query head is accepted; it writes the output served (O in the query's
dtype), each block's largest mass over the group (the scratch's score) and two flags for the whole layer: a
certifying head is over its limit or broken (the ladder must run), or accepted above `margin` of its limit (its
blocks are worth prefetching). When neither flag is set the layer needs nothing else: one read of the flags is the
layer's only host synchronisation.

Twin: reference.finish_decode followed by escalation.check (the same formulas, kernels/certificate.py), with the
blocks' spreads in the triangle form (the decode kernel does not give O . P_b). The terms are computed in float64,
as the compiled CPU path does; the certificate's relative margin covers this arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.certificate import RELATIVE_MARGIN, UNIT_ROUNDOFF, gamma
from kernels.certified_decode import Splits, decode_splits
from kernels.reference import DecodeResult, DecodeView, QuantizedLayer

BLOCKS = 64  # blocks a chunk of the finish's loops
LAUNCH = {"num_warps": 4, "num_stages": 1}


@triton.jit
def _expm1(x):
    """e^x - 1 in float64, accurate for small |x| too (Taylor below 1e-5: relative error under 1e-16; above, the
    subtraction loses at most 1e-11 relatively, inside the certificate's relative margin)."""
    small = tl.abs(x) < 1e-5
    series = x * (1.0 + x * (0.5 + x / 6.0))
    return tl.where(small, series, tl.exp(tl.where(small, 0.0, x)) - 1.0)


@triton.jit
def _nan_min(a, b):
    """torch.minimum: NaN when either is NaN."""
    return tl.where((a != a) | (b != b), a + b, tl.minimum(a, b))


@triton.jit
def _inf_if_nan(x):
    return tl.where(x != x, float("inf"), x)


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _exact_ratio(m_lo, m_hi):
    """certificate.exact_ratio: u_P >= |1 / S - 1| for S in [m_lo, m_hi]."""
    return tl.maximum(1.0 / m_lo - 1.0, 1.0 - 1.0 / m_hi)


@triton.jit
def _chunk(b, seq, h, row, live, top, total, out_norm, q_norm, q_abs_sum, block_max, block_sums, key_dots,
           block_notes, slots, tables, full, scratch_on, scale, k_levels, nb, HKV: tl.constexpr):
    """A chunk of blocks b [BLOCKS] (the nb full ones, then the partial one at nb) for the group's rows [GP]: the
    normalised sums (rho_b, sum p eta, sum p n^2, sum p l^2), W_b' (triangle form), Delta_b, whether the block's
    keys are read quantized (in T), and sum |q| |k^| (the score error's magnitude), each [GP, BLOCKS]."""
    in_b = b < nb + 1
    at = row[:, None] * (nb + 1) + b[None, :]
    ok = live[:, None] & in_b[None, :]
    m = tl.load(block_max + at, mask=ok, other=-float("inf")).to(tl.float64)
    sums = block_sums + at * 5
    count = tl.load(sums, mask=ok, other=0.0).to(tl.float64)
    weight = tl.where(count > 0, tl.exp(tl.where(count > 0, m - top[:, None], 0.0)), 0.0) / total[:, None]
    eta_sum = tl.load(sums + 1, mask=ok, other=0.0).to(tl.float64)
    norm_sum = tl.load(sums + 2, mask=ok, other=0.0).to(tl.float64)
    square_sum = tl.load(sums + 3, mask=ok, other=0.0).to(tl.float64)
    low_sum = tl.load(sums + 4, mask=ok, other=0.0).to(tl.float64)
    not_finite = ~(_finite(eta_sum) & _finite(norm_sum) & _finite(square_sum) & _finite(low_sum))
    rho, contrib, square, low = weight * count, weight * eta_sum, weight * square_sum, weight * low_sum
    dev = weight * norm_sum + rho * out_norm[:, None] + contrib
    # the full blocks' keys: read exact from the scratch (promoted) or quantized (in T)
    table_b = b < nb
    block = tl.load(tables + seq * nb + b, mask=table_b, other=0)
    piece = block * HKV + h
    promoted = (tl.load(slots + piece * 2, mask=table_b, other=-1) >= 0) & scratch_on
    attended = b < full
    in_tail = attended & ~promoted
    eps = tl.load(block_notes + piece * 2, mask=table_b, other=0.0).to(tl.float64)
    kappa = tl.load(block_notes + piece * 2 + 1, mask=table_b, other=0.0).to(tl.float64)
    dots = key_dots + (row[:, None] * nb + b[None, :]) * 2
    dots_ok = live[:, None] & table_b[None, :]
    scale_dot = tl.load(dots, mask=dots_ok, other=0.0).to(tl.float64)
    zero_dot = tl.load(dots + 1, mask=dots_ok, other=0.0).to(tl.float64)
    # MinMaxQuantizer.key_dots: sum |q| step and a bound of sum |q| |k^|
    step_dot = (zero_dot * 2.0**-10 + scale_dot + q_abs_sum[:, None] * 2.0**-24) * (1 + 2.0**-20)
    magnitude = (zero_dot + k_levels * scale_dot) * (1 + 2.0**-20)
    channel = _inf_if_nan(kappa[None, :] * step_dot)
    delta = scale * _nan_min(q_norm[:, None] * eps[None, :], channel)
    delta = tl.where(in_tail[None, :], delta, 0.0)
    magnitude = magnitude + tl.where(promoted[None, :], channel, 0.0)
    # NaN metadata makes the score error infinite, as in the twin (Triton's max skips NaN)
    magnitude = _inf_if_nan(tl.where(attended[None, :], magnitude, 0.0))
    broken = tl.maximum(tl.max(tl.where(in_tail & ~_finite(eps), 1, 0), axis=0),
                        tl.max(tl.max(tl.where(ok & not_finite, 1, 0), axis=1), axis=0))
    return rho, contrib, dev, square, low, delta, in_tail, magnitude, broken


@triton.jit
def _finish_kernel(q_ptr, split_out, split_max, split_sum, block_max, block_sums, key_dots, value_max, block_notes,
                   slots, tail_k, tables, num_full, tail_lens, seq_slots, use_scratch, starts, radius, tolerance,
                   certifying, served, out_ptr, rho_ptr, contrib_ptr, dev_ptr, delta_ptr, per_head, value_scale_ptr,
                   broken_ptr, mass_ptr, flags,
                   scale, k_levels, margin, g_len, g_dim, g_score, nb, splits,
                   HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                   BLOCKS: tl.constexpr, MARGIN: tl.constexpr, UNIT: tl.constexpr):
    pid = tl.program_id(0)
    seq, h = pid // HKV, pid % HKV
    g, d = tl.arange(0, GP), tl.arange(0, D)
    live = g < G
    row = (seq * HKV + h) * G + g  # [Bd, Hkv, G] rows
    # ---- the splits' O merged (float32, as the twin merges them)
    top_split = tl.full([GP], -float("inf"), tl.float32)
    for s in range(0, splits):
        top_split = tl.maximum(top_split, tl.load(split_max + row * splits + s, mask=live, other=-float("inf")))
    num = tl.zeros([GP, D], tl.float32)
    den = tl.zeros([GP], tl.float32)
    for s in range(0, splits):
        part_sum = tl.load(split_sum + row * splits + s, mask=live, other=0.0)
        part_max = tl.load(split_max + row * splits + s, mask=live, other=0.0)
        w = tl.where(part_sum > 0, tl.exp(tl.where(part_sum > 0, part_max - top_split, 0.0)), 0.0)
        num += tl.load(split_out + (row * splits + s)[:, None] * D + d[None, :], mask=live[:, None], other=0.0) \
            * w[:, None]
        den += part_sum * w
    o = num / tl.where(live, den, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * D + d[None, :], o, mask=live[:, None])
    o_served = o.to(served.dtype.element_ty)
    tl.store(served + row[:, None] * D + d[None, :], o_served, mask=live[:, None])
    cast_diff = o_served.to(tl.float32) - o
    cast = tl.sqrt(tl.sum(cast_diff * cast_diff, axis=1).to(tl.float64)) * (1 + g_dim)
    o64 = o.to(tl.float64)
    out_norm = tl.sqrt(tl.sum(o64 * o64, axis=1))
    q = tl.load(q_ptr + (seq * HKV * G + h * G + g)[:, None] * D + d[None, :], mask=live[:, None],
                other=0.0).to(tl.float64)
    q_norm = tl.sqrt(tl.sum(q * q, axis=1))
    q_abs_sum = tl.sum(tl.abs(q), axis=1)
    full = tl.load(num_full + seq).to(tl.int32)
    scratch_on = tl.load(use_scratch + seq) != 0
    # the partial block's largest key norm among its attended tokens (its keys are exact)
    r = tl.arange(0, BS)
    first = tl.load(starts + seq).to(tl.int32)
    attended = (r < tl.load(tail_lens + seq).to(tl.int32)) & (full * BS + r >= first)
    tail = tl.load(tail_k + ((tl.load(seq_slots + seq) * BS + r) * HKV + h)[:, None] * D + d[None, :],
                   mask=attended[:, None], other=0.0).to(tl.float64)
    tail_norm = tl.max(tl.where(attended, tl.sqrt(tl.sum(tail * tail, axis=1)), 0.0), axis=0)
    # ---- the blocks' softmax reference and denominator
    top = tl.full([GP], -float("inf"), tl.float64)
    largest_n = tl.zeros([BLOCKS], tl.float32)
    broken = tl.full([], 0, tl.int32)
    for b0 in range(0, nb + 1, BLOCKS):
        b = b0 + tl.arange(0, BLOCKS)
        ok = live[:, None] & (b < nb + 1)[None, :]
        m = tl.load(block_max + row[:, None] * (nb + 1) + b[None, :], mask=ok, other=-float("inf"))
        top = tl.maximum(top, tl.max(m, axis=1).to(tl.float64))
        n = tl.load(value_max + (seq * HKV + h) * (nb + 1) + b, mask=b < nb + 1, other=0.0)
        largest_n = tl.maximum(largest_n, n)
        broken = tl.maximum(broken, tl.max(tl.where(_finite(n), 0, 1), axis=0))
    value_scale = tl.max(largest_n, axis=0).to(tl.float64)
    top = tl.where(live, top, 0.0)  # padding rows: no -inf - -inf below
    total = tl.zeros([GP], tl.float64)
    for b0 in range(0, nb + 1, BLOCKS):
        b = b0 + tl.arange(0, BLOCKS)
        at = row[:, None] * (nb + 1) + b[None, :]
        ok = live[:, None] & (b < nb + 1)[None, :]
        m = tl.load(block_max + at, mask=ok, other=-float("inf")).to(tl.float64)
        count = tl.load(block_sums + at * 5, mask=ok, other=0.0).to(tl.float64)
        total += tl.sum(tl.where(count > 0, tl.exp(tl.where(count > 0, m - top[:, None], 0.0)), 0.0) * count, axis=1)
    total = tl.where(live, total, 1.0)
    # ---- every block's terms, summed per head
    zero = tl.zeros([GP], tl.float64)
    e_val, square_sum, alpha_t, w_tail, delta_t, kept = zero, zero, zero, zero, zero, zero
    lo_part, hi_part, moved, grow_max, tail_mass = zero, zero, zero, zero, zero
    largest = q_norm * tail_norm
    for b0 in range(0, nb + 1, BLOCKS):
        b = b0 + tl.arange(0, BLOCKS)
        rho, contrib, dev, square, low, delta, in_tail, magnitude, chunk_broken = _chunk(
            b, seq, h, row, live, top, total, out_norm, q_norm, q_abs_sum, block_max, block_sums, key_dots,
            block_notes, slots, tables, full, scratch_on, scale, k_levels, nb, HKV)
        broken = tl.maximum(broken, chunk_broken)
        at = row[:, None] * (nb + 1) + b[None, :]
        ok = live[:, None] & (b < nb + 1)[None, :]
        tl.store(rho_ptr + at, rho, mask=ok)
        tl.store(contrib_ptr + at, contrib, mask=ok)
        tl.store(dev_ptr + at, dev, mask=ok)
        full_b = (b < nb)[None, :]
        tl.store(delta_ptr + row[:, None] * nb + b[None, :], delta, mask=live[:, None] & full_b)
        tl.store(mass_ptr + (seq * nb + b) * HKV + h, tl.max(tl.where(live[:, None], rho, 0.0), axis=0), mask=b < nb)
        e_val += tl.sum(contrib, axis=1)
        square_sum += tl.sum(square, axis=1)
        tail_rho = tl.where(in_tail[None, :], rho, 0.0)
        alpha_t += tl.sum(tail_rho, axis=1)
        w_tail += tl.sum(tl.where(in_tail[None, :], dev, 0.0), axis=1)
        delta_t = tl.maximum(delta_t, tl.max(delta, axis=1))
        grow = _expm1(delta)
        lo_part += tl.sum(tl.where(full_b, rho * -_expm1(-delta), 0.0), axis=1)
        hi_part += tl.sum(tl.where(full_b, rho * grow, 0.0), axis=1)
        moved += tl.sum(tl.where(full_b, grow * dev, 0.0), axis=1)
        grow_max = tl.maximum(grow_max, tl.max(grow, axis=1))
        tail_mass += tl.sum(tl.where(full_b, rho, 0.0), axis=1)
        kept += tl.sum(low * tl.exp(-delta), axis=1)
        largest = tl.maximum(largest, tl.max(magnitude, axis=1))
    # the per-block form's total variation needs m_lo and m_hi: a second pass over the blocks
    m_lo_b, m_hi_b = 1.0 - lo_part, 1.0 + hi_part
    tv = zero
    for b0 in range(0, nb, BLOCKS):
        b = b0 + tl.arange(0, BLOCKS)
        rho, contrib, dev, square, low, delta, in_tail, magnitude, chunk_broken = _chunk(
            b, seq, h, row, live, top, total, out_norm, q_norm, q_abs_sum, block_max, block_sums, key_dots,
            block_notes, slots, tables, full, scratch_on, scale, k_levels, nb, HKV)
        u_block = tl.maximum(tl.exp(delta) / m_lo_b[:, None] - 1.0, 1.0 - tl.exp(-delta) / m_hi_b[:, None])
        tv += tl.sum(tl.where((b < nb)[None, :], rho * u_block, 0.0), axis=1)
    # ---- the bound (certificate.bound_terms) and the limit (certificate.threshold), per query head
    score_error = g_score * scale * largest
    w_all = tl.sqrt(tl.maximum(square_sum - out_norm * out_norm, 0.0)
                    + 2 * g_len * (square_sum + out_norm * value_scale)) + e_val
    drift = tl.exp(2 * score_error)
    mean = kept * (1 - 2 * g_len) / (drift * (1 + drift * (1 + g_len) * hi_part))
    rms_low = tl.sqrt(tl.maximum(mean, 0.0)) * (1 - 2.0**-20)
    rms_low = tl.where(rms_low == rms_low, rms_low, 0.0)
    rounding = (2 * score_error + 16 * UNIT + g_len) * value_scale
    centre = e_val + rounding
    rad = tl.load(radius + tl.load(seq_slots + seq) * HKV + h).to(tl.float64) * 2
    grow_t = _expm1(delta_t)
    tanh_half = tl.where(delta_t > 40.0, 1.0, grow_t / (grow_t + 2.0))  # tanh(x / 2) = expm1(x) / (expm1(x) + 2)
    spread = _nan_min(tanh_half, alpha_t * grow_t) * rad
    m_lo, m_hi = 1.0 - alpha_t * -_expm1(-delta_t), 1.0 + alpha_t * grow_t
    deviation = grow_t / m_lo * _nan_min(w_tail, w_all) + _exact_ratio(m_lo, m_hi) * _nan_min(centre, w_all)
    deviation = tl.where(m_lo > 0, _inf_if_nan(deviation), float("inf"))
    e_key = _nan_min(spread, deviation)
    if nb > 0:  # certificate.blockwise_key_error
        u_exact = _exact_ratio(m_lo_b, m_hi_b)
        blockwise = _nan_min(moved, grow_max * w_all) / m_lo_b + u_exact * _nan_min(centre, w_all)
        tv = (tv + tl.maximum(1.0 - tail_mass, 0.0) * u_exact) / 2
        blockwise = _nan_min(blockwise, tv * rad)
        e_key = _nan_min(e_key, tl.where(m_lo_b > 0, _inf_if_nan(blockwise), float("inf")))
    bound = e_val + e_key + (MARGIN * (e_val + e_key) + rounding + cast)
    finite_out = tl.sum(tl.where(_finite(o), 0, 1), axis=1) == 0
    bound = tl.where(_finite(bound) & (bound >= 0) & finite_out, bound, float("inf"))
    limit = tl.load(tolerance + seq).to(tl.float64) * tl.maximum(out_norm * (1 - g_dim) - bound, rms_low)
    limit = tl.where(_finite(limit), limit, -1.0)
    heads = per_head + row  # per_head [10, Bd, Hkv, G]
    stride = tl.num_programs(0) * G
    tl.store(heads, e_val, mask=live)
    tl.store(heads + stride, delta_t, mask=live)
    tl.store(heads + 2 * stride, alpha_t, mask=live)
    tl.store(heads + 3 * stride, w_all, mask=live)
    tl.store(heads + 4 * stride, w_tail, mask=live)
    tl.store(heads + 5 * stride, rms_low, mask=live)
    tl.store(heads + 6 * stride, score_error, mask=live)
    tl.store(heads + 7 * stride, cast, mask=live)
    tl.store(heads + 8 * stride, bound, mask=live)
    tl.store(heads + 9 * stride, limit, mask=live)
    tl.store(value_scale_ptr + seq * HKV + h, value_scale)
    tl.store(broken_ptr + seq * HKV + h, broken > 0)
    if tl.load(certifying + seq) != 0:
        over = tl.max(tl.where(live & ~(bound <= limit), 1, 0), axis=0)
        near = tl.max(tl.where(live & (bound / tl.maximum(limit, 1e-30) > margin), 1, 0), axis=0)
        tl.atomic_max(flags, tl.maximum(over, broken))
        tl.atomic_max(flags + 1, near)


class Finished:
    """One layer's certified decode on the device: the output served [Bd, H, D] in the query's dtype, the flags
    (read once: the layer's one host synchronisation), the blocks' masses for the scratch, and the whole
    DecodeResult with its bound and limit (for the ladder, when it must run)."""

    def __init__(self, served: torch.Tensor, result: DecodeResult, flags: torch.Tensor):
        self.served, self.result = served, result
        self.escalate, self.near = (bool(x) for x in flags.tolist())


def decode_layer(q, layer: QuantizedLayer, view: DecodeView, scale: float, quantizer, radius: torch.Tensor,
                 tolerance: torch.Tensor, certifying: torch.Tensor | None = None, margin: float = 1.0,
                 launch: dict | None = None) -> Finished:
    """The certified decode kernel and the finish kernel: radius [S, Hkv] by sequence slot, tolerance [Bd] and
    certifying [Bd] bool (None: every row) as tiers.StepPlan holds them."""
    return finish(decode_splits(q, layer, view, scale, quantizer, launch), q, layer, view, scale, radius, tolerance,
                  certifying, margin, quantizer.k_bits)


def finish(splits: Splits, q, layer: QuantizedLayer, view: DecodeView, scale: float, radius: torch.Tensor,
           tolerance: torch.Tensor, certifying: torch.Tensor | None = None, margin: float = 1.0,
           k_bits: int = 8) -> Finished:
    """The finish kernel on decode_splits' output (k_bits: the key codes' width, for the magnitude of k^)."""
    batch, heads, dim = q.shape
    kv_heads, bs = layer.tail_k.shape[2], layer.tail_k.shape[1]
    groups, nb = heads // kv_heads, view.block_tables.shape[1]
    device = q.device
    if certifying is None:
        certifying = torch.ones(batch, dtype=torch.bool, device=device)
    new = dict(device=device, dtype=torch.float32)
    out = torch.empty(batch, kv_heads, groups, dim, **new)
    served = torch.empty(batch, heads, dim, dtype=q.dtype, device=device)
    rho, contrib, dev = (torch.empty(batch, kv_heads, groups, nb + 1, **new) for _ in range(3))
    delta = torch.empty(batch, kv_heads, groups, nb, **new)
    per_head = torch.empty(10, batch, kv_heads, groups, **new)
    value_scale = torch.empty(batch, kv_heads, 1, **new)
    broken = torch.empty(batch, kv_heads, dtype=torch.bool, device=device)
    mass = torch.empty(batch, nb, kv_heads, **new)
    flags = torch.zeros(2, dtype=torch.int32, device=device)
    length = (nb + 1) * bs + splits.extra_terms
    if batch:
        _finish_kernel[(batch * kv_heads,)](
            q, splits.out, splits.split_max, splits.split_sum, splits.block_max, splits.block_sums, splits.key_dots,
            splits.value_max, layer.block_notes, layer.slots, layer.tail_k, view.block_tables, view.num_full,
            view.tail_lens, view.slots, view.use_scratch, view.start, radius, tolerance, certifying,
            served, out, rho, contrib, dev, delta, per_head, value_scale, broken, mass, flags,
            scale, float((1 << k_bits) - 1), margin, *_gammas(length, dim, splits.extra_terms), nb,
            splits.out.shape[3], **_constants(kv_heads, groups, dim, bs), **LAUNCH)
    e_val, delta_t, alpha_t, w_all, w_tail, rms_low, score_error, cast, bound, limit = per_head
    result = DecodeResult(out=out, rho=rho, val_contrib=contrib, dev_contrib=dev, block_delta=delta, e_val=e_val,
                          delta_t=delta_t, alpha_t=alpha_t, w_all=w_all, w_tail=w_tail, rms_low=rms_low,
                          score_error=score_error, cast=cast, value_scale=value_scale, broken=broken, length=length,
                          bound=bound, limit=limit, mass=mass)
    return Finished(served, result, flags)


def _gammas(length: int, dim: int, extra: int) -> tuple[float, float, float]:
    """gamma_(length + D), gamma_(D + 2) and the score error's gamma_(D + 2 + extra), rounded up by 2^-20 relatively:
    Triton passes them in float32, and a larger gamma only widens the bound."""
    return tuple(gamma(n) * (1 + 2.0**-20) for n in (length + dim, dim + 2, dim + 2 + extra))


def _constants(kv_heads: int, groups: int, dim: int, bs: int) -> dict:
    return dict(HKV=kv_heads, G=groups, GP=triton.next_power_of_2(groups), D=dim, BS=bs, BLOCKS=BLOCKS,
                MARGIN=RELATIVE_MARGIN, UNIT=UNIT_ROUNDOFF)


def compile_for(arch: int, groups: int, dim: int = 128, bs: int = 16) -> int:
    """Compiles the finish kernel to a cubin for CUDA compute capability `arch` without a GPU (float16 queries and
    tier 1, 8 KV heads); returns its shared memory. Needs a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"slots": "*i32", "flags": "*i32", "use_scratch": "*i1", "certifying": "*i1", "broken_ptr": "*i1",
                "q_ptr": "*fp16", "tail_k": "*fp16", "served": "*fp16"}
    pointers |= dict.fromkeys(("tables", "num_full", "tail_lens", "seq_slots", "starts"), "*i64")
    scalars = dict.fromkeys(("nb", "splits"), "i32")
    constants = _constants(8, groups, dim, bs)
    signature = {name: "constexpr" if name in constants else scalars.get(name, pointers.get(name, "*fp32"))
                 for name in _finish_kernel.arg_names}
    for name in ("scale", "k_levels", "margin", "g_len", "g_dim", "g_score"):
        signature[name] = "fp32"
    source = ASTSource(_finish_kernel, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=LAUNCH).metadata.shared
