"""PyTorch twins of the kernels: the definition of what each kernel computes, and the path used off CUDA.

Shapes: T new tokens (flattened over sequences), B sequences, H query heads, Hkv KV heads (H = G * Hkv),
D head dim, L context length, blocks of `block_size` tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    keys = gather_blocks(k_cache, block_tables)[:, :longest].transpose(1, 2)  # [Bd, Hkv, L, D]
    values = gather_blocks(v_cache, block_tables)[:, :longest].transpose(1, 2)
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
