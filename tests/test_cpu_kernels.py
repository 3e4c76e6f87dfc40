"""The compiled CPU path (kernels/cpu.py) against the PyTorch twin that defines it, on the Triton tests' awkward shapes:
every DecodeResult field, and the bound and limit that escalation.check computes from the twin's result."""

import pytest
import torch

from engine.kv.escalation import check
from kernels import cpu, reference
from tests.test_kernels import BS, assert_close, random_layer

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
FIELDS = ("out", "rho", "val_contrib", "block_delta", "e_val", "delta_t", "alpha_t", "w_tail", "rms_low",
          "score_error", "value_scale")


def compare_compiled(lengths, kv_heads=2, groups=3, dim=64, bits=(8, 4), promoted=0, seed=0, start=None,
                     tolerance=0.2):
    layer, view, quantizer = random_layer(lengths, kv_heads, dim, bits, promoted=promoted, seed=seed,
                                          start=start)
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), kv_heads * groups, dim, generator=generator) * 2
    radius = torch.rand(len(lengths) + 1, kv_heads, generator=generator) * 4 + 2
    tol = torch.full((len(lengths),), tolerance)
    scale = dim ** -0.5
    got = cpu.certified_decode(q, layer, view, scale, quantizer, radius, tol)
    want = reference.certified_decode(q, layer, view, scale, quantizer)
    what = f"L={lengths} D={dim} G={groups} bits={bits}"
    for name in FIELDS:
        assert_close(getattr(got, name), getattr(want, name), 1e-4, 1e-5, f"{what}: {name}")
    # square roots of differences that cancel (W', and W_b' where a block holds one value): float64 against float32
    assert_close(got.w_all, want.w_all, 1e-3, 1e-3, f"{what}: w_all")
    assert_close(got.dev_contrib, want.dev_contrib, 1e-2, 1e-3, f"{what}: dev_contrib")
    assert torch.equal(got.broken, want.broken)
    bound, limit = check(want, radius[view.slots], tol[:, None, None])
    assert_close(got.bound, bound, 1e-4, 1e-6, f"{what}: bound")
    assert_close(got.limit, limit, 1e-4, 1e-6, f"{what}: limit")
    assert torch.equal(got.mass, want.rho[..., :-1].amax(dim=2).transpose(1, 2)) or torch.allclose(
        got.mass, want.rho[..., :-1].amax(dim=2).transpose(1, 2), rtol=1e-4, atol=1e-6)
    return got, want


@pytest.mark.parametrize("length", [1, 15, 16, 17, 300])
@pytest.mark.parametrize("dim", [64, 128])
def test_compiled_lengths_and_head_dims(length, dim):
    compare_compiled([length], dim=dim, seed=length)


@pytest.mark.parametrize("groups", [1, 3, 4, 8])
@pytest.mark.parametrize("bits", [(8, 4), (4, 4), (4, 2), (8, 2)])
def test_compiled_gqa_ratios_and_bit_widths(groups, bits):
    compare_compiled([40, 17], groups=groups, bits=bits, promoted=3, seed=groups)


def test_compiled_mixed_batch_promoted_blocks_and_windows():
    compare_compiled([300, 1, 16, 47, 33], kv_heads=3, promoted=8, seed=11)
    compare_compiled([40, 300, 37, 17], promoted=3, seed=4, start=[5, 16, 34, 0])


def test_compiled_flags_tally_and_scratch():
    """The layer's flags agree with the limits, a layer with nothing to escalate is counted as Ladder.account would
    count it, and the scratch's scores decay and rise to the attended blocks' masses."""
    lengths = [70, 33]
    layer, view, quantizer = random_layer(lengths, 2, 64, (8, 4), promoted=4, seed=2)
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2))
    radius = torch.full((3, 2), 3.0)
    scores = {"k": torch.rand(8), "v": torch.rand(8)}
    expected = {kind: x.clone() for kind, x in scores.items()}
    for tolerance in (1e-6, 10.0):  # everything escalates; nothing does
        tally = type("Tally", (), {})()
        tally.evaluations, tally.rungs = torch.zeros(2, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64)
        tally.max_bound, tally.max_ratio, tally.tail_mass = torch.zeros(2), torch.zeros(2), torch.zeros(2)
        decoded = cpu.decode_layer(q, layer, view, 0.125, quantizer, radius, torch.full((2,), tolerance),
                                   torch.ones(2, dtype=torch.bool), 0.1, tally, scores, 0.9)
        result = decoded.result()
        reference.touch_scratch(expected["k"], expected["v"], layer.slots, view.block_tables, view.num_full,
                                result.block_mass(), 0.9)
        assert decoded.escalate == (not bool((result.bound <= result.limit).all()))
        assert decoded.counted == (not decoded.escalate)
        if decoded.counted:
            assert tally.evaluations.tolist() == [6, 6] and tally.rungs[:, 0].tolist() == [6, 6]
            assert torch.allclose(tally.max_bound, result.bound.amax(dim=(1, 2)))
            assert torch.allclose(tally.tail_mass, result.alpha_t.sum(dim=(1, 2)))
        else:
            assert tally.evaluations.sum() == 0
    assert torch.allclose(scores["k"], expected["k"]) and torch.allclose(scores["v"], expected["v"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_query_escalates_instead_of_failing_the_step(bad):
    """A non-finite query (a model gone wrong for one sequence) leaves every weight undefined: the compiled call must
    not raise (it divided by a zero sum), and that row's heads must not be accepted, so the ladder recomputes them
    exactly, as the twin's non-finite bound makes it do; the other row is decoded as usual."""
    lengths = [40, 33]
    layer, view, quantizer = random_layer(lengths, 2, 64, (8, 4), promoted=0, seed=5)
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    q[0, 1, 3] = bad
    decoded = cpu.decode_layer(q, layer, view, 64 ** -0.5, quantizer, torch.full((3, 2), 3.0), torch.full((2,), 0.2))
    assert decoded.escalate
    result = decoded.result()
    assert not result.bound[0, 0, 1] <= result.limit[0, 0, 1]  # [row, KV head, query head of its group]
    assert (result.bound[1] <= result.limit[1]).all() and torch.isfinite(result.out[1]).all()


@pytest.mark.parametrize("field", ["k_scale", "k_zero"])
def test_nan_key_metadata_of_a_promoted_block_is_refused_as_by_the_twin(field):
    """A promoted block's keys are read exact, but its scale and zero still bound the score error: NaN there makes
    the score error infinite (no head of that sequence and KV head accepted) on the compiled path as in the twin."""
    layer, view, quantizer = random_layer([70, 40], 2, 64, (8, 4), promoted=0, seed=7)
    block = int(view.block_tables[0, 1])
    layer.slots[block, 0, 0] = 0  # the block's keys of KV head 0 are held exact in scratch slot 0
    getattr(layer, field)[block, 0, 3] = float("nan")
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(7))
    radius, tol = torch.full((3, 2), 3.0), torch.full((2,), 0.5)
    got = cpu.certified_decode(q, layer, view, 64 ** -0.5, quantizer, radius, tol)
    want = reference.certified_decode(q, layer, view, 64 ** -0.5, quantizer)
    bound, limit = check(want, radius[view.slots], tol[:, None, None])
    assert not (bound[0, 0] <= limit[0, 0]).any() and not (got.bound[0, 0] <= got.limit[0, 0]).any()
    assert torch.equal(got.bound[1] <= got.limit[1], bound[1] <= limit[1])  # the other row as usual
