"""A short locust run against a real in-process server: the gRPC streaming user reports TTFT, inter-token latency and
whole-stream entries with no failures (the smoke version of `make loadtest`)."""

import asyncio
import csv
import os
import sys
from pathlib import Path

from tests.serving import running_server

ROOT = Path(__file__).resolve().parent.parent


async def test_locust_smoke(tiny_llama, tmp_path):
    async with running_server(tiny_llama, kv_mode="certified") as server:
        prefix = tmp_path / "smoke"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", "2",
            "-r", "2", "-t", "6s", "-H", f"grpc://127.0.0.1:{server.port}", "--only-summary", "--csv", str(prefix),
            env=os.environ | {"CERTKV_MAX_NEW": "8", "CERTKV_PROMPT_MIX": "short"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, stderr.decode()[-2000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(f"{prefix}_stats.csv"))}
    total = rows["Generate/total"]
    assert int(total["Request Count"]) > 2 and int(total["Failure Count"]) == 0
    assert float(total["Average Content Size"]) == 8  # tokens per stream
    finished, started = int(total["Request Count"]), int(rows["Generate/ttft"]["Request Count"])
    assert finished <= started <= finished + 2  # the time limit can stop each user's stream midway
    # a gap is between two messages of one stream, and a message may carry several tokens (text held back until its
    # UTF-8 is whole): each stream of 8 tokens makes 1 to 7 gaps
    assert finished <= int(rows["Generate/itl"]["Request Count"]) <= 7 * started


def test_kernel_benchmark_smoke():
    """loadtest/bench_kernels.py (a GPU benchmark) runs end to end on tiny CPU shapes and prints its JSON rows."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "loadtest" / "bench_kernels.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    decode = [r for r in rows if r.get("bench") == "decode"]
    e2e = {r["mode"]: r for r in rows if r.get("bench") == "e2e"}
    assert decode and all(r["certified_total_ms"] > 0 and r["sdpa_dense_ms"] > 0 for r in decode)
    assert set(e2e) == {"dense", "certified"} and all(r["decode_tokens_per_s"] > 0 for r in e2e.values())


def test_prefix_benchmark_smoke(tiny_llama):
    """loadtest/bench_prefix.py runs end to end on a tiny model: both configurations, every phase, the JSON rows and
    the comparison (the timing targets are the script's to report, not a test's to assert)."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "loadtest" / "bench_prefix.py"), "--model", str(tiny_llama),
                           "--rounds", "1", "--users", "2", "--batch", "2", "--new-tokens", "3", "--system-tokens", "40",
                           "--kv-modes", "dense", "certified", "--blocks", "64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    configs = {(r["mode"], r["prefix_caching"]): r for r in rows if "prefix_caching" in r}
    assert set(configs) == {(m, c) for m in ("dense", "certified") for c in (False, True)}
    assert configs[("dense", True)]["hit_rate_concurrent"] > 0 == configs[("dense", False)]["hit_rate_concurrent"]
    comparisons = [r for r in rows if "ttft_later_speedup" in r]
    assert {c["mode"] for c in comparisons} == {"dense", "certified"}
    assert next(c for c in comparisons if c["mode"] == "dense")["greedy_tokens_identical"]
