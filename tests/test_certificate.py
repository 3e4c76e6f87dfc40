"""The certificate's soundness against a float64 reference, on random and adversarial cases (hypothesis).

Each case is one query head over L tokens in blocks of 16: exact keys/values, stored ones with bounded errors,
some blocks promoted (exact keys), the trailing partial block exact. The attention is computed in float32 as
the kernel does; the reference in float64 from the exact tensors. The bound must hold every time.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import certificate as cert
from kernels.formats import round_up

BS = 16


def certify_case(q, k, k_hat, v, v_hat, promoted, scale, per_block=True, jensen_blocks=True):
    """q [D]; k, k_hat, v, v_hat [L, D]; promoted [num_blocks] bool (exact keys used). Returns (actual, terms);
    per_block: E_key may also use each block's own Delta_b (certificate.blockwise_key_error); jensen_blocks: W_b'
    may also take the Cauchy-Schwarz form (certificate.block_spread), as the twin does."""
    length, dim = k.shape
    blocks = math.ceil(length / BS)
    full = length // BS  # the partial block (if any) is exact, like the cache's tail
    key_used, value_used = k_hat.clone(), v_hat.clone()
    for b in range(blocks):
        if b >= full or promoted[b]:
            key_used[b * BS:(b + 1) * BS] = k[b * BS:(b + 1) * BS]
    value_used[full * BS:] = v[full * BS:]
    # kernel side, float32
    probs = torch.softmax((key_used.float() @ q.float()) * scale, dim=0)
    out = probs @ value_used.float()
    block_of = torch.arange(length) // BS
    in_tail = torch.tensor([b < full and not promoted[b] for b in range(blocks)])
    token_tail = in_tail[block_of]
    errors = (k.float() - key_used.float())
    eta = round_up((v.float() - value_used.float()).norm(dim=-1))
    deltas = torch.zeros(blocks)
    for b in range(blocks):
        if in_tail[b]:
            e = errors[b * BS:(b + 1) * BS]
            channel_scale = e.abs().amax(0)  # a per-channel scale with kappa = 1 (channel form of Delta)
            deltas[b] = cert.block_deltas(q.float().norm(), round_up(e.norm(dim=-1).max()),
                                          q.float().abs() @ channel_scale, round_up(torch.tensor(1.0)), scale)
    delta_t = deltas.max()
    alpha_t = probs[token_tail].sum()
    centre = v[:BS].float().mean(0)
    radius = round_up((v.float() - centre).norm(dim=-1).max())
    norms = round_up(value_used.float().norm(dim=-1))  # n_j >= ||value attention reads||
    e_val = (probs * eta).sum()
    w_all = cert.spread_around_output((probs * norms * norms).sum(), out.norm(), e_val, norms.max(), length, dim)
    score_error = cert.gamma(dim) * scale * (q.float().abs() @ key_used.float().abs().T).max()
    by_block = lambda x: torch.zeros(blocks, *x.shape[1:]).index_add_(0, block_of, x)  # noqa: E731
    rho = by_block(probs)
    dev = by_block(probs * (norms + out.norm() + eta))  # the triangle form
    out_dots = by_block(probs[:, None] * value_used.float()) @ out
    jensen = cert.block_spread(out_dots, out.norm(), rho, by_block(probs * norms * norms), by_block(probs * eta),
                               norms.max(), length, dim)
    dev = torch.minimum(dev, jensen) if jensen_blocks else dev
    w_tail = dev[in_tail].sum()
    terms = cert.bound_terms(e_val, delta_t, alpha_t, radius, w_all, w_tail, score_error, norms.max(), length, dim,
                             (deltas, rho, dev) if per_block else None)
    reference = torch.softmax((k.double() @ q.double()) * scale, dim=0) @ v.double()
    return (out.double() - reference).norm().item(), terms


def make_case(seed, length, dim, key_err, val_err, kind):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=g) * 3
    k = torch.randn(length, dim, generator=g) * 2
    v = torch.randn(length, dim, generator=g)
    e = torch.randn(length, dim, generator=g)
    e = e / e.norm(dim=-1, keepdim=True) * key_err * torch.rand(length, 1, generator=g)
    if kind == "aligned":  # errors along +-q: every score moves by exactly +-Delta (the tanh bound is tight)
        sign = torch.where(torch.rand(length, 1, generator=g) < 0.5, -1.0, 1.0)
        e = sign * key_err * q / q.norm()
    if kind == "sink":  # one token takes most of the mass and carries a huge value
        k[0] = q / q.norm() * 8
        v[0] *= 50
    if kind == "value_aligned":  # scores move up exactly where values lie on one side: the centred form's worst case
        side = torch.sign((v - v.mean(0)) @ v[0])[:, None]
        e = side * key_err * q / q.norm()
    if kind == "offset":  # values share a large common part (||v_j - O|| << n_j + ||O||: block_spread's case) and
        v += 30 * torch.randn(dim, generator=g)  # scores move up where values lie on one side of it
        side = torch.sign((v - v.mean(0)) @ (v[0] - v.mean(0)))[:, None]
        e = side * key_err * q / q.norm()
    if kind == "outlier":
        k[:, 3] *= 40
        q[3] *= 10
    if kind == "near_tie":
        k[:] = k[0]
        k += torch.randn(length, dim, generator=g) * 1e-3
    ev = torch.randn(length, dim, generator=g)
    ev = ev / ev.norm(dim=-1, keepdim=True) * val_err * torch.rand(length, 1, generator=g)
    blocks = math.ceil(length / BS)
    promoted = torch.rand(blocks, generator=g) < 0.3
    if kind == "promoted_big":  # promoted blocks carry the largest key errors and values: they must not leak in
        big = torch.zeros(length, dtype=torch.bool)
        for b in range(blocks):
            if promoted[b]:
                big[b * BS:(b + 1) * BS] = True
        e[big] *= 20
        v[big] *= 10
    return q, k, k + e, v, v + ev, promoted


KINDS = ["random", "aligned", "value_aligned", "offset", "sink", "outlier", "near_tie", "promoted_big"]


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31), length=st.sampled_from([1, 2, 15, 16, 17, 33, 64, 300]),
       dim=st.sampled_from([16, 64]), key_err=st.sampled_from([0.0, 1e-3, 0.05, 0.5, 3.0]),
       val_err=st.sampled_from([0.0, 1e-3, 0.1, 1.0]), kind=st.sampled_from(KINDS))
def test_bound_holds(seed, length, dim, key_err, val_err, kind):
    q, k, k_hat, v, v_hat, promoted = make_case(seed, length, dim, key_err, val_err, kind)
    actual, terms = certify_case(q, k, k_hat, v, v_hat, promoted, dim ** -0.5)
    assert actual <= terms.total.item(), (actual, terms)
    _, max_form = certify_case(q, k, k_hat, v, v_hat, promoted, dim ** -0.5, per_block=False)
    assert terms.e_key <= max_form.e_key  # the per-block form only ever tightens E_key


def test_key_error_survives_a_tail_mass_rounded_above_one():
    """alpha^_T computed as 1 + 2^-23 with Delta_T = 43 (found on the write path): m_lo = 1 - alpha^_T (1 - e^-43)
    rounds below 0, and form (c) must then give nothing rather than a negative bound; form (a) remains."""
    delta, alpha = torch.tensor(43.0), torch.tensor(1 + 2**-23)
    bound = cert.key_error(delta, alpha, torch.tensor(1.0), torch.tensor(1.4), torch.tensor(1.2), torch.tensor(0.9))
    assert bound == cert.softmax_tv_bound(delta, alpha) * 2 * 1.0 > 0


def test_block_spread_removes_the_values_common_part():
    """Values around a common part about 4x their spread, one block's scores moved: the triangle form of W_b' pays
    n_j + ||O|| (twice the common part; form (c) with W' then binds), the Cauchy-Schwarz form about the block's
    spread. Measured: actual 0.029, E_key 0.092 against 0.204."""
    q, k, k_hat, v, v_hat, promoted = make_case(7, 300, 64, 0.0, 1e-3, "offset")
    promoted[:] = False
    q = q / q.norm() * 4  # attention spread over many tokens
    k_hat[:16] = k[:16] - 0.5 * q / q.norm()  # one block of 18 carries the key error: the per-block form binds
    actual, jensen = certify_case(q, k, k_hat, v, v_hat, promoted, 64 ** -0.5)
    _, triangle = certify_case(q, k, k_hat, v, v_hat, promoted, 64 ** -0.5, jensen_blocks=False)
    assert actual <= jensen.total.item() <= triangle.total.item()
    assert jensen.e_key < 0.5 * triangle.e_key


def test_per_block_form_discounts_a_light_block_with_a_large_delta():
    """One block carries a huge key error but almost no mass: Delta_T is large, the mass-weighted form is not."""
    q, k, k_hat, v, v_hat, promoted = make_case(11, 64, 64, 0.01, 0.0, "random")
    promoted[:] = False
    k[16:32] -= 4 * q / q.norm()  # block 1 points away from q: it holds little mass ...
    k_hat[16:32] = k[16:32] - 0.5 * q / q.norm()  # ... and carries a large key error: Delta_1 = tau ||q|| / 2
    actual, per_block = certify_case(q, k, k_hat, v, v_hat, promoted, 0.125, jensen_blocks=False)
    _, max_form = certify_case(q, k, k_hat, v, v_hat, promoted, 0.125, per_block=False, jensen_blocks=False)
    assert actual <= per_block.total.item()
    assert per_block.e_key < 0.5 * max_form.e_key, (per_block.e_key, max_form.e_key)


def test_tanh_form_is_attained():
    """Reference masses sigma(-Delta), sigma(Delta) and score errors +Delta, -Delta: TV equals tanh(Delta / 2)."""
    delta = torch.tensor(0.7, dtype=torch.float64)
    exact = torch.stack([torch.sigmoid(-delta), torch.sigmoid(delta)])
    perturbed = torch.softmax(exact.log() + torch.stack([delta, -delta]), 0)
    tv = (perturbed - exact).abs().sum() / 2
    assert torch.isclose(tv, torch.tanh(delta / 2))
    assert torch.isclose(cert.softmax_tv_bound(delta, torch.tensor(1.0, dtype=torch.float64)), tv)


def test_tail_mass_form_is_tighter_for_small_tails():
    delta, alpha = torch.tensor(2.0), torch.tensor(1e-3)
    assert cert.softmax_tv_bound(delta, alpha) == alpha * torch.expm1(delta) < torch.tanh(delta / 2)
    assert cert.softmax_tv_bound(torch.tensor(0.0), torch.tensor(0.5)) == 0


def test_exact_keys_and_values_leave_only_rounding():
    q, k, _, v, _, _ = make_case(3, 300, 64, 0.0, 0.0, "random")
    actual, terms = certify_case(q, k, k, v, v, torch.zeros(19, dtype=torch.bool), 0.125)
    assert terms.e_val.item() < 1e-30 and terms.e_key.item() < 1e-30  # rounded up from 0, never below
    value_scale = v.float().norm(dim=-1).max().item()
    assert actual <= terms.e_fp.item() < 1e-3 * value_scale  # rounding-sized


def test_radius_over_tail_only_would_be_unsound():
    """The published trap: R taken over the tail tokens only. A promoted sink with a huge value breaks it."""
    q, k, k_hat, v, v_hat, promoted = make_case(7, 64, 16, 1.0, 0.0, "random")
    promoted[:] = False
    promoted[0] = True
    k[0] = q / q.norm() * 2
    k_hat[0] = k[0]
    v[0] *= 80
    v_hat[0] = v[0]
    actual, terms = certify_case(q, k, k_hat, v, v_hat, promoted, 0.25)
    assert actual <= terms.total.item()
    tail_radius = (v[16:].float() - v[:16].float().mean(0)).norm(dim=-1).max()
    naive = cert.softmax_tv_bound(0.25 * q.norm(), torch.tensor(1.0)) * 2 * tail_radius
    assert naive < terms.e_key  # the sound bound is larger, as it must be


def test_each_key_form_can_be_the_tightest():
    """Small Delta: the attention-weighted spread wins; a tiny tail mass: the tail-mass form of the TV bound."""
    delta, radius = torch.tensor(0.05), torch.tensor(10.0)
    spread_form = cert.key_error(delta, torch.tensor(0.9), radius, torch.tensor(1.0), torch.tensor(0.9),
                                 torch.tensor(0.1))
    assert spread_form < cert.softmax_tv_bound(delta, torch.tensor(0.9)) * 2 * radius
    big = torch.tensor(3.0)
    tail_form = cert.key_error(big, torch.tensor(1e-4), radius, torch.tensor(10.0), torch.tensor(5.0),
                               torch.tensor(1.0))
    assert tail_form == cert.softmax_tv_bound(big, torch.tensor(1e-4)) * 2 * radius


def test_normaliser_range_and_exact_ratio_are_attained_at_the_extremes():
    """All tail scores at +Delta (or -Delta): S = Z / Z^ reaches m_lo (m_hi) and p / p^ on P reaches u_P."""
    delta, alpha = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    m_lo, m_hi = cert.normaliser_range(delta, alpha)
    p_hat = torch.tensor([0.7, 0.3], dtype=torch.float64)  # [P token, T token]
    ratios = []
    for sign, extreme in ((1, m_lo), (-1, m_hi)):
        moved = torch.stack([torch.zeros((), dtype=torch.float64), sign * delta])
        assert torch.isclose((p_hat * torch.exp(-moved)).sum(), extreme)
        p = torch.softmax(p_hat.log() - moved, 0)
        ratios.append((p_hat - p).abs()[0] / p_hat[0])
    assert torch.isclose(max(ratios), cert.exact_ratio(m_lo, m_hi))


def test_centred_form_is_first_order_tight():
    """Two tokens of equal weight, values +a and -a (O = 0), scores moved by -Delta and +Delta: the error is
    tanh(Delta) ||a||, and form (c) gives (e^Delta - 1) e^Delta ||a||, tight as Delta -> 0. A form that bounds each
    |p_j - p^_j| by a ratio of p^_j pays the normaliser's shift on every token: about 3 Delta ||a||."""
    a = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    values = torch.stack([a, -a])
    for delta in (1e-3, 0.05, 0.3):
        d = torch.tensor(delta, dtype=torch.float64)
        p = torch.softmax(torch.stack([d, -d]), 0)  # p^ = (1/2, 1/2); reference scores moved by +-Delta
        actual = (p @ values).norm()
        norm = a.norm()
        bound = cert.key_error(d, torch.tensor(1.0, dtype=torch.float64), 100 * norm, norm, norm,
                               torch.tensor(0.0, dtype=torch.float64))
        assert torch.isclose(actual, torch.tanh(d) * norm)
        assert actual <= bound <= torch.expm1(d) * torch.exp(d) * norm * (1 + 1e-12)
        if delta <= 0.05:
            assert bound < 1.11 * actual


def test_a_negative_or_non_finite_bound_or_limit_is_never_accepted():
    """The ladder's monitors: whatever a form returns, a bound below 0 (no sound bound is) or not finite becomes
    infinite, so the head escalates instead of passing any limit; and a limit that overflowed (inf <= inf) accepts
    nothing."""
    from types import SimpleNamespace

    from engine.kv.escalation import _bound_and_limit

    out = torch.ones(1, 1, 4, 2)
    e_key = torch.tensor([-1e25, float("nan"), 0.01, float("inf")]).view(1, 1, 4)
    zero = torch.zeros(1, 1, 4)
    terms = cert.BoundTerms(zero, e_key, zero, zero)
    bound, limit = _bound_and_limit(SimpleNamespace(out=out, rms_low=torch.ones(1, 1, 4)), terms, torch.tensor(0.2))
    assert bound[0, 0].tolist() == [float("inf"), float("inf"), pytest.approx(0.01), float("inf")]
    assert (bound <= limit).tolist() == [[[False, False, True, False]]]
    huge = SimpleNamespace(out=out, rms_low=torch.full((1, 1, 4), float("inf")))
    bound, limit = _bound_and_limit(huge, cert.BoundTerms(zero, torch.full((1, 1, 4), 1e30), zero, zero),
                                    torch.tensor(0.2))
    assert not (bound <= limit).any()


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 2**19), m=st.integers(16, 2**12))
def test_tensor_core_terms_cover_tf32x3_dots(n, m):
    """certificate.tensor_core_terms' claim, in exact rational arithmetic: the split's error (3 + 2^-10) 2^-22, the
    tensor core's truncated sum of the 3m products of one dot, gamma_3m(2u), and the float32 accumulation and split
    merge of the ceil(n / m) dots' results, gamma_(3 ceil(n/m) + 4)(u), compose to at most gamma_(n + k)."""
    u = Fraction(1, 2**24)

    def gamma_(count, unit=u):
        return count * unit / (1 - count * unit)

    split = (3 + Fraction(1, 2**10)) * Fraction(1, 2**22)
    composed = (1 + split) * (1 + gamma_(3 * m, 2 * u)) * (1 + gamma_(3 * -(-n // m) + 4)) - 1
    assert composed <= gamma_(n + cert.tensor_core_terms(m))
