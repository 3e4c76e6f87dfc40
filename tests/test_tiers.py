"""The tiered cache without a model: hand-made batches of random and adversarial K/V drive the real write path,
the certified kernel twin, the ladder and audit. The bound is checked against an independent float64 reference
computed from the K/V this test generated (not from the cache's own shadows)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.batch import build_forward_batch
from engine.kv.escalation import check
from engine.kv.quantizers import Codes, MinMaxQuantizer, error_norms, make_quantizer
from engine.kv.scratch import Scratch
from engine.kv.tiers import TieredKVCache
from engine.request import KVMode, KVPolicy, Request, SamplingParams, StoppingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput
from kernels import certified_decode

BS, HKV, G, D = 16, 2, 3, 64


class Harness:
    """One layer of a TieredKVCache, fed sequence by sequence with known exact K/V."""

    def __init__(self, k_bits=4, v_bits=2, num_blocks=64, max_seqs=4, scratch=32, seed=0, quantizer="minmax",
                 dtype=torch.float32):
        basis = torch.linalg.qr(torch.randn(1, HKV, D, D, generator=torch.Generator().manual_seed(seed)))[0]
        self.cache = TieredKVCache(1, num_blocks, BS, HKV, D, dtype, torch.device("cpu"),
                                   make_quantizer(quantizer, k_bits, v_bits, rank=16, basis=basis[..., :16]),
                                   max_seqs, scratch)
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.tables: dict[str, list[int]] = {}
        self.next_block = 1

    def step(self, chunks: dict[str, tuple[torch.Tensor, torch.Tensor]], policy: KVPolicy, q=None):
        """Appends K/V chunks [n, Hkv, D] to their sequences in one forward pass; returns (batch, output)."""
        scheduled = []
        chunks = {rid: (k.to(self.dtype), v.to(self.dtype)) for rid, (k, v) in chunks.items()}  # as a model makes them
        for rid, (k, v) in chunks.items():
            start = len(self.keys.get(rid, ()))
            self.keys[rid] = torch.cat([self.keys.get(rid, k[:0]), k])
            self.values[rid] = torch.cat([self.values.get(rid, v[:0]), v])
            table = self.tables.setdefault(rid, [])
            while len(table) * BS < len(self.keys[rid]):
                table.append(self.next_block)
                self.next_block += 1
            scheduled.append(ScheduledRequest(rid, [0] * len(k), start, list(table), True))
        requests = [Request(rid, [0], SamplingParams(), StoppingParams(1), kv=policy) for rid in chunks]
        batch = build_forward_batch(SchedulerOutput(scheduled, []), BS, torch.device("cpu"), requests)
        self.cache.prepare(batch)
        k_all = torch.cat([k for k, _ in chunks.values()])
        v_all = torch.cat([v for _, v in chunks.values()])
        q = (q if q is not None else torch.randn(len(k_all), HKV * G, D, generator=self.gen)).to(self.dtype)
        out = self.cache.forward(0, q, k_all, v_all, batch, D ** -0.5)
        self.cache.end_step(batch)
        return batch, out

    def share(self, source: str, rid: str, blocks: int) -> None:
        """A new sequence `rid` starts from the first `blocks` full blocks of `source` (prefix caching): its next
        step() writes after them, into blocks of its own."""
        assert blocks * BS <= len(self.keys[source]) and rid not in self.keys
        self.tables[rid] = self.tables[source][:blocks]
        self.keys[rid], self.values[rid] = (x[source][:blocks * BS] for x in (self.keys, self.values))

    def reference(self, rid: str, q: torch.Tensor) -> torch.Tensor:
        """float64 attention of q [H, D] over the sequence's exact K/V -> [Hkv, G, D]."""
        return self.promise_scale(rid, q)[0]

    def promise_scale(self, rid: str, q: torch.Tensor, window: int | None = None):
        """(O_ref [Hkv, G, D], max(||O_ref||, RMS_ref) [Hkv, G]) in float64 from the exact K/V this test generated."""
        k, v = self.keys[rid].double(), self.values[rid].double()
        if window is not None:
            k, v = k[-window:], v[-window:]
        qg = q.double().view(HKV, G, D)
        probs = torch.softmax(torch.einsum("hgd,lhd->hgl", qg, k) * D ** -0.5, dim=-1)
        out = torch.einsum("hgl,lhd->hgd", probs, v)
        rms = torch.einsum("hgl,lh->hg", probs, (v * v).sum(dim=-1)).sqrt()
        return out, torch.maximum(out.norm(dim=-1), rms)


def random_kv(gen, n, kind="random"):
    k = torch.randn(n, HKV, D, generator=gen) * 2
    v = torch.randn(n, HKV, D, generator=gen)
    if kind == "outlier":
        k[..., 5] *= 30
        v[..., 9] *= 20
    if kind == "sink" and n:
        k[0] *= 6
        v[0] *= 60
    if kind == "offset":  # large common offsets: fp16 rounding of the zero points matters
        k += 700.3
        v -= 333.7
    if kind == "outward":  # two channels of each 16-channel group at +1 and -1, the rest near 0, between two low-bit
        groups = v.view(n, HKV, D // 16, 16)  # levels: the codes round away from 0 together, ||v^_j|| >> ||v_j||
        sign = torch.where(torch.rand(groups.shape, generator=gen) < 0.5, -1.0, 1.0)
        groups.copy_(sign * (0.03 * torch.rand(groups.shape, generator=gen)))
        extremes = torch.rand(groups.shape, generator=gen).argsort(dim=-1)[..., :2]
        groups.scatter_(-1, extremes[..., :1], 1.0)
        groups.scatter_(-1, extremes[..., 1:], -1.0)
    return k, v


@settings(max_examples=int(os.environ.get("CERTKV_PROPERTY_EXAMPLES", 40)), deadline=None)
@given(seed=st.integers(0, 2**31), lengths=st.lists(st.sampled_from([1, 15, 16, 17, 40, 100]), min_size=1,
                                                      max_size=3),
       bits=st.sampled_from([(8, 4), (8, 3), (8, 2), (4, 4), (4, 2), (5, 3), (6, 2)]),
       quantizer=st.sampled_from(["minmax", "hadamard", "minmax/hadamard", "minmax-fp8", "minmax-fp8/hadamard",
                                  "headq", "headq/hadamard"]),
       kind=st.sampled_from(["random", "outlier", "sink", "offset", "outward"]),
       tolerance=st.sampled_from([0.05, 0.1, 0.2, 0.5]), q_scale=st.sampled_from([1.0, 3.0, 6.0]),
       scratch=st.sampled_from([8, 32]))
@example(seed=101, lengths=[100], bits=(4, 4), quantizer="hadamard", kind="outlier", tolerance=0.05, q_scale=3.0,
         scratch=32)  # a tail mass computed above 1 with Delta_T = 43
@example(seed=1, lengths=[60, 100], bits=(4, 2), quantizer="minmax", kind="outward", tolerance=0.1, q_scale=6.0,
         scratch=8)  # an upper-norm floor accepted 1.85x the promise after promotions
def test_bound_and_promise_hold_on_the_real_write_path(seed, lengths, bits, quantizer, kind, tolerance, q_scale,
                                                       scratch):
    """Every quantizer: the certificate only reads annotations measured against its own dequantization. The bound
    holds for every head, and what attention serves (accepted at rung 0, after the ladder's promotions, or recomputed)
    is within tolerance * max(||O_ref||, RMS_ref) of the reference: the promise, not only the bound."""
    h = Harness(*bits, seed=seed, quantizer=quantizer, scratch=scratch)
    rids = [f"s{i}" for i in range(len(lengths))]
    policy = KVPolicy(KVMode.AUDIT, tolerance)
    h.step({rid: random_kv(h.gen, n, kind) for rid, n in zip(rids, lengths)}, policy)
    for _ in range(3):  # decode steps: blocks fill, the ladder promotes, promoted blocks are reused
        decode_and_check(h, rids, policy, kind, q_scale)
    for rid in rids:
        assert h.cache.stats[rid].audit_violations == 0 and h.cache.stats[rid].promise_violations == 0


def radius_covers(h: Harness, rid: str) -> None:
    """R >= max_j ||v_j - c|| over every token of the sequence, in float64 from the values this test generated."""
    slot = h.cache.slots[rid]
    centre, radius = h.cache.centre[0][slot].double(), h.cache.radius[0][slot].double()
    distance = (h.values[rid].double() - centre).norm(dim=-1).amax(dim=0)  # [Hkv]
    assert (distance <= radius).all(), (rid, distance, radius)


def decode_and_check(h: Harness, rids: list[str], policy: KVPolicy, kind: str, q_scale: float) -> None:
    """One decode step of `rids`: the bound of every head holds against the reference, and so does the promise for
    what attention serves."""
    q = torch.randn(len(rids), HKV * G, D, generator=h.gen) * q_scale
    batch, served = h.step({rid: random_kv(h.gen, 1, kind) for rid in rids}, policy, q=q)
    plan = batch.cache_meta
    result = certified_decode(q, h.cache.layers[0], plan.view, D ** -0.5, h.cache.quantizers[0])
    bound, _ = check(result, h.cache.radius[0][plan.view.slots], plan.tolerance[:, None, None])
    for i, rid in enumerate(rids):
        reference, scale = h.promise_scale(rid, q[i])
        assert ((result.out[i].double() - reference).norm(dim=-1) <= bound[i].double()).all(), rid
        error = (served[i].double().view(HKV, G, D) - reference).norm(dim=-1)
        assert (error <= policy.tolerance * scale).all(), (rid, error / (policy.tolerance * scale))
        radius_covers(h, rid)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_what_is_served_in_a_half_dtype_is_what_was_certified(dtype):
    """The float32 output is cast to the model's dtype on its way out; that rounding (2^-9 relative in bfloat16) is
    part of the bound, so a tolerance of 1e-3 still holds for what is served: heads whose cast alone exceeds it
    escalate to the exact rungs (whose result is the dense one), the others are accepted within their promise. Short
    sequences whose blocks the scratch keeps exact have bounds of rounding size: the cast decides alone."""
    h = Harness(8, 4, seed=21, dtype=dtype)
    policy = KVPolicy(KVMode.CERTIFIED, 1e-3)
    h.step({"a": random_kv(h.gen, 10), "b": random_kv(h.gen, 40, "sink")}, policy)
    for _ in range(3):
        q = (torch.randn(2, HKV * G, D, generator=h.gen) * 2).to(dtype)
        batch, served = h.step({"a": random_kv(h.gen, 1), "b": random_kv(h.gen, 1, "sink")}, policy, q=q)
        dense = h.cache.exact_decode(0, q, batch.block_tables, batch.context_lens, D ** -0.5)  # the exact rungs' result
        assert served.dtype == dtype
        for i, rid in enumerate("ab"):
            reference, scale = h.promise_scale(rid, q[i])
            error = (served[i].double().view(HKV, G, D) - reference).norm(dim=-1)
            exact = (served[i] == dense[i]).view(HKV, G, D).all(dim=-1)
            assert (exact | (error <= 1e-3 * scale)).all(), (rid, (error / (1e-3 * scale)).max())
    result = certified_decode(q.to(dtype), h.cache.layers[0], batch.cache_meta.view, D ** -0.5, h.cache.quantizers[0])
    assert (result.cast > 0).any()  # the cast costs something, and the bound knows it
    assert sum(h.cache.stats[rid].rungs[3] for rid in "ab") > 0


def test_write_path_stores_what_attention_reads():
    h = Harness(4, 2, seed=1)
    h.step({"a": random_kv(h.gen, 37), "b": random_kv(h.gen, 5)}, KVPolicy(KVMode.CERTIFIED, 0.05))
    for n in (1, 1, 20, 1):  # decodes and a chunk crossing block boundaries
        h.step({"a": random_kv(h.gen, n), "b": random_kv(h.gen, n)}, KVPolicy(KVMode.CERTIFIED, 0.05))
    layer, cache, quant = h.cache.layers[0], h.cache, h.cache.quantizers[0]
    for rid in ("a", "b"):
        k, v, table = h.keys[rid], h.values[rid], h.tables[rid]
        full = len(k) // BS
        shadow = cache.shadow_k[0][table].flatten(0, 1)[: len(k)]
        assert torch.equal(shadow, k) and torch.equal(cache.shadow_v[0][table].flatten(0, 1)[: len(v)], v)
        for b, block in enumerate(table[:full]):
            exact = k[b * BS:(b + 1) * BS].transpose(0, 1)[None]
            stored = quant.dequantize_keys(type(quant.quantize_keys(exact))(
                layer.k_codes[block:block + 1], layer.k_scale[block:block + 1], layer.k_zero[block:block + 1]))
            assert torch.equal(layer.eps[block], error_norms(exact, stored)[0])
        slot = cache.slots[rid]
        assert torch.equal(layer.tail_k[slot, : len(k) - full * BS], k[full * BS:])
        centre = cache.centre[0][slot]
        assert ((v - centre).norm(dim=-1) <= cache.radius[0][slot]).all()  # R covers every token


def test_deferred_tier2_writes_land_before_any_read(monkeypatch):
    """The CUDA write path, run here on the CPU: the step's K/V and the filled blocks' checksums reach the host
    through staging buffers and are scattered into the shadows before the next read (exact decodes, verification)
    and at the next step's start; nothing the ladder or audit reads is stale."""
    from kernels import cpu

    monkeypatch.setattr(cpu, "available", lambda: False)  # the torch write path, which CUDA takes
    h = Harness(4, 2, seed=7)
    h.cache._deferred = True
    h.step({"a": random_kv(h.gen, 30), "b": random_kv(h.gen, 14)}, KVPolicy(KVMode.AUDIT, 0.05))
    for n in (1, 1, 2, 1):  # block boundaries crossed by decodes and a two-token chunk
        q = torch.randn(2, HKV * G, D, generator=h.gen)
        _, out = h.step({"a": random_kv(h.gen, n), "b": random_kv(h.gen, n)}, KVPolicy(KVMode.EXACT, 0.0), q=q)
        if n == 1:
            for i, rid in enumerate("ab"):
                assert torch.allclose(out[i].double().view(HKV, G, D), h.reference(rid, q[i]), atol=1e-5)
    h.cache._settle()
    for rid in "ab":
        k, table = h.keys[rid], h.tables[rid]
        assert torch.equal(h.cache.shadow_k[0][table].flatten(0, 1)[:len(k)], k)
        full = torch.tensor(table[:len(k) // BS])
        assert bool(h.cache.verified[0][full].all())  # the exact decodes checked every full block: sums agreed
    assert h.cache.stats["a"].audit_violations == 0 and not h.cache._pending


def test_exact_and_dense_modes_read_the_shadows():
    h = Harness(seed=2)
    h.step({"a": random_kv(h.gen, 30)}, KVPolicy(KVMode.EXACT, 0.0))
    q = torch.randn(1, HKV * G, D, generator=h.gen)
    _, out = h.step({"a": random_kv(h.gen, 1)}, KVPolicy(KVMode.EXACT, 0.0), q=q)
    assert torch.allclose(out[0].double().view(HKV, G, D), h.reference("a", q[0]), atol=1e-5)
    assert h.cache.stats["a"].rungs[3] == h.cache.stats["a"].evaluations == 2 * HKV * G - HKV * G


def test_tiny_tolerance_escalates_and_stays_close():
    h = Harness(4, 2, seed=3)
    policy = KVPolicy(KVMode.CERTIFIED, 1e-6)
    h.step({"a": random_kv(h.gen, 64, "outlier")}, policy)
    q = torch.randn(1, HKV * G, D, generator=h.gen) * 3
    _, out = h.step({"a": random_kv(h.gen, 1, "outlier")}, policy, q=q)
    stats = h.cache.stats["a"]
    assert stats.rungs[0] == 0 and sum(stats.rungs[1:]) == HKV * G
    reference = h.reference("a", q[0])
    assert ((out[0].double().view(HKV, G, D) - reference).norm(dim=-1) <= 1e-6 * reference.norm(dim=-1) + 1e-4).all()
    assert h.cache.records and all(r.rung >= 1 for r in h.cache.records)


def test_a_layers_promotions_move_in_one_transfer_per_kind(monkeypatch):
    """Every group that escalates at a layer and step asks for its pieces; they cross from tier 2 in one transfer per
    kind (keys, values) and enter the scratch in one update, whatever the number of groups."""
    h = Harness(8, 2, seed=13, scratch=64)
    policy = KVPolicy(KVMode.CERTIFIED, 0.05)
    h.step({rid: random_kv(h.gen, 60, "outlier") for rid in "abc"}, policy)
    copies, puts = [], []
    copy, put = h.cache.copy._copy, h.cache.scratch[0].put
    monkeypatch.setattr(h.cache.copy, "_copy", lambda *args: copies.append(len(args[1])) or copy(*args))
    monkeypatch.setattr(h.cache.scratch[0], "put", lambda kind, *args: puts.append(kind) or put(kind, *args))
    h.step({rid: random_kv(h.gen, 1, "outlier") for rid in "abc"}, policy, q=torch.randn(3, HKV * G, D) * 3)
    groups = {(r.engine_id, r.kv_head) for r in h.cache.records if r.rung in (1, 2)}
    assert len(groups) > 1 and len(copies) <= 2 and sorted(set(puts)) == sorted(puts)  # one put per kind
    assert sum(copies) == sum(r.blocks for r in h.cache.records if r.rung in (1, 2))


def test_prefetches_chosen_during_a_step_are_fetched_after_it_and_hit():
    """Groups near their limit get their likeliest blocks chosen on the device at each layer; the step's choices are
    read back once at its end and fetched, and the next step's promotions find most of them waiting."""
    h = Harness(8, 2, seed=13, scratch=24)
    h.cache.copy = type(h.cache.copy)(h.cache.device, True)  # prefetch on (the CPU's default is off)
    policy = KVPolicy(KVMode.CERTIFIED, 0.05)
    h.step({rid: random_kv(h.gen, 90, "outlier") for rid in "ab"}, policy)
    for _ in range(4):
        h.step({rid: random_kv(h.gen, 1, "outlier") for rid in "ab"}, policy, q=torch.randn(2, HKV * G, D) * 3)
    stats = h.cache.copy.stats
    assert stats.prefetch_bytes > 0 and stats.hits > 0, stats
    h.cache.copy.close()


def test_broken_metadata_goes_to_rung_4():
    h = Harness(8, 4, seed=4)
    policy = KVPolicy(KVMode.CERTIFIED, 0.05)
    h.step({"a": random_kv(h.gen, 40)}, policy)
    block = torch.tensor([h.tables["a"][0]])
    h.cache.scratch[0].invalidate(block)  # its exact copy is gone: attention reads the quantized block
    h.cache.layers[0].eps[block] = float("inf")  # corrupt annotation
    q = torch.randn(1, HKV * G, D, generator=h.gen)
    _, out = h.step({"a": random_kv(h.gen, 1)}, policy, q=q)
    assert h.cache.stats["a"].rungs[4] == HKV * G
    assert torch.allclose(out[0].double().view(HKV, G, D), h.reference("a", q[0]), atol=1e-5)


def test_quantized_mode_is_not_certified():
    h = Harness(4, 2, seed=5)
    h.step({"a": random_kv(h.gen, 50, "outlier")}, KVPolicy(KVMode.QUANTIZED, 0.05))
    h.step({"a": random_kv(h.gen, 1, "outlier")}, KVPolicy(KVMode.QUANTIZED, 0.05))
    stats = h.cache.stats["a"]
    assert stats.evaluations == HKV * G * 2 - HKV * G and sum(stats.rungs) == 0 and not h.cache.records


def test_release_returns_slots():
    h = Harness(seed=6)
    h.step({"a": random_kv(h.gen, 40), "b": random_kv(h.gen, 3)}, KVPolicy(KVMode.CERTIFIED, 0.05))
    h.step({"a": random_kv(h.gen, 1), "b": random_kv(h.gen, 1)}, KVPolicy(KVMode.CERTIFIED, 0.05))  # promotes
    assert h.cache.in_use()["scratch_pieces"] > 0
    for rid in ("a", "b"):
        h.cache.release(rid)
        assert h.cache.pop_stats(rid) is not None and h.cache.pop_stats(rid) is None
    assert h.cache.in_use() == {"slots": 0, "scratch_pieces": 0, "stats": 0, "tracked_requests": 0, "held_blocks": 0,
                                "pending_copies": 0}
    assert sorted(h.cache._free_slots) == list(range(4))


def test_scratch_evicts_the_least_attended_piece():
    scratch = Scratch(2, num_blocks=8, kv_heads=2, block_size=BS, head_dim=D, dtype=torch.float32,
                      device=torch.device("cpu"))
    data = torch.randn(3, BS, D)
    scratch.put("k", torch.tensor([1, 2]), torch.tensor([0, 0]), data[:2])
    tables, full = torch.tensor([[1, 2]]), torch.tensor([2])
    for _ in range(30):  # block 1 keeps being attended, block 2 barely: its score decays
        scratch.touch(tables, full, torch.tensor([[[0.9, 0.0], [0.01, 0.0]]]))
    scratch.put("k", torch.tensor([3]), torch.tensor([1]), data[2:])
    assert scratch.slot["k"][2, 0] == -1 and scratch.slot["k"][1, 0] >= 0 and scratch.slot["k"][3, 1] >= 0
    assert torch.equal(scratch.data["k"][scratch.slot["k"][3, 1]], data[2])
    scratch.invalidate(torch.tensor([3]))
    assert scratch.slot["k"][3, 1] == -1 and scratch.used() == 1
    scratch.put("k", torch.tensor([1, 5]), torch.tensor([0, 0]), data[:2])  # re-put of a held piece + a new one
    assert scratch.used() == 2 and torch.equal(scratch.data["k"][scratch.slot["k"][1, 0]], data[0])


def test_filled_blocks_stay_exact_while_attended():
    h = Harness(4, 2, seed=12)
    policy = KVPolicy(KVMode.CERTIFIED, 0.1)
    h.step({"a": random_kv(h.gen, 15)}, policy)
    h.step({"a": random_kv(h.gen, 1)}, policy)  # the first block fills: kept exact, no tier-2 fetch
    block = h.tables["a"][0]
    layer = h.cache.layers[0]
    assert (layer.k_slot[block] >= 0).all() and (layer.v_slot[block] >= 0).all()
    assert torch.equal(layer.scratch_k[layer.k_slot[block, 1]], h.keys["a"][:BS, 1])
    assert not h.cache.records


def test_tier1_bytes_per_token_meet_the_promise():
    for bits, limit in (((8, 4), 0.56), ((4, 4), 0.40)):
        for head_dim in (64, 128):
            quant = MinMaxQuantizer(*bits)
            fp16 = 2 * head_dim * 2
            assert TieredKVCache.tier1_bytes(quant, head_dim, 16) / fp16 <= limit, (bits, head_dim)


@pytest.mark.parametrize("quantizer", ["minmax", "hadamard", "minmax-fp8", "headq"])
@pytest.mark.parametrize("mode", [KVMode.QUANTIZED, KVMode.CERTIFIED])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 33])
def test_twin_equals_brute_force(n, mode, quantizer):
    """certified_decode's output equals attention over explicitly dequantized blocks, the exact partial block and
    (except for the naive quantized baseline) the exact pieces the scratch holds."""
    h = Harness(4, 4, seed=10 + n, quantizer=quantizer)
    policy = KVPolicy(mode, 10.0)  # a tolerance nothing exceeds: the kernel's own output is what comes back
    h.step({"a": random_kv(h.gen, n)}, policy)
    q = torch.randn(1, HKV * G, D, generator=h.gen)
    batch, out = h.step({"a": random_kv(h.gen, 1)}, policy, q=q)
    layer, quant, length = h.cache.layers[0], h.cache.quantizers[0], n + 1
    full = length // BS
    keys, values = h.keys["a"].clone(), h.values["a"].clone()
    for b, block in enumerate(h.tables["a"][:full]):  # quantized blocks read their codes, held ones stay exact
        sl = slice(b * BS, (b + 1) * BS)
        deq_k = quant.dequantize_keys(Codes(layer.k_codes[block], layer.k_scale[block], layer.k_zero[block]))
        deq_v = quant.dequantize_values(Codes(layer.v_codes[block], layer.v_scale[block], layer.v_zero[block]))
        uses = mode is not KVMode.QUANTIZED
        held_k, held_v = (layer.k_slot[block] >= 0) & uses, (layer.v_slot[block] >= 0) & uses  # [Hkv]
        keys[sl] = torch.where(held_k[None, :, None], keys[sl], deq_k.transpose(0, 1))
        values[sl] = torch.where(held_v[None, :, None], values[sl], deq_v.transpose(0, 1))
    probs = torch.softmax(torch.einsum("hgd,lhd->hgl", q[0].view(HKV, G, D), keys) * D ** -0.5, dim=-1)
    expected = torch.einsum("hgl,lhd->hgd", probs, values)
    assert torch.allclose(out[0].view(HKV, G, D), expected, atol=1e-5), (out[0].view(HKV, G, D) - expected).abs().max()
    assert math.isclose(batch.cache_meta.view.num_full.item(), full)
