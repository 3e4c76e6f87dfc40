"""Exact-token equivalence with HF `generate` (greedy, fp32): alone, in mixed batches with staggered arrivals,
with forced chunked prefill and with forced preemption; on tiny Llama, Qwen2 and Mistral and on the default model."""

import random

import pytest

from engine.request import SamplingParams
from tests.helpers import hf_greedy, make_engine, run_engine

LENGTHS = (1, 5, 15, 16, 17, 40)


def random_prompts(n_tokens=LENGTHS, seed=0):
    rng = random.Random(seed)
    return {f"p{n}": [rng.randrange(3, 49152) for _ in range(n)] for n in n_tokens}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_models_alone_and_batched(tiny_models, arch):
    path = tiny_models[arch]
    prompts = random_prompts()
    expected = {rid: hf_greedy(path, p, 20) for rid, p in prompts.items()}
    engine = make_engine(path)
    for rid, prompt in prompts.items():
        assert run_engine(engine, {rid: prompt}, 20)[rid] == expected[rid], f"{rid} alone"
    arrivals = {rid: i * 3 for i, rid in enumerate(prompts)}  # decodes and prefills share steps
    assert run_engine(engine, prompts, 20, arrive_at=arrivals) == expected


@pytest.mark.parametrize("budget", [1, 7, 16])
def test_forced_chunked_prefill(tiny_llama, budget):
    prompts = random_prompts(seed=1)
    expected = {rid: hf_greedy(tiny_llama, p, 12) for rid, p in prompts.items()}
    engine = make_engine(tiny_llama, max_num_batched_tokens=budget)
    assert run_engine(engine, prompts, 12) == expected


def test_forced_preemption(tiny_llama):
    prompts = random_prompts((30, 33, 40, 45, 50, 20), seed=2)
    expected = {rid: hf_greedy(tiny_llama, p, 30) for rid, p in prompts.items()}
    engine = make_engine(tiny_llama, num_kv_blocks=12, block_size=16, max_num_batched_tokens=64)
    assert run_engine(engine, prompts, 30) == expected
    assert engine.scheduler.num_preemptions > 0


def test_repetition_penalty_matches_hf(tiny_llama):
    prompts = random_prompts((9, 30), seed=3)
    params = SamplingParams(repetition_penalty=1.3)
    expected = {rid: hf_greedy(tiny_llama, p, 16, repetition_penalty=1.3) for rid, p in prompts.items()}
    engine = make_engine(tiny_llama)
    assert run_engine(engine, prompts, 16, sampling={rid: params for rid in prompts}) == expected


@pytest.mark.slow
def test_default_model_matches_hf(default_model):
    engine = make_engine(default_model, num_kv_blocks=64)
    tokenizer = engine.tokenizer
    chats = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers."]
    prompts = {f"c{i}": tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False) for i, c in enumerate(chats)}
    prompts["raw"] = tokenizer("Once upon a time, there was a little")["input_ids"]
    expected = {rid: hf_greedy(default_model, p, 24) for rid, p in prompts.items()}
    assert run_engine(engine, prompts, 24, arrive_at={"c1": 2, "raw": 5}) == expected
    chunked = make_engine(default_model, num_kv_blocks=64, max_num_batched_tokens=13)
    assert run_engine(chunked, prompts, 24) == expected
    tight = make_engine(default_model, num_kv_blocks=8, max_num_batched_tokens=64)
    assert run_engine(tight, prompts, 24) == expected
    assert tight.scheduler.num_preemptions > 0
