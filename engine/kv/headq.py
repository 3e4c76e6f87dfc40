"""HeadQ keys: min-max codes plus a low-rank residual code in a query basis, judged by their effect on scores.

A key's score error is q . e_j; queries of one KV group concentrate in a few directions. `python -m engine.calibrate`
learns, per layer and KV head, an orthonormal basis of the group's post-RoPE queries (eigenvectors of sum q q^T,
by decreasing eigenvalue). Here U = its first `rank` vectors [Hkv, D, r]. Each token stores min-max codes k^_j (float8
scales, HeadQ's base) and a side code: the residual's coordinates U^T (k_j - k^_j), rounded to `side_bits`-bit
symmetric levels with one float16 scale a token. Attention reads the effective key k~_j = k^_j + U c^_j; adding
U c^_j to the key is the same as adding the logit correction (U^T q) . c^_j to its score.

For the certificate every error is measured against k~ (eps_b, kappa_b as for any quantizer), and two more
annotations per block split it along U: a_b >= max_j ||U^T e_j||, c_b >= max_j ||e_j - U U^T e_j||. Since
q . e = (U^T q) . (U^T e) + (q - U U^T q) . e, and for orthonormal U the second term is (P q) . (P e) with
P = I - U U^T, a score moves by at most

    Delta_b^U = tau (||U^T q|| a_b + ||P q|| c_b)

which is small when q lies mostly in U, where the side code removed the error. U is float32, orthonormal within
omega = ||I - U^T U||_F < 2^-16; the float32 rounding of the projections and the term (P q) . (U U^T e) that
omega leaves are covered by a relative 2^-12 on the form and 2^-8 tau ||q|| eps_b (analysis in key_deltas).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.kv.quantizers import META_DTYPE, Codes, CompactMinMaxQuantizer, pack, round_up, unpack
from kernels.reference import take

BASIS_FILE = "headq.safetensors"  # next to the model's weights
RANKS, SIDE_BITS = (8, 16, 24, 32, 40, 48), (2, 3, 4, 8)
SLACK, SLACK_ABSOLUTE = 2.0**-12, 2.0**-8


class HeadQQuantizer(CompactMinMaxQuantizer):
    """Key layout per block and KV head: codes [bs, D * k_bits / 8 + r * side_bits / 8] (base codes, then side
    codes), scale [D] float8 (base), zero [D + bs + 2] float16: the base zero points, the bs side scales, a_b, c_b.
    Values are min-max with float8 scales. `for_layer` gives the quantizer of one layer (its own basis)."""

    name = "headq"

    def __init__(self, k_bits: int = 8, v_bits: int = 4, rank: int = 16, side_bits: int = 4,
                 basis: torch.Tensor | None = None, layer: int | None = None):
        super().__init__(k_bits, v_bits)
        if rank not in RANKS or side_bits not in SIDE_BITS:
            raise ValueError(f"quantizer headq: rank must be one of {RANKS}, side bits one of {SIDE_BITS}")
        self.rank, self.side_bits, self.basis = rank, side_bits, basis
        self.u = None if layer is None else basis[layer]  # [Hkv, D, r], on the cache's device
        self._levels = (1 << (side_bits - 1)) - 1  # codes -L..L around the offset L + 1

    def for_layer(self, layer: int) -> HeadQQuantizer:
        if self.basis is None:
            raise ValueError("quantizer headq: no query basis loaded (python -m engine.calibrate writes one)")
        return HeadQQuantizer(self.k_bits, self.v_bits, self.rank, self.side_bits, self.basis, layer)

    def key_meta(self, block_size: int, dim: int):
        return (dim,), (dim + block_size + 2,)

    def key_width(self, dim: int) -> int:
        return dim * self.k_bits // 8 + self.rank * self.side_bits // 8

    def _base(self, c: Codes, dim: int) -> Codes:
        return Codes(c.codes[..., : dim * self.k_bits // 8], c.scale, c.zero[..., :dim])

    def _correction(self, c: Codes, dim: int) -> torch.Tensor:
        """U c^_j [..., bs, D] from the side codes and scales."""
        bs = c.codes.shape[-2]
        side = unpack(c.codes[..., dim * self.k_bits // 8:], self.side_bits).float() - (self._levels + 1)
        side = side.mul_(c.zero[..., dim:dim + bs, None].float())
        return torch.matmul(side, self.u.transpose(-1, -2))

    def quantize_keys(self, k: torch.Tensor) -> Codes:
        """k [N, Hkv, bs, D] -> base codes, side codes and the subspace annotations of the effective keys."""
        k, dim = k.float(), k.shape[-1]
        base, u = super().quantize_keys(k), self.u
        base_keys = super().dequantize_keys(base)
        coords = torch.matmul(k - base_keys, u)  # [N, Hkv, bs, r]
        side_scale = (coords.abs().amax(dim=-1) / self._levels).to(META_DTYPE)
        step = side_scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        side = (coords / step).round_().clamp_(-self._levels, self._levels) + (self._levels + 1)
        codes = torch.cat([base.codes, pack(side.to(torch.uint8), self.side_bits)], dim=-1)
        notes = torch.zeros(*side_scale.shape[:2], 2, dtype=META_DTYPE, device=k.device)
        c = Codes(codes, base.scale, torch.cat([base.zero, side_scale, notes], dim=-1))
        error = k - base_keys.add_(self._correction(c, dim))  # what dequantize_keys(c) returns
        along = torch.matmul(error, u)
        across = error - torch.matmul(along, u.transpose(-1, -2))
        c.zero[..., -2] = round_up(along.norm(dim=-1).amax(dim=-1), META_DTYPE)
        c.zero[..., -1] = round_up(across.norm(dim=-1).amax(dim=-1), META_DTYPE)
        return c

    def dequantize_keys(self, c: Codes) -> torch.Tensor:
        dim = c.scale.shape[-1]
        return super().dequantize_keys(self._base(c, dim)).add_(self._correction(c, dim))

    def key_step(self, c: Codes, dim: int) -> torch.Tensor:
        return self.key_grid(c.scale, c.zero[..., :dim])[0]

    def key_contractions(self, q_abs, scale, zero) -> torch.Tensor:
        """The base contractions, with ||q||_1 max_j ||U c^_j|| added to sum |q_c| |zero_c|: |(U c^_j)_c| <=
        ||c^_j|| (rows of U have norm <= 1 + omega) <= sqrt(r) L |side scale_j|, so the magnitude bound from
        key_dots still covers |k~_jc|."""
        dim, bs = scale.shape[-1], zero.shape[-1] - scale.shape[-1] - 2
        dots = super().key_contractions(q_abs, scale, zero[..., :dim])
        side = zero[..., dim:dim + bs].float().abs().amax(dim=-1).transpose(1, 2)  # [Bd, Hkv, nb]
        side = side * (math.sqrt(self.rank) * self._levels * (1 + 2**-10))
        dots[..., 1] += q_abs.sum(dim=-1, keepdim=True) * side[:, :, None]
        return dots

    def key_deltas(self, grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, tables: torch.Tensor,
                   eps: torch.Tensor, kappa: torch.Tensor, tau: float) -> torch.Tensor:
        """Delta_b^U [Bd, Hkv, G, nb] for queries grouped [Bd, Hkv, G, D], the layer's key metadata (scale [NB, Hkv, D],
        zero [NB, Hkv, *]), block tables [Bd, nb], eps_b and kappa_b [Bd, Hkv, 1, nb]. The part of q across U meets
        the whole error: |(P q) . e_j| <= min(||P q|| c_b, kappa_b sum_c |(P q)_c| step_bc), the second the channel
        form of Delta_b applied to P q (|e_jc| <= kappa_b step_bc for every token of the block).

        Rounding: each coordinate of U^T q is off by at most gamma_D ||q|| (columns of U have norm ~1), so ||U^T q||
        and P q are off by under 2 sqrt(r) gamma_D ||q|| <= 2^-12 ||q|| (r <= 48, D <= 256), and the measured a_b,
        c_b by under 2^-12 eps_b (||e_j|| <= eps_b); the two products then by under 4.1 2^-12 ||q|| eps_b. The term
        (P q) . (U U^T e) = q^T U (I - U^T U) U^T e is at most (1 + omega)^2 omega ||q|| ||e|| < 2^-15 ||q|| eps_b.
        2^-8 tau ||q|| eps_b covers both; the relative 2^-12 covers the rounding of the form's own arithmetic."""
        u, dim = self.u, grouped.shape[-1]
        along = torch.matmul(grouped, u)  # [Bd, Hkv, G, r]
        across = grouped - torch.matmul(along, u.transpose(-1, -2))
        blocks = take(zero, tables)  # [Bd, nb, Hkv, *]
        step = self.key_grid(take(scale, tables), blocks[..., :dim])[0].transpose(1, 2)  # [Bd, Hkv, nb, D]
        channel = kappa * torch.matmul(across.abs(), step.transpose(-1, -2))  # [Bd, Hkv, G, nb]
        a, c = blocks[..., -2:].float().permute(3, 0, 2, 1)[:, :, :, None]  # each [Bd, Hkv, 1, nb]
        across = torch.minimum(across.norm(dim=-1)[..., None] * c, torch.nan_to_num(channel, nan=torch.inf))
        form = along.norm(dim=-1)[..., None] * a + across
        form = form * (1 + SLACK) + SLACK_ABSOLUTE * grouped.norm(dim=-1)[..., None] * eps
        return torch.nan_to_num(tau * form, nan=torch.inf)

    def key_bytes(self, dim: int, block_size: int) -> float:
        """Base codes and metadata, side codes, a side scale a token, a_b and c_b spread over the block."""
        side = self.rank * self.side_bits / 8 + META_DTYPE.itemsize
        return super().key_bytes(dim, block_size) + side + 2 * META_DTYPE.itemsize / block_size


def eigenbasis(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second moments sum q q^T [..., D, D] (float64) -> (eigenvectors as columns by decreasing eigenvalue, the
    eigenvalues' cumulative share of the total: the query energy a rank keeps)."""
    values, vectors = torch.linalg.eigh(moments)
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    return vectors, values.cumsum(dim=-1) / values.sum(dim=-1, keepdim=True).clamp_min(1e-300)


def save_basis(path: Path, basis: torch.Tensor, energy: torch.Tensor, meta: dict[str, str]) -> None:
    save_file({"basis": basis.float().contiguous(), "energy": energy.float().contiguous()}, str(path), metadata=meta)


def load_basis(path: Path, layers: int, kv_heads: int, head_dim: int, rank: int) -> torch.Tensor:
    """[L, Hkv, D, rank] float32 with orthonormal columns (re-orthonormalised in float64; omega < 2^-16 checked)."""
    if not path.is_file():
        raise FileNotFoundError(f"headq: no query basis at {path}: run `python -m engine.calibrate --text FILE` first")
    basis = load_file(str(path))["basis"]
    if tuple(basis.shape) != (layers, kv_heads, head_dim, head_dim):
        raise ValueError(f"headq: basis {path} has shape {tuple(basis.shape)}, the model needs "
                         f"{(layers, kv_heads, head_dim, head_dim)} (calibrated for another model?)")
    q, _ = torch.linalg.qr(basis[..., :rank].double())
    u = q.float()
    omega = (torch.eye(rank, dtype=torch.float64) - u.double().transpose(-1, -2) @ u.double()).norm(dim=(-2, -1))
    if not bool(torch.isfinite(u).all()) or float(omega.max()) >= 2**-16:
        raise ValueError(f"headq: basis {path} is not finite or not orthonormal")
    return u
