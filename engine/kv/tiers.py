"""TieredKVCache: the certified cache behind the KVCache seam (docs/architecture.md, "Tiers").

Tier 1 (device) holds, per layer, every full block quantized (engine.kv.quantizers) with its error annotations
eps_b and eta_b measured at write time, each sequence's trailing partial block exact until it fills (then it is
quantized at once), and a bounded scratch of promoted exact blocks. Tier 2 holds every token's K and V exactly as
the model produced them, in the dense cache's layout, on the host (pinned on CUDA; plain memory on CPU). Per
sequence and layer, a value centre c (the mean of the first chunk's values) and the radius R = max ||v_j - c|| over
every token written.

Prefix caching shares full blocks between sequences: a shared block's codes, metadata, annotations, shadow, checksum
and scratch pieces serve every sequence holding it, and no sequence writes into a block another holds. A block's
scratch pieces and prefetches are dropped when its last holder leaves (`holders`). Each filled block also stores a
summary of its exact values per KV head (block_mean m_b, block_reach r_b >= max ||v_j - m_b||, on the host beside
the shadows), from which a sequence that starts after shared blocks gets a centre and radius covering them
(_start_shared).

Attention by request mode: prefill chunks and dense/exact decodes read tier 2 through the dense functions (so
exact mode is bit for bit the dense result); quantized/certified/audit decodes run certified_decode on tier 1, and
certified/audit ones climb the ladder (engine.kv.escalation) when the bound exceeds the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import torch

from engine.batch import ForwardBatch
from engine.faults import NO_FAULTS, FaultPlan, ShadowError
from engine.kv.copy_engine import CopyEngine, Fetch
from engine.kv.escalation import PREFETCH_MARGIN, Ladder
from engine.kv.quantizers import Quantizer, bytes_per_token
from engine.kv.scratch import Scratch
from engine.kv.stats import RUNGS, CertificateStats, EscalationRecord
from engine.kv.summaries import shared_spread, summarise
from engine.request import KVMode
from kernels import (certified_decode, certify_layer, cpu, decode_attention, decode_path, prefill_attention,
                     quantize_blocks)
from kernels.reference import DecodeView, QuantizedLayer, gather_blocks, make_view, reference_decode


@dataclass(frozen=True, slots=True)
class WritePlan:
    """Where this step's new tokens go in tier 1, for every layer. Rows index the step's T new tokens."""

    tail_dst: torch.Tensor  # [A] flat tail slot (slot * bs + offset) of tokens in their sequence's first touched block
    tail_src: torch.Tensor  # [A] their rows
    tail_blocks: torch.Tensor  # [n1] blocks completed in the tail buffer this step (quantized from the tail)
    tail_block_slots: torch.Tensor  # [n1] the sequence slot holding each of them
    new_blocks: torch.Tensor  # [n2] blocks made entirely of this step's tokens
    new_block_rows: torch.Tensor  # [n2, bs] their rows
    late_dst: torch.Tensor  # [C] tail positions of tokens in a partial last block other than the first touched one
    late_src: torch.Tensor  # [C]
    row_slots: torch.Tensor  # [T] sequence slot of each new token
    fresh_rows: torch.Tensor  # [R] rows of tokens of sequences written from position 0 this step
    fresh_slots: torch.Tensor  # [F] slots of those sequences (centre and radius start over)
    filled: list[int]  # tail_blocks then new_blocks, on the host


@dataclass(slots=True)
class Tally:
    """Certificate accounting of one step for its tier-1 decode sequences, flushed once by end_step()."""

    evaluations: torch.Tensor  # [Bd] int64: query heads evaluated (summed over layers)
    rungs: torch.Tensor  # [Bd, 5] int64: query heads by rung (certifying modes only)
    max_bound: torch.Tensor  # [Bd] float32
    max_ratio: torch.Tensor  # [Bd] float32: bound / limit
    tail_mass: torch.Tensor  # [Bd] float32: sum over heads and layers of the attention mass on quantized keys
    layers: list  # per layer (bound, limit, rung, alpha_t): counted once per step by Ladder.account

    @staticmethod
    def zeros(n: int, device: torch.device) -> Tally:
        return Tally(torch.zeros(n, dtype=torch.int64, device=device),
                     torch.zeros(n, RUNGS, dtype=torch.int64, device=device),
                     torch.zeros(n, device=device), torch.zeros(n, device=device), torch.zeros(n, device=device), [])


@dataclass(frozen=True, slots=True)
class StepPlan:
    write: WritePlan
    exact_seqs: torch.Tensor  # [Be] decode sequences (index into B) attended from tier 2 (dense, exact modes)
    exact_seqs_list: list[int]  # the same on the host
    exact_rows: torch.Tensor  # [Be] their rows
    exact_ids: list[str]  # their requests in exact mode (counted in certificates)
    quant_seqs: list[int]  # decode sequences attended from tier 1
    quant_rows: torch.Tensor  # [Bd]
    view: DecodeView | None
    request_ids: list[str]  # [Bd]
    client_ids: list[str]  # [Bd]
    modes: list[KVMode]  # [Bd]
    tolerance: torch.Tensor  # [Bd] float32
    certifying: torch.Tensor  # [Bd] bool: certified or audit (climbs the ladder)
    auditing: bool  # some row is in audit mode
    decode_only: bool  # every row of the step is a tier-1 decode, in row order
    tally: Tally | None
    prefetches: list = field(default_factory=list)  # (layer, chosen blocks [Bd, Hkv, 2, K]) to fetch after the step
    # the pass's certificate updates, made by end_step: a pass abandoned midway (the engine runs its requests again
    # one by one) leaves no trace in the certificates
    updates: list = field(default_factory=list)
    window: int | None = None  # the sliding window this plan's view applies (None: whole contexts)
    windowed: dict = field(default_factory=dict)  # window -> this plan with that window's view (built on first use)


class TieredKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, quantizer: Quantizer, max_seqs: int, scratch_blocks: int,
                 prefetch: bool = False, faults: FaultPlan = NO_FAULTS, prefetch_blocks: int = 512,
                 share: bool = True):
        self.quantizer = quantizer
        self.share = share  # blocks may be shared (prefix caching): each filled block keeps its value summary
        self.quantizers = [quantizer.for_layer(i) for i in range(num_layers)]  # HeadQ: each layer its own basis
        self.block_size, self.kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.num_blocks, self.dtype, self.device = num_blocks, dtype, device
        self.shadow_device = torch.device("cpu")
        pin = device.type == "cuda"
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.shadow_k = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        self.shadow_v = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        self.scratch = [Scratch(scratch_blocks, num_blocks, num_kv_heads, block_size, head_dim, dtype, device)
                        for _ in range(num_layers)]
        self.layers = [self._tier1(i, max_seqs) for i in range(num_layers)]
        self.centre = [torch.zeros(max_seqs, num_kv_heads, head_dim, device=device) for _ in range(num_layers)]
        self.radius = [torch.zeros(max_seqs, num_kv_heads, device=device) for _ in range(num_layers)]
        self.slots: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}  # each live request's block table, as of its last step
        self.holders: dict[int, int] = {}  # block -> live requests holding it (prefix caching shares blocks)
        # Per layer, filled block and KV head: the mean of its exact values and a radius around it (host, float32)
        summarised = num_blocks if share else 0  # only shared blocks are read through their summaries
        self.block_mean = torch.zeros(num_layers, summarised, num_kv_heads, head_dim)
        self.block_reach = torch.zeros(num_layers, summarised, num_kv_heads)
        self._corrupt: set[int] = set()  # blocks that failed verification, for corrupt_blocks()
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self.stats: dict[str, CertificateStats] = {}
        self.records: list[EscalationRecord] = []
        self.ladder = Ladder(self)
        self.copy = CopyEngine(device, prefetch, limit=prefetch_blocks)
        self.faults = faults
        # Checksums of the shadows of full blocks (bit patterns of K and V summed), set when a block fills and
        # verified before any path reads the shadows (prefill, dense and exact decodes, the ladder's fetches and
        # recomputes, audit): once per block, `verified` marks the blocks checked since they were last written.
        self.checksums = [torch.zeros(num_blocks, dtype=torch.int64) for _ in range(num_layers)]
        self.verified = [torch.zeros(num_blocks, dtype=torch.bool) for _ in range(num_layers)]
        self._corrupted: set[str] = set()
        # On CUDA the step's K/V and checksums reach the host asynchronously (pinned staging buffers, copies queued
        # on the stream): the host work waiting for them runs in _settle, before the next read of the shadows.
        self._deferred = device.type == "cuda"
        self._staging: dict[tuple, torch.Tensor] = {}
        self._pending: list = []
        self._pending_event = torch.cuda.Event() if device.type == "cuda" else None

    def _tier1(self, layer: int, max_seqs: int) -> QuantizedLayer:
        nb, h, bs, d = self.num_blocks, self.kv_heads, self.block_size, self.head_dim
        q, dev, scratch = self.quantizers[layer], self.device, self.scratch[layer]

        def zeros(*shape, dtype=torch.float16):
            return torch.zeros(shape, dtype=dtype, device=dev)

        (k_scale, k_zero), (v_scale, v_zero) = q.key_meta(bs, d), q.value_meta(d)
        return QuantizedLayer(
            k_codes=zeros(nb, h, bs, q.key_width(d), dtype=torch.uint8),
            k_scale=zeros(nb, h, *k_scale, dtype=q.key_scale_dtype), k_zero=zeros(nb, h, *k_zero),
            v_codes=zeros(nb, h, bs, d * q.v_bits // 8, dtype=torch.uint8),
            v_scale=zeros(nb, h, bs, v_scale, dtype=q.value_scale_dtype), v_zero=zeros(nb, h, bs, v_zero),
            block_notes=zeros(nb, h, 2, dtype=torch.float32), token_notes=zeros(nb, h, bs, 2), slots=scratch.slots,
            tail_k=zeros(max_seqs, bs, h, d, dtype=self.dtype), tail_v=zeros(max_seqs, bs, h, d, dtype=self.dtype),
            scratch_k=scratch.data["k"], scratch_v=scratch.data["v"], scratch_norms=scratch.norms)

    # ---- accounting -------------------------------------------------------------------------------------------
    @staticmethod
    def tier1_bytes(quantizer: Quantizer, head_dim: int, block_size: int) -> float:
        """Per token per KV head per layer: codes, metadata, annotations and scratch lookups (not the fixed-size
        tail buffers and scratch)."""
        per_token = 2 * 2  # eta and the value norm (float16)
        per_block = 2 * 4 + 2 * 4  # eps and kappa (float32), k_slot and v_slot (int32)
        return bytes_per_token(quantizer, head_dim, block_size) + per_token + per_block / block_size

    @staticmethod
    def fixed_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    max_seqs: int, scratch_blocks: int, prefetch_blocks: int) -> int:
        """Device bytes that do not grow with the number of blocks: per layer the scratch (exact key and value
        pieces, their token norms, scores and owners), the prefetch pool (`prefetch_blocks` pieces of keys or
        values at most; 0 when prefetch is off), each sequence slot's partial-block buffers and its value centre and
        radius."""
        piece = block_size * head_dim * dtype.itemsize
        scratch = scratch_blocks * (2 * piece + block_size * 4) + 2 * (scratch_blocks + 1) * (4 + 16)
        prefetch = prefetch_blocks * piece
        tails = 2 * block_size * num_kv_heads * head_dim * dtype.itemsize
        slots = max_seqs * (tails + num_kv_heads * (head_dim + 1) * 4)  # centre (float32) and radius
        return num_layers * (scratch + prefetch + slots)

    @staticmethod
    def summary_bytes(head_dim: int) -> int:
        """Host bytes of one (block, KV head)'s value summary: block_mean and block_reach, float32."""
        return (head_dim + 1) * 4

    def tier1_bytes_per_token(self) -> float:
        return self.tier1_bytes(self.quantizer, self.head_dim, self.block_size)

    def tier2_bytes_per_token(self) -> float:
        """Shadows, and the blocks' value summaries (block_mean, block_reach) when blocks may be shared."""
        summaries = self.summary_bytes(self.head_dim) / self.block_size if self.share else 0
        return 2 * self.head_dim * self.dtype.itemsize + summaries

    def prefetch_counts(self) -> tuple[int, int]:
        return self.copy.stats.hits, self.copy.stats.misses

    def device_bytes(self) -> int:
        """Every tensor this cache allocated on its device, each counted once, plus the prefetch pool's capacity
        (its pieces are allocated as they arrive): what --kv-cache-memory must hold (fixed_bytes is its estimate)."""
        tensors = [getattr(layer, n) for layer in self.layers for n in layer.__slots__] + self.centre + self.radius
        for scratch in self.scratch:
            tensors += [*scratch.data.values(), scratch.norms, scratch._slots, *scratch.score.values(),
                        *scratch.owner.values()]
        held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())
        piece = self.block_size * self.head_dim * self.dtype.itemsize
        return held + (self.copy.limit * piece * len(self.layers) if self.copy.enabled else 0)

    def tier_bytes(self, blocks_used: int) -> dict[str, int]:
        tokens_heads = blocks_used * self.block_size * self.kv_heads * len(self.layers)
        scratch_piece = self.block_size * self.head_dim * self.dtype.itemsize
        return {"tier1": int(tokens_heads * self.tier1_bytes_per_token()),
                "tier2": int(tokens_heads * self.tier2_bytes_per_token()),
                "scratch": sum(s.used() for s in self.scratch) * scratch_piece}

    def register(self, request_id: str, mode: KVMode, tolerance: float) -> None:
        self.stats.setdefault(request_id, CertificateStats(mode, tolerance))

    def pop_stats(self, request_id: str) -> CertificateStats | None:
        return self.stats.pop(request_id, None)

    def drain_records(self) -> list[EscalationRecord]:
        records, self.records = self.records, []
        return records

    def release(self, request_id: str) -> None:
        """Frees the request's slot; the scratch pieces and prefetches of blocks no other live request holds go."""
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        unheld = []
        for block in self.blocks.pop(request_id, ()):
            self.holders[block] -= 1
            if not self.holders[block]:
                del self.holders[block]
                unheld.append(block)
        if unheld:
            index = torch.tensor(unheld, device=self.device)
            for layer, scratch in enumerate(self.scratch):
                scratch.invalidate(index)
                self.copy.invalidate(layer, unheld)

    def corrupt_blocks(self) -> list[int]:
        """Blocks whose shadows failed their checksum since the last call."""
        blocks, self._corrupt = sorted(self._corrupt), set()
        return blocks

    def in_use(self) -> dict[str, int]:
        """Live per-request state, for leak checks: all zeros once every request has ended."""
        return {"slots": len(self.slots), "scratch_pieces": sum(s.used() for s in self.scratch),
                "stats": len(self.stats), "tracked_requests": len(self.blocks), "held_blocks": len(self.holders),
                "pending_copies": self.copy.pending()}

    # ---- the KVCache seam ---------------------------------------------------------------------------------------
    def prepare(self, batch: ForwardBatch) -> None:
        self._settle()
        shared = []  # sequences whose first step starts after cached blocks
        for seq, (rid, kv, blocks, client) in enumerate(zip(batch.request_ids, batch.kv, batch.block_ids,
                                                            batch.client_ids)):
            if rid not in self.slots:
                self.slots[rid] = self._free_slots.pop()
                if batch.starts[seq]:
                    shared.append(seq)
            self._hold(rid, blocks)
            self.register(rid, kv.mode, kv.tolerance)
            if batch.starts[seq] >= self.block_size:
                self._inject(client, blocks[0])
        if shared:
            self._start_shared(batch, shared)
        batch.cache_meta = StepPlan(write=self._write_plan(batch), **self._decode_plan(batch))

    def _hold(self, request_id: str, blocks: list[int]) -> None:
        """The request's table as of this step (it only grows while the request lives)."""
        known = self.blocks.get(request_id, ())
        assert len(blocks) >= len(known), "a block table shrank"
        for block in blocks[len(known):]:
            self.holders[block] = self.holders.get(block, 0) + 1
        self.blocks[request_id] = blocks

    def _start_shared(self, batch: ForwardBatch, seqs: list[int]) -> None:
        """Sequences starting after shared blocks (prefix caching): no write of theirs saw those tokens, so their
        centre and radius come from the blocks' summaries (engine.kv.summaries.shared_spread); their own tokens then
        grow R as for any sequence. Set first, before anything that can fail. Then the first block (the attention
        sink) goes exact into the scratch from its verified shadow, as a writer keeps it (_keep_filled)."""
        bs = self.block_size
        for seq in seqs:
            start, blocks = batch.starts[seq], batch.block_ids[seq]
            assert start % bs == 0, "a sequence starts inside a shared block"
            index = torch.tensor(blocks[:start // bs])
            centre, radius = shared_spread(self.block_mean[:, index], self.block_reach[:, index])  # every layer
            centre, radius = centre.to(self.device), radius.to(self.device)
            slot = self.slots[batch.request_ids[seq]]
            for layer in range(len(self.layers)):
                self.centre[layer][slot], self.radius[layer][slot] = centre[layer], radius[layer]
        index = torch.tensor(sorted({batch.block_ids[s][0] for s in seqs}))
        for layer in range(len(self.layers)):
            self.verify(layer, [batch.request_ids[s] for s in seqs], [batch.block_ids[s][:1] for s in seqs],
                        [batch.client_ids[s] for s in seqs])
            keys, values = (shadow[layer][index].transpose(1, 2).to(self.device)  # [n, Hkv, bs, D]
                            for shadow in (self.shadow_k, self.shadow_v))
            self._keep_filled(layer, index.to(self.device), keys, values)

    def forward(self, layer, q, k, v, batch, scale, window: int | None = None):
        plan = self._windowed(batch, window)
        self._write(layer, k, v, batch.slot_mapping_host, plan.write)
        self._verify_reads(layer, batch, plan)
        if plan.decode_only:  # every row a tier-1 decode, in order: no gather, no scatter
            return self._quantized_decode(layer, q, plan, batch, scale)
        out = torch.empty_like(q)
        for seq in batch.prefill_seqs:  # prefill chunks are exact: the dense computation on the shadows
            lo, hi = batch.query_starts[seq], batch.query_starts[seq + 1]
            length = batch.starts[seq] + hi - lo
            table = torch.tensor(batch.block_ids[seq], dtype=torch.int64)  # host: no device read
            keys = gather_blocks(self.shadow_k[layer], table, length).to(q.device)
            values = gather_blocks(self.shadow_v[layer], table, length).to(q.device)
            out[lo:hi] = prefill_attention(q[lo:hi], keys, values, scale, window)
        if plan.exact_rows.numel():
            seqs = plan.exact_seqs
            out[plan.exact_rows] = self.exact_decode(layer, q[plan.exact_rows], batch.block_tables[seqs],
                                                     batch.context_lens[seqs], scale, window)
            plan.updates.extend(partial(self.stats[rid].add_exact, q.shape[1]) for rid in plan.exact_ids)
        if plan.view is not None:
            out[plan.quant_rows] = self._quantized_decode(layer, q[plan.quant_rows], plan, batch, scale)
        return out

    def end_step(self, batch: ForwardBatch) -> None:
        """Adds the step's tally and updates to the requests' certificates (one host transfer for the whole step)."""
        plan: StepPlan = batch.cache_meta
        for update in plan.updates:
            update()
        plan.updates.clear()
        if plan.tally is None:
            return
        self.ladder.prefetch_chosen(plan)
        self.ladder.account(plan)
        tally = plan.tally
        evaluations, rungs = tally.evaluations.tolist(), tally.rungs.tolist()
        max_bound, max_ratio, tail_mass = tally.max_bound.tolist(), tally.max_ratio.tolist(), tally.tail_mass.tolist()
        for i, rid in enumerate(plan.request_ids):
            stats = self.stats[rid]
            stats.evaluations += evaluations[i]
            stats.rungs = [a + b for a, b in zip(stats.rungs, rungs[i])]
            stats.max_bound = max(stats.max_bound, max_bound[i])
            stats.max_bound_over_tolerance = max(stats.max_bound_over_tolerance, max_ratio[i])
            stats.quantized_key_mass += tail_mass[i]

    def verify(self, layer: int, request_ids: list[str], blocks: list[list[int]], client_ids: list[str]) -> None:
        """Raises ShadowError for the requests whose shadows (of full blocks) are missing or fail their checksum. Each
        block is checked once after it was written (`verified`); all unchecked blocks of the call in one pass."""
        self._settle()
        bad = [rid for rid, client in zip(request_ids, client_ids) if self.faults.targets("shadow.drop", client)]
        verified = self.verified[layer]
        fresh = sorted({b for rid, full in zip(request_ids, blocks) if rid not in bad for b in full if not verified[b]})
        if fresh:
            index = torch.tensor(fresh)
            ok = _checksum(self.shadow_k[layer][index], self.shadow_v[layer][index]) == self.checksums[layer][index]
            verified[index[ok]] = True
            failed = set(index[~ok].tolist())
            self._corrupt |= failed
            bad += [rid for rid, full in zip(request_ids, blocks) if rid not in bad and failed.intersection(full)]
        if bad:
            raise ShadowError(bad, "tier-2 shadow missing or corrupt")

    def _verify_reads(self, layer: int, batch: ForwardBatch, plan: StepPlan) -> None:
        """Before prefill chunks and dense or exact decodes read the shadows: their sequences' full blocks."""
        seqs = batch.prefill_seqs + plan.exact_seqs_list
        if seqs:
            bs = self.block_size
            self.verify(layer, [batch.request_ids[s] for s in seqs],
                        [batch.block_ids[s][:(batch.starts[s] + batch.query_len(s)) // bs] for s in seqs],
                        [batch.client_ids[s] for s in seqs])

    def _inject(self, client_id: str, first_block: int) -> None:
        """Fault points acting on a request's first full block, once (tests only: FaultPlan)."""
        if client_id in self._corrupted:
            return
        if self.faults.targets("shadow.corrupt", client_id):
            for shadow, verified in zip(self.shadow_k, self.verified):
                shadow[first_block] += 1.0
                verified[first_block] = False  # rewritten, as far as the checks can tell
            self.faults.hit("shadow.corrupt")
        elif self.faults.targets("kv.nonfinite", client_id):
            self.layers[0].k_scale[first_block] = torch.inf
            self.faults.hit("kv.nonfinite")
        else:
            return
        self._corrupted.add(client_id)

    def exact_decode(self, layer, q, tables, lens, scale, window: int | None = None):
        """Dense decode attention from the shadows (what dense mode computes, bit for bit on the same device)."""
        self._settle()
        keys, values = self.shadow_k[layer], self.shadow_v[layer]
        if keys.device != q.device:  # fetch the sequences' blocks; the same computation on the copied blocks
            host = tables.to(self.shadow_device)
            keys, values = (x[host].flatten(0, 1).to(q.device, non_blocking=True) for x in (keys, values))
            tables = torch.arange(host.numel(), device=q.device).view(host.shape)
        return decode_attention(q, keys, values, tables, lens, scale, window=window)

    def reference_decode(self, layer, q, tables, lens, scale, window: int | None = None):
        """The float64 reference (O_ref, RMS_ref) of decode queries q [n, H, D] over their shadows (audit)."""
        self._settle()
        host = tables.to(self.shadow_device)
        keys, values = (gather_blocks(x, host).to(q.device) for x in (self.shadow_k[layer], self.shadow_v[layer]))
        return reference_decode(q, keys, values, lens, scale, window)

    def _quantized_decode(self, layer, q, plan: StepPlan, batch, scale):
        """Certified decode of the tier-1 sequences; the output served is the accepted float32 output cast to q's
        dtype, whose rounding the certificate includes (DecodeResult.cast). On the CPU the compiled kernel also
        checks every head, touches the scratch and, when nothing escalates, counts the layer; on a GPU the finish
        kernel checks every head: either way, when nothing escalates or needs prefetching the ladder does not run."""
        view, quantizer, counted = plan.view, self.quantizers[layer], False
        path = decode_path(q, quantizer)
        if path == "cpu":
            decoded = cpu.decode_layer(q, self.layers[layer], view, scale, quantizer, self.radius[layer],
                                       plan.tolerance, plan.certifying, PREFETCH_MARGIN,
                                       None if plan.auditing else plan.tally, self.scratch[layer].score,
                                       self.scratch[layer].DECAY)
            if decoded.counted and not (decoded.escalate or decoded.near and self.copy.enabled):
                return decoded.out.flatten(1, 2)  # float32, q's dtype on this path
            result, counted = decoded.result(), decoded.counted
        elif path == "triton":  # the finish kernel checked every head: one read of its flags
            finished = certify_layer(q, self.layers[layer], view, scale, quantizer, self.radius[layer],
                                     plan.tolerance, plan.certifying, PREFETCH_MARGIN)
            result = finished.result
            self.scratch[layer].touch(view.block_tables, view.num_full, result.block_mass())
            if not (plan.auditing or finished.escalate or finished.near and self.copy.enabled):
                self.ladder.count(plan, result)
                return finished.served
        else:
            result = certified_decode(q, self.layers[layer], view, scale, quantizer)
            self.scratch[layer].touch(view.block_tables, view.num_full, result.block_mass())
        out = self.ladder.run(layer, q, result, plan, batch, scale, counted)
        return out.flatten(1, 2).to(q.dtype)

    # ---- writes -------------------------------------------------------------------------------------------------
    def _write(self, layer, k, v, slot_mapping, plan: WritePlan) -> None:
        """The step's K/V into the shadows and the tail buffers; blocks that filled are quantized (and kept exact in
        the scratch); each sequence's value centre and radius follow. On the CPU the copies and the spread are one
        compiled call on each side of the quantization (kernels.cpu.write_layer)."""
        tier1 = self.layers[layer]
        filled = bool(plan.tail_blocks.numel() or plan.new_blocks.numel())
        compiled = k.device.type == "cpu" and k.dtype == torch.float32 and cpu.available()
        if compiled:
            cpu.write_layer(k, v, self.shadow_k[layer], self.shadow_v[layer], slot_mapping, tier1.tail_k, tier1.tail_v,
                            plan, self.centre[layer], self.radius[layer], True, not filled)
        else:
            self._write_shadows(layer, k, v, slot_mapping)
            for tail, new in ((tier1.tail_k, k), (tier1.tail_v, v)):
                tail.view(-1, *new.shape[1:]).index_copy_(0, plan.tail_dst, new[plan.tail_src])
        if not filled:
            if not compiled:
                self._update_spread(layer, v, plan)
            return
        blocks = torch.cat([plan.tail_blocks, plan.new_blocks])
        full_k = torch.cat([tier1.tail_k[plan.tail_block_slots], k[plan.new_block_rows]]).transpose(1, 2)
        full_v = torch.cat([tier1.tail_v[plan.tail_block_slots], v[plan.new_block_rows]]).transpose(1, 2)
        self._quantize(layer, blocks, plan.filled, full_k, full_v)
        if plan.tail_blocks.numel():
            self._keep_filled(layer, plan.tail_blocks, full_k, full_v)
        if compiled:
            cpu.write_layer(k, v, self.shadow_k[layer], self.shadow_v[layer], slot_mapping, tier1.tail_k, tier1.tail_v,
                            plan, self.centre[layer], self.radius[layer], False, True)
            return
        for tail, new in ((tier1.tail_k, k), (tier1.tail_v, v)):
            tail.view(-1, *new.shape[1:]).index_copy_(0, plan.late_dst, new[plan.late_src])
        self._update_spread(layer, v, plan)

    def _write_shadows(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """The step's K/V [T, Hkv, D] into the shadows at slot_mapping [T] (host): a copy on the CPU; on CUDA an
        asynchronous one into pinned staging, scattered into the shadows by _settle."""
        shadows = (self.shadow_k[layer], self.shadow_v[layer])
        if not self._deferred:
            for shadow, new in zip(shadows, (k, v)):
                shadow.view(-1, *new.shape[1:]).index_copy_(0, slot_mapping, new.to(shadow.device))
            return
        staged = [self._stage((layer, kind), new) for kind, new in zip("kv", (k, v))]

        def scatter():
            for shadow, rows in zip(shadows, staged):
                shadow.view(-1, *rows.shape[1:]).index_copy_(0, slot_mapping, rows)

        self._queue(scatter)

    def _stage(self, key: tuple, x: torch.Tensor) -> torch.Tensor:
        """x copied to the host without waiting, into a pinned buffer of its own (grown when too small)."""
        buffer = self._staging.get(key)
        if buffer is None or buffer.numel() < x.numel() or buffer.dtype != x.dtype:
            buffer = self._staging[key] = torch.empty(max(x.numel(), 1 << 16), dtype=x.dtype,
                                                      pin_memory=self.device.type == "cuda")
        staged = buffer[:x.numel()].view(x.shape)
        staged.copy_(x, non_blocking=True)
        return staged

    def _queue(self, work) -> None:
        self._pending.append(work)
        if self._pending_event is not None:
            self._pending_event.record()

    def _settle(self) -> None:
        """Runs the host work waiting for this step's asynchronous copies (CUDA): one wait for all of them."""
        if self._pending:
            if self._pending_event is not None:
                self._pending_event.synchronize()
            for work in self._pending:
                work()
            self._pending.clear()

    def _quantize(self, layer: int, blocks: torch.Tensor, filled: list[int], keys: torch.Tensor,
                  values: torch.Tensor) -> None:
        """keys, values [N, Hkv, bs, D] exact -> codes, metadata and measured error norms of `blocks` (`filled`: the
        same on the host). The checksums are of the device's data, so a bad copy to the shadows shows."""
        tier1, q = self.layers[layer], self.quantizers[layer]
        host = torch.tensor(filled, dtype=torch.int64)
        sums = _checksum(keys, values)
        if self._deferred:
            staged = self._stage((layer, "checksum"), sums)
            self._queue(lambda: self._store_checksums(layer, host, staged))
        else:
            self._store_checksums(layer, host, sums)
        if self.share:
            self._summarise(layer, host, values)
        written = quantize_blocks(keys, values, q)
        k_codes, v_codes = written.keys, written.values
        tier1.k_codes[blocks], tier1.k_scale[blocks], tier1.k_zero[blocks] = k_codes.codes, k_codes.scale, k_codes.zero
        tier1.v_codes[blocks], tier1.v_scale[blocks], tier1.v_zero[blocks] = v_codes.codes, v_codes.scale, v_codes.zero
        tier1.block_notes[blocks], tier1.token_notes[blocks] = written.block_notes, written.token_notes
        self.scratch[layer].invalidate(blocks)
        self.copy.invalidate(layer, filled)

    def _summarise(self, layer: int, blocks: torch.Tensor, values: torch.Tensor) -> None:
        """Per filled block (blocks: host) and KV head, the summary of its exact values [N, Hkv, bs, D] that sequences
        sharing the block start from (engine.kv.summaries)."""
        mean, reach = summarise(values)
        if self._deferred:
            staged = [self._stage((layer, name), x) for name, x in (("mean", mean), ("reach", reach))]
            self._queue(lambda: self._store_summaries(layer, blocks, *staged))
        else:
            self._store_summaries(layer, blocks, mean, reach)

    def _store_summaries(self, layer: int, blocks: torch.Tensor, mean: torch.Tensor, reach: torch.Tensor) -> None:
        self.block_mean[layer][blocks], self.block_reach[layer][blocks] = mean.cpu(), reach.cpu()

    def _store_checksums(self, layer: int, blocks: torch.Tensor, sums: torch.Tensor) -> None:
        self.checksums[layer][blocks] = sums
        self.verified[layer][blocks] = False

    def _keep_filled(self, layer: int, blocks: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Blocks whose exact keys and values [n, Hkv, bs, D] are at hand (one that just filled in the tail buffer, or
        the first block of a sequence that starts from shared ones) stay exact in the scratch, competing for their
        slots by attention like any promoted piece: the recent window and the attention sink (a prompt's first block)
        are where quantization errors cost the most."""
        heads = torch.arange(self.kv_heads, device=self.device).repeat(len(blocks))[: self.scratch[layer].capacity]
        repeated = blocks.repeat_interleave(self.kv_heads)[: len(heads)]
        for kind, data in (("k", keys), ("v", values)):
            self.scratch[layer].put(kind, repeated, heads, data[: len(blocks)].flatten(0, 1)[: len(heads)])

    def _update_spread(self, layer: int, v: torch.Tensor, plan: WritePlan) -> None:
        """Centre c from a sequence's first chunk; R = max ||v_j - c|| over every token, rounded up."""
        centre, radius, values = self.centre[layer], self.radius[layer], v.float()
        if plan.fresh_slots.numel():
            rows = plan.fresh_rows
            slots = plan.row_slots[rows]
            sums = torch.zeros_like(centre).index_add_(0, slots, values[rows])
            counts = torch.zeros(centre.shape[0], device=centre.device).index_add_(
                0, slots, torch.ones_like(slots, dtype=torch.float32))
            centre[plan.fresh_slots] = sums[plan.fresh_slots] / counts[plan.fresh_slots, None, None]
            radius[plan.fresh_slots] = 0.0
        dist = (values - centre[plan.row_slots]).norm(dim=-1)
        dist = torch.nextafter(dist * (1 + 2**-20), torch.tensor(float("inf"), device=dist.device))
        radius.scatter_reduce_(0, plan.row_slots[:, None].expand_as(dist), dist, reduce="amax")

    # ---- planning (once per step) -------------------------------------------------------------------------------
    def _write_plan(self, batch: ForwardBatch) -> WritePlan:
        bs = self.block_size
        lists = {name: [] for name in ("tail_dst", "tail_src", "tail_blocks", "tail_block_slots", "new_blocks",
                                       "new_block_rows", "late_dst", "late_src", "row_slots", "fresh_rows",
                                       "fresh_slots")}
        for seq, rid in enumerate(batch.request_ids):
            slot, start, row0 = self.slots[rid], batch.starts[seq], batch.query_starts[seq]
            end, blocks = start + batch.query_len(seq), batch.block_ids[seq]
            lists["row_slots"] += [slot] * (end - start)
            assert self.holders[blocks[start // bs]] == 1, "a sequence would write into a block another one holds"
            if start == 0:
                lists["fresh_rows"] += range(row0, row0 + end - start)
                lists["fresh_slots"].append(slot)
            first_end = min(end, (start // bs + 1) * bs)  # tokens of the first touched block go to the tail
            lists["tail_dst"] += [slot * bs + p % bs for p in range(start, first_end)]
            lists["tail_src"] += [row0 + p - start for p in range(start, first_end)]
            if first_end % bs == 0 and first_end <= end:
                lists["tail_blocks"].append(blocks[start // bs])
                lists["tail_block_slots"].append(slot)
            for b0 in range(first_end, end, bs):  # later blocks: whole ones from the new rows, the last maybe partial
                if b0 + bs <= end:
                    lists["new_blocks"].append(blocks[b0 // bs])
                    lists["new_block_rows"].append([row0 + p - start for p in range(b0, b0 + bs)])
                else:
                    lists["late_dst"] += [slot * bs + p % bs for p in range(b0, end)]
                    lists["late_src"] += [row0 + p - start for p in range(b0, end)]
        device = self.device
        tensors = {name: torch.tensor(values, dtype=torch.int64, device=device) for name, values in lists.items()}
        tensors["new_block_rows"] = tensors["new_block_rows"].view(-1, bs)
        return WritePlan(**tensors, filled=lists["tail_blocks"] + lists["new_blocks"])

    def _decode_plan(self, batch: ForwardBatch) -> dict:
        device = self.device
        decode = batch.decode_seqs.tolist()
        exact = [s for s in decode if not batch.kv[s].quantized]
        quant = [s for s in decode if batch.kv[s].quantized]
        rows = [batch.query_starts[s] for s in quant]
        return dict(
            exact_seqs=torch.tensor(exact, dtype=torch.int64, device=device), exact_seqs_list=exact,
            exact_rows=torch.tensor([batch.query_starts[s] for s in exact], dtype=torch.int64, device=device),
            exact_ids=[batch.request_ids[s] for s in exact if batch.kv[s].mode is KVMode.EXACT],
            quant_seqs=quant, quant_rows=torch.tensor(rows, dtype=torch.int64, device=device),
            view=self._view(batch, quant, None) if quant else None,
            request_ids=[batch.request_ids[s] for s in quant], client_ids=[batch.client_ids[s] for s in quant],
            modes=[batch.kv[s].mode for s in quant],
            tolerance=torch.tensor([batch.kv[s].tolerance for s in quant], device=device),
            certifying=torch.tensor([batch.kv[s].mode in (KVMode.CERTIFIED, KVMode.AUDIT) for s in quant],
                                    dtype=torch.bool, device=device),
            auditing=any(batch.kv[s].mode is KVMode.AUDIT for s in quant),
            decode_only=rows == list(range(batch.num_tokens)),
            tally=Tally.zeros(len(quant), device) if quant else None)

    def _view(self, batch: ForwardBatch, quant: list[int], window: int | None) -> DecodeView:
        """The tier-1 view of the decoding sequences `quant`: the full blocks they attend (with a sliding window, from
        the block holding the window's first token) and their partial blocks."""
        bs, device = self.block_size, self.device
        lengths = [batch.starts[s] + 1 for s in quant]
        first = [0 if window is None else max(0, n - window) for n in lengths]
        skipped = [p // bs for p in first]  # blocks wholly before the window: neither read nor certified
        full = [n // bs - k for n, k in zip(lengths, skipped)]
        width = max(full)
        tables = [batch.block_ids[s][k:k + f] + [0] * (width - f) for s, k, f in zip(quant, skipped, full)]

        def tensor(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        return make_view(tensor(tables).view(len(quant), width), tensor(full), tensor([n % bs for n in lengths]),
                         tensor([self.slots[batch.request_ids[s]] for s in quant]), bs,
                         torch.tensor([batch.kv[s].mode is not KVMode.QUANTIZED for s in quant], device=device),
                         tensor([p - k * bs for p, k in zip(first, skipped)]))

    def _windowed(self, batch: ForwardBatch, window: int | None) -> StepPlan:
        """The step's plan for layers with this sliding window (the plan itself without one); built once a step."""
        plan: StepPlan = batch.cache_meta
        if window is None or plan.view is None:
            return plan
        if window not in plan.windowed:
            plan.windowed[window] = replace(plan, view=self._view(batch, plan.quant_seqs, window), window=window)
        return plan.windowed[window]

    # ---- tier-2 fetches -----------------------------------------------------------------------------------------
    def promote(self, layer: int, kind: str, pieces: list[tuple[int, int]],
                requests: list[tuple[str, str]]) -> Fetch | None:
        """Copies exact (block, KV head) pieces from tier 2 into the scratch: the shadows of every requesting
        sequence checked (requests[i] = (request id, client id) of piece i), then one transfer and one scratch
        update for all of them. pieces are distinct."""
        if not pieces:
            return None
        owners: dict[tuple[str, str], list[int]] = {}
        for (block, _), owner in zip(pieces, requests):
            owners.setdefault(owner, []).append(block)
        self.verify(layer, [r for r, _ in owners], list(owners.values()), [c for _, c in owners])
        shadow = self.shadow_k[layer] if kind == "k" else self.shadow_v[layer]
        try:
            if self.faults.active("copy.fail") is not None:
                self.faults.hit("copy.fail")
                raise RuntimeError("injected tier-2 copy failure")
            fetched = self.copy.fetch(layer, kind, shadow, pieces)
        except RuntimeError as exc:
            raise ShadowError([r for r, _ in owners], f"tier-2 copy failed: {exc}") from exc
        blocks, heads = (torch.tensor(x, dtype=torch.int64, device=self.device) for x in zip(*pieces))
        self.scratch[layer].put(kind, blocks, heads, fetched.data)
        return fetched

    def prefetch(self, layer: int, kind: str, pieces: list[tuple[int, int]]) -> None:
        """Starts one transfer of (block, KV head) pieces of a layer's keys or values that will probably be fetched."""
        self._settle()
        self.copy.prefetch(layer, kind, self.shadow_k[layer] if kind == "k" else self.shadow_v[layer], pieces)


def _checksum(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per block (first dim), the sum of the bit patterns of its keys and values: any layout of the same numbers gives
    the same sum, so the write path (head-major) and the shadows (token-major) can be compared."""
    bits = {4: torch.int32, 2: torch.int16}[keys.element_size()]

    def total(x):
        return x.contiguous().view(bits).to(torch.int64).flatten(1).sum(dim=1)

    return total(keys) + total(values)
