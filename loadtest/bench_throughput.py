"""Throughput of certkv against HF `generate` at 1, 8 and 32 concurrent requests (prints JSON and a table).

Three ways to run the same N requests (random prompts of --prompt-tokens tokens, exactly --new-tokens greedy
tokens each, EOS ignored):
  engine  LLMEngine in this process, all requests submitted at t=0, stepped to completion;
  grpc    the real service: `python -m server` in a subprocess, N concurrent Generate streams over loopback;
  hf      transformers `generate` on one static batch of N (equal prompt lengths: no padding).
Timing: TTFT from submission; ITL = time between a request's consecutive tokens; throughput = N * new / wall.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def summarize(name: str, n: int, wall: float, ttfts: list[float], gaps: list[float], new: int) -> dict:
    return {
        "system": name, "concurrency": n, "wall_s": round(wall, 3), "tokens": n * new,
        "tokens_per_s": round(n * new / wall, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_max_s": round(max(ttfts), 3),
        "itl_p50_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "itl_p99_ms": round(1000 * sorted(gaps)[int(0.99 * (len(gaps) - 1))], 1) if gaps else None,
    }


@functools.cache
def _engine(model: str, threads: int, kv_mode: str):
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, threads=threads, max_num_seqs=64, kv_mode=kv_mode,
                                    enable_prefix_caching=False))  # every run computes its prompts, as HF does
    _run_engine(engine, prompts(2, 8, seed=1), 4)  # warm-up
    return engine


def bench_engine(model: str, batch: list[list[int]], new: int, threads: int, kv_mode: str = "dense") -> dict:
    return _run_engine(_engine(model, threads, kv_mode), batch, new, name=f"engine-{kv_mode}")


def _run_engine(engine, batch, new, name="warmup"):
    from engine.request import SamplingParams, StoppingParams

    stopping = StoppingParams(max_new_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add_request(engine.new_request(f"b{i}", prompt, SamplingParams(), stopping))
    stamps: dict[str, list[float]] = {f"b{i}": [] for i in range(len(batch))}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            stamps[out.request_id].append(now)
    return _summary(name, len(batch), start, stamps.values(), new)


def bench_interleaved(model: str, batch: list[list[int]], new: int, threads: int) -> dict:
    """The dense and certified engines and HF's own decoding of the same static batch, stepped alternately on the same
    requests: the median decode step of each, and their ratios. Slow phases of a shared machine then hit all alike."""
    from engine.request import SamplingParams, StoppingParams

    engines = {mode: _engine(model, threads, mode) for mode in ("dense", "certified")}
    stopping = StoppingParams(max_new_tokens=new, ignore_eos=True)
    for engine in engines.values():
        for i, prompt in enumerate(batch):
            engine.add_request(engine.new_request(f"i{i}", prompt, SamplingParams(), stopping))
    hf = _HFDecode(model, batch, threads)
    steps: dict[str, list[float]] = {mode: [] for mode in (*engines, "hf")}
    while any(engine.has_unfinished() for engine in engines.values()):
        for mode, engine in engines.items():
            if engine.has_unfinished():
                decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running) \
                    and not engine.scheduler.waiting
                start = time.perf_counter()
                engine.step()
                if decoding:
                    steps[mode].append(time.perf_counter() - start)
        if len(steps["hf"]) < new - 1:
            start = time.perf_counter()
            hf.step()
            steps["hf"].append(time.perf_counter() - start)
    median = {mode: statistics.median(times) for mode, times in steps.items()}
    return {"system": "interleaved", "concurrency": len(batch), "decode_steps": len(steps["dense"]),
            "dense_step_ms": round(1000 * median["dense"], 1),
            "certified_step_ms": round(1000 * median["certified"], 1), "hf_step_ms": round(1000 * median["hf"], 1),
            "certified_over_dense_throughput": round(median["dense"] / median["certified"], 3),
            "dense_over_hf_throughput": round(median["hf"] / median["dense"], 3)}


class _HFDecode:
    """HF's decoding of one static batch (equal prompt lengths, no padding) with its DynamicCache, greedy, one step a
    call: what `generate` does per step, without its logits processors."""

    def __init__(self, model_dir: str, batch: list[list[int]], threads: int):
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        self.cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor(batch), past_key_values=self.cache, use_cache=True).logits
        self.next = logits[:, -1].argmax(dim=-1, keepdim=True)

    def step(self) -> None:
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=self.next, past_key_values=self.cache, use_cache=True).logits
        self.next = logits[:, -1].argmax(dim=-1, keepdim=True)


def _summary(name, n, start, stamp_lists, new):
    stamp_lists = list(stamp_lists)
    wall = max(s[-1] for s in stamp_lists) - start
    ttfts = [s[0] - start for s in stamp_lists]
    gaps = [b - a for s in stamp_lists for a, b in zip(s, s[1:])]
    return summarize(name, n, wall, ttfts, gaps, new)


def bench_hf(model_dir: str, batch: list[list[int]], new: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(batch)
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
    end = time.perf_counter()
    # every sequence of the static batch receives its k-th token when the k-th step's logits are processed
    per_request = [stamps[1:] + [end]] * len(batch)
    return _summary("hf-generate", len(batch), start, per_request, new)


def bench_grpc(model: str, batch: list[list[int]], new: int, threads: int, kv_mode: str = "dense") -> dict:
    import grpc

    from server.pb.certkv.v1 import inference_pb2 as pb
    from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--model", model,
                               "--threads", str(threads), "--kv-mode", kv_mode, "--log-level", "WARNING",
                               "--no-enable-prefix-caching"], cwd=ROOT)
    try:
        _wait_serving(port, server)

        async def one(stub, prompt, start):
            request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt),
                                         stopping=pb.StoppingCriteria(max_new_tokens=new, ignore_eos=True))
            stamps = []
            async for _ in stub.Generate(request, timeout=600):
                stamps.append(time.perf_counter())
            return stamps

        async def run():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceStub(channel)
                await one(stub, batch[0][:8], time.perf_counter())
                start = time.perf_counter()
                results = await asyncio.gather(*(one(stub, p, start) for p in batch))
                return start, results

        start, results = asyncio.run(run())
        return _summary(f"grpc-{kv_mode}", len(batch), start, results, new)
    finally:
        server.terminate()
        server.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError("server did not report SERVING")


def median_run(runs: list[dict]) -> dict:
    """The median run by tokens/s, with every run's tokens/s in `runs`."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return ranked[len(ranked) // 2] | {"runs": [r["tokens_per_s"] for r in runs]}


def table(rows: list[dict]) -> str:
    head = "| system | concurrency | wall s | tok/s | TTFT p50 s | ITL p50 ms | ITL p99 ms |\n|---|---|---|---|---|---|---|"
    lines = [f"| {r['system']} | {r['concurrency']} | {r['wall_s']} | {r['tokens_per_s']} | {r['ttft_p50_s']} | "
             f"{r['itl_p50_ms']} | {r['itl_p99_ms']} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--systems", nargs="+", default=["engine", "grpc", "hf"], choices=["engine", "grpc", "hf"])
    parser.add_argument("--kv-modes", nargs="+", default=["dense", "certified"],
                        help="KV modes for the engine and grpc systems (hf always runs its own dense cache)")
    parser.add_argument("--interleaved", action="store_true",
                        help="only step dense and certified engines alternately and compare their decode steps")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration, round-robin; keeps the median")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    from engine.weights import resolve_model

    model_dir = str(resolve_model(args.model))
    if args.interleaved:
        rows = []
        for n in args.concurrency:
            rows.append(bench_interleaved(model_dir, prompts(n, args.prompt_tokens), args.new_tokens, args.threads))
            print(json.dumps(rows[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows}, indent=2))
        return
    configs = [(n, bench, extra) for n in args.concurrency for system in args.systems
               for bench, extra in ([(bench_hf, {})] if system == "hf" else [
                   (bench_engine if system == "engine" else bench_grpc, {"kv_mode": mode}) for mode in args.kv_modes])]
    runs: list[list[dict]] = [[] for _ in configs]
    for _ in range(args.repeat):  # round-robin, so that this VM's slow phases hit every configuration alike
        for config_runs, (n, bench, extra) in zip(runs, configs):
            row = bench(model_dir, prompts(n, args.prompt_tokens), args.new_tokens, args.threads, **extra)
            print(json.dumps(row), flush=True)
            config_runs.append(row)
    rows = [median_run(config_runs) for config_runs in runs]
    meta = {"machine": f"{os.cpu_count()} CPU cores", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "model": model_dir, "repeat": args.repeat}
    print(json.dumps({"meta": meta}))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
