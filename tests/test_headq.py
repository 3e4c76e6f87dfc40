"""HeadQ keys (engine/kv/headq.py): the calibration command, the side code, the subspace form of Delta_b (sound
against float64 on adversarial queries) and audit-clean decoding on the default model."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from engine import calibrate
from engine.kv.headq import eigenbasis, load_basis
from engine.kv.quantizers import make_quantizer
from engine.kv.tiers import TieredKVCache
from engine.request import KVMode, KVPolicy
from kernels.reference import quantize_blocks
from tests.helpers import make_engine, run_engine
from tests.test_certified_engine import chat_prompts

HKV, BS, D = 2, 16, 64
TEXT = ("Now it came to pass in the days when the judges ruled, that there was a famine in the land. And a certain man "
        "of Bethlehemjudah went to sojourn in the country of Moab, he, and his wife, and his two sons. ") * 6


@pytest.fixture(scope="module")
def calibrated(default_model, tmp_path_factory):
    text = tmp_path_factory.mktemp("calibration") / "text.txt"
    text.write_text(TEXT)
    out = text.with_name("headq.safetensors")
    calibrate.main(["--text", str(text), "--model", str(default_model), "--window", "64", "--max-tokens", "256",
                    "--out", str(out)])
    return out


def random_basis(layers=1, rank=16, seed=0):
    q, _ = torch.linalg.qr(torch.randn(layers, HKV, D, D, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q[..., :rank].float().contiguous()


def test_calibration_learns_where_the_queries_are(calibrated):
    basis = load_basis(calibrated, 30, 3, 64, 16)  # SmolLM2-135M: 30 layers, 3 KV heads, head dim 64
    assert basis.shape == (30, 3, 64, 16)
    gram = basis.double().transpose(-1, -2) @ basis.double()
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64).expand_as(gram), atol=1e-6)
    energy = load_file(str(calibrated))["energy"]
    assert (energy.diff(dim=-1) >= -1e-6).all() and torch.allclose(energy[..., -1], torch.ones(()))
    assert float(energy[..., 15].median()) > 0.5  # a random 16 of 64 directions would keep 0.25


def test_load_basis_refuses_what_does_not_fit(calibrated, tmp_path):
    with pytest.raises(FileNotFoundError, match="engine.calibrate"):
        load_basis(tmp_path / "missing.safetensors", 30, 3, 64, 16)
    with pytest.raises(ValueError, match="another model"):
        load_basis(calibrated, 24, 3, 64, 16)


def test_eigenbasis_orders_by_energy():
    vectors = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    moments = vectors @ torch.diag(torch.tensor([1.0, 9, 4, 0, 16, 2, 3, 5], dtype=torch.float64)) @ vectors.T
    basis, energy = eigenbasis(moments)
    assert torch.allclose(basis[:, 0].abs(), vectors[:, 4].abs(), atol=1e-9)
    assert torch.allclose(energy[:2], torch.tensor([16 / 40, 25 / 40], dtype=torch.float64))


@pytest.mark.parametrize("k_bits,rank,side_bits", [(4, 16, 4), (5, 32, 3), (8, 48, 2), (4, 8, 8)])
def test_side_code_shrinks_the_error_along_the_basis_and_annotations_bound_it(k_bits, rank, side_bits):
    torch.manual_seed(k_bits + rank)
    basis = random_basis(rank=rank)
    quant = make_quantizer("headq", k_bits, 2, rank=rank, side_bits=side_bits, basis=basis).for_layer(0)
    base = make_quantizer("minmax-fp8", k_bits, 2)
    keys = torch.randn(3, HKV, BS, D) * 2 + torch.randn(1, HKV, 1, D) * 5
    written = quantize_blocks(keys, torch.randn(3, HKV, BS, D), quant)
    error = keys.double() - quant.dequantize_keys(written.keys).double()
    base_error = keys.double() - base.dequantize_keys(base.quantize_keys(keys)).double()
    u = basis[0].double()  # [Hkv, D, r]
    along, base_along = (e @ u for e in (error, base_error))
    across = error - along @ u.transpose(-1, -2)
    a, c = written.keys.zero[..., -2].double(), written.keys.zero[..., -1].double()
    assert (along.norm(dim=-1).amax(dim=-1) <= a).all() and (across.norm(dim=-1).amax(dim=-1) <= c).all()
    assert (error.norm(dim=-1).amax(dim=-1) <= written.block_notes[..., 0].double()).all()
    step = quant.key_step(written.keys, D).double()
    assert (error.abs().amax(dim=2) <= written.block_notes[..., 1].double()[..., None] * step).all()
    shrink = 2 ** (side_bits - 1) - 1  # levels on each side of 0: the side code's error is about 1 / shrink of it
    assert along.norm(dim=-1).median() < 1.5 / shrink * base_along.norm(dim=-1).median()
    assert written.keys.codes.shape[-1] == quant.key_width(D) == D * k_bits // 8 + rank * side_bits // 8


@settings(max_examples=int(os.environ.get("CERTKV_PROPERTY_EXAMPLES", 40)), deadline=None)
@given(seed=st.integers(0, 2**31), k_bits=st.sampled_from([4, 5, 8]), rank=st.sampled_from([8, 16, 32, 48]),
       side_bits=st.sampled_from([2, 3, 4]), kind=st.sampled_from(["random", "inside", "across", "aligned", "outlier"]))
def test_subspace_form_bounds_every_score_change(seed, k_bits, rank, side_bits, kind):
    """tau |q . (k_j - k~_j)| <= Delta_b^U for every token of every block, against float64, on queries inside the
    basis, across it, aligned with a token's error, and with outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    basis = random_basis(rank=rank, seed=seed % 1000)
    quant = make_quantizer("headq", k_bits, 2, rank=rank, side_bits=side_bits, basis=basis).for_layer(0)
    keys = torch.randn(4, HKV, BS, D, generator=gen) * 3
    if kind == "outlier":
        keys[..., 5] *= 40
    written = quantize_blocks(keys, torch.randn(4, HKV, BS, D, generator=gen), quant)
    error = keys.double() - quant.dequantize_keys(written.keys).double()  # [N, Hkv, bs, D]
    u = basis[0]
    q = torch.randn(1, HKV, 3, D, generator=gen) * 4
    if kind == "inside":
        q = q[..., :rank] @ u.transpose(-1, -2)[None] + 1e-3 * q
    elif kind == "across":
        q = q - (q @ u[None]) @ u.transpose(-1, -2)[None]
    elif kind == "aligned":  # each query head along the error of one token of block 0
        q = error[0, :, :3].float()[None] * 50
    tables = torch.arange(4)[None]
    notes = written.block_notes[None].transpose(1, 2)  # [1, Hkv, nb, 2]
    tau = D ** -0.5
    delta = quant.key_deltas(q, written.keys.scale, written.keys.zero, tables, notes[..., 0][:, :, None],
                             notes[..., 1][:, :, None], tau)  # [1, Hkv, G, nb]
    moved = tau * (q.double()[:, :, :, None, None] * error.transpose(0, 1)[None, :, None]).sum(dim=-1).abs()
    assert (moved.amax(dim=-1) <= delta.double()).all()


def test_subspace_form_is_tighter_for_queries_in_the_basis():
    torch.manual_seed(5)
    basis = random_basis(rank=32)
    quant = make_quantizer("headq", 4, 2, rank=32, side_bits=4, basis=basis).for_layer(0)
    written = quantize_blocks(torch.randn(2, HKV, BS, D) * 3, torch.randn(2, HKV, BS, D), quant)
    q = torch.randn(1, HKV, 3, 32) @ basis[0].transpose(-1, -2)[None]
    notes = written.block_notes[None].transpose(1, 2)
    eps = notes[..., 0][:, :, None]
    delta = quant.key_deltas(q, written.keys.scale, written.keys.zero, torch.arange(2)[None], eps,
                             notes[..., 1][:, :, None], 1.0)
    assert (delta < 0.3 * q.norm(dim=-1)[..., None] * eps).all()  # Cauchy-Schwarz: ||q|| eps_b


def test_headq_bytes():
    fp16 = 2 * 64 * 2

    def share(name, k, v, rank, bits):
        return TieredKVCache.tier1_bytes(make_quantizer(name, k, v, rank=rank, side_bits=bits), 64, 16) / fp16

    assert share("headq/hadamard", 4, 2, 32, 4) == pytest.approx(share("minmax", 4, 2, 0, 0), abs=0.002)
    assert share("headq/hadamard", 4, 2, 24, 2) <= 0.30
    with pytest.raises(ValueError, match="rank"):
        make_quantizer("headq", 4, 2, rank=20)
    with pytest.raises(ValueError, match="no query basis"):
        make_quantizer("headq", 4, 2).for_layer(0)


@pytest.mark.slow
def test_headq_audit_on_the_default_model(default_model, calibrated):
    engine = make_engine(default_model, kv_mode="audit", num_kv_blocks=64, k_bits=4, v_bits=2, quantizer="headq",
                         headq_rank=16, headq_basis=str(calibrated), scratch_blocks=4)
    finals = {}
    prompts = chat_prompts(engine.tokenizer)
    run_engine(engine, prompts, 24, finals=finals)
    certificates = [f.certificate for f in finals.values()]
    assert sum(c.evaluations for c in certificates) > 0
    assert all(c.audit_violations == 0 and 0 < c.worst_actual_over_bound <= 1 for c in certificates)
    assert sum(c.rungs[0] for c in certificates) > 0  # some head-steps certified from the quantized keys alone


def test_engine_refuses_headq_without_a_basis(default_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="engine.calibrate"):
        make_engine(default_model, kv_mode="certified", quantizer="headq", headq_basis=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="headq_rank"):
        make_engine(default_model, kv_mode="certified", quantizer="headq", headq_rank=7)
