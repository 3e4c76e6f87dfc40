"""Quantizers: packing, the min-max grid, error annotations measured against the stored (rounded) metadata."""

import pytest
import torch

from engine.kv.quantizers import MinMaxQuantizer, error_norms, pack, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
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
    assert MinMaxQuantizer(8, 4).bytes_per_token(64, 16) / fp16 <= 0.56 - 0.01
    assert MinMaxQuantizer(4, 4).bytes_per_token(64, 16) / fp16 <= 0.40 - 0.01
    assert MinMaxQuantizer(4, 4).bytes_per_token(128, 16) / (2 * 128 * 2) <= 0.40 - 0.01
