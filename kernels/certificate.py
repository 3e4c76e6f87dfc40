"""The certificate as pure functions of tensors (docs/certificate.md explains it with the same notation).

For one query head at one step: q, scale tau, token j with reference k_j, v_j and stored k^_j, v^_j. P = tokens whose
keys are exact (promoted blocks, the trailing partial block), T = the rest. p = softmax(tau q.k), p^ = softmax(tau q.k^),
O_ref = sum p_j v_j, O = sum p^_j v^_j. Exactly, O - O_ref = sum p^_j (v^_j - v_j) + sum (p^_j - p_j) v_j, so

    ||O - O_ref|| <= E_val + E_key + E_fp

E_val = sum_j p^_j eta_j with eta_j >= ||v_j - v^_j|| measured per token at write time (0 where values are exact).

E_key bounds ||sum (p^_j - p_j) v_j||. Key errors move each score by delta_j = tau q.(k^_j - k_j), |delta_j| <= Delta_b in
block b of T, 0 on P, with Delta_b = tau min(||q|| eps_b, kappa_b sum_c |q_c| s_bc) (eps_b: the block's largest key
error norm; kappa_b: its largest per-channel error in units of the channel's scale s_bc). Delta_T = max over T. Since
sum p^ = sum p = 1, any centre c can be subtracted from the values, and E_key is the smallest of three bounds:
  (a) TV(p, p^) * 2 R with R = max_j ||v_j - c|| over EVERY token for the sequence's centre c, TV <=
      min(tanh(Delta_T / 2), alpha^_T (e^Delta_T - 1)) (alpha^_T: the computed mass of T);
  (c) with s_j = e^-delta_j and S = sum_i p^_i s_i, p_j = p^_j s_j / S and S lies in [m_lo, m_hi] =
      [1 - alpha^_T (1 - e^-Delta_T), 1 + alpha^_T (e^Delta_T - 1)]. Centred at the computed output O, exactly
        sum (p_j - p^_j)(v_j - O) = (1 / S) sum_(j in T) p^_j (s_j - 1)(v_j - O) + (1 / S - 1) sum_j p^_j (v_j - O)
      (s_j = 1 on P), and sum_j p^_j (v_j - O) = sum_j p^_j (v_j - v^_j) + (exact O - computed O) has norm at most
      C = E_val + the float32 error of O: the shift of the normaliser multiplies a vector that is nearly 0. So
        ||.|| <= (e^Delta_T - 1) / m_lo * min(W_T', W') + u_P min(C, W'),   u_P = max(1 / m_lo - 1, 1 - 1 / m_hi),
      with W_X >= sum_(j in X) p^_j ||v_j - O|| and, from ||v_j - O|| <= ||v^_j - O|| + eta_j and n_j >= ||v^_j||:
        W' = sqrt(sum p^_j n_j^2 - ||O||^2) + E_val   (Jensen, since sum p^_j v^_j = O)
        W_T' = sum_(b in T) W_b',  W_b' = sum_(j in b) p^_j (n_j + ||O|| + eta_j)   (triangle inequality), or
               where O . P_b is known, the smaller Cauchy-Schwarz form (block_spread).
      (Bounding each |p^_j - p_j| by a ratio of p^_j instead, as an earlier form did, pays the normaliser's shift
      on every token: u_P W' more.)
  (b) form (c) per block: each block of T with its own Delta_b and mass rho_b in m_lo, m_hi and e^Delta_b - 1
      (blockwise_key_error), so that a light block with a large key error does not set the bound for the whole tail.
E_fp = RELATIVE_MARGIN (E_val + E_key) + output_rounding + cast_error: the float32 error of the kernel and of this
arithmetic, and the rounding of the output into the model's dtype (bound_terms). KL(p || p^) <= Delta_T^2 / 2.

The promise is about the reference: ||O_served - O_ref|| <= tolerance * S_ref with S_ref = max(||O_ref||, RMS_ref),
RMS_ref = sqrt(sum_j p_j ||v_j||^2) the RMS norm of the attended values under the reference weights, O_served what
leaves attention (O cast to the model's dtype: cast_error adds that rounding to the bound). A head is accepted
("certified") when bound <= tolerance * S_lo with S_lo <= S_ref computed from what the kernel knows: ||O|| - bound
<= ||O_ref||, and rms_lower_bound <= RMS_ref, which uses lower norms l_j <= ||v_j|| (stored ||v^_j|| rounded down,
minus eta_j; the exact norm where the exact value is read) under weights discounted for the key error
(p_j >= p^_j e^-Delta_b / m_hi). Upper bounds of norms are right inside the spread terms and wrong here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = 2.0**-24  # float32, the precision the certified kernel computes in
RELATIVE_MARGIN = 2.0**-12  # on the bound itself: the terms above are computed in float32 too


@dataclass(frozen=True, slots=True)
class BoundTerms:
    e_val: torch.Tensor
    e_key: torch.Tensor
    e_fp: torch.Tensor
    centre: torch.Tensor  # C of E_key's form (c): E_val + output_rounding

    @property
    def total(self) -> torch.Tensor:
        return self.e_val + self.e_key + self.e_fp


def gamma(n: int | torch.Tensor) -> torch.Tensor | float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float32 sum or dot product."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def tensor_core_terms(*inner: int) -> int:
    """k such that gamma_(n + k) bounds the relative error of an n-term dot product or sum that a kernel computes as
    tf32x3 tensor-core dots of at most m = max(inner) terms each, the dots' results accumulated in float32.

    tf32x3 splits each float32 operand a into a_big = tf32(a) and a_small = tf32(a - a_big) (round to nearest, 11
    significant bits each), so |a - a_big - a_small| <= 2^-22 |a|, and it keeps a_big b_big + a_big b_small +
    a_small b_big: these differ from a b by at most (3 + 2^-10) 2^-22 |a b| < 12.1 u |a b| (u = 2^-24). Each kept
    product of two TF32 numbers is exact in float32 (22 significant bits). The tensor core adds the 3m products of one
    dot with alignment to the largest exponent and truncation, not round to nearest (the behaviour measured on NVIDIA
    tensor cores by Fasi, Higham, Mikaitis and Pranesh, 2021): each addition errs by at most 2u relatively,
    gamma_3m(2u) in all. Across the n / m tiles the kernel rescales its float32 accumulator and adds each dot's result
    (two roundings a tile; the rescaling factor multiplies the normaliser too, so its own error cancels in O), and the
    splits' results are merged in float32 (fewer splits than tiles, a few roundings each): gamma_(3 n/m + 4) covers
    both. The three compose to (12.1 + 6m + 3 n/m + 5) u plus second-order terms, at most gamma_(n + 6m + 20) for
    m >= 16 (checked in exact arithmetic by a property test for n up to 2^19 and m up to 2^12)."""
    return 6 * max(inner) + 20


def block_deltas(q_norm: torch.Tensor, eps: torch.Tensor, q_abs_dot_scale: torch.Tensor, kappa: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Delta_b = tau min(||q|| eps_b, kappa_b sum_c |q_c| s_bc): the largest change of a score in block b."""
    channel_form = torch.nan_to_num(kappa * q_abs_dot_scale, nan=torch.inf)  # kappa = inf with |q| . s = 0
    return scale * torch.minimum(q_norm * eps, channel_form)


def softmax_tv_bound(delta_t: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """TV(p, p^) <= min(tanh(Delta_T / 2), alpha^_T (e^Delta_T - 1)); 0 when the tail is empty (Delta_T = 0)."""
    return torch.minimum(torch.tanh(delta_t / 2), alpha_t * torch.expm1(delta_t))


def normaliser_range(delta_t: torch.Tensor, alpha_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_lo, m_hi): the range of S = Z / Z^ = sum_j p^_j e^-delta_j when a mass alpha^_T moves by at most Delta_T."""
    return 1 - alpha_t * -torch.expm1(-delta_t), 1 + alpha_t * torch.expm1(delta_t)


def exact_ratio(m_lo: torch.Tensor, m_hi: torch.Tensor) -> torch.Tensor:
    """u_P >= |1 / S - 1|: |p^_j - p_j| <= u_P p^_j for tokens of P."""
    return torch.maximum(1 / m_lo - 1, 1 - 1 / m_hi)


def key_error(delta_t, alpha_t, radius, w_all, w_tail, centre, blocks: tuple | None = None) -> torch.Tensor:
    """E_key = min of forms (a), (c) and, given the per-block terms `blocks` = (Delta_b, rho_b, W_b'), (b);
    w_all = W', w_tail = W_T', centre = C >= ||sum_j p^_j v_j - O||."""
    spread = softmax_tv_bound(delta_t, alpha_t) * 2 * radius
    m_lo, m_hi = normaliser_range(delta_t, alpha_t)
    deviation = torch.expm1(delta_t) / m_lo * torch.minimum(w_tail, w_all) + exact_ratio(m_lo, m_hi) * torch.minimum(
        centre, w_all)
    # m_lo >= e^-Delta_T > 0 in exact arithmetic; a computed alpha^_T just above 1 with a large Delta_T can make it
    # 0 or negative, and the form says nothing then (it would be negative: not a bound)
    deviation = torch.where(m_lo > 0, torch.nan_to_num(deviation, nan=torch.inf), torch.inf)
    bound = torch.minimum(spread, deviation)
    if blocks is not None:
        bound = torch.minimum(bound, blockwise_key_error(*blocks, radius, w_all, centre))
    return bound


def blockwise_key_error(block_delta, rho, dev, radius, w_all, centre) -> torch.Tensor:
    """Form (b): form (c) with each block's own Delta_b instead of Delta_T for all of T. Blocks [..., nb] with Delta_b,
    their masses rho_b and W_b' >= sum_(j in b) p^_j ||v_j - O|| (see W_T' above); Delta_b = 0 marks a block of P.

    S lies in [m_lo, m_hi] = [1 - sum_b rho_b (1 - e^-Delta_b), 1 + sum_b rho_b (e^Delta_b - 1)] and |s_j - 1| <=
    e^Delta_b - 1 in block b, so ||sum (p^_j - p_j)(v_j - O)|| <= min(sum_b (e^Delta_b - 1) W_b', max_b (e^Delta_b - 1)
    W') / m_lo + u_P min(C, W'). For form (a), |p^_j - p_j| <= u_b p^_j in block b with u_b = max(e^Delta_b / m_lo - 1,
    1 - e^-Delta_b / m_hi) and u_P p^_j on the rest, so TV(p, p^) <= (sum_b rho_b u_b + (1 - sum_b rho_b) u_P) / 2."""
    m_lo = 1 - (rho * -torch.expm1(-block_delta)).sum(dim=-1, keepdim=True)
    m_hi = 1 + (rho * torch.expm1(block_delta)).sum(dim=-1, keepdim=True)
    u_exact = exact_ratio(m_lo, m_hi).squeeze(-1)
    grow = torch.expm1(block_delta)
    moved = torch.minimum((grow * dev).sum(dim=-1), grow.amax(dim=-1) * w_all)
    deviation = moved / m_lo.squeeze(-1) + u_exact * torch.minimum(centre, w_all)
    u_block = torch.maximum(torch.exp(block_delta) / m_lo - 1, 1 - torch.exp(-block_delta) / m_hi)
    mass = rho.sum(dim=-1)
    tv = ((rho * u_block).sum(dim=-1) + (1 - mass).clamp_min(0) * u_exact) / 2
    bound = torch.minimum(deviation, tv * 2 * radius)
    return torch.where(m_lo.squeeze(-1) > 0, torch.nan_to_num(bound, nan=torch.inf), torch.inf)


def spread_around_output(norm_sq: torch.Tensor, out_norm: torch.Tensor, e_val: torch.Tensor, value_scale, length: int,
                         head_dim: int) -> torch.Tensor:
    """W' = sqrt(sum p^_j n_j^2 - ||O||^2) + E_val, with slack for the float32 rounding of both sums (a computed O
    within gamma * value_scale of the exact one moves ||O||^2 by at most 2 ||O|| gamma value_scale)."""
    g = gamma(length + head_dim)
    variance = (norm_sq - out_norm * out_norm).clamp_min(0) + 2 * g * (norm_sq + out_norm * value_scale)
    return variance.sqrt() + e_val


def block_spread(out_dots, out_norm, rho, norm_sq, val_contrib, value_scale, length: int, head_dim: int) -> torch.Tensor:
    """W_b' by Cauchy-Schwarz within each block, for blocks [..., nb + 1]: sum_(j in b) p^_j ||v_j - O|| <=
    sqrt(rho_b sum_(j in b) p^_j ||v^_j - O||^2) + sum_(j in b) p^_j eta_j, where the sum of squares is
    sum p^_j n_j^2 - 2 O . P_b + rho_b ||O||^2 with P_b = sum_(j in b) p^_j v^_j and out_dots = O . P_b (n_j >= ||v^_j||).
    The triangle form sum p^_j (n_j + ||O|| + eta_j) pays ||O|| twice where values share a large common part.

    Float32 slack: P_b and O . P_b are sums of at most `length + head_dim` products with ||P_b|| <= rho_b value_scale,
    so the computed dot is within gamma rho_b ||O|| value_scale of the exact one (twice: the dot is doubled), and
    the positive sums rho_b and sum p^_j n_j^2 are within gamma of theirs, relatively."""
    g = gamma(length + head_dim)
    square = norm_sq - 2 * out_dots + rho * out_norm * out_norm
    slack = 2 * g * (norm_sq + rho * out_norm * (out_norm + 2 * value_scale))
    return (rho * (square.clamp_min(0) + slack)).sqrt() + val_contrib


def output_rounding(score_error: torch.Tensor, value_scale: torch.Tensor, length: int, head_dim: int) -> torch.Tensor:
    """A bound of ||computed O - sum_j p^_j v^_j||, the float32 error of computing O from p^ and v^ (the relative
    margin on the bound, which bound_terms adds, covers the float32 arithmetic of the bound's own terms).

    score_error bounds |fl(s_j) - s_j| (gamma_D tau max_j sum_c |q_c| |k^_jc|); a score perturbation of d moves the
    weights by at most tanh(d) in total variation, and exp/normalisation add a few roundings per weight, so the
    weights cost (2 d + 8 u) * value_scale; the weighted sum of L vectors costs gamma_(L + D) * value_scale.
    value_scale bounds max_j ||v^_j||. A kernel's dequantization may round differently from the twin's that measured
    eta (fused multiply-add): at most 2 u (|code * scale| + |zero|) per channel, under 8 u (||v^_j|| + eta_j) per
    token for min-max groups: 8 u value_scale, and the relative margin covers 8 u E_val."""
    weights = 2 * score_error + 8 * UNIT_ROUNDOFF
    dequantization = 8 * UNIT_ROUNDOFF
    return (weights + dequantization + gamma(length + head_dim)) * value_scale


def bound_terms(e_val, delta_t, alpha_t, radius, w_all, w_tail, score_error, value_scale, length: int,
                head_dim: int, blocks: tuple | None = None, cast=0.0) -> BoundTerms:
    """All terms for a batch of heads (tensors broadcast together), from the kernel's accumulators; `cast` is the
    rounding of the output into the served dtype (cast_error), part of E_fp."""
    rounding = output_rounding(score_error, value_scale, length, head_dim)
    centre = e_val + rounding
    e_key = key_error(delta_t, alpha_t, radius, w_all, w_tail, centre, blocks)
    return BoundTerms(e_val, e_key, RELATIVE_MARGIN * (e_val + e_key) + rounding + cast, centre)


def lower_norm(stored: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A lower bound of ||v^_j|| from its stored norm u_j (kernels.formats.token_norms: the float32 norm, inflated by
    2^-20 and one ulp, rounded up into float16). The float16 ceiling lies less than one float16 spacing above what it
    rounded (2^-10 relative for normal numbers, 2^-24 absolute below them), the inflation is under 2^-18, and a float32
    norm of D numbers is within gamma_(D+2) of the exact one; 2^-22 more covers this product's own rounding."""
    return (stored.float() * norm_shrink(head_dim) - 2.0**-24).clamp_min(0)


def norm_shrink(head_dim: int) -> float:
    """lower_norm's factor: lower_norm(u) = max(u * norm_shrink - 2^-24, 0)."""
    return (1 - 2.0**-10) * (1 - 2.0**-18) * (1 - 2.0**-22) * (1 - gamma(head_dim + 2))


def rms_lower_bound(low_square, block_delta, rho, score_error, length: int, head_dim: int) -> torch.Tensor:
    """A lower bound of RMS_ref = sqrt(sum_j p_j ||v_j||^2) for blocks [..., nb + 1] (the partial block last, its keys
    exact): low_square = sum_(j in b) p^_j l_j^2 with l_j <= ||v_j||, block_delta [..., nb] = Delta_b (0 for blocks
    whose keys are exact), rho = the block masses.

    p_j = p^_j s_j / S with s_j = e^-delta_j >= e^-Delta_b in block b and S <= m_hi = 1 + sum_b rho_b (e^Delta_b - 1),
    so RMS_ref^2 >= sum_b e^-Delta_b low_square_b / m_hi. The computed weights are those of scores within
    score_error = d of the exact ones: every computed weight is within a factor e^(2d) (and float32 sums within gamma)
    of p^_j, so the computed sums are discounted by e^-2d and the masses in m_hi inflated by e^2d."""
    g = gamma(length + head_dim)
    drift = torch.exp(2 * score_error)
    grow = torch.expm1(block_delta)
    m_hi = 1 + drift * (1 + g) * (rho[..., :-1] * grow).sum(dim=-1)
    kept = (low_square[..., :-1] * torch.exp(-block_delta)).sum(dim=-1) + low_square[..., -1]
    mean = kept * (1 - 2 * g) / (drift * m_hi)
    return torch.nan_to_num(mean.clamp_min(0).sqrt() * (1 - 2.0**-20), nan=0.0)


def cast_error(out: torch.Tensor, served: torch.Tensor) -> torch.Tensor:
    """||served - O|| per head, rounded up: the rounding of the float32 output O [..., D] into the model's dtype
    (each difference is exact in float32; the norm's own rounding is within gamma_(D+2))."""
    return (served.float() - out).norm(dim=-1) * (1 + gamma(out.shape[-1] + 2))


def threshold(out_norm: torch.Tensor, bound: torch.Tensor, rms_low: torch.Tensor, tolerance) -> torch.Tensor:
    """tolerance * S_lo, S_lo = max(||O|| - bound, rms_low) <= max(||O_ref||, RMS_ref) (out_norm: a lower bound of
    ||O||). A limit that is not finite (an overflow) accepts nothing: it becomes -1."""
    limit = tolerance * torch.maximum(out_norm - bound, rms_low)
    return torch.where(torch.isfinite(limit), limit, -1.0)


def kl_bound(delta_t: torch.Tensor) -> torch.Tensor:
    """KL(p || p^) <= Delta_T^2 / 2."""
    return delta_t * delta_t / 2
