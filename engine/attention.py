"""The attention function registered with transformers' AttentionInterface under the name "certkv".

Models are loaded with attn_implementation="certkv", so every standard HF decoder (Llama, Qwen2, Mistral, ...)
calls `certkv_attention` in each layer with its post-RoPE query, key and value. The step's ForwardBatch arrives
explicitly, with the KV cache, as the `forward_batch` and `kv_cache` keywords that the model runner passes to the
model's forward (transformers forwards extra keywords down to attention). No global state is set or reset.

Every other keyword transformers passes is either implemented (scaling, a sliding window), known to change nothing
here (position ids, cache flags, a zero dropout), or refused: an attention certkv does not compute exactly would be
certified against an attention that is not the model's. `check_arguments` raises on the first call; the model runner
makes that call at load time with a one-token forward (ModelRunner.probe_attention).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from engine.batch import ForwardBatch
from engine.kv import KVCache

ATTN_IMPLEMENTATION = "certkv"
# Keywords that do not change the attention certkv computes: positions come from the ForwardBatch, caching is ours.
IGNORED = frozenset({"position_ids", "cache_position", "use_cache", "past_key_values"})


class UnsupportedAttention(ValueError):
    """The model asks attention for something certkv does not implement."""


def check_arguments(dropout: float, kwargs: dict) -> None:
    """Raises UnsupportedAttention naming the first keyword certkv would otherwise drop."""
    if dropout:
        raise UnsupportedAttention(f"model: attention dropout {dropout} (certkv runs inference only)")
    for name, value in kwargs.items():
        if not _harmless(name, value):
            raise UnsupportedAttention(f"model: its attention passes {name}={value!r}, which certkv attention does "
                                       f"not implement")


def _harmless(name: str, value: object) -> bool:
    if name == "output_attentions":  # certkv returns no attention weights
        return not value
    if name == "is_causal":  # decoders are causal, and the ForwardBatch says so
        return value is None or value is True
    return name in IGNORED


def certkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, forward_batch: ForwardBatch | None = None,
                     kv_cache: KVCache | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None), attending through the paged cache (the
    causal structure comes from forward_batch; attention_mask is not read)."""
    check_arguments(dropout, kwargs)
    if forward_batch is None or kv_cache is None:
        raise RuntimeError("certkv attention called without forward_batch: run the model through ModelRunner")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    out = kv_cache.forward(module.layer_idx, q, k, v, forward_batch, scale, sliding_window or None)
    return out.unsqueeze(0), None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, certkv_attention)
