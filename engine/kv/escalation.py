"""The escalation ladder (DESIGN.md section 4) for one layer of one step.

Groups are (sequence, KV head): promotions are shared by the group's query heads. A group leaves rung 0 when any of
its certified/audit heads is over its threshold. Then:
  rung 1  values alone can fit: promote value blocks greedily by rho_b * eta_b until E_val fits what E_key and
          E_fp leave;
  rung 2  otherwise: promote key blocks greedily by mass until the predicted E_key fits half the budget, and value
          blocks until E_val fits the other half;
both promote exact blocks from tier 2 into the scratch and re-run the same certified kernel for the affected
sequences (one batched call), which re-certifies with the new exact set.
  rung 3  still over, too many blocks to promote, or a non-finite output or bound: dense attention from tier 2;
  rung 4  a block's annotations are not finite (broken metadata): dense attention for the sequence's whole layer.
Accepted outputs of other groups are never replaced. Audit requests also get the float64 reference.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from engine.kv import certificate as cert
from engine.kv.stats import RATIO_BINS, EscalationRecord, ratio_bins
from engine.request import KVMode
from kernels import certified_decode, decode_attention
from kernels.reference import DecodeResult, DecodeView

if TYPE_CHECKING:
    from engine.kv.tiers import StepPlan, TieredKVCache

CERTIFYING = (KVMode.CERTIFIED, KVMode.AUDIT)


def check(result: DecodeResult, radius: torch.Tensor, tolerance: torch.Tensor):
    """(bound, limit) per query head [Bd, Hkv, G]: certified where bound <= limit. radius [Bd, Hkv]; tolerance
    broadcast to [Bd, 1, 1]. A non-finite output or bound becomes an infinite bound (a monitor: never accepted)."""
    bound = terms_of(result, radius).total
    bound = torch.where(torch.isfinite(bound) & torch.isfinite(result.out).all(dim=-1), bound, torch.inf)
    return bound, cert.threshold(result.out.norm(dim=-1), bound, result.rms, tolerance)


def terms_of(result: DecodeResult, radius: torch.Tensor) -> cert.BoundTerms:
    return cert.bound_terms(result.e_val, result.delta_t, result.alpha_t, radius[..., None], result.radius_o,
                            result.w_tail, result.w_exact, result.score_error, result.value_scale[..., None],
                            result.length, result.out.shape[-1])


class Ladder:
    def __init__(self, cache: TieredKVCache):
        self.cache = cache

    def run(self, layer: int, q: torch.Tensor, result: DecodeResult, plan: StepPlan, batch, scale: float):
        """Returns the accepted output [Bd, Hkv, G, D] (float32); accounts every evaluation in the certificates."""
        view = plan.view
        radius = self.cache.radius[layer][view.slots]  # [Bd, Hkv]
        tol = plan.tolerance[:, None, None]
        bound, limit = check(result, radius, tol)
        out = result.out
        rung = torch.zeros(out.shape[:2], dtype=torch.int64, device=out.device)  # per group
        certifying = torch.tensor([m in CERTIFYING for m in plan.modes], device=out.device)
        over = certifying[:, None] & ~(bound <= limit).all(dim=-1)
        broken = certifying & (result.broken.any(dim=-1) | ~torch.isfinite(result.value_scale).all(dim=-1))
        if bool(over.any()) or bool(broken.any()):
            self._escalate(layer, q, result, plan, batch, scale, radius, tol, over & ~broken[:, None], broken,
                           (out, bound, limit, rung))
        if any(m is KVMode.AUDIT for m in plan.modes):
            self._audit(layer, q, plan, batch, scale, out, bound, rung)
        self._account(plan, q.shape[1], bound, limit, rung)
        return out

    def _escalate(self, layer, q, result, plan, batch, scale, radius, tol, over, broken, state):
        out, bound, limit, rung = state
        cache, view = self.cache, plan.view
        planned, moved = {}, {}
        terms = terms_of(result, radius)
        for i, h in over.nonzero().tolist():
            choice = self._plan_group(layer, result, terms, view, i, h, limit[i, h], radius[i, h])
            if choice is not None:
                values, keys = choice
                bytes_v, secs_v = cache.promote(layer, "v", values, h)
                bytes_k, secs_k = cache.promote(layer, "k", keys, h)
                planned[(i, h)] = 2 if keys else 1
                moved[(i, h)] = (len(values) + len(keys), bytes_v + bytes_k, secs_v + secs_k)
        before = bound.amax(dim=-1).clone()
        exact = {(i, h) for i, h in over.nonzero().tolist() if (i, h) not in planned}
        if planned:
            exact |= self._rerun(layer, q, view, scale, radius, tol, planned, state)
        exact |= {(i, h) for i in broken.nonzero().flatten().tolist() for h in range(out.shape[1])}
        if exact:
            for group, (blocks, nbytes, seconds) in self._exact(layer, q, plan, batch, scale, exact, broken,
                                                               state).items():
                earlier = moved.get(group, (0, 0, 0.0))
                moved[group] = (earlier[0] + blocks, earlier[1] + nbytes, earlier[2] + seconds)
        for (i, h), (blocks, nbytes, seconds) in moved.items():
            record = EscalationRecord(plan.request_ids[i], layer, h, int(rung[i, h]), float(before[i, h]),
                                      float(bound[i, h].amax()), float(plan.tolerance[i]), blocks, nbytes, seconds)
            cache.records.append(record)
            cache.stats[record.request_id].add_record(record)

    def _rerun(self, layer, q, view, scale, radius, tol, planned, state) -> set:
        """Re-certifies the planned groups with their promoted blocks; returns the groups that still fail."""
        out, bound, limit, rung = state
        seqs = sorted({i for i, _ in planned})
        index = torch.tensor(seqs, device=q.device)
        sub = DecodeView(view.block_tables[index], view.num_full[index], view.tail_lens[index], view.slots[index])
        result = certified_decode(q[index], self.cache.layers[layer], sub, scale, self.cache.quantizer)
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
        index = [plan.quant_seqs[i] for i in seqs]
        start = time.perf_counter()
        exact = self.cache.exact_decode(layer, q[seqs], batch.block_tables[index], batch.context_lens[index], scale)
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

    def _plan_group(self, layer, result, terms, view, i, h, limit, radius):
        """(value blocks, key blocks) to promote for group (i, h), or None when rung 3 is the better deal."""
        num_full = int(view.num_full[i])
        e_val, e_key, e_fp = terms.e_val[i, h], terms.e_key[i, h], terms.e_fp[i, h]
        if num_full == 0 or not bool(torch.isfinite(e_val + e_key + e_fp).all()):
            return None
        blocks = view.block_tables[i, :num_full]
        budget = limit - e_fp  # what E_val + E_key may use
        if not bool((budget > 0).all()):
            return None
        contrib = result.val_contrib[i, h, :, :num_full]
        if bool((e_key <= budget * 0.9).all()):
            values, keys = _by_contribution(contrib, e_val - (budget * 0.9 - e_key)), []
        else:
            in_tail = self.cache.layers[layer].k_slot[blocks, h] < 0
            keys = _by_mass(result, i, h, num_full, in_tail, radius, budget * 0.45)
            if keys is None:
                return None
            values = _by_contribution(contrib, e_val - budget * 0.45)
        if len(values) + len(keys) > max(4, num_full // 2):
            return None
        ids = blocks.tolist()
        return [ids[p] for p in values], [ids[p] for p in keys]

    def _audit(self, layer, q, plan, batch, scale, out, bound, rung) -> None:
        """The float64 reference from the shadows; accepted (non-exact) heads farther from it than their bound
        are violations."""
        audited = [i for i, m in enumerate(plan.modes) if m is KVMode.AUDIT]
        index = [plan.quant_seqs[i] for i in audited]
        reference = self.cache.exact_decode(layer, q[audited].double(), batch.block_tables[index],
                                            batch.context_lens[index], scale)
        actual = (out[audited].double() - reference.view(len(audited), *out.shape[1:])).norm(dim=-1)
        accepted = rung[audited][..., None] <= 2
        for n, i in enumerate(audited):
            stats = self.cache.stats[plan.request_ids[i]]
            checked = accepted[n].expand_as(actual[n])
            excess = actual[n][checked] - bound[i][checked].double()
            stats.audit_violations += int((excess > 0).sum())
            ratio = actual[n][checked] / bound[i][checked].double().clamp_min(1e-300)
            if ratio.numel():
                stats.worst_actual_over_bound = max(stats.worst_actual_over_bound, float(ratio.max()))
                counts = torch.bincount(ratio_bins(ratio), minlength=RATIO_BINS).tolist()
                stats.ratio_hist = [a + b for a, b in zip(stats.ratio_hist, counts)]

    def _account(self, plan, heads: int, bound, limit, rung) -> None:
        groups = rung.shape[1]
        accepted = (rung <= 2)[..., None].expand_as(bound)
        max_bound = torch.where(accepted, bound, 0.0).amax(dim=(1, 2)).tolist()
        max_ratio = torch.where(accepted & (limit > 0), bound / limit.clamp_min(1e-30), 0.0).amax(dim=(1, 2)).tolist()
        counts = torch.stack([(rung == r).sum(dim=1) for r in range(5)], dim=1).tolist()
        for i, rid in enumerate(plan.request_ids):
            stats = self.cache.stats[rid]
            stats.evaluations += heads
            if plan.modes[i] not in CERTIFYING:
                continue
            for r, n in enumerate(counts[i]):
                stats.rungs[r] += n * heads // groups
            stats.max_bound = max(stats.max_bound, max_bound[i])
            stats.max_bound_over_tolerance = max(stats.max_bound_over_tolerance, max_ratio[i])


def _by_contribution(contrib: torch.Tensor, need: torch.Tensor) -> list[int]:
    """Fewest blocks (positions) whose contributions [G, nb] cover `need` [G] for every head, largest first."""
    if not bool((need > 0).any()):
        return []
    order = contrib.amax(dim=0).argsort(descending=True)
    covered = contrib[:, order].cumsum(dim=-1) >= need[:, None] * (1 + 1e-3)
    enough = covered.all(dim=0).nonzero()
    count = int(enough[0]) + 1 if enough.numel() else int((contrib.amax(dim=0) > 0).sum())
    return order[:count].tolist()


def _by_mass(result: DecodeResult, i: int, h: int, num_full: int, in_tail, radius, goal):
    """Fewest tail blocks of group (i, h), heaviest first, whose promotion to exact keys brings the predicted E_key
    under `goal` [G] for every query head; None when no prefix suffices. Moving a block from T to P removes its
    Delta_b, mass and spread from the tail sums (the prediction keeps p^ fixed; the re-run decides)."""
    tail = in_tail.nonzero().flatten()
    rho = result.rho[i, h, :, :num_full]
    order = tail[rho[:, tail].amax(dim=0).argsort(descending=True)]
    deltas = result.block_delta[i, h, :, :num_full][:, order]  # [G, n]
    rest = torch.cat([deltas.flip(-1).cummax(-1).values.flip(-1), deltas.new_zeros(deltas.shape[0], 1)], dim=-1)

    def moved(x):  # what the first m blocks carry, m = 0 .. n
        return torch.cat([x.new_zeros(x.shape[0], 1), x[:, order].cumsum(dim=-1)], dim=-1)

    dev = moved(result.dev_contrib[i, h, :, :num_full])
    e_key = cert.key_error(rest, (result.alpha_t[i, h, :, None] - moved(rho)).clamp_min(0), radius,
                           result.radius_o[i, h, :, None], (result.w_tail[i, h, :, None] - dev).clamp_min(0),
                           result.w_exact[i, h, :, None] + dev)
    fits = (e_key <= goal[:, None]).all(dim=0).nonzero()
    return order[: int(fits[0])].tolist() if fits.numel() else None
