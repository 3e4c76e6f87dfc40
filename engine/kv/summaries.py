"""Value summaries of KV blocks, and the value centre and radius of a sequence that starts from shared blocks.

The certificate's key-error form (a) needs, per sequence, layer and KV head, a centre c and a radius
R >= max_j ||v_j - c|| over EVERY token the sequence attends (docs/certificate.md). A sequence that starts after
blocks another sequence wrote (prefix caching) never saw those tokens' values. Each filled block therefore stores, per
KV head, the mean m_b of its exact values (float32) and r_b >= max_(j in b) ||v_j - m_b|| (rounded up). For any centre
c, the triangle inequality gives ||v_j - c|| <= ||m_b - c|| + r_b for every j in b, so

    R = max_b (||m_b - c|| + r_b)

covers every shared token; c is the first block's mean. Both sums are computed in float64 from float32 inputs
(relative error under D * 2^-53, far inside the 2^-40 margin) and rounded up into float32. Each summary describes the
data of its own block (whoever wrote it), so a chain of blocks written by different sequences is covered too.
"""

from __future__ import annotations

import torch

MARGIN = 2.0**-40  # relative: covers float64 rounding of a norm of a few thousand terms


def round_up(x: torch.Tensor) -> torch.Tensor:
    """float64 -> a float32 at least as large."""
    x = (x * (1 + MARGIN)).float()
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def summarise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [N, Hkv, bs, D] (exact, any float dtype) -> (m_b [N, Hkv, D] float32, r_b [N, Hkv] float32) with
    r_b >= max_j ||v_j - m_b|| for the stored (float32) m_b."""
    exact = values.double()
    mean = exact.mean(dim=2).float()
    return mean, round_up((exact - mean.double()[:, :, None]).norm(dim=-1).amax(dim=-1))


def shared_spread(means: torch.Tensor, reaches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries of a sequence's shared blocks, in order (means [..., n, Hkv, D], reaches [..., n, Hkv]) -> its centre
    c = m of the first block [..., Hkv, D] and R = max_b (||m_b - c|| + r_b) [..., Hkv], float32, R rounded up."""
    exact = means.double()
    centre = exact[..., 0, :, :]
    reach = (exact - centre[..., None, :, :]).norm(dim=-1) + reaches.double()
    return centre.float(), round_up(reach.amax(dim=-2))
