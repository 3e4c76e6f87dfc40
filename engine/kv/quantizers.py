"""Tier-1 quantizers: a small interface and min-max round-to-nearest.

Blocks are [N, Hkv, bs, D] (N blocks of bs tokens, Hkv KV heads, D channels). Keys are quantized per block and
per channel (asymmetric: scale and zero for each channel of each block), values per token in groups of 16
channels. Scales and zeros are stored as float16; codes are packed into bytes (two 4-bit or four 2-bit codes a
byte). `dequantize_*` is THE dequantization: attention and the write-time error annotations both call it, so the
measured errors describe exactly what attention reads, rounded metadata included.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch

from kernels.formats import (META_DTYPE, VALUE_GROUP, Codes, channel_error_ratio, error_norms, pack, round_up,
                             token_error_norms, token_norms, unpack)

KEY_BITS, VALUE_BITS = (4, 5, 6, 8), (2, 3, 4)  # what every quantizer here accepts


class Quantizer(Protocol):
    """What tier 1 needs from a quantizer. Each quantizer lays out its own metadata (shapes per block and KV head);
    the certificate only reads the error annotations measured against `dequantize_*` at write time, plus two
    contractions of |q| with the key metadata (Delta's channel form and a bound on |q| . |k^|)."""

    name: str
    k_bits: int
    v_bits: int
    triton: bool  # the Triton kernels implement this layout (else the twins run everywhere)
    key_scale_dtype: torch.dtype  # of Codes.scale (zeros are float16)
    value_scale_dtype: torch.dtype

    def for_layer(self, layer: int) -> Quantizer: ...  # the quantizer of one layer (HeadQ: its basis)
    def key_meta(self, block_size: int, dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]: ...
    def key_width(self, dim: int) -> int: ...  # bytes of key codes per token
    def value_meta(self, dim: int) -> tuple[int, int]: ...
    def quantize_keys(self, k: torch.Tensor) -> Codes: ...
    def dequantize_keys(self, c: Codes) -> torch.Tensor: ...
    def quantize_values(self, v: torch.Tensor) -> Codes: ...
    def dequantize_values(self, c: Codes) -> torch.Tensor: ...
    def key_step(self, c: Codes, dim: int) -> torch.Tensor: ...
    def key_contractions(self, q_abs, scale, zero) -> torch.Tensor: ...
    def key_dots(self, first, second, q_abs_sum) -> tuple[torch.Tensor, torch.Tensor]: ...
    def key_deltas(self, grouped, scale, zero, tables, eps, kappa, tau: float) -> torch.Tensor | None: ...  # 3rd form
    def key_bytes(self, dim: int, block_size: int) -> float: ...
    def value_bytes(self, dim: int) -> float: ...


def bytes_per_token(quantizer: Quantizer, dim: int, block_size: int) -> float:
    """Tier-1 code and metadata bytes per token per KV head (annotations: TieredKVCache.tier1_bytes)."""
    return quantizer.key_bytes(dim, block_size) + quantizer.value_bytes(dim)


def scale_up_fp8(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales >= 0 -> float8_e4m3fn scales never below them (up to 384; larger ones saturate, and the codes
    clip: the measured annotations then say so): the next representable value at or above each."""
    s = scale.clamp(2**-9, 384)
    spacing = torch.exp2(torch.floor(torch.log2(s)).clamp_min(-6) - 3)
    up = (torch.ceil(s / spacing) * spacing).to(torch.float8_e4m3fn)
    # log2 may land just below a power of two; then 1.125 s + 2^-9 rounded to nearest is still >= s
    return torch.where(up.float() >= s, up, (s * 1.125 + 2**-9).to(torch.float8_e4m3fn))


def _affine(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, scale_dtype=META_DTYPE) -> Codes:
    """Asymmetric min-max codes for x with per-group bounds lo/hi (broadcastable); metadata rounded first."""
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    scale = scale_up_fp8(scale) if scale_dtype == torch.float8_e4m3fn else scale.to(scale_dtype)
    zero = lo.to(META_DTYPE)
    step = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((x - zero.float()) / step).round_().clamp_(0, levels).to(torch.uint8)
    return Codes(pack(codes, bits), scale, zero)


class LayerlessQuantizer:
    """What most quantizers share: the same quantizer in every layer, key codes of k_bits each, and no form of Delta_b
    beyond the certificate's two (kernels.certificate.block_deltas)."""

    k_bits: int

    def for_layer(self, layer: int) -> LayerlessQuantizer:
        return self

    def key_width(self, dim: int) -> int:
        return dim * self.k_bits // 8

    def key_deltas(self, grouped, scale, zero, tables, eps, kappa, tau: float) -> None:
        return None


class MinMaxQuantizer(LayerlessQuantizer):
    """Round-to-nearest on a min-max grid: keys per block and channel, values per token and 16-channel group."""

    name = "minmax"
    key_scale_dtype = value_scale_dtype = META_DTYPE

    def __init__(self, k_bits: int = 8, v_bits: int = 4):
        _check_bits(self.name, k_bits, v_bits)
        self.k_bits, self.v_bits = k_bits, v_bits
        self.triton = k_bits in (4, 8) and v_bits in (2, 4) and self.key_scale_dtype == META_DTYPE

    def key_meta(self, block_size: int, dim: int):
        return (dim,), (dim,)

    def value_meta(self, dim: int) -> tuple[int, int]:
        return dim // VALUE_GROUP, dim // VALUE_GROUP

    def quantize_keys(self, k: torch.Tensor) -> Codes:
        k = k.float()  # [N, Hkv, bs, D]: one scale and zero per (block, head, channel)
        c = _affine(k, k.amin(dim=2, keepdim=True), k.amax(dim=2, keepdim=True), self.k_bits,
                    self.key_scale_dtype)
        return Codes(c.codes, c.scale.squeeze(2), c.zero.squeeze(2))

    def dequantize_keys(self, c: Codes) -> torch.Tensor:
        return unpack(c.codes, self.k_bits).float().mul_(c.scale.float().unsqueeze(-2)).add_(c.zero.unsqueeze(-2))

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

    def key_step(self, c: Codes, dim: int) -> torch.Tensor:
        return self.key_grid(c.scale, c.zero)[0]

    def key_contractions(self, q_abs, scale, zero) -> torch.Tensor:
        """q_abs [Bd, Hkv, G, D], scale and zero [Bd, nb, Hkv, D] -> [Bd, Hkv, G, nb, 2]: sum_c |q_c| scale_bc and
        sum_c |q_c| |zero_bc| (what the Triton kernel accumulates per block)."""
        meta = torch.stack([scale.float(), zero.float().abs()], dim=-2).transpose(1, 2)  # [Bd, Hkv, nb, 2, D]
        return (q_abs[:, :, :, None, None] * meta[:, :, None]).sum(dim=-1)  # broadcast: 3x faster than einsum on CPU

    def key_dots(self, scale_dot, zero_dot, q_abs_sum) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_c |q_c| step_c and an upper bound of sum_c |q_c| |k^_jc|, from sum_c |q_c| scale_c, sum_c |q_c| |zero_c|
        and sum_c |q_c| (key_grid is linear in scale and |zero|; |k^_jc| <= |zero_c| + levels scale_c)."""
        step_dot = zero_dot * 2**-10 + scale_dot + q_abs_sum * 2**-24
        magnitude = (zero_dot + ((1 << self.k_bits) - 1) * scale_dot) * (1 + 2**-20)
        return step_dot * (1 + 2**-20), magnitude

    def quantize_values(self, v: torch.Tensor) -> Codes:
        v = v.float()
        grouped = v.view(*v.shape[:-1], v.shape[-1] // VALUE_GROUP, VALUE_GROUP)  # [N, Hkv, bs, D / 16, 16]
        c = _affine(grouped, grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True), self.v_bits,
                    self.value_scale_dtype)
        return Codes(c.codes.flatten(-2), c.scale.squeeze(-1), c.zero.squeeze(-1))

    def dequantize_values(self, c: Codes) -> torch.Tensor:
        codes = unpack(c.codes, self.v_bits).float()
        grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // VALUE_GROUP, VALUE_GROUP)
        return grouped.mul_(c.scale.float().unsqueeze(-1)).add_(c.zero.unsqueeze(-1)).flatten(-2)

    def key_bytes(self, dim: int, block_size: int) -> float:
        """Tier-1 bytes per token per KV head for keys: codes plus per-block metadata spread over the block."""
        return dim * self.k_bits / 8 + dim * (self.key_scale_dtype.itemsize + META_DTYPE.itemsize) / block_size

    def value_bytes(self, dim: int) -> float:
        return dim * self.v_bits / 8 + dim / VALUE_GROUP * (self.value_scale_dtype.itemsize + META_DTYPE.itemsize)


class CompactMinMaxQuantizer(MinMaxQuantizer):
    """Min-max codes whose scales are float8 (e4m3), rounded up so that no code clips; zero points stay float16
    (their rounding shifts every code). 1 byte less per group: 4 bytes per token less for keys (64 channels, blocks
    of 16) and values (groups of 16), which buys a key bit at the same bytes. The annotations are measured against the
    rounded scales, as always."""

    name = "minmax-fp8"
    key_scale_dtype = value_scale_dtype = torch.float8_e4m3fn


def _check_bits(name: str, k_bits: int, v_bits: int) -> None:
    if k_bits not in KEY_BITS or v_bits not in VALUE_BITS:
        raise ValueError(f"quantizer {name}: k_bits must be one of {KEY_BITS}, v_bits one of {VALUE_BITS}")


ROTATION_SEED = 0x5EED


@functools.cache
def rotation_signs(dim: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The fixed random signs s [D] (float32, +-1) of the rotation, built once per device. D a power of two."""
    if dim < 2 or dim & (dim - 1):
        raise ValueError(f"hadamard quantizer: head_dim {dim} is not a power of two")
    signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(ROTATION_SEED)) * 2 - 1
    return signs.float().to(device)


def rotation(dim: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """R = H diag(s) / sqrt(D) [D, D] float32: the Walsh-Hadamard matrix (Sylvester's order) with the fixed signs,
    orthonormal. Rotated coordinates of x are x @ R.T (rotate); x = x_rotated @ R (unrotate)."""
    eye = torch.eye(dim, device=device)
    return unrotate(eye)


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dim (H: Sylvester's Hadamard matrix, entries +-1) by butterflies. Elementwise additions in a
    fixed order, no matmul: the same bits for any batch shape, device or BLAS, so that what the write path measured is
    what attention reads back."""
    dim, half = x.shape[-1], x.shape[-1] // 2
    while half:
        pairs = x.reshape(*x.shape[:-1], dim // (2 * half), 2, half)
        first, second = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack([first + second, first - second], dim=-2).reshape(*x.shape)
        half //= 2
    return x


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ R.T = (x * s) @ H / sqrt(D)."""
    dim = x.shape[-1]
    return walsh_hadamard(x * rotation_signs(dim, x.device)) * (1 / math.sqrt(dim))


def unrotate(y: torch.Tensor) -> torch.Tensor:
    """y @ R = (y @ H) * s / sqrt(D)."""
    dim = y.shape[-1]
    return walsh_hadamard(y) * (rotation_signs(dim, y.device) * (1 / math.sqrt(dim)))


@functools.cache
def lloyd_max(bits: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The 2**bits levels (ascending, float32, on `device`) minimising the mean squared error of N(0, 1): Lloyd's iteration on the
    density itself (centroid of [a, b] = (phi(a) - phi(b)) / (Phi(b) - Phi(a))), deterministic, computed once."""
    n = 1 << bits
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    levels = normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(2000):
        edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
        density = torch.exp(-edges.clamp(-40, 40) ** 2 / 2) / math.sqrt(2 * math.pi)
        new = (density[:-1] - density[1:]) / (normal.cdf(edges[1:]) - normal.cdf(edges[:-1]))
        if torch.allclose(new, levels, rtol=0, atol=1e-12):
            break
        levels = new
    return levels.float().to(device)


class HadamardQuantizer(LayerlessQuantizer):
    """TurboQuant-style: each token's key or value is rotated (rotation above), so that its coordinates are close to
    N(0, ||x||^2 / D) whatever its outlier channels, and each coordinate is coded with the Lloyd-Max levels of
    N(0, 1) scaled by sigma = ||x|| / sqrt(D); the one stored number per token is the least-squares scale of the
    chosen levels (float16). Dequantization rotates back: x^ = (scale * levels[codes]) @ R. Metadata: 2 bytes per
    token, where min-max groups of 16 spend 4 per group.

    For the certificate, keys have no per-channel grid in the original basis: Delta's channel form uses the unit
    step (kappa_b = max |e_jc|, so |q . e_j| <= kappa_b ||q||_1, Hoelder), and |k^_jc| <= ||k^_j|| <=
    |scale_j| max|level| sqrt(D) bounds the score magnitudes."""

    name = "hadamard"
    triton = False
    key_scale_dtype = value_scale_dtype = META_DTYPE

    def __init__(self, k_bits: int = 8, v_bits: int = 4):
        _check_bits(self.name, k_bits, v_bits)
        self.k_bits, self.v_bits = k_bits, v_bits
        self._key_peak = float(lloyd_max(k_bits).abs().max())  # the largest |level|

    def key_meta(self, block_size: int, dim: int):
        return (block_size, 1), (block_size, 0)

    def value_meta(self, dim: int) -> tuple[int, int]:
        return 1, 0

    @staticmethod
    def _encode(x: torch.Tensor, bits: int) -> Codes:
        levels = lloyd_max(bits, x.device)
        rotated = rotate(x.float())
        sigma = (rotated.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.bucketize(rotated / sigma, (levels[1:] + levels[:-1]) / 2)
        chosen = levels[codes]
        scale = (rotated * chosen).sum(dim=-1, keepdim=True) / (chosen * chosen).sum(dim=-1, keepdim=True)
        scale = scale.to(META_DTYPE)
        return Codes(pack(codes.to(torch.uint8), bits), scale, scale.new_zeros(*scale.shape[:-1], 0))

    @staticmethod
    def _decode(c: Codes, bits: int) -> torch.Tensor:
        levels = lloyd_max(bits, c.codes.device)
        rotated = levels[unpack(c.codes, bits).long()] * c.scale.float()
        return unrotate(rotated)

    def quantize_keys(self, k: torch.Tensor) -> Codes:
        return self._encode(k, self.k_bits)

    def dequantize_keys(self, c: Codes) -> torch.Tensor:
        return self._decode(c, self.k_bits)

    def quantize_values(self, v: torch.Tensor) -> Codes:
        return self._encode(v, self.v_bits)

    def dequantize_values(self, c: Codes) -> torch.Tensor:
        return self._decode(c, self.v_bits)

    def key_step(self, c: Codes, dim: int) -> torch.Tensor:
        return torch.ones(*c.scale.shape[:2], dim, device=c.scale.device)

    def key_contractions(self, q_abs, scale, zero) -> torch.Tensor:
        """[Bd, Hkv, G, nb, 2]: ||q||_1 and sqrt(D) max|level| max_j |scale_j| (>= max_j ||k^_j||, with room for the
        rounding of the rotation back)."""
        dim, nb = q_abs.shape[-1], scale.shape[1]
        largest = scale.float().abs().amax(dim=(-2, -1)).transpose(1, 2)  # [Bd, Hkv, nb]
        largest = largest * (self._key_peak * math.sqrt(dim) * (1 + 2**-10))
        l1 = q_abs.sum(dim=-1, keepdim=True).expand(*q_abs.shape[:-1], nb)
        return torch.stack([l1, largest[:, :, None].expand_as(l1)], dim=-1)

    def key_dots(self, l1, largest, q_abs_sum) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_c |q_c| step_c with the unit step, a bound of sum_c |q_c| |k^_jc| <= ||q||_1 max_c |k^_jc|)."""
        return l1 * (1 + 2**-20), l1 * largest * (1 + 2**-20)

    def key_bytes(self, dim: int, block_size: int) -> float:
        return dim * self.k_bits / 8 + META_DTYPE.itemsize

    def value_bytes(self, dim: int) -> float:
        return dim * self.v_bits / 8 + META_DTYPE.itemsize


class PairedQuantizer:
    """Keys coded by one quantizer, values by another (`--quantizer KEYS/VALUES`, e.g. minmax/hadamard)."""

    def __init__(self, keys: Quantizer, values: Quantizer):
        self.keys, self.values = keys, values
        self.name = f"{keys.name}/{values.name}"
        self.k_bits, self.v_bits = keys.k_bits, values.v_bits
        self.key_scale_dtype, self.value_scale_dtype = keys.key_scale_dtype, values.value_scale_dtype
        self.triton = False

    def for_layer(self, layer: int) -> PairedQuantizer:
        return PairedQuantizer(self.keys.for_layer(layer), self.values.for_layer(layer))

    def key_meta(self, block_size: int, dim: int):
        return self.keys.key_meta(block_size, dim)

    def key_width(self, dim: int) -> int:
        return self.keys.key_width(dim)

    def value_meta(self, dim: int) -> tuple[int, int]:
        return self.values.value_meta(dim)

    def quantize_keys(self, k):
        return self.keys.quantize_keys(k)

    def dequantize_keys(self, c):
        return self.keys.dequantize_keys(c)

    def quantize_values(self, v):
        return self.values.quantize_values(v)

    def dequantize_values(self, c):
        return self.values.dequantize_values(c)

    def key_step(self, c, dim):
        return self.keys.key_step(c, dim)

    def key_contractions(self, q_abs, scale, zero):
        return self.keys.key_contractions(q_abs, scale, zero)

    def key_dots(self, first, second, q_abs_sum):
        return self.keys.key_dots(first, second, q_abs_sum)

    def key_deltas(self, grouped, scale, zero, tables, eps, kappa, tau: float):
        return self.keys.key_deltas(grouped, scale, zero, tables, eps, kappa, tau)

    def key_bytes(self, dim: int, block_size: int) -> float:
        return self.keys.key_bytes(dim, block_size)

    def value_bytes(self, dim: int) -> float:
        return self.values.value_bytes(dim)


def make_quantizer(name: str, k_bits: int, v_bits: int, **headq) -> Quantizer:
    """`NAME` for keys and values, or `KEYS/VALUES` (each a name below); ValueError for unknown names or bits.
    `headq` keywords (rank, side_bits, basis) reach engine.kv.headq.HeadQQuantizer."""
    from engine.kv.headq import HeadQQuantizer  # it builds on the quantizers here

    kinds = {"minmax": MinMaxQuantizer, "minmax-fp8": CompactMinMaxQuantizer, "hadamard": HadamardQuantizer,
             "headq": lambda k_bits=8, v_bits=4: HeadQQuantizer(k_bits, v_bits, **headq)}
    names = name.split("/")
    if len(names) > 2 or any(n not in kinds for n in names):
        raise ValueError(f"unknown quantizer {name!r} (available: {', '.join(kinds)}, or KEYS/VALUES of them)")
    if len(names) == 1:
        return kinds[name](k_bits, v_bits)
    keys, values = (kinds[n] for n in names)  # each half built with the other half's default bits
    return PairedQuantizer(keys(k_bits=k_bits), values(v_bits=v_bits))
