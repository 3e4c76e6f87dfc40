"""The CUDA paths end to end (skipped without a GPU): the Triton kernels inside the engine, pinned shadows, the copy
stream and its event timing. Token comparisons stay on one device: dense and exact mode on CUDA against each other
(the CPU tests compare with HF's float32 reference)."""

import pytest
import torch

from engine.kv.quantizers import make_quantizer
from engine.request import KVMode
from kernels import quantize_blocks
from kernels.formats import token_error_norms
from tests.helpers import make_engine, run_engine
from tests.test_certified_engine import chat_prompts
from tests.test_engine_equivalence import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_mode_equals_dense_on_cuda(tiny_models, arch):
    path = tiny_models[arch]
    prompts = random_prompts((1, 15, 16, 17, 40, 45), seed=4)
    dense = run_engine(make_engine(path, device="cuda", num_kv_blocks=12, max_num_batched_tokens=7), prompts, 30)
    engine = make_engine(path, device="cuda", kv_mode="exact", num_kv_blocks=12, max_num_batched_tokens=7)
    assert run_engine(engine, prompts, 30) == dense
    assert engine.scheduler.num_preemptions > 0


def test_escalations_on_cuda_fetch_through_the_copy_stream(tiny_llama):
    """A tight tolerance at K4/V2: the ladder fetches from pinned shadows, fetches are timed with CUDA events, the
    prefetcher hits, audit finds no violation, and every block, slot and prefetched piece is released."""
    engine = make_engine(tiny_llama, device="cuda", kv_mode="audit", k_bits=4, v_bits=2, tolerance=0.02,
                         num_kv_blocks=64, scratch_blocks=8)
    cache = engine.runner.cache
    assert cache.shadow_k[0].is_pinned() and cache.layers[0].k_codes.is_cuda
    finals = {}
    run_engine(engine, random_prompts((40, 70, 90), seed=5), 40, finals=finals)
    certificates = [f.certificate for f in finals.values()]
    assert all(c.mode is KVMode.AUDIT and c.audit_violations == 0 for c in certificates)
    assert sum(c.evaluations - c.rungs[0] for c in certificates) > 0
    stats = cache.copy.stats
    assert stats.fetch_bytes > 0 and stats.misses > 0 and stats.hits > 0
    assert stats.fetch_seconds > 0 and all(s >= 0 for s in stats.latencies)
    assert not any(cache.copy._pending.values())


@pytest.mark.slow
def test_default_model_certified_on_cuda(default_model):
    engine = make_engine(default_model, device="cuda", kv_mode="certified", num_kv_blocks=64)
    prompts = chat_prompts(engine.tokenizer)
    reference = run_engine(make_engine(default_model, device="cuda", num_kv_blocks=64), prompts, 48)
    assert run_engine(engine, prompts, 48, kv=engine.kv_policy(KVMode.EXACT, None)) == reference
    finals = {}
    run_engine(engine, prompts, 48, kv=engine.kv_policy(KVMode.AUDIT, None), finals=finals)
    certificates = [f.certificate for f in finals.values()]
    assert all(c.audit_violations == 0 and 0 < c.worst_actual_over_bound <= 1 for c in certificates)
    assert sum(c.rungs[0] for c in certificates) / sum(c.evaluations for c in certificates) >= 0.9


@pytest.mark.parametrize("name", ["hadamard", "minmax-fp8/hadamard"])
def test_hadamard_reads_back_on_cuda_what_the_write_path_measured(name):
    """On CUDA too, the dequantization attention runs (another batch shape, gathered blocks) gives the bits the write
    path measured eta against, even with TF32 allowed by the process: the rotation is butterflies, not a matmul."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        quant = make_quantizer(name, 4, 2)
        generator = torch.Generator(device="cuda").manual_seed(3)
        keys, values = (torch.randn(9, 2, 16, 128, generator=generator, device="cuda") * 3 for _ in range(2))
        written = quantize_blocks(keys, values, quant)
        order = torch.tensor([[8, 1, 4], [0, 0, 7]], device="cuda")
        codes = written.values
        read = quant.dequantize_values(type(codes)(codes.codes[order], codes.scale[order], codes.zero[order]))
        assert torch.equal(token_error_norms(values[order], read), written.token_notes[order][..., 0])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
