"""Certified decode attention on the CPU in one compiled call per layer (numba), beside the PyTorch twin that defines it.

One call (`certified_decode`) does for every (sequence, KV head) of a layer what the twin's decode_accumulators,
finish_decode and the ladder's check do in some hundred small tensor operations: per 16-token block the precision gate
(an exact piece from the scratch, else min-max codes dequantized as code * scale + zero in float32, the twin's
arithmetic), the scores of the group's query heads, the softmax, O and each block's partial output, the per-block
sums the certificate reads, and then the certificate itself (kernels.certificate, each form written out below with
the twin's name), the limit and the accept decision. It also raises the scratch scores of the blocks attended
(Scratch.touch). What it returns is the twin's DecodeResult plus (bound, limit): the ladder works on either.

One thread: on the measured 2-core machine a second one gained nothing (certified/dense 0.872 against 0.871 at 8
requests), and numba's parallel threads, spinning beside torch's, made steps up to 30 times slower whenever they
outnumbered the free cores.

Numerics: float32 where the kernel computes (dequantization, scores, exponentials, weighted sums: any summation order
is inside the certificate's gamma terms), float64 for the certificate's own arithmetic (more accurate than the twin's
float32, so its relative margins still cover it). No fast-math flags: inf and NaN keep their meaning for the
monitors. float16 metadata is read through a 65536-entry table (numba has no float16 arrays).

Compilation happens once per machine: numba caches the machine code in the user's cache directory
($NUMBA_CACHE_DIR, by default $CERTKV_HOME/numba, CERTKV_HOME defaulting to ~/.cache/certkv); `warm_up` (run by
`make setup`, by `python -m kernels.cpu` and at the server's start) compiles or loads every signature the engine
uses. Without numba, or with CERTKV_NO_COMPILED_CPU=1, the twin runs.
"""

from __future__ import annotations

import ctypes
import math
import os
import time

import numpy as np
import torch

from kernels.home import CACHE_HOME

os.environ.setdefault("NUMBA_CACHE_DIR", str(CACHE_HOME / "numba"))  # read when numba is imported, just below
try:
    import numba
    from numba import njit
except ImportError:  # the twins everywhere
    numba = None

UNIT = 2.0**-24  # float32 unit roundoff, as kernels.certificate.UNIT_ROUNDOFF
RELATIVE_MARGIN = 2.0**-12  # kernels.certificate.RELATIVE_MARGIN
HALF = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # float16 bits -> float32
SUPPORTED_BITS = ((4, 8), (2, 4))  # key bits, value bits: whole codes per byte, the layout kernels.formats.pack uses


def available() -> bool:
    return numba is not None and os.environ.get("CERTKV_NO_COMPILED_CPU") != "1"


def runs(q: torch.Tensor, quantizer) -> bool:
    """Whether the compiled path computes this call: float32 CPU tensors, min-max codes with float16 metadata."""
    return (available() and q.device.type == "cpu" and q.dtype == torch.float32 and quantizer.name == "minmax"
            and quantizer.k_bits in SUPPORTED_BITS[0] and quantizer.v_bits in SUPPORTED_BITS[1])


if numba is not None:
    @njit(cache=True, error_model="numpy", inline="always")
    def _gamma(n):
        return n * UNIT / (1 - n * UNIT)

    @njit(cache=True, error_model="numpy", inline="always")
    def _finite(x):
        return not (math.isinf(x) or math.isnan(x))

    @njit(cache=True, error_model="numpy", inline="always")
    def _unpack(out, codes, bits, count):
        """out[c] = code c as float32 for c < count; codes packed little-endian within each byte (kernels.formats.pack:
        2, 4 or 8 bits)."""
        if bits == 8:
            for c in range(count):
                out[c] = np.float32(codes[c])
        elif bits == 4:
            for j in range(count // 2):
                out[2 * j] = np.float32(codes[j] & 15)
                out[2 * j + 1] = np.float32(codes[j] >> 4)
        else:
            for j in range(count // 4):
                for k in range(4):
                    out[4 * j + k] = np.float32((codes[j] >> (2 * k)) & 3)

    @njit(cache=True, error_model="numpy")
    def _key_error(delta_t, alpha_t, radius, w_all, w_tail, centre, grow, rho, dev, nb):
        """certificate.key_error with the per-block form (blockwise_key_error), float64; grow[b] = e^Delta_b - 1
        (e^Delta_b and e^-Delta_b follow from it within a few ulps, inside the bound's relative margin)."""
        spread = min(math.tanh(delta_t / 2), alpha_t * math.expm1(delta_t)) * 2 * radius
        m_lo = 1 - alpha_t * -math.expm1(-delta_t)
        m_hi = 1 + alpha_t * math.expm1(delta_t)
        deviation = math.inf
        if m_lo > 0:
            u_exact = max(1 / m_lo - 1, 1 - 1 / m_hi)
            deviation = math.expm1(delta_t) / m_lo * min(w_tail, w_all) + u_exact * min(centre, w_all)
            if math.isnan(deviation):
                deviation = math.inf
        bound = min(spread, deviation)
        if nb == 0:
            return bound
        lo, hi, moved, largest, mass = 1.0, 1.0, 0.0, 0.0, 0.0
        for b in range(nb):
            lo -= rho[b] * (grow[b] / (1 + grow[b]))  # 1 - e^-Delta_b
            hi += rho[b] * grow[b]
            moved += grow[b] * dev[b]
            largest = max(largest, grow[b])
            mass += rho[b]
        if not lo > 0:
            return bound
        u_exact = max(1 / lo - 1, 1 - 1 / hi)
        deviation = min(moved, largest * w_all) / lo + u_exact * min(centre, w_all)
        tv = max(1 - mass, 0.0) * u_exact
        for b in range(nb):
            tv += rho[b] * max((1 + grow[b]) / lo - 1, 1 - 1 / ((1 + grow[b]) * hi))
        blockwise = min(deviation, tv * radius)
        if math.isnan(blockwise):
            blockwise = math.inf
        return min(bound, blockwise)

    @njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
    def _accumulate(i, h, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, token_notes, slots, scratch_k,
                    scratch_v, scratch_norms, tail_k, tail_v, tables, num_full, tail_lens, seq_slots, starts,
                    use_scratch, half, scale, k_bits, v_bits, shrink, block_max, block_sums, partials, key_dots,
                    value_max):
        """reference.decode_accumulators for one (sequence i, KV head h): per block the keys and values attention
        reads (an exact scratch piece, else code * scale + zero), the scores of the group's query heads and, relative
        to the block's largest score, sum e, e eta, e n, e n^2, e l^2 and sum e v; returns the largest key norm of the
        partial block. Reassociation and fused multiply-adds only reorder or fuse float32 sums and products, which
        the certificate's gamma terms bound in any order (kernels.certificate); inf and NaN keep their meaning."""
        groups, dim = partials.shape[0], partials.shape[2]
        bs, nb = tail_k.shape[1], tables.shape[1]
        full, filled, first, slot = num_full[i], tail_lens[i], starts[i], seq_slots[i]
        g_dim = _gamma(dim + 2)
        widen, narrow = np.float32(1 + g_dim), np.float32(1 - g_dim)
        keys, values = np.empty((bs, dim), np.float32), np.empty((bs, dim), np.float32)
        terms, scores = np.empty((bs, 5), np.float32), np.empty(bs, np.float32)
        steps, offsets, row = np.empty(dim, np.float32), np.empty(dim, np.float32), np.empty(dim, np.float32)
        tail_key_norm = np.float32(0.0)
        for b in range(full + 1):
            at = b if b < full else nb  # the partial block is reported last, after the nb table entries
            terms[:, :] = 0.0
            if b < full:
                block = tables[i, b]
                k_slot = slots[block, h, 0] if use_scratch[i] else -1
                v_slot = slots[block, h, 1] if use_scratch[i] else -1
                for d in range(dim):
                    steps[d], offsets[d] = half[k_scale[block, h, d]], half[k_zero[block, h, d]]
                for t in range(bs):
                    if k_slot >= 0:
                        for d in range(dim):
                            keys[t, d] = scratch_k[k_slot, t, d]
                    else:
                        _unpack(row, k_codes[block, h, t], k_bits, dim)
                        for d in range(dim):
                            keys[t, d] = row[d] * steps[d] + offsets[d]
                    if v_slot >= 0:
                        for d in range(dim):
                            values[t, d] = scratch_v[v_slot, t, d]
                    else:
                        _unpack(row, v_codes[block, h, t], v_bits, dim)
                        for group in range(dim // 16):
                            step, offset = half[v_scale[block, h, t, group]], half[v_zero[block, h, t, group]]
                            for d in range(group * 16, group * 16 + 16):
                                values[t, d] = row[d] * step + offset
                    if b * bs + t < first:
                        continue
                    terms[t, 0] = 1.0
                    if v_slot >= 0:
                        exact = scratch_norms[v_slot, t]
                        terms[t, 2], terms[t, 4] = exact * widen, exact * narrow
                    else:
                        stored, eta = half[token_notes[block, h, t, 1]], half[token_notes[block, h, t, 0]]
                        terms[t, 1], terms[t, 2] = eta, stored
                        terms[t, 4] = max(max(stored * np.float32(shrink) - np.float32(2.0**-24), 0.0) - eta, 0.0)
            else:
                for t in range(bs):
                    for d in range(dim):
                        keys[t, d], values[t, d] = tail_k[slot, t, h, d], tail_v[slot, t, h, d]
                    if t >= filled or full * bs + t < first:
                        continue
                    value_sq, key_sq = np.float32(0.0), np.float32(0.0)
                    for d in range(dim):
                        value_sq += values[t, d] * values[t, d]
                        key_sq += keys[t, d] * keys[t, d]
                    exact = np.float32(math.sqrt(value_sq))
                    terms[t, 0], terms[t, 2], terms[t, 4] = 1.0, exact * widen, exact * narrow
                    tail_key_norm = max(tail_key_norm, np.float32(math.sqrt(key_sq)))
            for t in range(bs):
                terms[t, 3] = terms[t, 2] * terms[t, 2]
                terms[t, 4] = terms[t, 4] * terms[t, 4]
                value_max[at] = max(value_max[at], terms[t, 2])
            for g in range(groups):
                qrow = h * groups + g
                if b < full:
                    first_dot, second_dot = 0.0, 0.0  # float64: the forms take these with a 2^-20 margin only
                    for d in range(dim):
                        magnitude = abs(np.float64(q[i, qrow, d]))
                        first_dot += magnitude * steps[d]
                        second_dot += magnitude * abs(offsets[d])
                    key_dots[g, b, 0], key_dots[g, b, 1] = first_dot, second_dot
                top = np.float32(-np.inf)
                for t in range(bs):
                    total = np.float32(0.0)
                    for d in range(dim):
                        total += q[i, qrow, d] * keys[t, d]
                    scores[t] = total * np.float32(scale) if terms[t, 0] != 0 else np.float32(-np.inf)
                    top = max(top, scores[t])
                block_max[g, at] = top
                if top == -np.inf:
                    continue
                for t in range(bs):
                    if terms[t, 0] == 0:
                        continue
                    e = np.exp(scores[t] - top)
                    for k in range(5):
                        block_sums[g, at, k] += e * terms[t, k]
                    for d in range(dim):
                        partials[g, at, d] += e * values[t, d]
        return tail_key_norm

    @njit(cache=True, error_model="numpy")
    def _decode_layer(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, block_notes, token_notes, slots,
                      scratch_k, scratch_v, scratch_norms, tail_k, tail_v, tables, num_full, tail_lens, seq_slots,
                      starts, use_scratch, radius, tolerance, half, scale, k_bits, v_bits, shrink, certifying, margin,
                      count, tally_evaluations, tally_rungs, tally_bound, tally_ratio, tally_mass, score_k, score_v,
                      decay):
        """One pass per (sequence, KV head) over its blocks (_accumulate), the certificate (_finish), then for the
        whole layer: whether a certifying group is over its limit or broken (escalate), or accepted above `margin` of
        its limit (near); the scratch's scores (Scratch.touch: score_k, score_v, `decay`; empty arrays: none); and,
        with `count` and nothing to escalate, this layer's evaluations in the step's tally (Ladder.account)."""
        batch, heads, dim = q.shape
        kv_heads, bs = tail_k.shape[2], tail_k.shape[1]
        groups, nb = heads // kv_heads, tables.shape[1]
        out = np.zeros((batch, kv_heads, groups, dim), np.float32)
        rho = np.zeros((batch, kv_heads, groups, nb + 1), np.float32)
        val_contrib = np.zeros((batch, kv_heads, groups, nb + 1), np.float32)
        dev_contrib = np.zeros((batch, kv_heads, groups, nb + 1), np.float32)
        block_delta = np.zeros((batch, kv_heads, groups, nb), np.float32)
        per_head = np.zeros((11, batch, kv_heads, groups), np.float32)
        value_scale = np.zeros((batch, kv_heads, 1), np.float32)
        broken = np.zeros((batch, kv_heads), np.bool_)
        mass = np.zeros((batch, nb, kv_heads), np.float32)  # max over the group of each block's mass (scratch)
        for task in range(batch * kv_heads):
            i, h = task // kv_heads, task % kv_heads
            block_max = np.full((groups, nb + 1), -np.inf, np.float32)
            block_sums = np.zeros((groups, nb + 1, 5), np.float32)
            partials = np.zeros((groups, nb + 1, dim), np.float32)  # sum_j e_j v_j per block, e_j = exp(s_j - m_b)
            key_dots = np.zeros((groups, nb, 2))
            value_max = np.zeros(nb + 1, np.float32)
            tail_key_norm = _accumulate(
                i, h, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, token_notes, slots, scratch_k, scratch_v,
                scratch_norms, tail_k, tail_v, tables, num_full, tail_lens, seq_slots, starts, use_scratch, half, scale,
                k_bits, v_bits, shrink, block_max, block_sums, partials, key_dots, value_max)
            _finish(i, h, q, block_max, block_sums, partials, key_dots, value_max, block_notes, tables, slots,
                    use_scratch, num_full[i], nb, bs, tail_key_norm, radius[seq_slots[i], h], tolerance[i], scale,
                    (1 << k_bits) - 1, out, rho, val_contrib, dev_contrib, block_delta, per_head, value_scale,
                    broken, mass)
        escalate, near = False, False
        for i in range(batch):
            for h in range(kv_heads):
                if not certifying[i]:
                    continue
                escalate |= broken[i, h]
                for g in range(groups):
                    bound, limit = per_head[8, i, h, g], per_head[9, i, h, g]
                    escalate |= not bound <= limit
                    near |= bound / max(limit, 1e-30) > margin
        if count and not escalate:
            _tally(per_head, certifying, tally_evaluations, tally_rungs, tally_bound, tally_ratio, tally_mass)
        if score_k.shape[0]:
            _touch(score_k, score_v, slots, tables, num_full, mass, decay)
        return out, rho, val_contrib, dev_contrib, block_delta, per_head, value_scale, broken, mass, escalate, near

    @njit(cache=True, error_model="numpy")
    def _tally(per_head, certifying, evaluations, rungs, max_bound, max_ratio, tail_mass):
        """Ladder.account for a layer whose heads were all accepted at rung 0."""
        batch, kv_heads, groups = per_head.shape[1:]
        for i in range(batch):
            evaluations[i] += kv_heads * groups
            for h in range(kv_heads):
                for g in range(groups):
                    tail_mass[i] += per_head[2, i, h, g]
                    if certifying[i]:
                        bound, limit = per_head[8, i, h, g], per_head[9, i, h, g]
                        max_bound[i] = max(max_bound[i], bound)
                        if limit > 0:
                            max_ratio[i] = max(max_ratio[i], bound / max(limit, 1e-30))
            if certifying[i]:
                rungs[i, 0] += kv_heads * groups

    @njit(cache=True, error_model="numpy")
    def _finish(i, h, q, block_max, block_sums, partials, key_dots, value_max, block_notes, tables, slots,
                use_scratch, full, nb, bs, tail_key_norm, radius, tolerance, scale, k_levels, out, rho, val_contrib,
                dev_contrib, block_delta, per_head, value_scale, broken, mass):
        """reference.finish_decode and escalation.check for one (sequence, KV head), in float64: normalise the
        blocks' sums once, then every term of the bound, the limit (per_head rows: e_val, delta_t, alpha_t, w_all,
        w_tail, rms_low, score_error, cast, bound, limit, out_norm)."""
        groups, dim = block_max.shape[0], partials.shape[2]
        length = (nb + 1) * bs
        g_len, g_dim = _gamma(length + dim), _gamma(dim + 2)
        largest_n = 0.0
        for b in range(nb + 1):
            largest_n = max(largest_n, value_max[b])
        value_scale[i, h, 0] = largest_n
        tail_broken = not _finite(largest_n)
        for b in range(full):
            if not (use_scratch[i] and slots[tables[i, b], h, 0] >= 0):
                tail_broken |= not _finite(block_notes[tables[i, b], h, 0])
        weight, dev, grow, masses = np.zeros(nb + 1), np.zeros(nb + 1), np.zeros(nb), np.zeros(nb)
        for g in range(groups):
            top = -np.inf
            for b in range(nb + 1):
                top = max(top, block_max[g, b])
            total = 0.0
            for b in range(nb + 1):
                weight[b] = math.exp(block_max[g, b] - top) if block_sums[g, b, 0] > 0 else 0.0
                total += weight[b] * block_sums[g, b, 0]
            for b in range(nb + 1):
                weight[b] /= total
                for d in range(dim):
                    out[i, h, g, d] += np.float32(weight[b]) * partials[g, b, d]
            out_norm, q_norm, q_abs_sum = 0.0, 0.0, 0.0
            for d in range(dim):
                qd = np.float64(q[i, h * groups + g, d])
                out_norm += np.float64(out[i, h, g, d]) ** 2
                q_norm += qd * qd
                q_abs_sum += abs(qd)
            out_norm, q_norm = math.sqrt(out_norm), math.sqrt(q_norm)
            e_val, square_sum, alpha_t, w_tail, delta_t, low_sum, m_hi_part = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
            largest = q_norm * tail_key_norm
            for b in range(nb + 1):
                r = weight[b] * block_sums[g, b, 0]
                contrib, norm_sum = weight[b] * block_sums[g, b, 1], weight[b] * block_sums[g, b, 2]
                square, low = weight[b] * block_sums[g, b, 3], weight[b] * block_sums[g, b, 4]
                out_dot = 0.0
                for d in range(dim):
                    out_dot += weight[b] * partials[g, b, d] * np.float64(out[i, h, g, d])
                triangle = norm_sum + r * out_norm + contrib
                spread = r * out_norm * out_norm + square - 2 * out_dot
                slack = 2 * g_len * (square + r * out_norm * (out_norm + 2 * largest_n))
                dev[b] = min(triangle, math.sqrt(r * (max(spread, 0.0) + slack)) + contrib)  # block_spread
                rho[i, h, g, b], val_contrib[i, h, g, b], dev_contrib[i, h, g, b] = r, contrib, dev[b]
                if b < nb:
                    masses[b], grow[b] = r, 0.0
                e_val += contrib
                square_sum += square
                for k in range(1, 5):
                    tail_broken |= not _finite(block_sums[g, b, k])
                if b >= full:
                    low_sum += low  # the partial block (padding adds 0): exact keys
                    continue
                block = tables[i, b]
                promoted = use_scratch[i] and slots[block, h, 0] >= 0
                scale_dot, zero_dot = key_dots[g, b, 0], key_dots[g, b, 1]
                step_dot = (zero_dot * 2.0**-10 + scale_dot + q_abs_sum * 2.0**-24) * (1 + 2.0**-20)
                channel = block_notes[block, h, 1] * step_dot
                channel = math.inf if math.isnan(channel) else channel
                magnitude = (zero_dot + k_levels * scale_dot) * (1 + 2.0**-20) + (channel if promoted else 0.0)
                largest = max(largest, math.inf if math.isnan(magnitude) else magnitude)  # NaN metadata: refused
                mass[i, b, h] = max(mass[i, b, h], r)
                if promoted:
                    low_sum += low
                    continue
                delta = scale * min(q_norm * block_notes[block, h, 0], channel)
                block_delta[i, h, g, b], grow[b] = delta, math.expm1(delta)
                alpha_t += r
                w_tail += dev[b]
                delta_t = max(delta_t, delta)
                m_hi_part += r * grow[b]
                low_sum += low / (1 + grow[b])
            score_error = g_dim * scale * largest
            # certificate.spread_around_output, rms_lower_bound, output_rounding, bound_terms, threshold
            w_all = math.sqrt(max(square_sum - out_norm * out_norm, 0.0)
                              + 2 * g_len * (square_sum + out_norm * largest_n)) + e_val
            drift = math.exp(2 * score_error)
            mean = low_sum * (1 - 2 * g_len) / (drift * (1 + drift * (1 + g_len) * m_hi_part))
            rms_low = 0.0 if math.isnan(mean) else math.sqrt(max(mean, 0.0)) * (1 - 2.0**-20)
            rounding = (2 * score_error + 16 * UNIT + g_len) * largest_n
            e_key = _key_error(delta_t, alpha_t, radius, w_all, w_tail, e_val + rounding, grow, masses, dev, nb)
            bound = e_val + e_key + RELATIVE_MARGIN * (e_val + e_key) + rounding
            if not (_finite(bound) and bound >= 0 and _finite(out_norm)):
                bound = math.inf
            limit = tolerance * max(out_norm * (1 - g_dim) - bound, rms_low)
            if not _finite(limit):
                limit = -1.0
            row = per_head[:, i, h, g]
            row[0], row[1], row[2], row[3], row[4], row[5] = e_val, delta_t, alpha_t, w_all, w_tail, rms_low
            row[6], row[7], row[8], row[9], row[10] = score_error, 0.0, bound, limit, out_norm
        broken[i, h] = tail_broken

    @njit(cache=True, error_model="numpy")
    def _touch(score_k, score_v, slots, tables, num_full, mass, decay):
        """Scratch.touch: decay every score, raise the held pieces of the attended blocks to their block's mass."""
        for scores in (score_k, score_v):
            for c in range(scores.shape[0]):
                scores[c] *= decay
        for i in range(tables.shape[0]):
            for b in range(num_full[i]):
                for h in range(slots.shape[1]):
                    for kind, scores in ((0, score_k), (1, score_v)):
                        slot = slots[tables[i, b], h, kind]
                        if slot >= 0:
                            scores[slot] = max(scores[slot], mass[i, b, h])

    @njit(cache=True, error_model="numpy")
    def _scatter_rows(dst, src, dst_index, src_index):
        """dst[dst_index[r]] = src[src_index[r]] (src_index empty: src[r]); rows of [.., Hkv, D]."""
        for r in range(dst_index.shape[0]):
            dst[dst_index[r]] = src[src_index[r] if src_index.shape[0] else r]

    @njit(cache=True, error_model="numpy")
    def _write_layer(k, v, shadow_k, shadow_v, slot_mapping, tail_k, tail_v, tail_dst, tail_src, late_dst, late_src,
                     centre, radius, row_slots, fresh_rows, fresh_slots, first, last):
        """TieredKVCache._write without the quantization of filled blocks, in two parts around it: `first` writes
        the step's K/V into the shadows and the tokens of each sequence's first touched block into its tail buffer;
        `last` writes the tokens of a later partial block into the tail buffer and updates each sequence's value
        centre (the mean of a fresh sequence's first chunk) and radius R = max ||v_j - c||, rounded up."""
        none = np.empty(0, np.int64)
        if first:
            _scatter_rows(shadow_k, k, slot_mapping, none)
            _scatter_rows(shadow_v, v, slot_mapping, none)
            _scatter_rows(tail_k, k, tail_dst, tail_src)
            _scatter_rows(tail_v, v, tail_dst, tail_src)
        if not last:
            return
        _scatter_rows(tail_k, k, late_dst, late_src)
        _scatter_rows(tail_v, v, late_dst, late_src)
        heads, dim = v.shape[1], v.shape[2]
        if fresh_slots.shape[0]:
            sums = np.zeros((centre.shape[0], heads, dim))
            counts = np.zeros(centre.shape[0])
            for r in fresh_rows:
                counts[row_slots[r]] += 1
                for h in range(heads):
                    for d in range(dim):
                        sums[row_slots[r], h, d] += v[r, h, d]
            for slot in fresh_slots:
                for h in range(heads):
                    radius[slot, h] = 0.0
                    for d in range(dim):
                        centre[slot, h, d] = sums[slot, h, d] / counts[slot]
        for r in range(v.shape[0]):
            slot = row_slots[r]
            for h in range(heads):
                square = 0.0
                for d in range(dim):
                    square += (np.float64(v[r, h, d]) - centre[slot, h, d]) ** 2
                up = np.nextafter(np.float32(math.sqrt(square) * (1 + 2.0**-20)), np.float32(np.inf))
                radius[slot, h] = max(radius[slot, h], up)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.uint16, torch.int64: np.int64, torch.int32: np.int32,
                 torch.uint8: np.uint8, torch.bool: np.bool_}  # float16 as its bits: numba has no float16 arrays


def _alias(x: torch.Tensor) -> np.ndarray:
    """x's memory as a numpy array, without a tensor operation (Tensor.numpy() is several): the caller keeps x alive
    for as long as the array is used."""
    dtype = np.dtype(_NUMPY_DTYPES[x.dtype])
    if x.numel() == 0:
        return np.zeros(x.shape, dtype)
    span = sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1
    memory = (ctypes.c_char * (span * dtype.itemsize)).from_address(x.data_ptr())
    flat = np.frombuffer(memory, dtype=dtype, count=span)
    return np.lib.stride_tricks.as_strided(flat, x.shape, [s * dtype.itemsize for s in x.stride()])


_NUMPY: dict[int, tuple] = {}  # id -> (tensor, its numpy array): persistent tensors are converted once


def _numpy(x: torch.Tensor) -> np.ndarray:
    """x as a numpy array sharing its memory (float16 as bits), made once while x lives (a layer's tensors for the
    cache's lifetime, a step's view for the step)."""
    entry = _NUMPY.get(id(x))
    if entry is None or entry[0] is not x:
        if len(_NUMPY) > 4096:
            _NUMPY.pop(next(iter(_NUMPY)))
        entry = _NUMPY[id(x)] = (x, _alias(x))
    return entry[1]


def _fields(obj, names: tuple[str, ...]) -> list[np.ndarray]:
    return [_numpy(getattr(obj, n)) for n in names]


LAYER = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "block_notes", "token_notes", "slots",
         "scratch_k", "scratch_v", "scratch_norms", "tail_k", "tail_v")
VIEW = ("block_tables", "num_full", "tail_lens", "slots", "start", "use_scratch")
TALLY = ("evaluations", "rungs", "max_bound", "max_ratio", "tail_mass")
NO_TALLY = (np.zeros(0, np.int64), np.zeros((0, 5), np.int64), *(np.zeros(0, np.float32),) * 3)
NO_SCORES = np.zeros(0, np.float32)


class Decoded:
    """One layer's compiled certified decode: the output, whether anything escalates or is near its limit, whether
    the kernel counted the layer in the tally, and the whole DecodeResult on demand (for the ladder)."""

    def __init__(self, arrays: tuple, length: int, counted: bool):
        *self._arrays, escalate, near = arrays
        self.escalate, self.near = bool(escalate), bool(near)
        self.counted = counted and not self.escalate  # the kernel counts a layer only when nothing escalates
        self.length = length
        self.out = torch.from_numpy(self._arrays[0])

    def result(self):
        from kernels.reference import DecodeResult

        out, rho, val_contrib, dev_contrib, block_delta, per_head, value_scale, broken, mass = self._arrays
        t = torch.from_numpy
        heads = [t(x) for x in per_head]
        return DecodeResult(out=self.out, rho=t(rho), val_contrib=t(val_contrib), dev_contrib=t(dev_contrib),
                            block_delta=t(block_delta), e_val=heads[0], delta_t=heads[1], alpha_t=heads[2],
                            w_all=heads[3], w_tail=heads[4], rms_low=heads[5], score_error=heads[6], cast=heads[7],
                            value_scale=t(value_scale), broken=t(broken), length=self.length, bound=heads[8],
                            limit=heads[9], mass=t(mass))


def decode_layer(q, layer, view, scale: float, quantizer, radius, tolerance, certifying=None, margin: float = 1.0,
                 tally=None, scores=None, decay: float = 1.0) -> Decoded:
    """The certified decode of one layer in one call (see the module docstring): radius [S, Hkv] by sequence slot,
    tolerance [Bd]; certifying [Bd] bool (None: every row) for the flags; with a Tally (tiers.Tally) the layer is
    counted there when nothing escalates; with the scratch's scores ({"k": [C], "v": [C]}) they are decayed by `decay`
    and raised to the attended blocks' masses."""
    from kernels.certificate import norm_shrink

    certifying = np.ones(q.shape[0], np.bool_) if certifying is None else _numpy(certifying)
    counts = NO_TALLY if tally is None else _fields(tally, TALLY)
    score_k, score_v = (NO_SCORES, NO_SCORES) if scores is None else (_numpy(scores["k"]), _numpy(scores["v"]))
    arrays = _decode_layer(_alias(q), *_fields(layer, LAYER), *_fields(view, VIEW), _numpy(radius),
                           _numpy(tolerance), HALF, float(scale), quantizer.k_bits, quantizer.v_bits,
                           norm_shrink(q.shape[-1]), certifying, margin, tally is not None, *counts, score_k, score_v,
                           decay)
    return Decoded(arrays, (view.block_tables.shape[1] + 1) * layer.tail_k.shape[1], tally is not None)


def certified_decode(q, layer, view, scale: float, quantizer, radius: torch.Tensor, tolerance: torch.Tensor):
    """kernels.reference.certified_decode and escalation.check in one compiled call: the DecodeResult with its
    bound, limit (tolerance [Bd], radius [S, Hkv] by sequence slot) and block masses filled in."""
    return decode_layer(q, layer, view, scale, quantizer, radius, tolerance).result()


def touch_scratch(score_k, score_v, slots, tables, num_full, mass, decay: float) -> None:
    _touch(*(_alias(x) for x in (score_k, score_v, slots, tables, num_full, mass)), decay)


def warm_up() -> tuple[float, bool]:
    """Compiles (or loads from the cache) every compiled function the engine calls, on a tiny layer; returns the
    seconds it took and whether anything was compiled rather than loaded."""
    from types import SimpleNamespace

    start = time.perf_counter()
    blocks, heads, dim, bs = 2, 1, 16, 16

    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)

    half = torch.float16
    layer = SimpleNamespace(
        k_codes=zeros(blocks, heads, bs, dim, dtype=torch.uint8), k_scale=zeros(blocks, heads, dim, dtype=half),
        k_zero=zeros(blocks, heads, dim, dtype=half), v_codes=zeros(blocks, heads, bs, dim // 2, dtype=torch.uint8),
        v_scale=zeros(blocks, heads, bs, 1, dtype=half), v_zero=zeros(blocks, heads, bs, 1, dtype=half),
        block_notes=zeros(blocks, heads, 2), token_notes=zeros(blocks, heads, bs, 2, dtype=half),
        slots=torch.full((blocks, heads, 2), -1, dtype=torch.int32), scratch_k=zeros(1, bs, dim),
        scratch_v=zeros(1, bs, dim), scratch_norms=zeros(1, bs), tail_k=zeros(1, bs, heads, dim),
        tail_v=zeros(1, bs, heads, dim))
    view = SimpleNamespace(block_tables=torch.ones(1, 1, dtype=torch.int64), num_full=torch.ones(1, dtype=torch.int64),
                           tail_lens=torch.ones(1, dtype=torch.int64), slots=torch.zeros(1, dtype=torch.int64),
                           start=torch.zeros(1, dtype=torch.int64), use_scratch=torch.ones(1, dtype=torch.bool))
    tally = SimpleNamespace(evaluations=zeros(1, dtype=torch.int64), rungs=zeros(1, 5, dtype=torch.int64),
                            max_bound=zeros(1), max_ratio=zeros(1), tail_mass=zeros(1))
    quantizer = SimpleNamespace(k_bits=8, v_bits=4)
    # numba compiles apart for contiguous and strided arrays, and the engine passes both: the query, keys and values
    # are views of the model's [1, heads, T, D] tensors, strided when T > 1
    for strided in (False, True):
        new = torch.ones(1, heads, 2 * dim)[..., ::2] if strided else torch.ones(1, heads, dim)
        decode_layer(new, layer, view, 0.25, quantizer, torch.ones(1, heads), torch.ones(1),
                     torch.ones(1, dtype=torch.bool), 0.1, tally, {"k": zeros(1), "v": zeros(1)}, 0.9)
        plan = SimpleNamespace(**{name: torch.zeros(1 if name == "row_slots" else 0, dtype=torch.int64)
                                  for name in WRITE_PLAN})
        write_layer(new, new, zeros(blocks, bs, heads, dim), zeros(blocks, bs, heads, dim),
                    torch.zeros(1, dtype=torch.int64), layer.tail_k, layer.tail_v, plan, zeros(1, heads, dim),
                    zeros(1, heads), True, True)
    touch_scratch(zeros(1), zeros(1), layer.slots, view.block_tables, view.num_full, zeros(1, 1, heads), 0.9)
    compiled = any(sum(f.stats.cache_misses.values()) for f in (_decode_layer, _write_layer, _touch))
    return time.perf_counter() - start, compiled



WRITE_PLAN = ("tail_dst", "tail_src", "late_dst", "late_src", "row_slots", "fresh_rows", "fresh_slots")


def write_layer(k, v, shadow_k, shadow_v, slot_mapping, tail_k, tail_v, plan, centre, radius, first: bool,
                last: bool) -> None:
    """The cheap part of the write path in one call (_write_layer); k, v [T, Hkv, D] float32, the shadows
    [NB, bs, Hkv, D], the tails [S, bs, Hkv, D], plan a tiers.WritePlan, centre [S, Hkv, D], radius [S, Hkv]."""
    rows = lambda x: _numpy(x).reshape(-1, *x.shape[-2:])  # noqa: E731  [positions, Hkv, D]
    tail_dst, tail_src, late_dst, late_src, row_slots, fresh_rows, fresh_slots = _fields(plan, WRITE_PLAN)
    _write_layer(_alias(k), _alias(v), rows(shadow_k), rows(shadow_v), _numpy(slot_mapping), rows(tail_k),
                 rows(tail_v), tail_dst, tail_src, late_dst, late_src, _numpy(centre), _numpy(radius), row_slots,
                 fresh_rows, fresh_slots, first, last)
