"""The ladder's promotion planner (engine.kv.escalation: _by_contribution, _by_mass) plans every escalating group of
a layer at once. Hypothesis checks it group by group against plain definitions: the fewest largest blocks that cover
what is needed, and the shortest heaviest-first prefix of tail blocks whose promotion brings the predicted E_key
under its goal."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import certificate as cert
from engine.kv.escalation import _by_contribution, _by_mass

G = 3


def generator(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


@st.composite
def contribution_cases(draw):
    n, nb = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    gen = generator(draw)
    contrib = torch.rand(n, G, nb, generator=gen) * (torch.rand(n, 1, nb, generator=gen) < 0.7)  # some zeros
    need = (torch.rand(n, G, generator=gen) * 2 - 0.5) * contrib.sum(dim=-1).clamp_min(1e-3)  # some unreachable
    return contrib, need


@given(contribution_cases())
def test_by_contribution_takes_the_fewest_largest_blocks(case):
    contrib, need = case
    order, count = _by_contribution(contrib, need)
    for g in range(contrib.shape[0]):
        c, want, k = contrib[g], need[g] * (1 + 1e-3), int(count[g])
        chosen = order[g, :k].tolist()
        top = c.amax(dim=0)
        if not bool((want > 0).any()):
            assert k == 0
            continue
        largest = sorted(range(c.shape[-1]), key=lambda b: -float(top[b]))
        sums = [c[:, largest[:m]].sum(dim=-1) for m in range(c.shape[-1] + 1)]
        covering = [m for m in range(1, c.shape[-1] + 1) if bool((sums[m] >= want).all())]
        near = [m for m in range(c.shape[-1] + 1) if bool(((sums[m] - want).abs() <= 1e-5 * want.abs() + 1e-7).any())]
        if covering and covering[0] not in near:
            assert k == covering[0] or k in near  # the fewest blocks, largest first
            assert sorted(top[chosen].tolist(), reverse=True) == [float(top[b]) for b in largest[:k]]
        elif not covering and not near:  # nothing covers: every block that contributes
            assert sorted(chosen) == sorted((top > 0).nonzero().flatten().tolist())


@st.composite
def mass_cases(draw):
    n, nb = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    gen = generator(draw)
    rho = torch.rand(n, G, nb, generator=gen)
    rho = rho / (rho.sum(dim=-1, keepdim=True) * 1.25)  # block masses; the rest sits in the partial block
    in_tail = torch.rand(n, nb, generator=gen) < 0.7
    delta = torch.rand(n, G, nb, generator=gen) * 0.5 * in_tail[:, None]
    dev = torch.rand(n, G, nb, generator=gen) * rho * 4
    result = SimpleNamespace(rho=rho[:, None], block_delta=delta[:, None], dev_contrib=dev[:, None],
                             alpha_t=(rho * in_tail[:, None]).sum(dim=-1)[:, None],
                             w_all=dev.sum(dim=-1)[:, None] + torch.rand(n, 1, G, generator=gen),
                             w_tail=(dev * in_tail[:, None]).sum(dim=-1)[:, None])
    radius = torch.rand(n, generator=gen) + 0.1
    goal = torch.rand(n, G, generator=gen) * 0.3
    centre = torch.rand(n, G, generator=gen) * 0.1  # C of E_key's form (c): E_val and the rounding of O
    return result, in_tail, radius, centre, goal


def predicted_e_key(result, g, in_tail, radius, centre, moved: list[int]):
    """E_key after moving `moved` out of the tail: Delta_T over the blocks left, their mass and spread."""
    left = [b for b in in_tail[g].nonzero().flatten().tolist() if b not in moved]
    delta = result.block_delta[g, 0][:, left].amax(dim=-1) if left else torch.zeros(G)
    alpha = (result.alpha_t[g, 0] - result.rho[g, 0][:, moved].sum(dim=-1)).clamp_min(0)
    w_tail = (result.w_tail[g, 0] - result.dev_contrib[g, 0][:, moved].sum(dim=-1)).clamp_min(0)
    return cert.key_error(delta, alpha, radius[g], result.w_all[g, 0], w_tail, centre[g])


@given(mass_cases())
def test_by_mass_takes_the_shortest_heaviest_prefix_that_meets_the_goal(case):
    result, in_tail, radius, centre, goal = case
    n = in_tail.shape[0]
    order, count = _by_mass(result, torch.arange(n), torch.zeros(n, dtype=torch.long), in_tail, radius, centre, goal)
    for g in range(n):
        tail = in_tail[g].nonzero().flatten().tolist()
        heaviest = sorted(tail, key=lambda b: -float(result.rho[g, 0][:, b].amax()))
        fits = [bool((predicted_e_key(result, g, in_tail, radius, centre, heaviest[:m]) <= goal[g] * (1 + 1e-5)).all())
                for m in range(len(tail) + 1)]
        if int(count[g]) < 0:
            assert not any(fits[m] and not _near(result, g, in_tail, radius, centre, heaviest[:m], goal) for m in
                           range(len(tail) + 1))
            continue
        m = int(count[g])
        chosen = order[g, :m].tolist()
        assert set(chosen) <= set(tail) and len(set(chosen)) == m
        masses = sorted((float(result.rho[g, 0][:, b].amax()) for b in tail), reverse=True)[:m]
        assert sorted((float(result.rho[g, 0][:, b].amax()) for b in chosen), reverse=True) == masses
        assert bool((predicted_e_key(result, g, in_tail, radius, centre, chosen) <= goal[g] * (1 + 1e-5)).all())
        assert not any(fits[k] and not _near(result, g, in_tail, radius, centre, heaviest[:k], goal) for k in range(m))


def _near(result, g, in_tail, radius, centre, moved, goal) -> bool:
    """Within float rounding of the goal: the batched and the plain sums may round differently there."""
    predicted = predicted_e_key(result, g, in_tail, radius, centre, moved)
    return bool(((predicted - goal[g]).abs() <= 1e-5 * goal[g] + 1e-7).any())
