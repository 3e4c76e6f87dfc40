"""The attention function registered with transformers' AttentionInterface under the name "certkv".

Models are loaded with attn_implementation="certkv", so every standard HF decoder (Llama, Qwen2, Mistral, ...)
calls `certkv_attention` in each layer with its post-RoPE query, key and value. The step's ForwardBatch arrives
explicitly, with the KV cache, as the `forward_batch` and `kv_cache` keywords that the model runner passes to the
model's forward (transformers forwards extra keywords down to attention). No global state is set or reset.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from engine.batch import ForwardBatch
from engine.kv import KVCache

ATTN_IMPLEMENTATION = "certkv"


def certkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     forward_batch: ForwardBatch | None = None, kv_cache: KVCache | None = None,
                     **_: object) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None), attending through the paged cache."""
    if forward_batch is None or kv_cache is None:
        raise RuntimeError("certkv attention called without forward_batch: run the model through ModelRunner")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    out = kv_cache.forward(module.layer_idx, q, k, v, forward_batch, scale)
    return out.unsqueeze(0), None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, certkv_attention)
