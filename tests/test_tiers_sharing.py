"""The tiered cache with blocks shared by prefix caching, without a model: sequences that start after
another one's blocks get a value centre and radius that cover the shared tokens (from the blocks' summaries), the
bound holds against an independent float64 reference for them, whether the writer still lives or not and whatever
wrote each block, and releasing one sharer drops nothing the others use."""

from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.request import KVMode, KVPolicy
from tests.test_tiers import BS, D, G, HKV, Harness, decode_and_check, radius_covers, random_kv


@settings(max_examples=int(os.environ.get("CERTKV_PROPERTY_EXAMPLES", 40)), deadline=None)
@given(seed=st.integers(0, 2**31), written=st.sampled_from([16, 33, 64, 100]), share=st.integers(1, 6),
       own=st.sampled_from([1, 7, 16, 40]), bits=st.sampled_from([(8, 4), (4, 2), (8, 2)]),
       quantizer=st.sampled_from(["minmax", "hadamard", "minmax-fp8"]),
       kind=st.sampled_from(["random", "outlier", "sink", "offset", "outward"]),
       tolerance=st.sampled_from([0.05, 0.2]), q_scale=st.sampled_from([1.0, 4.0]), writer_ends=st.booleans())
def test_the_bound_holds_for_sequences_that_start_from_shared_blocks(seed, written, share, own, bits, quantizer, kind,
                                                                      tolerance, q_scale, writer_ends):
    """A writer fills blocks; a second sequence starts after some of them with other values of its own (an offset
    kind that moves its own tokens far from the shared ones); a third shares the second's blocks, which mix the
    writer's and the second's. Every radius covers every token its sequence attends, and the bound and the promise
    hold at each decode step."""
    h = Harness(*bits, seed=seed, quantizer=quantizer, num_blocks=64, max_seqs=4)
    policy = KVPolicy(KVMode.AUDIT, tolerance)
    h.step({"w": random_kv(h.gen, written, kind)}, policy)
    h.step({"w": random_kv(h.gen, 1, kind)}, policy)
    blocks = min(share, len(h.keys["w"]) // BS)
    h.share("w", "a", blocks)
    if writer_ends:
        h.cache.release("w")
    h.step({"a": random_kv(h.gen, own, "offset" if kind != "offset" else "random")}, policy)
    radius_covers(h, "a")
    mixed = len(h.keys["a"]) // BS
    h.share("a", "b", mixed)
    h.step({"b": random_kv(h.gen, 3, kind)}, policy)
    live = ["a", "b"] + ([] if writer_ends else ["w"])
    for _ in range(2):
        decode_and_check(h, live, policy, kind, q_scale)
    for rid in live:
        assert h.cache.stats[rid].audit_violations == 0 and h.cache.stats[rid].promise_violations == 0


def test_a_sharer_starts_with_the_first_block_exact_and_a_radius_from_summaries():
    h = Harness(8, 4, seed=3, scratch=32)
    policy = KVPolicy(KVMode.CERTIFIED, 0.2)
    h.step({"w": random_kv(h.gen, 48, "sink")}, policy)
    h.cache.release("w")  # the writer is gone: its scratch pieces too
    layer = h.cache.layers[0]
    first = h.tables["w"][0]
    assert (layer.k_slot[first] < 0).all() and h.cache.in_use()["held_blocks"] == 0
    h.share("w", "a", 3)
    h.step({"a": random_kv(h.gen, 5, "sink")}, policy)
    assert (layer.k_slot[first] >= 0).all() and (layer.v_slot[first] >= 0).all()
    assert torch.equal(layer.scratch_v[layer.v_slot[first, 1]], h.values["a"][:BS, 1])
    slot = h.cache.slots["a"]
    values = h.values["a"].double()
    assert torch.equal(h.cache.centre[0][slot], values[:BS].mean(dim=0).float())  # the first block's mean
    exact = (values - h.cache.centre[0][slot].double()).norm(dim=-1).amax(dim=0)
    assert (exact <= h.cache.radius[0][slot]).all() and (h.cache.radius[0][slot] <= 3 * exact).all()


def test_releasing_one_sharer_keeps_what_the_others_use():
    h = Harness(4, 2, seed=8, scratch=64)
    policy = KVPolicy(KVMode.CERTIFIED, 0.01)  # tight: decodes promote shared blocks into the scratch
    h.step({"w": random_kv(h.gen, 64, "outlier")}, policy)
    h.share("w", "a", 4)
    h.step({"a": random_kv(h.gen, 3, "outlier")}, policy)
    for _ in range(2):
        h.step({rid: random_kv(h.gen, 1, "outlier") for rid in ("w", "a")}, policy, q=torch.randn(2, HKV * G, D) * 3)
    shared = torch.tensor(h.tables["w"][:4])
    held = (h.cache.layers[0].slots[shared] >= 0).sum()
    assert held > 0 and h.cache.holders[h.tables["w"][0]] == 2
    h.cache.release("w")
    assert (h.cache.layers[0].slots[shared] >= 0).sum() == held  # a still reads them
    assert all(h.cache.holders[b] == 1 for b in h.tables["a"])
    decode_and_check(h, ["a"], policy, "outlier", 3.0)
    h.cache.release("a")
    assert h.cache.in_use()["scratch_pieces"] == 0 and h.cache.in_use()["held_blocks"] == 0


def test_every_group_the_ladder_escalates_has_its_record():
    """Two sequences that read the same shared blocks with the same query want the same pieces; the layer fetches
    each piece once, and the group that did not fetch it still escalated: it keeps its record (0 blocks moved), so
    spans and per-request counts see every escalation. Each record stands for the G query heads of its group."""
    h = Harness(4, 2, seed=7, scratch=64)  # a seed where the two groups promote the same pieces at rung 2
    policy = KVPolicy(KVMode.CERTIFIED, 0.05)
    h.step({"w": random_kv(h.gen, 64, "outlier")}, policy)
    h.share("w", "a", 4)
    h.step({"a": random_kv(h.gen, 3, "outlier")}, policy)
    for _ in range(2):
        query = torch.randn(1, HKV * G, D, generator=h.gen) * 3
        h.step({rid: random_kv(h.gen, 1, "outlier") for rid in ("w", "a")}, policy, q=query.expand(2, -1, -1))
    for rid in ("w", "a"):
        rungs = h.cache.stats[rid].rungs
        records = [r.rung for r in h.cache.records if r.engine_id == rid]
        assert [G * records.count(rung) for rung in (1, 2, 3)] == rungs[1:4], (rid, rungs, records)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), blocks=st.integers(1, 6), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       offset=st.sampled_from([0.0, 700.3, -1e4]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_summaries_cover_every_value_of_the_blocks(seed, blocks, scale, offset, dtype):
    """shared_spread's R >= max_j ||v_j - c|| over every value of every block (float64 reference), for each block
    alone and for the chain, including outliers and large common offsets in a half dtype."""
    from engine.kv.summaries import shared_spread, summarise

    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(blocks, HKV, BS, D, generator=gen) * scale + offset).to(dtype)
    values[0, :, 0] *= 50  # a sink-like outlier in the first block
    mean, reach = summarise(values)
    exact = values.double()
    assert ((exact - mean.double()[:, :, None]).norm(dim=-1).amax(dim=-1) <= reach.double()).all()
    centre, radius = shared_spread(mean, reach)
    assert torch.equal(centre, mean[0])
    distance = (exact - centre.double()[None, :, None]).norm(dim=-1).amax(dim=(0, 2))
    assert (distance <= radius.double()).all()


def test_summaries_written_through_the_deferred_cuda_path_reach_a_sharer(monkeypatch):
    """On CUDA the filled blocks' summaries reach the host through staging, like the checksums, and land before the
    next step's start: a sharer admitted at that step starts from them (run here on the CPU)."""
    from kernels import cpu

    monkeypatch.setattr(cpu, "available", lambda: False)  # the torch write path, which CUDA takes
    h = Harness(8, 4, seed=5)
    h.cache._deferred = True
    policy = KVPolicy(KVMode.AUDIT, 0.1)
    h.step({"w": random_kv(h.gen, 40, "offset")}, policy)
    assert (0, "mean") in h.cache._staging and (0, "reach") in h.cache._staging  # they crossed through staging
    h.share("w", "a", 2)
    h.step({"a": random_kv(h.gen, 4, "offset")}, policy)
    radius_covers(h, "a")
    decode_and_check(h, ["w", "a"], policy, "offset", 2.0)
