"""The escalation ladder (docs/certificate.md, "The ladder") for one layer of one step.

Groups are (sequence, KV head): promotions are shared by the group's query heads. A group leaves rung 0 when any of
its certified/audit heads is over its threshold. Then:
  rung 1  values alone can fit: promote value blocks greedily by sum p^_j eta_j until E_val fits what E_key and
          E_fp leave (the weights do not move, so this is cheap to predict);
  rung 2  otherwise: promote key blocks greedily by mass until the predicted E_key fits half the budget, and value
          blocks until E_val fits the other half;
both promote exact blocks from tier 2 into the scratch and re-run the same certified kernel for the affected
sequences (one batched call), which re-certifies with the new exact set.
  rung 3  still over, no promotion can fit, the layer's promotions for this step would exceed half the scratch,
          or a non-finite output or bound: dense attention from tier 2;
  rung 4  a block's annotations are not finite (broken metadata): dense attention for the sequence's whole layer.
Accepted outputs of other groups are never replaced. Audit requests also get the float64 reference and count, apart,
accepted heads farther from it than their bound and farther than their promise (tolerance * max(||O_ref||, RMS_ref)).
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

import torch

from kernels import certificate as cert
from engine.kv.stats import RATIO_BINS, EscalationRecord, ratio_bins
from engine.request import KVMode
from kernels import certified_decode, decode_attention, kernel_decodes, reference
from kernels.reference import DecodeResult, take

if TYPE_CHECKING:
    from engine.kv.tiers import StepPlan, TieredKVCache

CERTIFYING = (KVMode.CERTIFIED, KVMode.AUDIT)
VALUE_ONLY = 0.9  # rung 1 when E_key uses at most this share of the budget
HEADROOM = 0.5  # promotions aim at this share of the budget, leaving slack so the next steps certify too
# Accepted groups with bound / limit above this get their heaviest quantized blocks prefetched. Measured on two
# escalating workloads (README "Fallback"): hit rate 79%/79% at 0.3, 81%/80% at 0.2, 82%/81% at 0.1, for 1-5% more
# prefetched bytes each step down.
PREFETCH_MARGIN = 0.1
PREFETCH_BLOCKS = 12


def check(result: DecodeResult, radius: torch.Tensor, tolerance: torch.Tensor, tightest: bool = True):
    """(bound, limit) per query head [Bd, Hkv, G]: certified where bound <= limit. radius [Bd, Hkv]; tolerance
    broadcast to [Bd, 1, 1]. A non-finite output or a non-finite or negative bound becomes an infinite bound (a monitor:
    never accepted).
    tightest=False tries the whole-tail forms first and adds the per-block form only if some head fails them (it
    can only lower the bound): the same decisions for less work. A result the kernel checked itself (the compiled
    CPU path, with every form) carries its bound and limit."""
    if result.bound is not None:
        return result.bound, result.limit
    limit = None
    if not tightest:
        bound, limit = _bound_and_limit(result, terms_of(result, radius, blockwise=False), tolerance)
    if limit is None or not bool((bound <= limit).all()):
        bound, limit = _bound_and_limit(result, terms_of(result, radius), tolerance)
    return bound, limit


def _bound_and_limit(result: DecodeResult, terms: cert.BoundTerms, tolerance: torch.Tensor):
    bound = terms.total
    # a non-finite or negative bound (a defect in some form: no sound bound is negative) is never accepted
    bound = torch.where(torch.isfinite(bound) & (bound >= 0) & torch.isfinite(result.out).all(dim=-1), bound, torch.inf)
    out_norm = result.out.norm(dim=-1) * (1 - cert.gamma(result.out.shape[-1] + 2))  # a lower bound of ||O||
    return bound, cert.threshold(out_norm, bound, result.rms_low, tolerance)


def terms_of(result: DecodeResult, radius: torch.Tensor, blockwise: bool = True) -> cert.BoundTerms:
    nb = result.block_delta.shape[-1]
    blocks = (result.block_delta, result.rho[..., :nb], result.dev_contrib[..., :nb]) if nb and blockwise else None
    return cert.bound_terms(result.e_val, result.delta_t, result.alpha_t, radius[..., None], result.w_all,
                            result.w_tail, result.score_error, result.value_scale, result.length, result.out.shape[-1],
                            blocks, result.cast)


class Ladder:
    def __init__(self, cache: TieredKVCache):
        self.cache = cache

    def run(self, layer: int, q: torch.Tensor, result: DecodeResult, plan: StepPlan, batch, scale: float,
            counted: bool = False):
        """Returns the accepted output [Bd, Hkv, G, D] (float32); accounts every evaluation in the certificates
        (unless the kernel already `counted` this layer: then nothing escalates here)."""
        view = plan.view
        radius = self.cache.radius[layer][view.slots]  # [Bd, Hkv]
        tol = plan.tolerance[:, None, None]
        auditing = plan.auditing
        bound, limit = check(result, radius, tol, tightest=auditing)
        out = result.out
        rung = torch.zeros(out.shape[:2], dtype=torch.int64, device=out.device)  # per group
        certifying = plan.certifying
        over = certifying[:, None] & ~(bound <= limit).all(dim=-1)
        broken = certifying & result.broken.any(dim=-1)
        # groups accepted close to their limit will probably escalate at the next step
        near = certifying[:, None] & ((bound / limit.clamp_min(1e-30)).amax(dim=-1) > PREFETCH_MARGIN)
        escalating, prefetching = torch.stack([over.any() | broken.any(), near.any()]).tolist()  # one device sync
        if escalating:
            self._escalate(layer, q, result, plan, batch, scale, radius, tol, over & ~broken[:, None], broken,
                           (out, bound, limit, rung))
        if auditing:
            self._audit(layer, q, plan, batch, scale, out, bound, rung)
        if not counted:
            self.count(plan, result, bound, limit, rung)
        if escalating or prefetching:
            self._prefetch(layer, result, plan, near | (rung > 0))
        return out

    @staticmethod
    def count(plan, result: DecodeResult, bound=None, limit=None, rung=None) -> None:
        """Adds a layer's evaluations to the step's tally (account sums them at the end of the step): by default
        every head at rung 0 with the bound and limit the kernel checked."""
        if rung is None:
            bound, limit = result.bound, result.limit
            rung = torch.zeros(bound.shape[:2], dtype=torch.int64, device=bound.device)
        plan.tally.layers.append((bound, limit, rung, result.alpha_t))

    def _prefetch(self, layer, result, plan, likely) -> None:
        """Groups that escalated, or were accepted with a bound above PREFETCH_MARGIN of their limit (`likely`
        [Bd, Hkv]), will probably escalate at the next step: the blocks the ladder would pick among those attention
        still reads quantized (keys by mass, as rung 2 does; values by sum p eta, as rung 1 does) are chosen here, on
        the device, and fetched after the step (prefetch_chosen: one host read for every layer), so that the
        transfer overlaps the next step."""
        if not self.cache.copy.enabled or plan.view.block_tables.shape[1] == 0:
            return
        view, tables = plan.view, plan.view.block_tables
        # keys by mass (what rung 2 picks), values by sum p eta (rung 1), both kinds at once: [Bd, Hkv, 2, nb]
        wanted = torch.stack([result.rho[..., :-1].amax(dim=2), result.val_contrib[..., :-1].amax(dim=2)], dim=2)
        quantized = view.full[:, None, None, :] & (take(self.cache.layers[layer].slots, tables) < 0).permute(0, 2, 3, 1)
        top = torch.where(quantized, wanted, 0.0).topk(min(PREFETCH_BLOCKS, tables.shape[1]), dim=-1)
        blocks = tables.gather(1, top.indices.flatten(1)).view_as(top.indices)
        chosen = torch.where((top.values > 0) & likely[:, :, None, None], blocks, -1)  # -1: nothing to fetch
        plan.prefetches.append((layer, chosen))

    def prefetch_chosen(self, plan) -> None:
        """Starts the step's prefetches: every layer's choices read back at once, one transfer per layer and kind."""
        if not plan.prefetches:
            return
        layers, chosen = zip(*plan.prefetches)
        plan.prefetches.clear()
        flat = torch.cat([c.flatten() for c in chosen]).tolist()  # one device sync for the whole step
        offset = 0
        for layer, tensor in zip(layers, chosen):
            batch, heads, kinds, count = tensor.shape
            pieces: tuple[list, list] = ([], [])  # keys, values: (block, KV head), heaviest first within a group
            for i in range(batch):
                for h in range(heads):
                    for kind in range(kinds):
                        first = offset + ((i * heads + h) * kinds + kind) * count
                        pieces[kind].extend((b, h) for b in flat[first:first + count] if b >= 0)
            for kind, wanted in zip("kv", pieces):
                if wanted:
                    self.cache.prefetch(layer, kind, wanted)
            offset += tensor.numel()

    def _escalate(self, layer, q, result, plan, batch, scale, radius, tol, over, broken, state):
        out, bound, limit, rung = state
        cache, view = self.cache, plan.view
        rerun, exact, moved = {}, set(), {}
        terms = terms_of(result, radius)
        before = bound.amax(dim=-1).clone()
        groups = over.nonzero().tolist()
        if groups and kernel_decodes(q, cache.quantizers[layer]):
            # the kernel bounds block spreads by the triangle form: the twin's tighter form may certify the same
            # tier-1 data without a fetch (still rung 0)
            failed = self._rerun(layer, q, view, scale, radius, tol, {(i, h): 0 for i, h in groups}, state, twin=True)
            groups = [[i, h] for i, h in groups if (i, h) in failed]
        allowance = cache.scratch[layer].capacity // 2  # promotions per layer and step: no churn within a step
        wanted: dict[str, dict[tuple[int, int], tuple[int, int]]] = {"v": {}, "k": {}}  # piece -> its first group
        for (i, h), choice in zip(groups, self._plan_groups(layer, result, terms, view, groups, limit, radius)):
            if choice is None or len(choice[0]) + len(choice[1]) > allowance:
                exact.add((i, h))
                continue
            values, keys = choice
            allowance -= len(values) + len(keys)
            for kind, blocks in (("v", [b for _, b in values]), ("k", keys)):
                for block in blocks:
                    wanted[kind].setdefault((block, h), (i, h))
            rerun[(i, h)] = 2 if keys else 1
        moved |= self._promote(layer, plan, wanted)
        for group in rerun:  # a group whose pieces another group of the layer fetched first (shared blocks)
            moved.setdefault(group, (0, 0, 0.0, True))
        if rerun:
            exact |= self._rerun(layer, q, view, scale, radius, tol, rerun, state)
        exact |= {(i, h) for i in broken.nonzero().flatten().tolist() for h in range(out.shape[1])}
        if exact:
            for group, (blocks, nbytes, seconds) in self._exact(layer, q, plan, batch, scale, exact, broken,
                                                               state).items():
                earlier = moved.get(group, (0, 0, 0.0, False))
                moved[group] = (earlier[0] + blocks, earlier[1] + nbytes, earlier[2] + seconds, False)
        for (i, h), (blocks, nbytes, seconds, hit) in moved.items():
            record = EscalationRecord(plan.client_ids[i], layer, h, int(rung[i, h]), float(before[i, h]),
                                      float(bound[i, h].amax()), float(plan.tolerance[i]), blocks, nbytes, seconds,
                                      hit, plan.request_ids[i])
            cache.records.append(record)
            plan.updates.append(partial(cache.stats[record.engine_id].add_record, record))

    def _promote(self, layer, plan, wanted: dict) -> dict:
        """All of a layer's promotions in one transfer and one scratch update per kind (TieredKVCache.promote); returns
        per group (blocks, bytes, seconds, all prefetched), the seconds shared by the pieces' count."""
        moved: dict[tuple[int, int], list] = {}
        for kind, pieces in wanted.items():
            owners = list(pieces.values())
            fetched = self.cache.promote(layer, kind, list(pieces), [(plan.request_ids[i], plan.client_ids[i])
                                                                     for i, _ in owners])
            if fetched is None:
                continue
            share_bytes, share_seconds = fetched.bytes / len(owners), fetched.seconds / len(owners)
            for group, hit in zip(owners, fetched.hit):
                entry = moved.setdefault(group, [0, 0, 0.0, True])
                entry[0] += 1
                entry[1] += share_bytes
                entry[2] += share_seconds
                entry[3] &= hit
        return {group: (blocks, int(nbytes), seconds, hit) for group, (blocks, nbytes, seconds, hit) in moved.items()}

    def _rerun(self, layer, q, view, scale, radius, tol, planned, state, twin: bool = False) -> set:
        """Re-certifies the planned groups with their promoted blocks (with the PyTorch twin if `twin`); returns the
        groups that still fail."""
        out, bound, limit, rung = state
        seqs = sorted({i for i, _ in planned})
        index = torch.tensor(seqs, device=q.device)
        sub = view.select(index)
        layers, quantizer = self.cache.layers[layer], self.cache.quantizers[layer]
        if twin:
            result = reference.certified_decode(q[index], layers, sub, scale, quantizer)
        else:
            result = certified_decode(q[index], layers, sub, scale, quantizer, self.cache.radius[layer], tol[index, 0, 0])
        new_bound, new_limit = check(result, radius[index], tol[index])
        failed = set()
        for (i, h), level in planned.items():
            j = seqs.index(i)
            if bool((new_bound[j, h] <= new_limit[j, h]).all()):
                out[i, h], bound[i, h], limit[i, h], rung[i, h] = result.out[j, h], new_bound[j, h], new_limit[j, h], level
            else:
                failed.add((i, h))
        return failed

    def _exact(self, layer, q, plan, batch, scale, groups, broken, state) -> dict:
        """Dense attention from tier 2 for the given groups (whole sequences for broken ones)."""
        out, bound, limit, rung = state
        seqs = sorted({i for i, _ in groups})
        index = self._verified(layer, plan, batch, seqs)
        start = time.perf_counter()
        exact = self.cache.exact_decode(layer, q[seqs], batch.block_tables[index], batch.context_lens[index], scale,
                                        plan.window)
        seconds = (time.perf_counter() - start) / len(groups)
        exact = exact.float().view(len(seqs), *out.shape[1:])
        moved = {}
        for i, h in groups:
            out[i, h], bound[i, h], limit[i, h] = exact[seqs.index(i), h], 0.0, 0.0
            rung[i, h] = 4 if bool(broken[i]) else 3
            blocks = len(batch.block_ids[plan.quant_seqs[i]])
            moved[(i, h)] = (blocks, 2 * blocks * self.cache.block_size * out.shape[-1] * self.cache.dtype.itemsize,
                             seconds)
        return moved

    def _verified(self, layer, plan, batch, seqs: list[int]) -> list[int]:
        """Checks the shadows of the decode sequences `seqs` (indices into the plan) before a path reads them all;
        returns their indices into the batch."""
        index = [plan.quant_seqs[i] for i in seqs]
        bs = self.cache.block_size
        self.cache.verify(layer, [plan.request_ids[i] for i in seqs],
                          [batch.block_ids[s][:(batch.starts[s] + 1) // bs] for s in index],
                          [plan.client_ids[i] for i in seqs])
        return index

    def _plan_groups(self, layer, result, terms, view, groups, limit, radius) -> list:
        """Per group (i, h): ((position, block) value promotions, key blocks), or None when no promotion can certify
        it. Rung 1 (values only) when E_key uses at most VALUE_ONLY of the budget (limit - E_fp), promoting values
        down to HEADROOM of it; else rung 2, keys and values each down to HEADROOM / 2. All groups at once, with one
        host transfer for the decisions."""
        nb = view.block_tables.shape[1]
        if not groups or nb == 0:
            return [None] * len(groups)
        gi, hi = (torch.tensor(x, device=limit.device) for x in zip(*groups))
        num_full = view.num_full[gi]
        e_val, e_key, e_fp = terms.e_val[gi, hi], terms.e_key[gi, hi], terms.e_fp[gi, hi]  # [n, G]
        budget = limit[gi, hi] - e_fp  # what E_val + E_key may use
        possible = (num_full > 0) & torch.isfinite(e_val + e_key + e_fp).all(-1) & (budget > 0).all(-1)
        value_only = (e_key <= budget * VALUE_ONLY).all(-1)  # rung 1: slack left for the next steps
        need = torch.where(value_only[:, None], e_val - (budget * HEADROOM - e_key).clamp_min(0),
                           e_val - budget * HEADROOM / 2)
        real, tables = view.full[gi], view.block_tables[gi]  # [n, nb]
        v_order, v_count = _by_contribution(torch.where(real[:, None], result.val_contrib[gi, hi, :, :nb], 0.0), need)
        key_slots = take(self.cache.layers[layer].k_slot, tables)  # [n, nb, Hkv]
        in_tail = real & (key_slots.gather(2, hi[:, None, None].expand(-1, nb, 1))[..., 0] < 0)
        k_order, k_count = _by_mass(result, gi, hi, in_tail, radius[gi, hi], terms.centre[gi, hi],
                                    budget * HEADROOM / 2)
        flags = torch.stack([x.long() for x in (possible, value_only, v_count, k_count)], dim=1)
        decided = torch.cat([flags, v_order, k_order, tables], dim=1).tolist()
        choices = []
        for row in decided:
            ok, values_only, nv, nk = row[:4]
            v_at, k_at, ids = row[4:4 + nb], row[4 + nb:4 + 2 * nb], row[4 + 2 * nb:]
            if not ok or (not values_only and nk < 0):
                choices.append(None)
                continue
            values = [(p, ids[p]) for p in v_at[:nv]]
            choices.append((values, [] if values_only else [ids[p] for p in k_at[:nk]]))
        return choices

    def _audit(self, layer, q, plan, batch, scale, out, bound, rung) -> None:
        """The float64 reference from the shadows. Accepted (non-exact) heads whose served output (cast to the model's
        dtype) is farther from it than their bound are bound violations; farther than tolerance * max(||O_ref||,
        RMS_ref), promise violations. Counted apart: either is a defect."""
        audited = [i for i, m in enumerate(plan.modes) if m is KVMode.AUDIT]
        index = self._verified(layer, plan, batch, audited)
        ref, rms = self.cache.reference_decode(layer, q[audited], batch.block_tables[index],
                                               batch.context_lens[index], scale, plan.window)
        shape = (len(audited), *out.shape[1:])
        actual = (out[audited].to(q.dtype).double() - ref.view(shape)).norm(dim=-1)  # [n, Hkv, G]
        promise = plan.tolerance[audited].double()[:, None, None] * torch.maximum(ref.view(shape).norm(dim=-1),
                                                                                  rms.view(shape[:-1]))
        accepted = (rung[audited][..., None] <= 2).expand_as(actual)
        for n, i in enumerate(audited):
            checked = accepted[n]
            error, limit = actual[n][checked], bound[i][checked].double()
            if not error.numel():
                continue
            ratio = error / limit.clamp_min(1e-300)
            counts = torch.bincount(ratio_bins(ratio), minlength=RATIO_BINS).tolist()
            plan.updates.append(partial(
                self.cache.stats[plan.request_ids[i]].add_audit, int((error > limit).sum()),
                int((error > promise[n][checked]).sum()), float(ratio.max()),
                float((error / promise[n][checked].clamp_min(1e-300)).max()), counts))

    def account(self, plan) -> None:
        """Adds the step's layers to its tally, all at once (flushed into the certificates by end_step)."""
        tally = plan.tally
        if not tally.layers:
            return
        bound, limit, rung, alpha_t = (torch.cat(x, dim=1) for x in zip(*tally.layers))  # layers side by side
        tally.layers.clear()
        tally.tail_mass += alpha_t.sum(dim=(1, 2))
        groups = bound.shape[-1]  # query heads per KV head
        tally.evaluations += rung.shape[1] * groups
        counts = torch.nn.functional.one_hot(rung, 5).sum(dim=1) * groups
        tally.rungs += counts * plan.certifying[:, None]
        accepted = (rung <= 2)[..., None] & plan.certifying[:, None, None]
        bound_max = torch.where(accepted, bound, 0.0).amax(dim=(1, 2))
        ratio_max = torch.where(accepted & (limit > 0), bound / limit.clamp_min(1e-30), 0.0).amax(dim=(1, 2))
        torch.maximum(tally.max_bound, bound_max, out=tally.max_bound)
        torch.maximum(tally.max_ratio, ratio_max, out=tally.max_ratio)


def _by_contribution(contrib: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the fewest blocks whose contributions [n, G, nb] cover `need` [n, G] for every head, largest first:
    (block positions in that order [n, nb], how many [n]; every block with a contribution when no prefix covers,
    none when nothing is needed)."""
    top = contrib.amax(dim=1)
    order = top.argsort(dim=-1, descending=True)
    covered = (contrib.gather(2, order[:, None, :].expand_as(contrib)).cumsum(dim=-1)
               >= need[..., None] * (1 + 1e-3)).all(dim=1)  # [n, nb]
    count = torch.where(covered.any(dim=-1), covered.int().argmax(dim=-1) + 1, (top > 0).sum(dim=-1))
    return order, torch.where((need > 0).any(dim=-1), count, 0)


def _by_mass(result: DecodeResult, gi, hi, in_tail, radius, centre, goal) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (gi, hi), the fewest tail blocks (in_tail [n, nb]), heaviest first, whose promotion to exact keys
    brings the predicted E_key under `goal` [n, G] for every query head: (block positions in that order [n, nb], how
    many [n]; -1 when no prefix suffices). Moving a block from T to P removes its Delta_b, mass and spread from the
    tail sums (the prediction keeps p^ and centre [n, G], the C of E_key's form (c), fixed; the re-run decides)."""
    n, nb = in_tail.shape
    rho = result.rho[gi, hi, :, :nb]  # [n, G, nb]
    order = torch.where(in_tail, rho.amax(dim=1), -torch.inf).argsort(dim=-1, descending=True)  # tail blocks first
    first = in_tail.gather(1, order)[:, None, :]  # [n, 1, nb]: the tail blocks in that order

    def ordered(x):  # [n, G, nb] in that order, 0 past the tail blocks
        return torch.where(first, x.gather(2, order[:, None, :].expand_as(x)), 0.0)

    def moved(x):  # what the first m blocks carry, m = 0 .. nb
        return torch.cat([x.new_zeros(n, x.shape[1], 1), ordered(x).cumsum(dim=-1)], dim=-1)

    deltas = ordered(result.block_delta[gi, hi])  # Delta_b >= 0: the zeros past the tail change no maximum
    rest = torch.cat([deltas.flip(-1).cummax(-1).values.flip(-1), deltas.new_zeros(n, deltas.shape[1], 1)], dim=-1)
    dev = moved(result.dev_contrib[gi, hi, :, :nb])
    e_key = cert.key_error(rest, (result.alpha_t[gi, hi][..., None] - moved(rho)).clamp_min(0), radius[:, None, None],
                           result.w_all[gi, hi][..., None], (result.w_tail[gi, hi][..., None] - dev).clamp_min(0),
                           centre[..., None])
    fits = (e_key <= goal[..., None]).all(dim=1)  # [n, nb + 1]
    fits &= torch.arange(nb + 1, device=fits.device)[None, :] <= in_tail.sum(dim=-1, keepdim=True)
    return order, torch.where(fits.any(dim=-1), fits.int().argmax(dim=-1), -1)
