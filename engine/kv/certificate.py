"""The certificate (DESIGN.md section 3) as pure functions of tensors. Read it next to the notation there.

For one query head at one step: q, scale tau, token j with reference k_j, v_j and stored k^_j, v^_j. P = tokens whose
keys are exact (promoted blocks, the trailing partial block), T = the rest. p = softmax(tau q.k), p^ = softmax(tau q.k^),
O_ref = sum p_j v_j, O = sum p^_j v^_j. Then exactly O - O_ref = sum p^_j (v^_j - v_j) + sum (p^_j - p_j) v_j, so

    ||O - O_ref|| <= E_val + E_key + E_fp
    E_val = sum_b rho^_b eta_b                                     (value error, weighted by the kernel's masses)
    E_key = min(tanh(Delta_T / 2), alpha^_T (e^Delta_T - 1)) * 2R  (total variation of the weights times the spread)
    E_fp  = floating-point slack of the kernel and of this arithmetic (fp_slack below)

with Delta_b = tau * ||q|| * eps_b the largest score error in block b, Delta_T = max over tail blocks, alpha^_T the
computed mass of the tail, and R = max_j ||v_j - c|| over EVERY token of the sequence for a fixed centre c, because
sum (p^ - p) v = sum (p^ - p)(v - c) <= TV(p, p^) * 2R. The two forms of the TV bound: |delta_j| <= Delta_T on T and 0
on P gives TV <= tanh(Delta_T / 2) (attained by two tokens at +-Delta), and since p^_j / p_j lies in e^[-2Delta, 2Delta]
when only the tail moves, TV <= alpha^_T (e^Delta_T - 1). KL(p || p^) <= Delta_T^2 / 2 comes free.

Accepted ("certified") when E_val + E_key + E_fp <= tolerance * max(||O|| - bound, floor): ||O|| - bound is a lower
bound of ||O_ref||, so the relative error against the reference is at most `tolerance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = 2.0**-24  # float32, the precision the certified kernel computes in
RELATIVE_MARGIN = 2.0**-12  # on the bound itself: the terms above are computed in float32 too
FLOOR_FRACTION = 0.1  # floor = FLOOR_FRACTION * R: outputs far smaller than the values' spread need no more


@dataclass(frozen=True, slots=True)
class BoundTerms:
    e_val: torch.Tensor
    e_key: torch.Tensor
    e_fp: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.e_val + self.e_key + self.e_fp


def gamma(n: int | torch.Tensor) -> torch.Tensor | float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float32 sum or dot product."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def key_deltas(q_norm: torch.Tensor, eps: torch.Tensor, scale: float) -> torch.Tensor:
    """Delta_b = tau ||q|| eps_b: the largest change of a score in block b caused by key quantization."""
    return scale * q_norm * eps


def softmax_tv_bound(delta_t: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """TV(p, p^) <= min(tanh(Delta_T / 2), alpha^_T (e^Delta_T - 1)); 0 when the tail is empty (Delta_T = 0)."""
    return torch.minimum(torch.tanh(delta_t / 2), alpha_t * torch.expm1(delta_t))


def value_error(rho: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """E_val = sum_b rho^_b eta_b over the last dim (blocks whose values are exact carry eta_b = 0)."""
    return (rho * eta).sum(dim=-1)


def fp_slack(bound: torch.Tensor, score_error: torch.Tensor, value_scale: torch.Tensor, length: int,
             head_dim: int) -> torch.Tensor:
    """E_fp: a relative margin on the bound plus the float32 error of computing O from p^ and v^.

    score_error bounds |fl(s_j) - s_j| (gamma_D tau ||q|| max_j ||k^_j||); a score perturbation of d moves the
    weights by at most tanh(d) in total variation, and exp/normalisation add a few roundings per weight, so the
    weights cost (2 d + 8 u) * value_scale; the weighted sum of L vectors costs gamma_(L + D) * value_scale.
    value_scale bounds max_j ||v^_j|| (||c|| + R + max eta)."""
    weights = 2 * score_error + 8 * UNIT_ROUNDOFF
    return RELATIVE_MARGIN * bound + (weights + gamma(length + head_dim)) * value_scale


def bound_terms(e_val: torch.Tensor, delta_t: torch.Tensor, alpha_t: torch.Tensor, radius: torch.Tensor,
                score_error: torch.Tensor, value_scale: torch.Tensor, length: int, head_dim: int) -> BoundTerms:
    """All terms for a batch of heads (tensors broadcast together), from the kernel's accumulators."""
    e_key = softmax_tv_bound(delta_t, alpha_t) * 2 * radius
    e_fp = fp_slack(e_val + e_key, score_error, value_scale, length, head_dim)
    return BoundTerms(e_val, e_key, e_fp)


def threshold(out_norm: torch.Tensor, bound: torch.Tensor, radius: torch.Tensor, tolerance: torch.Tensor | float):
    """tolerance * max(||O|| - bound, floor): the largest bound that certifies a relative error <= tolerance."""
    return tolerance * torch.maximum(out_norm - bound, FLOOR_FRACTION * radius)


def certified(terms: BoundTerms, out_norm: torch.Tensor, radius: torch.Tensor, tolerance) -> torch.Tensor:
    bound = terms.total
    return torch.isfinite(bound) & (bound <= threshold(out_norm, bound, radius, tolerance))


def kl_bound(delta_t: torch.Tensor) -> torch.Tensor:
    """KL(p || p^) <= Delta_T^2 / 2."""
    return delta_t * delta_t / 2
