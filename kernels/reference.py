"""PyTorch twins of the kernels: the definition of what each kernel computes, and the path used off CUDA.

Shapes: T new tokens (flattened over sequences), B sequences, H query heads, Hkv KV heads (H = G * Hkv),
D head dim, L context length, blocks of `block_size` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv.certificate import UNIT_ROUNDOFF, block_deltas, gamma
from engine.kv.quantizers import Codes


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """cache [num_blocks, block_size, ...], block_table [..., nb] -> [..., nb * block_size, ...] (first `length`)."""
    gathered = cache[block_table]
    gathered = gathered.flatten(block_table.dim() - 1, block_table.dim())
    return gathered if length is None else gathered[..., :length, :, :]


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """out[b] = softmax(scale * q[b] K_b^T) V_b over the first context_lens[b] cached tokens of sequence b.

    q [Bd, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [Bd, nb]; context_lens [Bd].
    Returns [Bd, H, D]. GQA: query head h reads KV head h // G.
    """
    longest = int(context_lens.max())
    keys = gather_blocks(k_cache, block_tables)[:, :longest].transpose(1, 2).to(q.dtype)  # [Bd, Hkv, L, D]
    values = gather_blocks(v_cache, block_tables)[:, :longest].transpose(1, 2).to(q.dtype)
    mask = None
    if int(context_lens.min()) != longest:
        mask = (torch.arange(longest, device=q.device)[None, :] < context_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def prefill_attention(q, keys, values, scale):
    """Causal attention of n new tokens over a context of L >= n tokens whose last n are the new ones.

    q [n, H, D]; keys, values [L, Hkv, D]. Query i sits at position L - n + i and sees keys 0 .. L - n + i.
    """
    n, length = q.shape[0], keys.shape[0]
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, keys, values))
    if n == length:  # no cached prefix: the same call as transformers' SDPA path, so prefill matches it bit for bit
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    else:
        visible = torch.arange(length, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (
            length - n)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=visible, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(q, k_cache, v_cache, batch, scale):
    """Attention of every new token of a ForwardBatch over its sequence's cached tokens (causal).

    q [T, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] already holding this step's K/V. Returns [T, H, D].
    """
    out = torch.empty_like(q)
    if batch.decode_rows.numel():
        seqs = batch.decode_seqs
        out[batch.decode_rows] = decode_attention(
            q[batch.decode_rows], k_cache, v_cache, batch.block_tables[seqs], batch.context_lens[seqs], scale)
    for seq in batch.prefill_seqs:
        lo, hi = batch.query_starts[seq], batch.query_starts[seq + 1]
        length = batch.starts[seq] + hi - lo
        table = batch.block_tables[seq]
        out[lo:hi] = prefill_attention(
            q[lo:hi], gather_blocks(k_cache, table, length), gather_blocks(v_cache, table, length), scale)
    return out


@dataclass(frozen=True, slots=True)
class QuantizedLayer:
    """Tier 1 of one layer (device). NB blocks, Hkv KV heads, bs tokens a block, D channels, S sequence slots,
    C scratch slots. Codes and metadata as engine.kv.quantizers stores them."""

    k_codes: torch.Tensor  # [NB, Hkv, bs, D * k_bits / 8] uint8
    k_scale: torch.Tensor  # [NB, Hkv, D] float16 (per block and channel)
    k_zero: torch.Tensor  # [NB, Hkv, D] float16
    v_codes: torch.Tensor  # [NB, Hkv, bs, D * v_bits / 8] uint8
    v_scale: torch.Tensor  # [NB, Hkv, bs, D / 16] float16 (per token and 16-channel group)
    v_zero: torch.Tensor  # [NB, Hkv, bs, D / 16] float16
    eps: torch.Tensor  # [NB, Hkv] float32: max_j ||k_j - k^_j|| in the block (inf: broken metadata)
    kappa: torch.Tensor  # [NB, Hkv] float32: max_(j,c) |k_jc - k^_jc| / k_scale_c
    eta: torch.Tensor  # [NB, Hkv, bs] float16: ||v_j - v^_j|| per token, rounded up
    tail_k: torch.Tensor  # [S, bs, Hkv, D] model dtype: each sequence's trailing partial block, exact
    tail_v: torch.Tensor  # [S, bs, Hkv, D]
    scratch_k: torch.Tensor  # [C, bs, D] model dtype: promoted exact key blocks (one KV head each)
    scratch_v: torch.Tensor  # [C, bs, D]
    k_slot: torch.Tensor  # [NB, Hkv] int64: scratch slot holding the block's exact keys, -1 if none
    v_slot: torch.Tensor  # [NB, Hkv] int64


@dataclass(frozen=True, slots=True)
class DecodeView:
    """The decoding sequences of one step, shared by all layers."""

    block_tables: torch.Tensor  # [Bd, nb] int64: the full (quantized) blocks of each sequence, padded with 0
    num_full: torch.Tensor  # [Bd] int64: full blocks of each sequence (context // bs)
    tail_lens: torch.Tensor  # [Bd] int64: tokens in the partial block (context % bs)
    slots: torch.Tensor  # [Bd] int64: sequence slots (tail buffers)


@dataclass(frozen=True, slots=True)
class DecodeResult:
    """Output and the certificate's accumulators (engine.kv.certificate). Per-block tensors list the nb full blocks
    and then the partial one (index nb); per-head tensors are [Bd, Hkv, G]."""

    out: torch.Tensor  # [Bd, Hkv, G, D] float32: O = sum_j p^_j v^_j
    probs: torch.Tensor  # [Bd, Hkv, G, nb + 1, bs] float32: p^ (0 on padding)
    rho: torch.Tensor  # [Bd, Hkv, G, nb + 1]: block masses
    val_contrib: torch.Tensor  # [Bd, Hkv, G, nb + 1]: sum_(j in b) p^_j eta_j
    dev_contrib: torch.Tensor  # [Bd, Hkv, G, nb + 1]: sum_(j in b) p^_j (||v^_j - O|| + eta_j)
    block_delta: torch.Tensor  # [Bd, Hkv, G, nb]: Delta_b for blocks of T, 0 for the others
    e_val: torch.Tensor  # sum_j p^_j eta_j
    delta_t: torch.Tensor  # max Delta_b over T
    alpha_t: torch.Tensor  # mass of T
    w_tail: torch.Tensor  # W_T
    w_exact: torch.Tensor  # W_P
    radius_o: torch.Tensor  # max_j (||v^_j - O|| + eta_j)
    rms: torch.Tensor  # sqrt(sum_j p^_j ||v^_j||^2)
    score_error: torch.Tensor  # gamma_D tau ||q|| max_j ||k^_j||: the float32 score error bound
    value_scale: torch.Tensor  # [Bd, Hkv]: max_j ||v^_j||
    broken: torch.Tensor  # [Bd, Hkv] bool: some annotation of a quantized block is not finite (rung 4)
    length: int  # tokens attended per row, padding included (for gamma_L)


def certified_decode(q, layer: QuantizedLayer, view: DecodeView, scale: float, quantizer) -> DecodeResult:
    """Certified paged decode attention: dequantized keys/values per block, exact partial and promoted blocks,
    softmax in float32, and the accumulators of DESIGN.md section 3. q [Bd, H, D] -> DecodeResult."""
    batch, heads, dim = q.shape
    kv_heads, bs = layer.eps.shape[1], layer.tail_k.shape[1]
    tables, nb = view.block_tables, view.block_tables.shape[1]
    keys = _blocks(quantizer.dequantize_keys(Codes(layer.k_codes[tables], layer.k_scale[tables],
                                                   layer.k_zero[tables])), layer.scratch_k, layer.k_slot[tables])
    values = _blocks(quantizer.dequantize_values(Codes(layer.v_codes[tables], layer.v_scale[tables],
                                                       layer.v_zero[tables])), layer.scratch_v, layer.v_slot[tables])
    tail_k = layer.tail_k[view.slots].float().permute(0, 2, 1, 3).unsqueeze(2)  # [Bd, Hkv, 1, bs, D]
    tail_v = layer.tail_v[view.slots].float().permute(0, 2, 1, 3).unsqueeze(2)
    keys = torch.cat([keys, tail_k], dim=2).flatten(2, 3)  # [Bd, Hkv, (nb + 1) * bs, D]
    values = torch.cat([values, tail_v], dim=2).flatten(2, 3)
    block = torch.arange(nb + 1, device=q.device)
    full = block[None, :] < view.num_full[:, None]  # [Bd, nb + 1]
    valid = full[:, :, None] | ((block[None, :, None] == nb) & (torch.arange(bs, device=q.device)[None, None, :]
                                                                 < view.tail_lens[:, None, None]))
    valid = valid.flatten(1)[:, None, None, :]  # [Bd, 1, 1, L]
    grouped = q.float().view(batch, kv_heads, heads // kv_heads, dim)
    probs = torch.softmax((torch.matmul(grouped, keys.transpose(-1, -2)) * scale).masked_fill(~valid, -torch.inf), -1)
    out = torch.matmul(probs, values)
    in_tail = full[:, None, :nb] & (layer.k_slot[tables] < 0).transpose(1, 2)  # [Bd, Hkv, nb]
    value_quant = full[:, None, :nb] & (layer.v_slot[tables] < 0).transpose(1, 2)
    eta = torch.where(value_quant[..., None], layer.eta[tables].transpose(1, 2).float(), 0.0)  # [Bd, Hkv, nb, bs]
    eta = torch.cat([eta, eta.new_zeros(batch, kv_heads, 1, bs)], dim=2).flatten(2)  # partial block: exact
    eps = torch.where(in_tail, layer.eps[tables].transpose(1, 2), 0.0)
    q_norm = grouped.norm(dim=-1)
    block_delta = torch.where(in_tail[:, :, None], block_deltas(q_norm[..., None], eps[:, :, None], torch.matmul(
        grouped.abs(), layer.k_scale[tables].transpose(1, 2).float().transpose(-1, -2)),
        layer.kappa[tables].transpose(1, 2)[:, :, None], scale), 0.0)
    squares = (values * values).sum(dim=-1)  # [Bd, Hkv, L]
    out_sq = (out * out).sum(dim=-1, keepdim=True)
    spread = (squares[:, :, None] - 2 * torch.matmul(out, values.transpose(-1, -2)) + out_sq).clamp_min(0)
    spread = (spread + 8 * UNIT_ROUNDOFF * (squares[:, :, None] + out_sq)).sqrt() + eta[:, :, None]  # >= ||v_j - O||
    spread = spread * valid[:, 0, None]
    blocks_of = (batch, kv_heads, heads // kv_heads, nb + 1, bs)
    rho = probs.view(blocks_of).sum(dim=-1)
    dev_contrib = (probs * spread).view(blocks_of).sum(dim=-1)
    mask = in_tail[:, :, None].float()
    w_tail = (dev_contrib[..., :nb] * mask).sum(dim=-1)
    return DecodeResult(
        out=out, probs=probs.view(blocks_of), rho=rho,
        val_contrib=(probs * eta[:, :, None]).view(blocks_of).sum(dim=-1), dev_contrib=dev_contrib,
        block_delta=block_delta, e_val=(probs * eta[:, :, None]).sum(dim=-1),
        delta_t=block_delta.amax(dim=-1) if nb else q_norm.new_zeros(q_norm.shape),
        alpha_t=(rho[..., :nb] * mask).sum(dim=-1), w_tail=w_tail, w_exact=dev_contrib.sum(dim=-1) - w_tail,
        radius_o=spread.amax(dim=-1), rms=(probs * squares[:, :, None]).sum(dim=-1).sqrt(),
        score_error=gamma(dim) * scale * q_norm * (keys.norm(dim=-1) * valid[:, 0, 0, None]).amax(dim=-1)[..., None],
        value_scale=(squares * valid[:, 0, 0, None]).amax(dim=-1).sqrt(),
        broken=~(torch.isfinite(eps).all(dim=-1) & torch.isfinite(eta).all(dim=-1)),
        length=(nb + 1) * bs,
    )


def _blocks(dequantized, scratch, slots):
    """[Bd, nb, Hkv, bs, D] dequantized blocks with promoted ones replaced from the scratch -> [Bd, Hkv, nb, bs, D]."""
    promoted = slots >= 0
    if bool(promoted.any()):
        dequantized[promoted] = scratch[slots[promoted]].float()
    return dequantized.transpose(1, 2)
