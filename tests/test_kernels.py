"""Triton kernels against their PyTorch twins (kernels/reference.py): quantize-on-write, certified paged decode
attention, the scatter of promoted blocks into the scratch.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): the shapes stay
small there; on a GPU the long contexts run too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent

from engine.kv.quantizers import Codes, MinMaxQuantizer, unpack  # noqa: E402
from kernels import certificate as cert  # noqa: E402
from engine.kv.escalation import check  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.certificate import tensor_core_terms  # noqa: E402
from kernels.certified_decode import TILE_TOKENS, decode_accumulators  # noqa: E402
from kernels.certified_finish import decode_layer  # noqa: E402
from kernels.quantize import quantize_blocks  # noqa: E402
from kernels.scatter import scatter_blocks  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
BS = 16
BITS = [(8, 4), (4, 4), (4, 2)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """Equal non-finite pattern; finite entries within atol + rtol |expected|; reports the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), f"{what}: non-finite entries differ"
    excess = torch.where(finite, (actual - expected).abs() - (atol + rtol * expected.abs()), -1.0)
    worst = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), excess.shape))
    assert excess.flatten()[worst] <= 0, (f"{what}: worst element {index}: {actual[index].item()} vs "
                                          f"{expected[index].item()}")


# ---- quantize-on-write ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_its_twin_and_its_annotations_bound_its_own_codes(dim, bits):
    torch.manual_seed(dim + bits[0] * 10 + bits[1])
    quantizer = MinMaxQuantizer(*bits)
    keys = torch.randn(5, 3, BS, dim, device=DEVICE) * torch.rand(1, 3, 1, dim, device=DEVICE) * 4
    values = torch.randn(5, 3, BS, dim, device=DEVICE)
    keys[1, 2, :, 7] = 0.25  # a constant channel
    got, want = quantize_blocks(keys, values, quantizer), reference.quantize_blocks(keys, values, quantizer)
    for part in ("keys", "values"):
        a, b = getattr(got, part), getattr(want, part)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), f"{part}: metadata differs"
        width = bits[0] if part == "keys" else bits[1]
        differ = (unpack(a.codes, width).int() - unpack(b.codes, width).int()).abs()
        assert int(differ.max()) <= 1 and float((differ > 0).float().mean()) < 0.01, f"{part}: codes differ"
    assert_close(got.block_notes, want.block_notes, 1e-5, 1e-7, "eps, kappa")
    assert_close(got.token_notes.float(), want.token_notes.float(), 2e-3, 1e-6, "eta, |v^|")
    # the kernel's annotations hold for the kernel's own codes, read through the twin's dequantization
    k_hat, v_hat = quantizer.dequantize_keys(got.keys), quantizer.dequantize_values(got.values)
    error = keys - k_hat
    assert bool((error.norm(dim=-1).amax(dim=-1) <= got.block_notes[..., 0]).all())
    step = quantizer.key_grid(got.keys.scale, got.keys.zero)[0]
    assert bool(((error.abs() / step[:, :, None]).amax(dim=(2, 3)) <= got.block_notes[..., 1]).all())
    assert bool(((values - v_hat).norm(dim=-1) <= got.token_notes[..., 0].float()).all())
    assert bool((v_hat.norm(dim=-1) <= got.token_notes[..., 1].float()).all())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy meets the NaN
def test_quantize_marks_non_finite_input_as_broken():
    keys, values = torch.randn(2, 1, BS, 64, device=DEVICE), torch.randn(2, 1, BS, 64, device=DEVICE)
    keys[1, 0, 3, 5], values[0, 0, 2, 9] = float("nan"), float("inf")
    got = quantize_blocks(keys, values, MinMaxQuantizer(8, 4))
    assert torch.isfinite(got.block_notes[0, 0, 0]) and not torch.isfinite(got.block_notes[1, 0, 0])
    assert not torch.isfinite(got.token_notes[0, 0, 2, 0]) and bool(torch.isfinite(got.token_notes[1]).all())


def test_quantize_refuses_what_it_cannot_do():
    quantizer = MinMaxQuantizer(8, 4)
    with pytest.raises(ValueError, match="same"):
        quantize_blocks(torch.zeros(1, 1, BS, 64), torch.zeros(1, 1, BS, 32), quantizer)
    with pytest.raises(ValueError, match="powers of two"):
        quantize_blocks(torch.zeros(1, 1, BS, 48), torch.zeros(1, 1, BS, 48), quantizer)


# ---- certified decode -------------------------------------------------------------------------------------------
def random_layer(lengths, kv_heads, dim, bits, promoted, seed, scratch=8, start=None, bs=BS):
    """A QuantizedLayer holding len(lengths) sequences (distinct blocks each), `promoted` of the full (block, head)
    pieces also exact in the scratch, and the DecodeView of all of them (`start`: each sequence's first attended
    token, a sliding window's)."""
    generator = torch.Generator().manual_seed(seed)
    quantizer = MinMaxQuantizer(*bits)
    fulls = [n // bs for n in lengths]
    num_blocks = sum(fulls) + 1
    keys = torch.randn(num_blocks, kv_heads, bs, dim, generator=generator) * 2
    values = torch.randn(num_blocks, kv_heads, bs, dim, generator=generator)
    written = reference.quantize_blocks(keys, values, quantizer)
    slots = torch.full((num_blocks, kv_heads, 2), -1, dtype=torch.int32)
    pieces = torch.randperm(num_blocks * kv_heads * 2, generator=generator)[:min(promoted, scratch)]
    slots.view(-1)[pieces] = torch.arange(len(pieces), dtype=torch.int32)
    nb = max(max(fulls), 1)
    tables = torch.zeros(len(lengths), nb, dtype=torch.int64)
    first = 1
    for i, n in enumerate(fulls):
        tables[i, :n] = torch.arange(first, first + n)
        first += n
    tail = torch.randn(len(lengths) + 1, bs, kv_heads, dim, generator=generator)
    scratch_v = torch.randn(scratch, bs, dim, generator=generator)
    layer = reference.QuantizedLayer(
        written.keys.codes, written.keys.scale, written.keys.zero, written.values.codes, written.values.scale,
        written.values.zero, written.block_notes, written.token_notes, slots, tail, tail.flip(0).contiguous(),
        torch.randn(scratch, bs, dim, generator=generator), scratch_v, scratch_v.norm(dim=-1))
    lengths = torch.tensor(lengths)
    view = reference.make_view(tables, lengths // bs, lengths % bs, torch.arange(len(lengths)) + 1, bs,
                               torch.ones(len(lengths), dtype=torch.bool), None if start is None else torch.tensor(start))
    move = lambda x: x.to(DEVICE)  # noqa: E731
    return (reference.QuantizedLayer(*map(move, (getattr(layer, n) for n in layer.__slots__))),
            reference.DecodeView(*map(move, (getattr(view, n) for n in view.__slots__))), quantizer)


def compare(q, layer, view, quantizer, what):
    scale = q.shape[-1] ** -0.5
    got = decode_accumulators(q, layer, view, scale, quantizer)
    want = reference.decode_accumulators(q, layer, view, scale, quantizer)
    for name in got.__slots__:
        if name not in ("out_dots", "extra_terms"):  # out_dots: the twin's alone (it knows O in its one pass)
            assert_close(getattr(got, name), getattr(want, name), 1e-4, 1e-5, f"{what}: {name}")
    # the kernel's tensor-core dots widen the certificate's rounding terms; the twin computes in IEEE float32
    assert got.extra_terms == tensor_core_terms(q.shape[-1], TILE_TOKENS) and want.extra_terms == 0
    # the same certificate from the same accumulators
    want = dataclasses.replace(want, extra_terms=got.extra_terms,
                               out_dots=want.out_dots if got.out_dots is not None else None)
    finished = [reference.finish_decode(acc, q, layer, view, scale, quantizer) for acc in (got, want)]
    for name in ("out", "rho", "e_val", "alpha_t", "delta_t", "w_tail", "rms_low", "score_error"):
        assert_close(getattr(finished[0], name), getattr(finished[1], name), 1e-4, 1e-5, f"{what}: {name}")
    assert_close(finished[0].w_all, finished[1].w_all, 1e-3, 1e-3, f"{what}: w_all")  # a square root of a difference
    return got


LONG = [2049] if GPU else [1000]


@pytest.mark.parametrize("length", [1, 15, 16, 17, 300, *LONG])
@pytest.mark.parametrize("dim", [64, 128])
def test_decode_lengths_and_head_dims(length, dim):
    layer, view, quantizer = random_layer([length], 2, dim, (8, 4), promoted=3, seed=length + dim)
    compare(torch.randn(1, 2 * 3, dim, device=DEVICE), layer, view, quantizer, f"L={length} D={dim}")


@pytest.mark.parametrize("bs", [8, 32])
def test_decode_other_block_sizes(bs):
    """Tiles of 64 tokens are 8 blocks of 8 or 2 of 32; the partial block of 8 tokens is padded to a dot's 16 rows."""
    for lengths in ([5], [8 * bs + 3, 3 * bs, 40 * bs + bs - 1]):
        layer, view, quantizer = random_layer(lengths, 2, 64, (8, 4), promoted=5, seed=bs + len(lengths), bs=bs)
        compare(torch.randn(len(lengths), 6, 64, device=DEVICE), layer, view, quantizer, f"bs={bs} L={lengths}")


def test_decode_rounding_stays_within_the_certificates_rounding_term():
    """The kernel's O against O computed in float64 from the same dequantized keys and values (the quantization error
    is not in this comparison, only the arithmetic): within output_rounding, for adversarial inputs: a query with a
    large dynamic range, values sharing a large common part (cancellation in O - mean). On a GPU this is the tensor
    cores' arithmetic; in the interpreter numpy's float32."""
    scale = 128 ** -0.5
    for length in (700, 33):
        layer, view, quantizer = random_layer([length], 2, 128, (8, 4), promoted=0, seed=length)
        q = (torch.randn(1, 8, 128) * torch.logspace(-2, 0.5, 128)).to(DEVICE)  # channels from 1e-2 to 3
        layer.tail_v.add_(1000.0)  # a large common part in the partial block's values
        acc = decode_accumulators(q, layer, view, scale, quantizer)
        result = reference.finish_decode(acc, q, layer, view, scale, quantizer)
        tables = view.block_tables[0, :length // BS]
        read = [quantizer.dequantize_keys(Codes(*(x[tables] for x in (layer.k_codes, layer.k_scale, layer.k_zero)))),
                quantizer.dequantize_values(Codes(*(x[tables] for x in (layer.v_codes, layer.v_scale, layer.v_zero))))]
        keys, values = (torch.cat([x.transpose(1, 2).flatten(0, 1), tail[view.slots[0]]])[None]
                        for x, tail in zip(read, (layer.tail_k, layer.tail_v)))  # [1, L, Hkv, D], as attention reads
        exact, _ = reference.reference_decode(q, keys, values, torch.tensor([length], device=DEVICE), scale)
        rounding = cert.output_rounding(result.score_error, result.value_scale, result.length, 128).flatten()
        error = (acc.out.flatten(0, 2).double() - exact[0]).norm(dim=-1)
        assert bool((error <= rounding).all()), f"L={length}: {(error / rounding).max().item():.3g} x the term"


@pytest.mark.parametrize("groups", [1, 3, 4, 8])
@pytest.mark.parametrize("bits", BITS)
def test_decode_gqa_ratios_and_bit_widths(groups, bits):
    layer, view, quantizer = random_layer([40], 2, 64, bits, promoted=4, seed=groups * 7 + bits[1])
    compare(torch.randn(1, 2 * groups, 64, device=DEVICE), layer, view, quantizer, f"G={groups} bits={bits}")


def test_decode_sliding_window_masks_tokens_before_its_start():
    """A window's first token inside a full block, at a block boundary, inside the partial block, and none."""
    lengths, start = [40, 300, 37, 17], [5, 16, 34, 0]
    q = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    layer, view, quantizer = random_layer(lengths, 2, 64, (8, 4), promoted=3, seed=4, start=start)
    got = compare(q, layer, view, quantizer, "window")
    sums = got.block_sums[..., 0].cpu()  # [Bd, Hkv, G, nb + 1]
    assert sums[0, :, :, 0].gt(0).all() and sums[2, :, :, :2].eq(0).all()  # block 0 of sequence 2 lies before 34
    assert view.valid.sum(dim=1).tolist() == [n - s for n, s in zip(lengths, start)]


def test_decode_mixed_batch_equals_each_sequence_alone():
    lengths = [1, 33, 16, 300, 47]
    layer, view, quantizer = random_layer(lengths, 2, 64, (8, 4), promoted=6, seed=5)
    q = torch.randn(len(lengths), 8, 64, device=DEVICE)
    together = compare(q, layer, view, quantizer, "mixed batch")
    for i, length in enumerate(lengths):
        nb = max(length // BS, 1)
        alone = decode_accumulators(q[i:i + 1], layer, view.select(torch.tensor([i], device=DEVICE)), 0.125, quantizer)
        assert_close(alone.out, together.out[i:i + 1], 1e-5, 1e-6, f"sequence {i}: out")
        assert_close(alone.block_sums[..., :nb, :], together.block_sums[i:i + 1, ..., :nb, :], 1e-5, 1e-6,
                     f"sequence {i}: block sums")


def test_decode_without_the_certificate_computes_the_same_output():
    """certify=False (the benchmark's measure of the certificate's cost) leaves the accumulators empty, O unchanged."""
    layer, view, quantizer = random_layer([300, 47], 2, 64, (8, 4), promoted=4, seed=9)
    q = torch.randn(2, 8, 64, device=DEVICE)
    full = decode_accumulators(q, layer, view, 0.125, quantizer)
    plain = decode_accumulators(q, layer, view, 0.125, quantizer, launch={"num_warps": 2, "num_stages": 1},
                                certify=False)
    assert torch.equal(plain.out, full.out)
    assert bool((plain.block_sums == 0).all()) and bool((full.block_sums[..., 0] > 0).any())


def test_decode_reads_promoted_blocks_from_the_scratch():
    """With every piece promoted, the keys and values attention reads are the scratch's: the output changes when
    the scratch changes and the quantized codes do not matter; the value annotations report exact values."""
    layer, view, quantizer = random_layer([64], 1, 64, (4, 2), promoted=8, seed=3)
    q = torch.randn(1, 4, 64, device=DEVICE)
    before = compare(q, layer, view, quantizer, "promoted")
    layer.scratch_v.mul_(2.0)
    layer.scratch_norms.mul_(2.0)
    after = compare(q, layer, view, quantizer, "promoted, scratch changed")
    promoted_values = (layer.slots[view.block_tables[0, :4], 0, 1] >= 0).cpu()
    assert bool(promoted_values.any())
    assert not torch.allclose(before.out, after.out)
    assert bool((after.block_sums[0, 0, :, :4][:, promoted_values, 1] == 0).all())  # eta = 0 where values are exact


def test_twin_stays_ieee_when_the_process_allows_faster_float32_matmuls():
    """An embedding process may allow TF32 (CUDA) or bfloat16 passes (CPUs with AVX512-BF16) for float32 matmuls;
    the certificate's rounding terms assume IEEE float32, so the twin computes the same bits either way."""
    layer, view, quantizer = random_layer([300, 70], 2, 64, (8, 4), promoted=3, seed=8)
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    ieee = reference.certified_decode(q, layer, view, 0.125, quantizer)
    torch.set_float32_matmul_precision("medium")
    try:
        fast = reference.certified_decode(q, layer, view, 0.125, quantizer)
        assert torch.get_float32_matmul_precision() == "medium"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision("highest")
    for name in ("out", "rho", "e_val", "w_all", "rms_low"):
        assert torch.equal(getattr(fast, name), getattr(ieee, name)), name


def test_decode_launcher_refuses_bad_inputs():
    layer, view, quantizer = random_layer([40], 2, 64, (8, 4), promoted=0, seed=1)
    q = torch.randn(1, 6, 64, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        decode_accumulators(torch.randn(1, 64, 6, device=DEVICE).transpose(1, 2), layer, view, 0.125, quantizer)
    with pytest.raises(ValueError, match="heads"):
        decode_accumulators(torch.randn(1, 5, 64, device=DEVICE), layer, view, 0.125, quantizer)
    other = type("Other", (), {"name": "hadamard", "k_bits": 8, "v_bits": 4})()
    with pytest.raises(ValueError, match="hadamard"):
        decode_accumulators(q, layer, view, 0.125, other)


def test_decode_kernel_compiles_for_hopper_and_ampere():
    """The interpreter runs the kernel as Python and checks none of the compiler's rules (a variable that changes
    shape inside a branch, tl.dot's shapes, shared memory): compile it to a cubin for sm_90 and sm_80 without a GPU
    (a process without TRITON_INTERPRET), at the engine's shapes (head dim 128, K8/V4, float16 tier 1)."""
    cases = [(90, 16, 4, True), (90, 8, 4, True), (90, 32, 32, True), (90, 16, 4, False), (80, 16, 8, True)]
    for (arch, *_), used in zip(cases, compiled("certified_decode", cases)):
        assert 0 < used <= (227 if arch == 90 else 163) * 1024


def compiled(module: str, cases: list[tuple]) -> list[int]:
    """kernels.<module>.compile_for(*case) for each case in a process without TRITON_INTERPRET: shared memory."""
    script = (f"import json; from kernels.{module} import compile_for; "
              f"print(json.dumps([compile_for(*case) for case in {cases!r}]))")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


# ---- the certificate's finish ------------------------------------------------------------------------------------
def finish_against_twin(q, layer, view, quantizer, tolerance, certifying=None, margin=0.5, what=""):
    """The finish kernel against its twin (finish_decode on the merged accumulators, then escalation.check): every
    term, the bound and the limit, the same decision for every head not within 1e-4 of its limit, the same flags,
    the scratch's masses, and O served in the query's dtype."""
    scale = q.shape[-1] ** -0.5
    radius = torch.rand(int(view.slots.max()) + 1, layer.tail_k.shape[2], generator=torch.Generator().manual_seed(1))
    radius = (radius * 4 + 1).to(DEVICE)
    done = decode_layer(q, layer, view, scale, quantizer, radius, tolerance, certifying, margin)
    acc = decode_accumulators(q, layer, view, scale, quantizer)
    twin = reference.finish_decode(acc, q, layer, view, scale, quantizer)
    bound, limit = check(twin, radius[view.slots], tolerance[:, None, None])
    got = done.result
    for name in ("out", "rho", "val_contrib", "dev_contrib", "block_delta", "e_val", "delta_t", "alpha_t", "w_tail",
                 "rms_low", "score_error", "value_scale"):
        assert_close(getattr(got, name), getattr(twin, name), 1e-4, 1e-6, f"{what}: {name}")
    assert_close(got.w_all, twin.w_all, 1e-3, 1e-3, f"{what}: w_all")  # a square root of a difference
    assert_close(got.cast, twin.cast, 1e-3, 1e-7, f"{what}: cast")
    assert torch.equal(got.broken, twin.broken), what
    assert got.length == twin.length
    huge = 1e37  # the twin's nan_to_num turns an infinite form into float32's largest number
    assert_close(got.bound.clamp(max=huge), bound.clamp(max=huge), 1e-4, 1e-7, f"{what}: bound")
    assert_close(got.limit, limit, 1e-4, 1e-7, f"{what}: limit")
    clear = ((bound / limit.clamp_min(1e-30) - 1).abs() > 1e-4) | ~torch.isfinite(bound)
    assert torch.equal((got.bound <= got.limit)[clear], (bound <= limit)[clear]), f"{what}: decisions"
    rows = torch.ones(q.shape[0], dtype=torch.bool, device=DEVICE) if certifying is None else certifying
    over = rows[:, None] & (~(bound <= limit).all(dim=-1) | twin.broken)
    near = rows[:, None, None] & (bound / limit.clamp_min(1e-30) > margin)
    assert (done.escalate, done.near) == (bool(over.any()), bool(near.any())), what
    assert_close(got.mass, twin.block_mass(), 1e-5, 1e-7, f"{what}: masses")
    assert done.served.dtype == q.dtype
    assert_close(done.served.float(), acc.out.flatten(1, 2).to(q.dtype).float(), 1e-3, 1e-5, f"{what}: served")
    return done, bound, limit


@pytest.mark.parametrize("lengths", [[1], [15, 16, 17], [300, 47, 1], [1100]])  # 1100: 68 blocks, two chunks
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_finish_matches_its_twin_on_awkward_shapes(lengths, groups):
    layer, view, quantizer = random_layer(lengths, 2, 64, (8, 4), promoted=4, seed=len(lengths) + groups)
    q = torch.randn(len(lengths), 2 * groups, 64, generator=torch.Generator().manual_seed(groups)).to(DEVICE)
    tolerance = torch.tensor([0.02, 0.1, 0.3][:len(lengths)] * (1 + len(lengths) // 3), device=DEVICE)[:len(lengths)]
    finish_against_twin(q, layer, view, quantizer, tolerance, what=f"L={lengths} G={groups}")


def test_finish_serves_the_query_dtype_with_its_rounding_in_the_bound():
    layer, view, quantizer = random_layer([300, 40], 2, 64, (8, 4), promoted=3, seed=12)
    q = torch.randn(2, 8, 64, device=DEVICE).half()
    done, _, _ = finish_against_twin(q, layer, view, quantizer, torch.tensor([0.1, 0.1], device=DEVICE), what="fp16")
    assert done.served.dtype == torch.float16 and bool((done.result.cast > 0).all())


def test_finish_windows_bits_and_decisions_on_both_sides():
    """Sliding windows, K4/V2 codes, tolerances from hopeless to generous: some heads over their limits, some
    accepted, some near; the flags say so only for certifying rows."""
    lengths, start = [40, 300, 37, 17], [5, 16, 34, 0]
    layer, view, quantizer = random_layer(lengths, 2, 64, (4, 2), promoted=3, seed=4, start=start)
    q = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    tolerance = torch.tensor([1e-4, 0.05, 0.5, 2.0], device=DEVICE)
    done, bound, limit = finish_against_twin(q, layer, view, quantizer, tolerance, what="window")
    accepted = bound <= limit
    assert bool(accepted.any()) and not bool(accepted.all()) and done.escalate
    quiet = torch.tensor([False, False, True, True], device=DEVICE)  # the hopeless rows do not certify
    finish_against_twin(q, layer, view, quantizer, tolerance, quiet, margin=0.99, what="window, two rows certifying")


def test_finish_reports_broken_annotations():
    layer, view, quantizer = random_layer([300, 47], 2, 64, (8, 4), promoted=0, seed=6)
    layer.block_notes[view.block_tables[1, 1], 0, 0] = float("inf")  # sequence 1, KV head 0: an attended block
    q = torch.randn(2, 8, 64, device=DEVICE)
    done, _, _ = finish_against_twin(q, layer, view, quantizer, torch.tensor([0.5, 0.5], device=DEVICE),
                                     what="broken")
    assert done.result.broken.tolist() == [[False, False], [True, False]] and done.escalate


@pytest.mark.parametrize("field", ["k_scale", "k_zero", "kappa"])
def test_finish_refuses_nan_key_metadata_as_the_twin_does(field):
    """NaN in a promoted block's scale or zero (they bound the score error even though its keys are read exact) makes
    the score error infinite: refused, as by the twin (Triton's max skips NaN; the kernel must not). NaN kappa of a
    quantized block leaves the other form of Delta_b: both accept or refuse alike."""
    layer, view, quantizer = random_layer([70, 40], 2, 64, (8, 4), promoted=0, seed=7)
    block = int(view.block_tables[0, 1])
    if field == "kappa":
        layer.block_notes[block, 0, 1] = float("nan")
    else:
        layer.slots[block, 0, 0] = 0  # the block's keys of KV head 0 are held exact in scratch slot 0
        getattr(layer, field)[block, 0, 3] = float("nan")
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    done, bound, limit = finish_against_twin(q, layer, view, quantizer, torch.tensor([0.5, 0.5], device=DEVICE),
                                             what=f"NaN {field}")
    if field != "kappa":
        assert not bool((done.result.bound[0, 0] <= done.result.limit[0, 0]).any()) and done.escalate


def test_finish_kernel_compiles_for_hopper_and_ampere():
    """As the decode kernel's compile test: the finish kernel's float64 terms and branches through the compiler."""
    assert all(0 <= used <= 48 * 1024 for used in compiled("certified_finish", [(90, 4), (90, 8, 64, 8), (80, 32)]))


# ---- scatter ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_blocks_matches_its_twin(dtype):
    source = torch.randn(5, BS, 64, device=DEVICE)
    slots = torch.tensor([7, 0, 3, 9, 2], device=DEVICE)
    got, want = torch.zeros(10, BS, 64, dtype=dtype, device=DEVICE), torch.zeros(10, BS, 64, dtype=dtype, device=DEVICE)
    scatter_blocks(got, slots, source)
    reference.scatter_blocks(want, slots, source)
    assert torch.equal(got, want)
    strided = torch.randn(BS, 5, 64, device=DEVICE).transpose(0, 1)  # how the write path slices the step's K/V
    scatter_blocks(got, slots, strided)
    reference.scatter_blocks(want, slots, strided)
    assert not strided.is_contiguous() and torch.equal(got, want)
    with pytest.raises(ValueError, match="src"):
        scatter_blocks(got, slots, torch.randn(5, BS, 32, device=DEVICE))
