"""Tier-1 storage formats shared by the kernels, their twins and the quantizers: packed codes with float16 metadata,
and the write-time annotations (error norms measured against the dequantization attention reads, rounded up so
that stored numbers stay upper bounds). The quantizers (above the kernels, in the engine) decide how codes are chosen; this
module only says how they are stored and measured."""

from __future__ import annotations

from dataclasses import dataclass

import torch

META_DTYPE = torch.float16
VALUE_GROUP = 16


@dataclass(frozen=True, slots=True)
class Codes:
    codes: torch.Tensor  # uint8, packed along the last dim
    scale: torch.Tensor  # float16
    zero: torch.Tensor  # float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits [..., D] -> bytes [..., D * bits / 8] (D a multiple of 8): code i of a group of 8 codes
    sits at bit i * bits of the group's `bits` bytes, little-endian (for 2, 4 and 8 bits: code i of a byte at bit
    i * bits, the layout the Triton kernels read)."""
    if bits == 8:
        return codes
    if 8 % bits == 0:  # whole codes per byte: the fast path
        grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // (8 // bits), 8 // bits).to(torch.int32)
        return (grouped << torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)).sum(-1).to(torch.uint8)
    groups = codes.view(*codes.shape[:-1], codes.shape[-1] // 8, 8).to(torch.int64)
    word = (groups << torch.arange(0, 8 * bits, bits, device=codes.device)).sum(dim=-1, keepdim=True)
    return ((word >> torch.arange(0, 8 * bits, 8, device=codes.device)) & 0xFF).to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    if 8 % bits == 0:
        mask = (1 << bits) - 1
        return torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1).flatten(-2)
    groups = packed.view(*packed.shape[:-1], packed.shape[-1] // bits, bits).to(torch.int64)
    word = (groups << torch.arange(0, 8 * bits, 8, device=packed.device)).sum(dim=-1, keepdim=True)
    codes = (word >> torch.arange(0, 8 * bits, bits, device=packed.device)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).flatten(-2)


def round_up(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x in `dtype`, never below x: stored annotations must stay upper bounds after rounding."""
    inf = torch.tensor(float("inf"), device=x.device)
    y = torch.nextafter(x * (1 + 2**-20), inf)  # covers the float32 rounding of the norm computation itself
    stored = y.to(dtype)
    return torch.where(stored.float() < y, torch.nextafter(stored, inf.to(dtype)), stored)


def error_norms(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """max over the block's tokens of ||exact - approx||_2, rounded up: [N, Hkv, bs, D] -> [N, Hkv] float32."""
    return round_up((exact.float() - approx).norm(dim=-1).amax(dim=-1))


def token_error_norms(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """||exact_j - approx_j||_2 per token, rounded up into float16: [N, Hkv, bs, D] -> [N, Hkv, bs]."""
    return round_up((exact.float() - approx).norm(dim=-1), META_DTYPE)


def channel_error_ratio(exact: torch.Tensor, approx: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """kappa_b = max over tokens and channels of |error| / step_c, so that |e_jc| <= kappa_b * step_c for every token j
    of the block: [N, Hkv, bs, D] with step [N, Hkv, D] (> 0, Quantizer.key_grid) -> [N, Hkv] float32."""
    worst = (exact.float() - approx).abs().amax(dim=2)  # [N, Hkv, D]
    return round_up((worst / step).amax(dim=-1))


def token_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_j||_2 per token, rounded up into float16: [N, Hkv, bs, D] -> [N, Hkv, bs]."""
    return round_up(x.float().norm(dim=-1), META_DTYPE)
