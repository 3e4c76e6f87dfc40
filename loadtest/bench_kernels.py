"""Kernel benchmarks for a GPU (prints JSON lines and a table).

decode:  certified paged decode attention (the Triton kernel, and the kernel plus the certificate's terms) against
         PyTorch SDPA on dense FP16/BF16 K/V and against dequantize-then-SDPA, Llama-3-8B shapes (head dim 128,
         8 KV heads, 32 query heads), random data, contexts 4K-128K and batches 1-64 (combinations whose dense
         cache exceeds --max-dense-gib are skipped). Achieved bandwidth = bytes the op must read / its latency,
         against the device's measured copy bandwidth (the roofline).
sweep:   the Triton kernel at each number of warps and pipeline stages, one shape (the winner goes into LAUNCH).
e2e:     decode tokens/s of LLMEngine in dense and certified mode on a random-weight model with Llama-3-8B layer
         shapes (--e2e-layers of them: the attention/weights ratio per layer is the 8B model's).

    python loadtest/bench_kernels.py                 # on a CUDA machine
    python loadtest/bench_kernels.py --smoke         # tiny shapes on CPU through the twins: checks the script runs
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.kv.quantizers import META_DTYPE, VALUE_GROUP, Codes, MinMaxQuantizer  # noqa: E402
from kernels import certified_decode, certify_layer, decode_accumulators, reference, use_triton  # noqa: E402

try:  # the Triton module (kernels.certified_decode is the dispatching function): its launcher takes launch=, certify=
    triton_decode = importlib.import_module("kernels.certified_decode")
except ImportError:  # no Triton
    triton_decode = None

BS = 16


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write): the memory roofline this machine reaches."""
    x = torch.empty(1 << 28 if device.type == "cuda" else 1 << 22, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), device, 20)
    return 2 * x.numel() / ms / 1e6


def random_layer(batch: int, context: int, kv_heads: int, dim: int, bits: tuple[int, int], device, dtype):
    """Tier 1 of one layer holding `batch` sequences of `context` tokens (random codes and metadata), its view."""
    full, tail = divmod(context, BS)
    blocks = batch * full + 1
    kb, vb = bits

    def codes(width):
        return torch.randint(0, 256, (blocks, kv_heads, BS, dim * width // 8), dtype=torch.uint8, device=device)

    def meta(*shape, low, high):
        return (torch.rand(*shape, device=device) * (high - low) + low).to(META_DTYPE)

    layer = reference.QuantizedLayer(
        codes(kb), meta(blocks, kv_heads, dim, low=0.005, high=0.02), meta(blocks, kv_heads, dim, low=-2, high=-1),
        codes(vb), meta(blocks, kv_heads, BS, dim // VALUE_GROUP, low=0.05, high=0.2),
        meta(blocks, kv_heads, BS, dim // VALUE_GROUP, low=-1.5, high=-0.5),
        torch.rand(blocks, kv_heads, 2, device=device), meta(blocks, kv_heads, BS, 2, low=0.1, high=2),
        torch.full((blocks, kv_heads, 2), -1, dtype=torch.int32, device=device),
        torch.randn(batch, BS, kv_heads, dim, device=device, dtype=dtype),
        torch.randn(batch, BS, kv_heads, dim, device=device, dtype=dtype),
        torch.zeros(64, BS, dim, device=device, dtype=dtype), torch.zeros(64, BS, dim, device=device, dtype=dtype),
        torch.zeros(64, BS, device=device))
    tables = (torch.arange(1, blocks, device=device).view(batch, full) if full
              else torch.zeros(batch, 1, dtype=torch.long, device=device))
    view = reference.make_view(tables, torch.full((batch,), full, device=device),
                               torch.full((batch,), tail, device=device), torch.arange(batch, device=device), BS,
                               torch.ones(batch, dtype=torch.bool, device=device))
    return layer, view


def tier1_bytes(batch: int, context: int, kv_heads: int, dim: int, bits: tuple[int, int]) -> int:
    """Bytes certified decode reads: codes, metadata and annotations of every full block, the exact partial block."""
    per_block = BS * dim * (bits[0] + bits[1]) // 8 + 2 * dim * 2 + 2 * BS * dim // VALUE_GROUP * 2 + BS * 2 * 2 + 8
    return batch * kv_heads * (context // BS * per_block + 2 * BS * dim * 2)


def bench_decode(batch, context, args, device, dtype, peak) -> dict:
    heads, kv_heads, dim = 32, 8, 128
    quantizer = MinMaxQuantizer(*args.bits)
    layer, view = random_layer(batch, context, kv_heads, dim, args.bits, device, dtype)
    q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
    scale = dim ** -0.5
    keys = torch.randn(batch, kv_heads, context, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    query = q.view(batch, heads, 1, dim)
    full = context // BS

    def dequantize_then_sdpa():
        tables = view.block_tables
        k = quantizer.dequantize_keys(Codes(layer.k_codes[tables], layer.k_scale[tables], layer.k_zero[tables]))
        v = quantizer.dequantize_values(Codes(layer.v_codes[tables], layer.v_scale[tables], layer.v_zero[tables]))
        k = k.to(dtype).permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, full * BS, dim)
        v = v.to(dtype).permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, full * BS, dim)
        return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)

    dense_bytes = 2 * batch * kv_heads * context * dim * keys.element_size()
    cert_bytes = tier1_bytes(batch, context, kv_heads, dim, args.bits)
    row = {"bench": "decode", "batch": batch, "context": context, "dtype": str(dtype).split(".")[-1],
           "bits": f"K{args.bits[0]}/V{args.bits[1]}"}
    row["sdpa_dense_ms"] = timed(lambda: F.scaled_dot_product_attention(query, keys, values, scale=scale,
                                                                        enable_gqa=True), device, args.repeats)
    row["dequant_sdpa_ms"] = timed(dequantize_then_sdpa, device, args.repeats)
    row["certified_kernel_ms"] = timed(lambda: decode_accumulators(q, layer, view, scale, quantizer), device,
                                       args.repeats)
    row["certified_total_ms"] = timed(lambda: certified_decode(q, layer, view, scale, quantizer), device, args.repeats)
    if use_triton(q):  # the same kernel computing O alone: what the certificate's accumulators cost inside it
        row["plain_kernel_ms"] = timed(lambda: triton_decode.decode_accumulators(q, layer, view, scale, quantizer,
                                                                                 certify=False), device, args.repeats)
        row["certificate_overhead"] = row["certified_kernel_ms"] / row["plain_kernel_ms"] - 1
        # what the engine runs: the decode kernel, the finish kernel (bound, limit, flags) and the flags' one read
        radius = torch.ones(layer.tail_k.shape[0], kv_heads, device=device)
        tolerance = torch.full((batch,), 0.1, device=device)
        row["fused_total_ms"] = timed(lambda: certify_layer(q, layer, view, scale, quantizer, radius, tolerance),
                                      device, args.repeats)
        row["finish_ms"] = row["fused_total_ms"] - row["certified_kernel_ms"]
    row["speedup_vs_dense"] = row["sdpa_dense_ms"] / row.get("fused_total_ms", row["certified_total_ms"])
    row["dense_gbps"] = dense_bytes / row["sdpa_dense_ms"] / 1e6
    row["certified_gbps"] = cert_bytes / row["certified_kernel_ms"] / 1e6
    row["certified_roofline_fraction"] = row["certified_gbps"] / peak
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def bench_sweep(args, device, dtype) -> list[dict]:
    """The Triton kernel's time for each number of warps and pipeline stages, at one shape (--sweep-batch,
    --sweep-context): the winner belongs in kernels/certified_decode.py's LAUNCH."""
    quantizer = MinMaxQuantizer(*args.bits)
    batch, context = args.sweep_batch, args.sweep_context
    layer, view = random_layer(batch, context, 8, 128, args.bits, device, dtype)
    q = torch.randn(batch, 32, 128, device=device, dtype=dtype)
    rows = []
    for warps in args.sweep_warps:
        for stages in args.sweep_stages:
            launch = {"num_warps": warps, "num_stages": stages}
            ms = timed(lambda: triton_decode.decode_accumulators(q, layer, view, 128 ** -0.5, quantizer, launch),
                       device, args.repeats)
            rows.append({"bench": "sweep", "batch": batch, "context": context, "num_warps": warps,
                         "num_stages": stages, "kernel_ms": round(ms, 4)})
            print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: r["kernel_ms"])
    print(json.dumps({"sweep_best": {"num_warps": best["num_warps"], "num_stages": best["num_stages"],
                                     "kernel_ms": best["kernel_ms"], "in_code": triton_decode.LAUNCH}}), flush=True)
    return rows


def bench_e2e(args, device) -> list[dict]:
    """Decode tokens/s of the engine, dense vs certified, on random weights with Llama-3-8B layer shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.request import SamplingParams, StoppingParams
    from engine.weights import resolve_model

    small = args.smoke
    config = LlamaConfig(hidden_size=64 if small else 4096, intermediate_size=128 if small else 14336,
                         num_attention_heads=4 if small else 32, num_key_value_heads=2 if small else 8,
                         num_hidden_layers=2 if small else args.e2e_layers, vocab_size=49152,
                         max_position_embeddings=max(args.e2e_context * 2, 4096), rope_theta=500000.0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        model.save_pretrained(folder)
        del model
        for name in ("tokenizer.json", "tokenizer_config.json"):
            source = resolve_model("default") / name
            if source.exists():
                (Path(folder) / name).write_bytes(source.read_bytes())
        for mode in ("dense", "certified"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            engine = LLMEngine(EngineConfig(model=folder, device=device.type, kv_mode=mode,
                                            max_num_seqs=args.e2e_batch, max_num_batched_tokens=8192,
                                            kv_cache_memory=args.e2e_kv_gib << 30, shadow_memory=args.e2e_kv_gib << 31))
            generator = torch.Generator().manual_seed(0)
            stopping = StoppingParams(max_new_tokens=args.e2e_new_tokens, ignore_eos=True)
            for i in range(args.e2e_batch):
                prompt = torch.randint(1000, 40000, (args.e2e_context,), generator=generator).tolist()
                engine.add_request(engine.new_request(f"e{i}", prompt, SamplingParams(), stopping))
            started: set[str] = set()
            while len(started) < args.e2e_batch:  # prefill: every request has its first token
                started |= {o.request_id for o in engine.step() if o.token_ids}
            start, produced, rungs = time.perf_counter(), 0, [0] * 5
            while engine.has_unfinished():
                for out in engine.step():
                    produced += len(out.token_ids)
                    if out.finished and out.certificate is not None:
                        rungs = [a + b for a, b in zip(rungs, out.certificate.rungs)]
            wall = time.perf_counter() - start
            rows.append({"bench": "e2e", "mode": mode, "layers": config.num_hidden_layers, "batch": args.e2e_batch,
                         "context": args.e2e_context, "decode_tokens_per_s": round(produced / wall, 1),
                         "rungs": rungs,  # head-evaluations by the rung that produced them (certified mode)
                         "escalation_rate": round(1 - rungs[0] / sum(rungs), 4) if sum(rungs) else None,
                         "cache_device_bytes": device_bytes(engine.runner.cache),
                         "peak_device_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None})
            print(json.dumps(rows[-1]), flush=True)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def device_bytes(cache) -> int:
    """Device bytes the KV cache allocated: the dense paged cache, or the tiered cache's whole device footprint
    (TieredKVCache.device_bytes: tier 1, the scratch, partial blocks, the prefetch pool's capacity)."""
    if hasattr(cache, "device_bytes"):
        return cache.device_bytes()
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.0f}%"


def table(rows: list[dict]) -> str:
    decode = [r for r in rows if r["bench"] == "decode"]
    lines = ["| batch | context | SDPA dense ms | dequant+SDPA ms | certified kernel ms | certified + terms ms | "
             "kernel + finish kernel ms | speedup vs dense | certified GB/s | of roofline | certificate in kernel |",
             "|---" * 11 + "|"]
    for r in decode:
        fused = r.get("fused_total_ms")
        lines.append(f"| {r['batch']} | {r['context']} | {r['sdpa_dense_ms']:.3f} | {r['dequant_sdpa_ms']:.3f} | "
                     f"{r['certified_kernel_ms']:.3f} | {r['certified_total_ms']:.3f} | "
                     f"{'n/a' if fused is None else f'{fused:.3f}'} | {r['speedup_vs_dense']:.2f}x | "
                     f"{r['certified_gbps']:.0f} | {100 * r['certified_roofline_fraction']:.0f}% | "
                     f"{_percent(r.get('certificate_overhead'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--bits", type=int, nargs=2, default=[8, 4])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--max-dense-gib", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--benches", nargs="+", default=["decode", "e2e"])
    parser.add_argument("--sweep-batch", type=int, default=16)
    parser.add_argument("--sweep-context", type=int, default=32768)
    parser.add_argument("--sweep-warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--sweep-stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--e2e-layers", type=int, default=4)
    parser.add_argument("--e2e-batch", type=int, default=16)
    parser.add_argument("--e2e-context", type=int, default=4096)
    parser.add_argument("--e2e-new-tokens", type=int, default=64)
    parser.add_argument("--e2e-kv-gib", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (twins): the script runs")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    if args.smoke:
        args.contexts, args.batches, args.repeats = [40], [2], 2
        args.e2e_context, args.e2e_batch, args.e2e_new_tokens, args.e2e_kv_gib = 24, 2, 4, 1
        args.sweep_batch, args.sweep_context, args.sweep_warps, args.sweep_stages = 1, 40, [1, 4], [1]
    peak = copy_bandwidth(device)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "copy_gbps": round(peak, 1),
            "triton": use_triton(torch.empty(0, device=device))}
    print(json.dumps({"meta": meta}), flush=True)
    rows = []
    if "decode" in args.benches:
        for batch in args.batches:
            for context in args.contexts:
                if 2 * batch * 8 * context * 128 * 2 > args.max_dense_gib * (1 << 30):
                    continue
                rows.append(bench_decode(batch, context, args, device, dtype, peak))
                print(json.dumps(rows[-1]), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if "sweep" in args.benches:
        if triton_decode is None:
            raise SystemExit("sweep: Triton is not installed")
        rows += bench_sweep(args, device, dtype)
    if "e2e" in args.benches:
        rows += bench_e2e(args, device)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
