"""PyTorch twins of the kernels: the definition of what each kernel computes, and the path used off CUDA.

Shapes: T new tokens (flattened over sequences), B sequences, H query heads, Hkv KV heads (H = G * Hkv),
D head dim, L context length, blocks of `block_size` tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.certificate import (block_deltas, block_spread, cast_error, gamma, lower_norm, rms_lower_bound,
                                 spread_around_output)
from kernels.formats import Codes, channel_error_ratio, error_norms, token_error_norms, token_norms


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """cache [num_blocks, block_size, ...], block_table [..., nb] -> [..., nb * block_size, ...] (first `length`)."""
    gathered = take(cache, block_table)
    gathered = gathered.flatten(block_table.dim() - 1, block_table.dim())
    return gathered if length is None else gathered[..., :length, :, :]


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an index of any shape along x's first dim (index_select: several times faster on CPU than
    advanced indexing with a 2-D index)."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


# cuDNN's SDPA builds an execution plan for every new shape: 1.4 ms of CPU per call on an H100, at every decode step
# (the context grows by one token). The other fused backends have no such cost.
CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q, k, v, **kwargs) -> torch.Tensor:
    if not q.is_cuda:  # the default choice, as transformers' own SDPA path makes it
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(CUDA_SDPA):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


@contextlib.contextmanager
def ieee_float32():
    """float32 matmuls in IEEE single precision whatever the embedding process chose (TF32 on CUDA, bfloat16 passes on
    CPUs that have them): the certificate's rounding terms assume float32 arithmetic. Also a decorator."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def window_mask(length: int, context_lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Bd, length] bool: positions a decode query attends, the first context_lens[b] tokens, or with a sliding window
    the last `window` of them (the query's own position included, as in transformers)."""
    position = torch.arange(length, device=context_lens.device)[None, :]
    visible = position < context_lens[:, None]
    if window is not None:
        visible &= position >= context_lens[:, None] - window
    return visible


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, lengths: list[int] | None = None,
                     window: int | None = None, mask: torch.Tensor | None = None):
    """out[b] = softmax(scale * q[b] K_b^T) V_b over the first context_lens[b] cached tokens of sequence b (the last
    `window` of them with a sliding window).

    q [Bd, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [Bd, nb]; context_lens [Bd]
    (`lengths`: the same on the host, which spares a device sync; `mask`: decode_mask's, when a caller made it once
    for every layer). Returns [Bd, H, D]. GQA: query head h reads KV head h // G.
    """
    lengths = context_lens.tolist() if lengths is None else lengths
    longest = max(lengths)
    keys = gather_blocks(k_cache, block_tables)[:, :longest].transpose(1, 2)  # [Bd, Hkv, L, D]
    values = gather_blocks(v_cache, block_tables)[:, :longest].transpose(1, 2)
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    if mask is None:
        mask = decode_mask(lengths, context_lens, window)
    out = sdpa(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def decode_mask(lengths: list[int], context_lens: torch.Tensor, window: int | None = None) -> torch.Tensor | None:
    """[Bd, 1, 1, L] bool for decode_attention, or None when every row attends all of the longest context."""
    longest = max(lengths)
    if min(lengths) == longest and (window is None or longest <= window):
        return None
    return window_mask(longest, context_lens, window)[:, None, None, :]


def prefill_attention(q, keys, values, scale, window: int | None = None):
    """Causal attention of n new tokens over a context of L >= n tokens whose last n are the new ones.

    q [n, H, D]; keys, values [L, Hkv, D]. Query i sits at position L - n + i and sees keys 0 .. L - n + i (with a
    sliding window, only the last `window` of those).
    """
    n, length = q.shape[0], keys.shape[0]
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, keys, values))
    if n == length and (window is None or window >= length):
        # no cached prefix: the same call as transformers' SDPA path, so prefill matches it bit for bit
        out = sdpa(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    else:
        query_at = torch.arange(n, device=q.device) + (length - n)
        out = sdpa(q4, k4, v4, attn_mask=window_mask(length, query_at + 1, window), scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(q, k_cache, v_cache, batch, scale, window: int | None = None, mask=None):
    """Attention of every new token of a ForwardBatch over its sequence's cached tokens (causal, within `window`).

    q [T, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] already holding this step's K/V; `mask` the
    decodes' decode_mask when the caller made it once a step. Returns [T, H, D].
    """
    if not batch.prefill_seqs:  # decodes only: row i is sequence i's token, no gather or scatter of rows
        return decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale, batch.decode_lens,
                                window, mask)
    out = torch.empty_like(q)
    if batch.decode_rows.numel():
        seqs = batch.decode_seqs
        out[batch.decode_rows] = decode_attention(q[batch.decode_rows], k_cache, v_cache, batch.block_tables[seqs],
                                                  batch.context_lens[seqs], scale, batch.decode_lens, window, mask)
    for seq in batch.prefill_seqs:
        lo, hi = batch.query_starts[seq], batch.query_starts[seq + 1]
        length = batch.starts[seq] + hi - lo
        table = batch.block_tables[seq]
        out[lo:hi] = prefill_attention(q[lo:hi], gather_blocks(k_cache, table, length),
                                       gather_blocks(v_cache, table, length), scale, window)
    return out


def reference_decode(q, keys, values, context_lens, scale, window: int | None = None):
    """The promise's reference in float64: (O_ref [Bd, H, D], RMS_ref [Bd, H] = sqrt(sum_j p_j ||v_j||^2)) for decode
    queries q [Bd, H, D] over exact keys, values [Bd, L, Hkv, D] (each sequence's first context_lens[b] tokens)."""
    batch, heads, dim = q.shape
    kv_heads = keys.shape[2]
    grouped = q.double().view(batch, kv_heads, heads // kv_heads, dim)
    k, v = keys.double().transpose(1, 2), values.double().transpose(1, 2)  # [Bd, Hkv, L, D]
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * scale  # [Bd, Hkv, G, L]
    visible = window_mask(keys.shape[1], context_lens, window)[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1)
    out = torch.matmul(probs, v).view(batch, heads, dim)
    rms = torch.matmul(probs, (v * v).sum(dim=-1, keepdim=True)).sqrt().view(batch, heads)
    return out, rms


@dataclass(frozen=True, slots=True)
class QuantizedLayer:
    """Tier 1 of one layer (device). NB blocks, Hkv KV heads, bs tokens a block, D channels, S sequence slots,
    C scratch slots. Codes and metadata as kernels.formats stores them; annotations packed so that one gather
    fetches each kind."""

    k_codes: torch.Tensor  # [NB, Hkv, bs, D * k_bits / 8] uint8
    k_scale: torch.Tensor  # [NB, Hkv, *key_meta] (min-max: [NB, Hkv, D], per block and channel)
    k_zero: torch.Tensor  # [NB, Hkv, *key_meta] float16
    v_codes: torch.Tensor  # [NB, Hkv, bs, D * v_bits / 8] uint8
    v_scale: torch.Tensor  # [NB, Hkv, bs, value_meta] (min-max: D / 16, per token and 16-channel group)
    v_zero: torch.Tensor  # [NB, Hkv, bs, value_meta] float16
    block_notes: torch.Tensor  # [NB, Hkv, 2] float32: eps_b = max_j ||k_j - k^_j|| (inf: broken), kappa_b
    token_notes: torch.Tensor  # [NB, Hkv, bs, 2] float16, rounded up: eta_j = ||v_j - v^_j||, ||v^_j||
    slots: torch.Tensor  # [NB, Hkv, 2] int32: scratch slots of the block's exact keys and values, -1 if none
    tail_k: torch.Tensor  # [S, bs, Hkv, D] model dtype: each sequence's trailing partial block, exact
    tail_v: torch.Tensor  # [S, bs, Hkv, D]
    scratch_k: torch.Tensor  # [C, bs, D] model dtype: promoted exact key blocks (one KV head each)
    scratch_v: torch.Tensor  # [C, bs, D]
    scratch_norms: torch.Tensor  # [C, bs] float32: the float32 norm of each token of scratch_v's pieces

    eps = property(lambda self: self.block_notes[..., 0])
    kappa = property(lambda self: self.block_notes[..., 1])
    eta = property(lambda self: self.token_notes[..., 0])
    vnorm = property(lambda self: self.token_notes[..., 1])
    k_slot = property(lambda self: self.slots[..., 0])
    v_slot = property(lambda self: self.slots[..., 1])


@dataclass(frozen=True, slots=True)
class QuantizedBlocks:
    """Tier-1 contents of N whole blocks (kernels.formats layout) with their write-time annotations."""

    keys: Codes  # codes [N, Hkv, bs, D * k_bits / 8] uint8, scale and zero [N, Hkv, D] float16
    values: Codes  # codes [N, Hkv, bs, D * v_bits / 8] uint8, scale and zero [N, Hkv, bs, D / 16] float16
    block_notes: torch.Tensor  # [N, Hkv, 2] float32: eps_b, kappa_b (QuantizedLayer.block_notes)
    token_notes: torch.Tensor  # [N, Hkv, bs, 2] float16: eta_j, ||v^_j|| (QuantizedLayer.token_notes)


@ieee_float32()
def quantize_blocks(keys: torch.Tensor, values: torch.Tensor, quantizer) -> QuantizedBlocks:
    """Quantize-on-write: keys, values [N, Hkv, bs, D] exact -> codes, metadata and the error norms measured against
    the dequantization attention uses, rounded metadata included (rounded up: they stay upper bounds)."""
    k_codes, v_codes = quantizer.quantize_keys(keys), quantizer.quantize_values(values)
    k_hat, v_hat = quantizer.dequantize_keys(k_codes), quantizer.dequantize_values(v_codes)
    step = quantizer.key_step(k_codes, keys.shape[-1])
    block_notes = torch.stack([error_norms(keys, k_hat), channel_error_ratio(keys, k_hat, step)], dim=-1)
    token_notes = torch.stack([token_error_norms(values, v_hat), token_norms(v_hat)], dim=-1)
    return QuantizedBlocks(k_codes, v_codes, block_notes, token_notes)


def scatter_blocks(dst: torch.Tensor, slots: torch.Tensor, src: torch.Tensor) -> None:
    """dst[slots[i]] = src[i] in dst's dtype: promoted exact blocks into the scratch. dst [C, bs, D], slots [n] int64
    (distinct), src [n, bs, D]."""
    dst[slots] = src.to(dst.dtype)


@dataclass(frozen=True, slots=True)
class DecodeView:
    """The decoding sequences of one step, shared by all layers (make_view builds it)."""

    block_tables: torch.Tensor  # [Bd, nb] int64: the full (quantized) blocks each sequence attends, padded with 0
    num_full: torch.Tensor  # [Bd] int64: entries of block_tables in use (full blocks within the window)
    tail_lens: torch.Tensor  # [Bd] int64: tokens in the partial block (context % bs)
    slots: torch.Tensor  # [Bd] int64: sequence slots (tail buffers)
    start: torch.Tensor  # [Bd] int64: first attended token, counted from the first table block (sliding window; else 0)
    full: torch.Tensor  # [Bd, nb] bool: block i < num_full
    valid: torch.Tensor  # [Bd, (nb + 1) * bs] bool: attended positions (full blocks, then the partial block)
    use_scratch: torch.Tensor  # [Bd] bool: exact scratch pieces replace quantized blocks (not for the naive baseline)

    def select(self, index: torch.Tensor) -> DecodeView:
        return DecodeView(*(getattr(self, name)[index] for name in self.__slots__))


def make_view(block_tables, num_full, tail_lens, slots, block_size: int, use_scratch, start=None) -> DecodeView:
    nb, device = block_tables.shape[1], block_tables.device
    start = torch.zeros_like(num_full) if start is None else start
    full = torch.arange(nb, device=device)[None, :] < num_full[:, None]
    offset = torch.arange(block_size, device=device)[None, :]
    partial = (offset < tail_lens[:, None]) & (offset + num_full[:, None] * block_size >= start[:, None])
    in_window = torch.arange(nb * block_size, device=device)[None, :] >= start[:, None]
    valid = torch.cat([full.repeat_interleave(block_size, dim=1) & in_window, partial], dim=1)
    return DecodeView(block_tables, num_full, tail_lens, slots, start, full, valid, use_scratch)


@dataclass(frozen=True, slots=True)
class DecodeAccumulators:
    """What one pass over the cache reads off it (decode_accumulators below, or the Triton kernel). Blocks b are the nb
    full blocks, then the partial one (index nb). Each block keeps its own reference m_b = its largest score, and the
    sums over its tokens of e_j, e_j eta_j, e_j n_j and e_j n_j^2 with e_j = exp(s_j - m_b): a split of the sequence
    writes its blocks without knowing the others, and finish_decode normalises once. n_j >= the norm of the value
    attention reads, l_j <= the norm of the exact value (certificate.rms_lower_bound)."""

    out: torch.Tensor  # [Bd, Hkv, G, D] float32: O = sum_j p^_j v^_j
    block_max: torch.Tensor  # [Bd, Hkv, G, nb + 1]: m_b (-inf for a block with no token)
    block_sums: torch.Tensor  # [Bd, Hkv, G, nb + 1, 5]: sum e, sum e eta, sum e n, sum e n^2, sum e l^2
    key_dots: torch.Tensor  # [Bd, Hkv, G, nb, 2]: Quantizer.key_contractions (min-max: sum |q| scale, sum |q| |zero|)
    value_max: torch.Tensor  # [Bd, Hkv, nb + 1]: max_j n_j over the block's attended tokens
    out_dots: torch.Tensor | None = None  # [Bd, Hkv, G, nb + 1]: O . sum_(j in b) p^_j v^_j (the twin: O is known)
    extra_terms: int = 0  # terms added to n in gamma_n for the kernel's dots and sums (certificate.tensor_core_terms)


@dataclass(frozen=True, slots=True)
class DecodeResult:
    """Output and the certificate's accumulators (kernels.certificate). Per-block tensors list the nb full blocks
    and then the partial one (index nb); per-head tensors are [Bd, Hkv, G]."""

    out: torch.Tensor  # [Bd, Hkv, G, D] float32: O = sum_j p^_j v^_j
    rho: torch.Tensor  # [Bd, Hkv, G, nb + 1]: block masses
    val_contrib: torch.Tensor  # [Bd, Hkv, G, nb + 1]: sum_(j in b) p^_j eta_j
    dev_contrib: torch.Tensor  # [Bd, Hkv, G, nb + 1]: W_b' >= sum_(j in b) p^_j ||v_j - O|| (W_T' per block)
    block_delta: torch.Tensor  # [Bd, Hkv, G, nb]: Delta_b for blocks of T, 0 for the others
    e_val: torch.Tensor  # sum_j p^_j eta_j
    delta_t: torch.Tensor  # max Delta_b over T
    alpha_t: torch.Tensor  # mass of T
    w_all: torch.Tensor  # W' (certificate.spread_around_output)
    w_tail: torch.Tensor  # W_T'
    rms_low: torch.Tensor  # a lower bound of the reference's RMS norm of the attended values (certificate)
    score_error: torch.Tensor  # gamma_(D+2) tau max_j sum_c |q_c| |k^_jc|: the float32 score error bound
    cast: torch.Tensor  # ||O cast to q's dtype - O||: the rounding of what attention serves
    value_scale: torch.Tensor  # [Bd, Hkv, 1]: max_j n_j
    broken: torch.Tensor  # [Bd, Hkv] bool: some annotation of a quantized block is not finite (rung 4)
    length: int  # tokens attended per row, padding included, plus the kernel's extra_terms: the n of gamma_n
    bound: torch.Tensor | None = None  # [Bd, Hkv, G]: the bound and limit, when the kernel checked them itself
    limit: torch.Tensor | None = None  # (the compiled CPU path; else escalation.check computes them)
    mass: torch.Tensor | None = None  # [Bd, nb, Hkv]: each block's largest mass over the group (else from rho)

    def block_mass(self) -> torch.Tensor:
        """[Bd, nb, Hkv]: each full block's mass, the largest over the group's query heads (the scratch's score)."""
        return self.mass if self.mass is not None else self.rho[..., :-1].amax(dim=2).transpose(1, 2)


@ieee_float32()
def certified_decode(q, layer: QuantizedLayer, view: DecodeView, scale: float, quantizer) -> DecodeResult:
    """Certified paged decode attention (the twin end to end): q [Bd, H, D] -> DecodeResult."""
    return finish_decode(decode_accumulators(q, layer, view, scale, quantizer), q, layer, view, scale, quantizer)


def used_slots(layer: QuantizedLayer, view: DecodeView) -> torch.Tensor:
    """[Bd, nb, Hkv, 2]: the scratch slots attention reads for keys and values of each block, -1: tier-1 codes."""
    return torch.where(view.use_scratch[:, None, None, None], take(layer.slots, view.block_tables), -1)


@ieee_float32()
def decode_accumulators(q, layer: QuantizedLayer, view: DecodeView, scale: float, quantizer) -> DecodeAccumulators:
    """Dequantized keys/values per block, exact partial and promoted blocks, softmax in float32. Full blocks stay in
    the gathered layout [Bd, nb, Hkv, bs, D]: one small matmul per block and head, no copy into one long sequence."""
    batch, heads, dim = q.shape
    kv_heads, bs = layer.tail_k.shape[2], layer.tail_k.shape[1]
    groups, tables, nb = heads // kv_heads, view.block_tables, view.block_tables.shape[1]
    slots = used_slots(layer, view)
    k_scale, k_zero = take(layer.k_scale, tables), take(layer.k_zero, tables)
    keys = _promoted(quantizer.dequantize_keys(Codes(take(layer.k_codes, tables), k_scale, k_zero)), layer.scratch_k,
                     slots[..., 0])
    values = _promoted(quantizer.dequantize_values(Codes(take(layer.v_codes, tables), take(layer.v_scale, tables),
                                                         take(layer.v_zero, tables))), layer.scratch_v, slots[..., 1])
    tail_k, tail_v = (x[view.slots].transpose(1, 2).float().contiguous()  # [Bd, Hkv, bs, D]
                      for x in (layer.tail_k, layer.tail_v))
    grouped = q.float().view(batch, kv_heads, groups, dim)
    valid = view.valid.view(batch, 1, 1, nb + 1, bs)
    scores = torch.cat([torch.matmul(grouped[:, None], keys.transpose(-1, -2)).permute(0, 2, 3, 1, 4),
                        torch.matmul(grouped, tail_k.transpose(-1, -2))[:, :, :, None]], dim=3)
    scores = scores.mul_(scale).masked_fill_(~valid, -torch.inf)  # [Bd, Hkv, G, nb + 1, bs]
    weights = torch.softmax(scores.flatten(-2), dim=-1).view(scores.shape)
    partial = torch.matmul(weights[:, :, :, nb], tail_v)  # [Bd, Hkv, G, D]: the partial block's share of O
    if nb:
        blocks = torch.matmul(weights[:, :, :, :nb].permute(0, 3, 1, 2, 4), values)  # [Bd, nb, Hkv, G, D]
        out = partial + blocks.sum(dim=1)
        block_dots = (blocks * out[:, None]).sum(dim=-1).permute(0, 2, 3, 1)
    else:
        out, block_dots = partial, partial.new_zeros(*partial.shape[:-1], 0)
    out_dots = torch.cat([block_dots, (partial * out).sum(dim=-1, keepdim=True)], dim=-1)  # O . P_b, partial last
    block_max = scores.amax(dim=-1)
    e = torch.where(valid, torch.exp(scores - block_max[..., None]), 0.0)
    exact_norms = take(layer.scratch_norms, slots[..., 1].clamp(min=0).long()).transpose(1, 2)  # [Bd, Hkv, nb, bs]
    terms = _token_terms(take(layer.token_notes, tables), (view.full[:, :, None] & (slots[..., 1] < 0)).transpose(1, 2),
                         exact_norms, tail_v, view)  # [Bd, Hkv, nb + 1, bs, 5]
    dots = quantizer.key_contractions(grouped.abs(), k_scale, k_zero)
    dots = torch.where(view.full[:, None, None, :, None], dots, 0.0)  # padding entries of the tables: nothing
    sums = torch.matmul(e.transpose(2, 3), terms).transpose(2, 3)  # [Bd, Hkv, G, nb + 1, 5]
    return DecodeAccumulators(out=out, block_max=block_max, block_sums=sums, key_dots=dots,
                              value_max=terms[..., 2].amax(dim=-1), out_dots=out_dots)


@ieee_float32()
def finish_decode(acc: DecodeAccumulators, q, layer: QuantizedLayer, view: DecodeView, scale: float,
                  quantizer) -> DecodeResult:
    """The certificate's per-head terms (kernels.certificate) from one pass's accumulators: normalises the blocks'
    sums by the softmax denominator, then adds what the metadata alone gives (Delta_b, the score error bound) and the
    rounding of the output into q's dtype (what attention serves)."""
    batch, kv_heads, groups, nb = acc.key_dots.shape[:4]
    bs, dim = layer.tail_k.shape[1], q.shape[-1]
    length = (nb + 1) * bs + acc.extra_terms  # the n of the rounding terms' gamma_n
    present = acc.block_sums[..., 0] > 0
    weight = torch.where(present, torch.exp(acc.block_max - acc.block_max.amax(dim=-1, keepdim=True)), 0.0)
    weight = weight / (weight * acc.block_sums[..., 0]).sum(dim=-1, keepdim=True)
    rho, val_contrib, norm_sum, block_square, low_square = (acc.block_sums * weight[..., None]).unbind(-1)
    out_norm = acc.out.norm(dim=-1)
    e_val, square_sum = val_contrib.sum(dim=-1), block_square.sum(dim=-1)
    value_scale = acc.value_max.amax(dim=-1, keepdim=True)  # [Bd, Hkv, 1]
    dev_contrib = norm_sum + rho * out_norm[..., None] + val_contrib
    if acc.out_dots is not None:
        dev_contrib = torch.minimum(dev_contrib, block_spread(acc.out_dots, out_norm[..., None], rho, block_square,
                                                              val_contrib, value_scale[..., None], length, dim))
    slots = used_slots(layer, view)
    in_tail = (view.full[:, :, None] & (slots[..., 0] < 0)).transpose(1, 2)  # [Bd, Hkv, nb]: keys read quantized
    block_notes = take(layer.block_notes, view.block_tables).transpose(1, 2)  # [Bd, Hkv, nb, 2]
    block_delta, score_error = _key_terms(quantizer, q.float().view(batch, kv_heads, groups, dim), acc.key_dots,
                                          block_notes, (layer.k_scale, layer.k_zero), in_tail, slots[..., 0] >= 0,
                                          layer.tail_k[view.slots], view, scale, acc.extra_terms)
    mask = in_tail[:, :, None].float()
    return DecodeResult(
        out=acc.out, rho=rho, val_contrib=val_contrib, dev_contrib=dev_contrib, block_delta=block_delta, e_val=e_val,
        delta_t=block_delta.amax(dim=-1) if nb else out_norm.new_zeros(out_norm.shape),
        alpha_t=(rho[..., :nb] * mask).sum(dim=-1),
        w_all=spread_around_output(square_sum, out_norm, e_val, value_scale, length, dim),
        w_tail=(dev_contrib[..., :nb] * mask).sum(dim=-1), score_error=score_error, value_scale=value_scale,
        rms_low=rms_lower_bound(low_square, block_delta, rho, score_error, length, dim),
        cast=cast_error(acc.out, acc.out.to(q.dtype)),
        broken=~(torch.isfinite(torch.where(in_tail, block_notes[..., 0], 0.0)).all(dim=-1)
                 & torch.isfinite(acc.block_sums[..., 1:]).all(dim=(2, 3, 4))
                 & torch.isfinite(acc.value_max).all(dim=-1)),
        length=length,
    )


def _token_terms(stored, value_quant, exact_norms, tail_v, view):
    """Per attended position [Bd, Hkv, nb + 1, bs, 5]: 1, eta_j (0 where values are exact), n_j >= the norm of the
    value attention reads, n_j^2, and l_j^2 with l_j <= ||v_j||; all 0 on padding. Quantized values: n_j = the stored
    ||v^_j||, l_j = its lower bound minus eta_j; exact values (promoted pieces, whose float32 norms the scratch keeps,
    and the partial block): their computed norm widened by gamma_(D+2) either way. stored [Bd, nb, Hkv, bs, 2] (eta_j,
    ||v^_j||), value_quant [Bd, Hkv, nb], exact_norms [Bd, Hkv, nb, bs] (read where not value_quant), tail_v
    [Bd, Hkv, bs, D]."""
    batch, nb, kv_heads, bs, _ = stored.shape
    widen = gamma(tail_v.shape[-1] + 2)
    stored = stored.transpose(1, 2)
    quantized = value_quant[..., None]
    measured = stored[..., 0].float()
    terms = torch.empty(batch, kv_heads, nb + 1, bs, 5, device=stored.device)
    terms[..., 0] = view.valid.view(batch, 1, nb + 1, bs)
    terms[:, :, :nb, :, 1] = torch.where(quantized, measured, 0.0)
    terms[:, :, :nb, :, 2] = torch.where(quantized, stored[..., 1].float(), exact_norms * (1 + widen))
    low = torch.where(quantized, lower_norm(stored[..., 1], tail_v.shape[-1]) - measured, exact_norms * (1 - widen))
    terms[:, :, :nb, :, 4] = low.clamp_min(0)
    tail_norm = tail_v.norm(dim=-1)
    terms[:, :, nb, :, 1] = 0.0
    terms[:, :, nb, :, 2] = tail_norm * (1 + widen)
    terms[:, :, nb, :, 4] = tail_norm * (1 - widen)
    terms[..., 1:3] *= terms[..., :1]
    terms[..., 4] *= terms[..., 0]
    terms[..., 3] = terms[..., 2] * terms[..., 2]
    terms[..., 4] *= terms[..., 4]
    return terms


def _key_terms(quantizer, grouped, key_dots, block_notes, key_meta, in_tail, promoted, tail_k, view, scale, extra=0):
    """(Delta_b per block [Bd, Hkv, G, nb], the float32 score error bound [Bd, Hkv, G]) from the metadata: the
    contractions of |q| with each block's scales and |zeros| give sum_c |q_c| step_c (Delta's channel form) and a
    bound of sum_c |q_c| |k^_jc|; exact keys of promoted blocks obey |k_jc| <= |k^_jc| + kappa_b step_c. The score
    error covers the dot product (gamma_D) and the two roundings of a dequantization that may differ from the twin's
    (a kernel's fused multiply-add): gamma_(D+2), and `extra` more terms for a kernel's tensor-core dots."""
    nb = key_dots.shape[3]
    q_abs = grouped.abs()
    step_dot, magnitude = quantizer.key_dots(key_dots[..., 0], key_dots[..., 1], q_abs.sum(dim=-1, keepdim=True))
    eps, kappa = block_notes[..., 0][:, :, None], block_notes[..., 1][:, :, None]
    q_norm = grouped.norm(dim=-1)
    block_delta = block_deltas(q_norm[..., None], eps, step_dot, kappa, scale)
    subspace = quantizer.key_deltas(grouped, *key_meta, view.block_tables, eps, kappa, scale)
    if subspace is not None:
        block_delta = torch.minimum(block_delta, subspace)
    block_delta = torch.where(in_tail[:, :, None], block_delta, 0.0)
    magnitude = magnitude + torch.where(promoted.transpose(1, 2)[:, :, None],
                                        torch.nan_to_num(kappa * step_dot, nan=torch.inf), 0.0)
    magnitude = torch.where(view.full[:, None, None, :], magnitude, 0.0)
    partial = view.valid[:, -tail_k.shape[1]:][:, None, :]  # [Bd, 1, bs]
    tail_norm = (tail_k.float().norm(dim=-1).transpose(1, 2) * partial).amax(dim=-1)  # [Bd, Hkv]
    largest = torch.maximum(magnitude.amax(dim=-1) if nb else q_norm * 0, q_norm * tail_norm[..., None])
    return block_delta, gamma(grouped.shape[-1] + 2 + extra) * scale * largest


def touch_scratch(score_k, score_v, slots, tables, num_full, mass, decay: float) -> None:
    """One decode step of attention for a layer's scratch: decay every score [C], raise the held pieces of the
    attended blocks (tables [Bd, nb], the first num_full of each row; slots [NB, Hkv, 2]) to their block's mass
    [Bd, nb, Hkv] (max over the group's query heads)."""
    held = take(slots, tables)  # [Bd, nb, Hkv, 2]
    full = torch.arange(tables.shape[1], device=tables.device)[None, :] < num_full[:, None]
    for index, score in enumerate((score_k, score_v)):
        score.mul_(decay)
        slot = held[..., index]
        # entries without a held piece raise slot 0 to -inf, which changes nothing (no boolean indexing: a device
        # sync on CUDA)
        masked = torch.where((slot >= 0) & full[..., None], mass, -torch.inf)
        score.scatter_reduce_(0, slot.clamp(min=0).long().flatten(), masked.flatten(), reduce="amax")


def _promoted(dequantized, scratch, slots):
    """Dequantized blocks [Bd, nb, Hkv, bs, D] float32 with the promoted ones (slots [Bd, nb, Hkv] >= 0) replaced by
    their exact copies from the scratch."""
    promoted = slots >= 0
    if bool(promoted.any()):
        dequantized[promoted] = scratch[slots[promoted]].float()
    return dequantized
