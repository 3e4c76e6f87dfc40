"""Soak: N concurrent clients for a fixed time against a real server process, with random cancels, deadlines, bad
input and hostile input (stop ids outside the vocabulary, penalties that would overflow the logits, prompts far
past the context: each must be INVALID_ARGUMENT and cost its neighbours nothing). Every request must end with
exactly one outcome, no request may end INTERNAL, and afterwards the server must hold nothing: no running or
waiting request, no KV block, no tier-1/tier-2/scratch byte (read from its Prometheus endpoint; blocks kept by the
prefix cache count as free, as in vLLM). Prints JSON, with the prompt tokens the prefix cache was asked for and hit
(the prompts repeat one sentence: they share prefixes).

    python loadtest/soak.py --clients 32 --seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))
import grpc  # noqa: E402
from bench_throughput import _free_port, _wait_serving  # noqa: E402

from server.pb.certkv.v1 import inference_pb2 as pb  # noqa: E402
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

KINDS = ["ok", "ok", "ok", "cancel", "deadline", "bad", "hostile"]


def hostile(request: pb.GenerateRequest, rng: random.Random) -> None:
    """Valid-looking requests that used to fail every stream of their engine step, or to tie up the tokenizer."""
    choice = rng.randrange(3)
    if choice == 0:
        request.stopping.stop_token_ids.append(10**6)
        request.stopping.min_new_tokens = 1
    elif choice == 1:
        request.sampling.temperature, request.sampling.repetition_penalty = 0.8, 1e-40
    else:
        request.prompt = "Tell me about the sea. " * 40_000  # ~920K characters: far past any context here


async def client(stub, rng: random.Random, until: float, ledger: Counter, outcomes: list) -> None:
    while time.monotonic() < until:
        kind = rng.choice(KINDS)
        request = pb.GenerateRequest(prompt="Tell me about the sea. " * rng.randint(1, 20),
                                     stopping=pb.StoppingCriteria(max_new_tokens=rng.randint(1, 48)))
        if kind == "bad":
            request.sampling.temperature = -1.0
        elif kind == "hostile":
            hostile(request, rng)
        seen = []
        try:
            call = stub.Generate(request, timeout=0.2 if kind == "deadline" else 120)
            async for message in call:
                if kind == "cancel" and rng.random() < 0.3:
                    call.cancel()
                    seen.append("cancelled")
                    break
                if message.finish_reason:
                    seen.append("finished")
            if kind == "cancel" and not seen:
                seen.append("cancelled-after-finish")
        except grpc.aio.AioRpcError as exc:
            seen.append(exc.code().name)
        outcomes.append(len(seen))
        ledger[seen[0] if seen else "none"] += 1


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


async def soak(port: int, clients: int, seconds: float) -> tuple[Counter, list]:
    ledger, outcomes = Counter(), []
    until = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        await asyncio.gather(*(client(stub, random.Random(i), until, ledger, outcomes) for i in range(clients)))
    return ledger, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--server-args", default="--kv-mode certified --max-pending-requests 48")
    args = parser.parse_args()
    port, metrics = _free_port(), _free_port()
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--metrics-port", str(metrics),
                               "--log-level", "WARNING", *args.server_args.split()], cwd=ROOT)
    try:
        _wait_serving(port, server)
        ledger, outcomes = asyncio.run(soak(port, args.clients, args.seconds))
        time.sleep(1.0)  # aborts of the last cancelled streams land within one engine step
        samples = scrape(metrics)
    finally:
        server.terminate()
        server.wait(timeout=120)
    held = {name: value for name, value in samples.items() if name.startswith((
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "certkv_tier_bytes"))}
    result = {"clients": args.clients, "seconds": args.seconds, "requests": len(outcomes),
              "outcomes": dict(ledger), "requests_without_exactly_one_outcome": sum(n != 1 for n in outcomes),
              "held_after": held, "leaked": any(held.values()),
              "prefix_cache_tokens": {kind: sum(v for name, v in samples.items()
                                                if name.startswith(f"vllm:prefix_cache_{kind}"))
                                      for kind in ("queries", "hits")},
              "server_exit_code": server.returncode}
    print(json.dumps(result, indent=2))
    failed = result["requests_without_exactly_one_outcome"] or result["leaked"] or ledger["INTERNAL"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
