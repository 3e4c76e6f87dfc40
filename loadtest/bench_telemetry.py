"""Shadow-tier and telemetry benchmarks (prints JSON and tables).

fallback: tier-2 fetch latency of escalations (per fetch call: p50/p99) and the prefetch hit rate, with prefetch on
          and off, on a decode workload that keeps escalating (K4/V2, a tight tolerance, a small scratch).
tracing:  end-to-end throughput of the gRPC service with tracing off, with 10% of engine steps traced, and with
          every step traced (spans exported to a discarding exporter, so that only their cost is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float | None:
    return sorted(values)[int(q * (len(values) - 1))] if values else None


def bench_fallback(model: str, prefetch: bool, threads: int, new_tokens: int) -> dict:
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.request import SamplingParams, StoppingParams

    engine = LLMEngine(EngineConfig(model=model, kv_mode="certified", k_bits=4, v_bits=2, tolerance=0.05,
                                    scratch_blocks=24, prefetch=prefetch, threads=threads))
    text = ("The history of the river valley begins with the first settlers, who farmed the floodplain. " * 30)
    prompts = [engine.tokenizer(text[i * 7:])["input_ids"][:200] for i in range(4)]
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.new_request(f"r{i}", prompt, SamplingParams(),
                                              StoppingParams(new_tokens, ignore_eos=True)))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - start
    stats = engine.runner.cache.copy.stats
    latencies = [s for s in stats.latencies]
    misses_only = [s for s in latencies if s > 0]
    return {"bench": "fallback", "prefetch": prefetch, "fetch_calls": len(latencies),
            "pieces_hit": stats.hits, "pieces_missed": stats.misses, "fetched_mb": round(stats.fetch_bytes / 1e6, 1),
            "prefetched_mb": round(stats.prefetch_bytes / 1e6, 1), "transfers": stats.transfers,
            "hit_rate": stats.hits / max(stats.hits + stats.misses, 1),
            "fetch_latency_p50_ms": 1000 * percentile(latencies, 0.5) if latencies else None,
            "fetch_latency_p99_ms": 1000 * percentile(latencies, 0.99) if latencies else None,
            "uncovered_fetch_p50_ms": 1000 * percentile(misses_only, 0.5) if misses_only else None,
            "decode_wall_s": round(wall, 2)}


async def _throughput(model: str, ratio: float | None, streams: int, new_tokens: int, threads: int) -> dict:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from server.app import CertkvServer
    from server.config import ServerConfig
    from server.pb.certkv.v1 import inference_pb2 as pb
    from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
    from server.telemetry import Telemetry, TelemetryConfig

    class Discard(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    config = EngineConfig(model=model, threads=threads)
    engine = await asyncio.to_thread(LLMEngine, config)
    telemetry = Telemetry(TelemetryConfig(step_sample_ratio=ratio or 0.0), "bench",
                          exporter=None if ratio is None else Discard())
    server = CertkvServer(ServerConfig(port=0, drain_delay_s=0), config, engine, telemetry)
    await server.start()
    await server.load()
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i):
            request = pb.GenerateRequest(prompt=f"Story number {i}: once upon a time",
                                         stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True))
            return sum([len(m.token_ids) async for m in stub.Generate(request)])

        await one(-1)
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(streams))))
        wall = time.perf_counter() - start
    await server.drain()
    label = "off" if ratio is None else f"{int(ratio * 100)}% steps"
    return {"bench": "tracing", "tracing": label, "tokens_per_s": round(tokens / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--benches", nargs="+", default=["fallback", "tracing"])
    parser.add_argument("--repeats", type=int, default=2, help="tracing runs per setting (the median is kept)")
    args = parser.parse_args()
    from engine.weights import resolve_model

    model = str(resolve_model(args.model))
    rows = []
    if "fallback" in args.benches:
        for prefetch in (False, True):
            rows.append(bench_fallback(model, prefetch, args.threads, new_tokens=48))
            print(json.dumps(rows[-1]), flush=True)
    if "tracing" in args.benches:
        for ratio in (None, 0.1, 1.0):
            runs = [asyncio.run(_throughput(model, ratio, streams=8, new_tokens=48, threads=args.threads))
                    for _ in range(args.repeats)]
            row = dict(runs[0], tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs),
                       runs=[r["tokens_per_s"] for r in runs])
            rows.append(row)
            print(json.dumps(row), flush=True)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(json.dumps({"meta": {"machine": f"{os.cpu_count()} CPU cores, {gpu}", "threads": args.threads}}))


if __name__ == "__main__":
    main()
