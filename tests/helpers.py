"""Test helpers: drive an engine to completion, and HF `generate` as the reference."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import KVPolicy, SamplingParams, StoppingParams


# Engines in tests run on the CPU, in float32 like the HF reference they are compared with token for token (on a GPU,
# bfloat16 and batch-dependent kernels make no such promise); tests/test_cuda.py covers the CUDA paths.
TEST_DEVICE = "cpu"


def make_engine(model: Path, **overrides) -> LLMEngine:
    defaults = dict(model=str(model), num_kv_blocks=256, max_num_batched_tokens=512, kv_mode="dense",
                    device=TEST_DEVICE)
    return LLMEngine(EngineConfig(**(defaults | overrides)))


def run_engine(engine: LLMEngine, prompts: dict[str, list[int]], max_new: int = 16,
               sampling: dict[str, SamplingParams] | None = None, arrive_at: dict[str, int] | None = None,
               stopping: StoppingParams | None = None, kv: KVPolicy | None = None,
               finals: dict | None = None) -> dict[str, list[int]]:
    """Runs prompts to completion; `arrive_at[rid]` delays a request's admission by that many steps; the final
    output of each request goes into `finals` when given."""
    arrive_at = arrive_at or {}
    pending = dict(prompts)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    step = 0
    while pending or engine.has_unfinished():
        for rid in [r for r in pending if arrive_at.get(r, 0) <= step]:
            params = (sampling or {}).get(rid, SamplingParams())
            engine.add_request(engine.new_request(rid, pending.pop(rid), params, stopping or StoppingParams(max_new),
                                                  kv))
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished and finals is not None:
                finals[out.request_id] = out
        engine.scheduler.check_invariants()
        step += 1
    assert engine.scheduler.blocks.num_free == engine.spec.num_kv_blocks
    if hasattr(engine.runner.cache, "in_use"):
        assert not any(engine.runner.cache.in_use().values()), engine.runner.cache.in_use()
    return tokens


@functools.lru_cache(maxsize=4)
def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()


def hf_greedy(path: Path, prompt: list[int], max_new: int, **kwargs) -> list[int]:
    """HF generate, greedy, stopping at EOS like the engine; returns the new tokens up to and including EOS."""
    model = hf_model(path)
    eos = model.generation_config.eos_token_id
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=eos,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
    new = out[0, len(prompt):].tolist()
    eos_ids = eos if isinstance(eos, list) else [eos]
    for i, token in enumerate(new):
        if token in eos_ids:
            return new[: i + 1]
    return new
