"""Prefix caching in the engine on tiny real models: the same greedy tokens with caching on and off in every
mode (and HF's where the mode is exact), hits counted in usage, audit clean on shared prefixes, sharers that are
preempted or aborted never disturb the others, and a corrupt shared shadow fails every request that reads it with
DATA_LOSS while later requests recompute the prefix."""

import random

import pytest

from engine.engine import StepFailed
from engine.errors import DataLoss
from engine.faults import FaultPlan
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import KVMode, KVPolicy, SamplingParams, StoppingParams
from tests.helpers import TEST_DEVICE, hf_greedy, make_engine, run_engine

SYSTEM = [random.Random(22).randrange(3, 49152) for _ in range(50)]  # 3 full blocks and 2 tokens


def chat_prompts(n=5, seed=0):
    """A shared system prompt and user turns of 1 to 20 tokens (one ends exactly at a block boundary: 64 tokens, all
    of whose full blocks are cached, so its last block runs again)."""
    rng = random.Random(seed)
    turns = [14, 1, 20, 7, 3][:n]
    return {f"u{i}": SYSTEM + [rng.randrange(3, 49152) for _ in range(t)] for i, t in enumerate(turns)}


def one_by_one(engine, prompts, max_new, kv=None, finals=None):
    """Each request alone, in order: the later ones find the earlier ones' blocks cached."""
    tokens = {}
    for rid, prompt in prompts.items():
        tokens |= run_engine(engine, {rid: prompt}, max_new, kv=kv, finals=finals)
    return tokens


@pytest.mark.parametrize("mode", ["dense", "exact", "quantized", "certified", "audit"])
def test_greedy_tokens_are_the_same_with_caching_on_and_off(tiny_llama, mode):
    """Alone and in staggered batches. Certified outputs may differ within their tolerance wherever the bound's inputs
    differ (a sharer's radius comes from block summaries, its scratch from its own history), and this model has top-2
    gaps of 0.07 logits on these prompts: at 0.01 its certified tokens are HF's, with caching on and off."""
    prompts = chat_prompts()
    runs = {}
    for caching in (False, True):
        engine = make_engine(tiny_llama, kv_mode=mode, enable_prefix_caching=caching, tolerance=0.01)
        finals = {}
        sequential = one_by_one(engine, prompts, 16, finals=finals)
        arrivals = {rid: 2 * i for i, rid in enumerate(prompts)}  # shared blocks read while their writer decodes
        batched = run_engine(engine, {f"b{rid}": p for rid, p in prompts.items()}, 16,
                             arrive_at={f"b{rid}": t for rid, t in arrivals.items()})
        batched = {rid[1:]: t for rid, t in batched.items()}
        runs[caching] = sequential, batched, finals, engine.scheduler
    (off, off_batched, off_finals, off_scheduler), (on, on_batched, on_finals, on_scheduler) = runs[False], runs[True]
    assert on == off == on_batched == off_batched
    assert [f.usage.cached_tokens for f in on_finals.values()] == [0, 48, 48, 48, 48]
    assert all(f.usage.cached_tokens == 0 for f in off_finals.values()) and off_scheduler.prefix_queries == 0
    assert on_scheduler.prefix_hits >= 48 * 8 and on_scheduler.prefix_queries > on_scheduler.prefix_hits
    if mode != "quantized":
        assert on == {rid: hf_greedy(tiny_llama, p, 16) for rid, p in prompts.items()}
    if mode == "audit":
        assert all(f.certificate.audit_violations == f.certificate.promise_violations == 0 for f in on_finals.values())


def test_audit_is_clean_on_shared_prefixes_at_the_default_tolerance(tiny_models):
    """Sharers in a batch with their writer, with chunked prefill, on two GQA ratios and K4/V2: no violation."""
    for arch in ("llama", "qwen2"):
        engine = make_engine(tiny_models[arch], kv_mode="audit", k_bits=4, v_bits=2, max_num_batched_tokens=24)
        finals = {}
        run_engine(engine, chat_prompts(), 24, arrive_at={"u1": 3, "u2": 4, "u3": 9, "u4": 9}, finals=finals)
        assert engine.scheduler.prefix_hits > 0
        for out in finals.values():
            cert = out.certificate
            assert cert.audit_violations == cert.promise_violations == 0 and cert.worst_actual_over_bound <= 1


def test_preemption_and_aborts_of_sharers_leave_the_others_intact(tiny_llama):
    """A pool too small for everyone: sharers are preempted (and come back through their own cached blocks), one is
    aborted mid-decode; the others keep HF's tokens and everything is free at the end (run_engine checks)."""
    prompts = chat_prompts()
    expected = {rid: hf_greedy(tiny_llama, p, 30) for rid, p in prompts.items()}
    for mode in ("dense", "exact"):
        engine = make_engine(tiny_llama, kv_mode=mode, num_kv_blocks=10, max_num_batched_tokens=32)
        for rid, prompt in prompts.items():
            engine.add_request(engine.new_request(rid, prompt, SamplingParams(), StoppingParams(30)))
        tokens = {rid: [] for rid in prompts}
        for step in range(10_000):
            if not engine.has_unfinished():
                break
            if step == 12:
                assert engine.abort("u2")
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
            engine.scheduler.check_invariants()
        assert engine.scheduler.num_preemptions > 0 and engine.scheduler.prefix_hits > 0
        assert {rid: t for rid, t in tokens.items() if rid != "u2"} == {r: e for r, e in expected.items() if r != "u2"}
        assert engine.scheduler.blocks.num_free == 10
        if mode == "exact":
            assert not any(engine.runner.cache.in_use().values())


def drive(engine, prompts, kv, max_new=8):
    """Runs requests to the end, one step apart; returns each one's tokens or the error that ended it."""
    pending, results = list(prompts.items()), {rid: [] for rid in prompts}
    while pending or engine.has_unfinished():
        if pending:
            rid, prompt = pending.pop(0)
            engine.add_request(engine.new_request(rid, prompt, SamplingParams(), StoppingParams(max_new), kv))
        try:
            for out in engine.step():
                results[out.request_id] = out.error or results[out.request_id] + list(out.token_ids)
        except StepFailed as exc:
            results |= exc.errors
    return results


@pytest.mark.parametrize("mode", [KVMode.EXACT, KVMode.AUDIT])
def test_a_corrupt_shared_shadow_fails_every_request_that_reads_it(tiny_llama, mode):
    """The victim shares the writer's first block, whose shadow is corrupted when the victim starts: the victim (its
    first block is copied exact into the scratch from that shadow) and the writer (whose exact or audited decodes
    read it) end with DATA_LOSS; the block leaves the prefix cache, so a request arriving later recomputes it."""
    config = EngineConfig(model=str(tiny_llama), num_kv_blocks=64, kv_mode="certified", device=TEST_DEVICE)
    engine = LLMEngine(config, FaultPlan({"shadow.corrupt": {"request": "victim"}}, testing=True))
    prompts = {"writer": SYSTEM + [5, 6], "victim": SYSTEM + [7]}
    results = drive(engine, prompts, KVPolicy(mode, 0.05))
    assert engine.runner.faults.fired["shadow.corrupt"] == 1
    assert isinstance(results["victim"], DataLoss) and isinstance(results["writer"], DataLoss)
    later = drive(engine, {"later": SYSTEM + [8]}, KVPolicy(mode, 0.05))
    assert later["later"] == hf_greedy(tiny_llama, SYSTEM + [8], 8)
    assert engine.scheduler.requests == {} and engine.scheduler.blocks.num_free == 64
    assert not any(engine.runner.cache.in_use().values())
