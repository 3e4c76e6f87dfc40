"""Quantizers: packing, the min-max grid, error annotations measured against the stored (rounded) metadata."""

import math

import pytest
import torch

from engine.kv.quantizers import (HadamardQuantizer, MinMaxQuantizer, PairedQuantizer, bytes_per_token, error_norms,
                                  lloyd_max, make_quantizer, pack, rotation, scale_up_fp8, unpack)
from engine.kv.tiers import TieredKVCache
from kernels.reference import quantize_blocks


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8 and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("k_bits,v_bits", [(8, 4), (4, 4), (4, 2)])
def test_round_trip_error_is_half_a_step(k_bits, v_bits):
    torch.manual_seed(0)
    quant = MinMaxQuantizer(k_bits, v_bits)
    x = torch.randn(6, 3, 16, 64) * torch.linspace(0.1, 20, 64)  # channels with very different ranges
    keys = quant.quantize_keys(x)
    assert keys.scale.shape == (6, 3, 64) and keys.scale.dtype == torch.float16
    k_hat = quant.dequantize_keys(keys)
    step = keys.scale.float().unsqueeze(2)
    assert ((x - k_hat).abs() <= step / 2 * (1 + 1e-3) + 1e-3 * x.abs().amax()).all()
    values = quant.quantize_values(x)
    assert values.scale.shape == (6, 3, 16, 4)
    v_hat = quant.dequantize_values(values)
    vstep = values.scale.float().repeat_interleave(16, dim=-1)
    assert ((x - v_hat).abs() <= vstep / 2 * (1 + 1e-3) + 1e-3 * x.abs().amax()).all()


def test_annotations_bound_the_stored_error_exactly():
    """eps/eta are measured with the fp16-rounded metadata: they bound the error of what attention reads."""
    torch.manual_seed(1)
    quant = MinMaxQuantizer(4, 2)
    x = torch.randn(4, 2, 16, 64) * 3 + 3000.3  # fp16 spacing is 2 here: the zero point rounds by up to 1
    codes = quant.quantize_keys(x)
    k_hat = quant.dequantize_keys(codes)
    eps = error_norms(x, k_hat)
    actual = (x.double() - k_hat.double()).norm(dim=-1).amax(dim=-1)
    assert (eps.double() >= actual).all() and (eps.double() <= actual * (1 + 1e-5) + 1e-6).all()
    # an error bound assumed from the step size (half a step per element) would be unsound here
    half_step = codes.scale.double().unsqueeze(2) / 2
    assert ((x.double() - k_hat.double()).abs() > half_step * 1.01).any()


def test_constant_and_extreme_blocks():
    quant = MinMaxQuantizer(8, 4)
    const = torch.full((1, 1, 16, 64), 0.37)
    assert error_norms(const, quant.dequantize_keys(quant.quantize_keys(const))).item() < 1e-3
    huge = torch.full((1, 1, 16, 64), 1e6)  # beyond float16: the metadata overflows and the annotation says so
    eps = error_norms(huge, quant.dequantize_keys(quant.quantize_keys(huge)))
    assert not torch.isfinite(eps).all()


def test_bytes_per_token_meet_the_promise():
    fp16 = 2 * 64 * 2  # keys + values, bytes per token per KV head
    assert bytes_per_token(MinMaxQuantizer(8, 4), 64, 16) / fp16 <= 0.56 - 0.01
    assert bytes_per_token(MinMaxQuantizer(4, 4), 64, 16) / fp16 <= 0.40 - 0.01
    assert bytes_per_token(MinMaxQuantizer(4, 4), 128, 16) / (2 * 128 * 2) <= 0.40 - 0.01


def test_odd_widths_pack_tightly_and_even_ones_keep_the_kernel_layout():
    codes = torch.randint(0, 8, (2, 64), dtype=torch.uint8)
    assert pack(codes, 3).shape == (2, 24)
    nibbles = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(nibbles, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]  # code i of a byte at bit 4 i


# Max (1960), Table I: optimum levels and mean squared errors of N(0, 1)
LLOYD_MAX = {1: ([0.7979], 0.3634), 2: ([0.4528, 1.510], 0.1175), 3: ([0.2451, 0.7560, 1.344, 2.152], 0.03454),
             4: ([0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733], 0.009497)}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_levels_match_the_published_table(bits):
    levels = lloyd_max(bits)
    published, mse = LLOYD_MAX[bits]
    assert torch.allclose(levels[len(levels) // 2:], torch.tensor(published), atol=2e-3)
    assert torch.allclose(levels, -levels.flip(0), atol=1e-6)  # symmetric
    # mean squared error of N(0, 1) coded by these levels, by quadrature on a fine grid
    x = torch.linspace(-9, 9, 2_000_001, dtype=torch.float64)
    density = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    nearest = levels.double()[torch.bucketize(x, (levels.double()[1:] + levels.double()[:-1]) / 2)]
    assert abs(torch.trapezoid((x - nearest) ** 2 * density, x).item() - mse) < 2e-4 * (1 + 10 * mse)


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_lloyd_max_levels_are_centroids_of_their_cells(bits):
    levels = lloyd_max(bits).double()
    x = torch.linspace(-9, 9, 4_000_001, dtype=torch.float64)
    density = torch.exp(-x * x / 2)
    cell = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
    mass = torch.zeros_like(levels).index_add_(0, cell, density)
    centroid = torch.zeros_like(levels).index_add_(0, cell, density * x) / mass
    assert torch.allclose(centroid, levels, atol=5e-3)


def test_rotation_is_orthonormal_and_spreads_an_outlier():
    r = rotation(64).double()
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-6)
    spike = torch.zeros(64, dtype=torch.float64)
    spike[5] = 100.0
    assert torch.allclose((spike @ r.T).abs(), torch.full((64,), 100 / 8, dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        rotation(48)


def test_hadamard_dequantization_reads_back_the_same_bits_in_any_batch():
    """The rotation is butterflies (no matmul): dequantizing blocks one by one, all at once or gathered in another
    order gives the same bits, so eta measured at write time is what attention reads (a BLAS or cuBLAS matmul may
    pick another summation order for another shape)."""
    quant = make_quantizer("hadamard", 4, 2)
    generator = torch.Generator().manual_seed(9)
    keys, values = (torch.randn(7, 3, 16, 128, generator=generator) for _ in range(2))
    for encode, decode, x in ((quant.quantize_keys, quant.dequantize_keys, keys),
                              (quant.quantize_values, quant.dequantize_values, values)):
        codes = encode(x)
        together = decode(codes)
        alone = torch.cat([decode(type(codes)(codes.codes[i:i + 1], codes.scale[i:i + 1], codes.zero[i:i + 1]))
                           for i in range(7)])
        order = torch.tensor([[6, 0, 3], [2, 2, 5]])
        gathered = decode(type(codes)(codes.codes[order], codes.scale[order], codes.zero[order]))
        assert torch.equal(together, alone) and torch.equal(gathered, together[order])


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_hadamard_error_follows_the_codebook(bits):
    """Per token ||x - x^|| / ||x|| is about sqrt(MSE of the codebook), outlier channels or not."""
    torch.manual_seed(bits)
    quant = HadamardQuantizer(max(bits, 4), min(bits, 4))
    x = torch.randn(8, 2, 16, 64)
    x[..., 7] *= 25  # an outlier channel: min-max groups of 16 channels would spend their range on it
    codes = quant.quantize_keys(x) if bits > 4 else quant.quantize_values(x)
    assert codes.codes.shape[-1] == 64 * bits // 8 and codes.scale.shape == (8, 2, 16, 1) and codes.zero.numel() == 0
    decoded = quant.dequantize_keys(codes) if bits > 4 else quant.dequantize_values(codes)
    relative = (x - decoded).norm(dim=-1) / x.norm(dim=-1)
    mse = ((torch.randn(200_000)[:, None] - lloyd_max(bits)).abs().amin(dim=-1) ** 2).mean()
    assert 0.6 * mse.sqrt() < relative.median() < 1.25 * mse.sqrt(), (relative.median(), mse.sqrt())


@pytest.mark.parametrize("name", ["hadamard", "minmax/hadamard", "hadamard/minmax", "minmax-fp8", "minmax-fp8/hadamard"])
def test_annotations_bound_the_errors_of_every_quantizer(name):
    torch.manual_seed(3)
    quant = make_quantizer(name, 5, 2)
    keys, values = torch.randn(3, 2, 16, 64) * 2 + 40.3, torch.randn(3, 2, 16, 64)
    written = quantize_blocks(keys, values, quant)
    k_hat, v_hat = quant.dequantize_keys(written.keys), quant.dequantize_values(written.values)
    key_error = (keys.double() - k_hat.double())
    eps, kappa = written.block_notes.unbind(-1)
    assert (key_error.norm(dim=-1).amax(dim=-1) <= eps.double()).all()
    step = quant.key_step(written.keys, 64).double()  # kappa_b in units of the quantizer's step
    assert (key_error.abs().amax(dim=2) <= kappa.double()[..., None] * step).all()
    eta, norm = written.token_notes.double().unbind(-1)
    assert ((values.double() - v_hat.double()).norm(dim=-1) <= eta).all()
    assert (v_hat.double().norm(dim=-1) <= norm).all()


def test_make_quantizer_pairs_and_refuses():
    paired = make_quantizer("minmax/hadamard", 5, 2)
    assert isinstance(paired, PairedQuantizer) and paired.name == "minmax/hadamard" and not paired.triton
    assert paired.key_meta(16, 64) == ((64,), (64,)) and paired.value_meta(64) == (1, 0)
    assert make_quantizer("minmax", 8, 4).triton and not make_quantizer("minmax", 5, 4).triton
    for name, bits in (("lattice", (8, 4)), ("minmax/hadamard/minmax", (8, 4)), ("minmax", (3, 4)),
                       ("hadamard", (8, 1)), ("minmax/hadamard", (7, 2))):
        with pytest.raises(ValueError):
            make_quantizer(name, *bits)


def test_k4_v2_sized_caches_within_the_byte_budget():
    """Tier-1 bytes per token (codes, metadata, annotations) against an FP16 dense cache: min-max K4/V2 spends 0.33,
    Hadamard values bring a K4/V2 cache under 0.30 and leave room for a fifth key bit at min-max K4/V2's bytes."""
    fp16 = 2 * 64 * 2

    def share(name, k, v):
        return TieredKVCache.tier1_bytes(make_quantizer(name, k, v), 64, 16) / fp16

    assert share("minmax/hadamard", 4, 2) <= 0.30 < share("minmax", 4, 2) < 0.34
    assert share("minmax/hadamard", 5, 2) < share("minmax", 4, 2)
    assert share("hadamard", 6, 2) <= 0.30
    assert share("minmax-fp8/hadamard", 5, 2) <= 0.30  # float8 key scales pay for the fifth key bit
    assert share("minmax-fp8/hadamard", 6, 2) <= share("minmax", 4, 2) == share("minmax-fp8", 5, 2)


def test_fp8_scales_round_up_to_the_next_representable():
    s = torch.cat([torch.rand(50_000) * 20, torch.rand(50_000) * 0.03, torch.exp2(torch.arange(-9.0, 8.0)),
                   torch.exp2(torch.arange(-9.0, 8.0)) * (1 + 2**-20), torch.zeros(1)])
    up = scale_up_fp8(s)
    assert up.dtype == torch.float8_e4m3fn and (up.float() >= s).all()
    normal = s >= 2**-6
    assert (up.float()[normal] <= s[normal] * (1 + 2**-3)).all()  # one e4m3 spacing at most
    assert (up.float() > 0).all()  # a constant channel still gets a positive step
    assert (scale_up_fp8(torch.tensor([1e4])).float() == 384).all()  # saturates: codes clip, annotations measure it
