"""Tier-1 quantizers: a small interface and min-max round-to-nearest.

Blocks are [N, Hkv, bs, D] (N blocks of bs tokens, Hkv KV heads, D channels). Keys are quantized per block and
per channel (asymmetric: scale and zero for each channel of each block), values per token in groups of 16
channels. Scales and zeros are stored as float16; codes are packed into bytes (two 4-bit or four 2-bit codes a
byte). `dequantize_*` is THE dequantization: attention and the write-time error annotations both call it, so the
measured errors describe exactly what attention reads, rounded metadata included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

META_DTYPE = torch.float16
VALUE_GROUP = 16


@dataclass(frozen=True, slots=True)
class Codes:
    codes: torch.Tensor  # uint8, packed along the last dim
    scale: torch.Tensor  # float16
    zero: torch.Tensor  # float16


class Quantizer(Protocol):
    name: str
    k_bits: int
    v_bits: int

    def quantize_keys(self, k: torch.Tensor) -> Codes: ...
    def dequantize_keys(self, c: Codes) -> torch.Tensor: ...
    def quantize_values(self, v: torch.Tensor) -> Codes: ...
    def dequantize_values(self, c: Codes) -> torch.Tensor: ...
    def key_grid(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def key_dots(self, scale_dot, zero_dot, q_abs_sum) -> tuple[torch.Tensor, torch.Tensor]: ...
    def bytes_per_token(self, head_dim: int, block_size: int) -> float: ...


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits [..., D] -> bytes [..., D * bits / 8]; code i of a byte sits at bit i * bits."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    return torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1).flatten(-2)


def _affine(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Codes:
    """Asymmetric min-max codes for x with per-group bounds lo/hi (broadcastable); metadata rounded first."""
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(META_DTYPE)
    zero = lo.to(META_DTYPE)
    step = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((x - zero.float()) / step).round_().clamp_(0, levels).to(torch.uint8)
    return Codes(pack(codes, bits), scale, zero)


class MinMaxQuantizer:
    """Round-to-nearest on a min-max grid: keys per block and channel, values per token and 16-channel group."""

    name = "minmax"

    def __init__(self, k_bits: int = 8, v_bits: int = 4):
        if k_bits not in (4, 8) or v_bits not in (2, 4):
            raise ValueError("MinMaxQuantizer: k_bits must be 8 or 4, v_bits 4 or 2")
        self.k_bits, self.v_bits = k_bits, v_bits

    def quantize_keys(self, k: torch.Tensor) -> Codes:
        k = k.float()  # [N, Hkv, bs, D]: one scale and zero per (block, head, channel)
        c = _affine(k, k.amin(dim=2, keepdim=True), k.amax(dim=2, keepdim=True), self.k_bits)
        return Codes(c.codes, c.scale.squeeze(2), c.zero.squeeze(2))

    def dequantize_keys(self, c: Codes) -> torch.Tensor:
        return unpack(c.codes, self.k_bits).float().mul_(c.scale.unsqueeze(-2)).add_(c.zero.unsqueeze(-2))

    def key_grid(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, bound) per block and channel, float32, from the metadata alone.

        step = scale + |zero| 2^-10 + 2^-24 (at least the float16 spacing at |zero|): the unit in which kappa_b
        measures per-channel key errors, never 0 (a constant channel still carries the rounding of its zero point).
        bound >= |k^_jc| for every token: the grid spans [zero, zero + levels * scale], inflated for the rounding of
        the dequantization."""
        scale, zero = scale.float(), zero.float()
        step = zero.abs().mul_(2**-10).add_(scale).add_(2**-24)
        hi = zero + ((1 << self.k_bits) - 1) * scale
        return step, torch.maximum(zero.abs(), hi.abs()).mul_(1 + 2**-20)

    def key_dots(self, scale_dot, zero_dot, q_abs_sum) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_c |q_c| step_c and an upper bound of sum_c |q_c| |k^_jc|, from sum_c |q_c| scale_c, sum_c |q_c| |zero_c|
        and sum_c |q_c| (key_grid is linear in scale and |zero|; |k^_jc| <= |zero_c| + levels scale_c)."""
        step_dot = zero_dot * 2**-10 + scale_dot + q_abs_sum * 2**-24
        magnitude = (zero_dot + ((1 << self.k_bits) - 1) * scale_dot) * (1 + 2**-20)
        return step_dot * (1 + 2**-20), magnitude

    def quantize_values(self, v: torch.Tensor) -> Codes:
        v = v.float()
        grouped = v.view(*v.shape[:-1], v.shape[-1] // VALUE_GROUP, VALUE_GROUP)  # [N, Hkv, bs, D / 16, 16]
        c = _affine(grouped, grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True), self.v_bits)
        return Codes(c.codes.flatten(-2), c.scale.squeeze(-1), c.zero.squeeze(-1))

    def dequantize_values(self, c: Codes) -> torch.Tensor:
        codes = unpack(c.codes, self.v_bits).float()
        grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // VALUE_GROUP, VALUE_GROUP)
        return grouped.mul_(c.scale.unsqueeze(-1)).add_(c.zero.unsqueeze(-1)).flatten(-2)

    def bytes_per_token(self, head_dim: int, block_size: int) -> float:
        """Tier-1 bytes per token per KV head: codes plus metadata (keys' per-block metadata spread over the block)."""
        meta = META_DTYPE.itemsize * 2
        keys = head_dim * self.k_bits / 8 + head_dim * meta / block_size
        values = head_dim * self.v_bits / 8 + head_dim / VALUE_GROUP * meta
        return keys + values


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


def make_quantizer(name: str, k_bits: int, v_bits: int) -> Quantizer:
    if name == "minmax":
        return MinMaxQuantizer(k_bits, v_bits)
    raise ValueError(f"unknown quantizer {name!r} (available: minmax)")
