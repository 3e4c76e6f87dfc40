"""`make gpu-check DIR=...`: everything a lent GPU should measure, in one prepared run of at most 8 minutes on an
H100/H200, writing JSON and logs into DIR (and DIR/summary.json: each step's status, seconds and output files).

Steps, each a subprocess with its own time limit, so that one failure costs only its step:
  device      the GPU, the driver and library versions
  tests       the compiled kernel tests and tests/test_cuda.py
  kernels     bench_kernels.py decode: certified kernel vs SDPA at 4K/16K/32K/64K x batch 1/16 (Llama-3-8B shapes),
              the kernel without the certificate's accumulators (what the certificate costs inside it), and the
              decode kernel + finish kernel + flag read the engine runs
  sweep       the kernel's warps x pipeline stages at batch 16, 32K (the winner belongs in its LAUNCH)
  step        bench_step.py on the device: aten operations, host syncs and time per decode step, dense vs certified
  throughput  bench_throughput.py --interleaved, default model, 8 requests
  e2e-4k      the engine on a random Llama-3-8B-shaped model (4 layers), batch 16 at 4K: decode tokens/s dense vs
  e2e-32k     certified, escalation rates, device bytes of the caches and peak device memory; batch 4 at 32K

`--cpu-smoke` runs the same steps on the CPU with tiny shapes and a tiny model (make test runs it), so that a GPU
minute is never lost to a typo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def steps(out: Path, smoke: bool, model: str) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) for each step."""
    bench = [PYTHON, str(ROOT / "loadtest" / "bench_kernels.py")]
    if smoke:
        return [
            ("device", [PYTHON, str(ROOT / "loadtest" / "gpu_check.py"), "--describe"], 60),
            ("tests", [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                       "tests/test_kernels.py::test_decode_sliding_window_masks_tokens_before_its_start",
                       "tests/test_kernels.py::test_finish_windows_bits_and_decisions_on_both_sides"], 240),
            ("kernels", [*bench, "--smoke", "--benches", "decode", "--json", str(out / "kernels.json")], 240),
            ("sweep", [*bench, "--smoke", "--benches", "sweep", "--json", str(out / "sweep.json")], 240),
            ("step", [PYTHON, str(ROOT / "loadtest" / "bench_step.py"), "--model", model, "--requests", "2",
                      "--steps", "1", "--prompt-tokens", "20", "--json", str(out / "step.json")], 240),
            ("throughput", [PYTHON, str(ROOT / "loadtest" / "bench_throughput.py"), "--model", model, "--interleaved",
                            "--concurrency", "2", "--prompt-tokens", "20", "--new-tokens", "4",
                            "--json", str(out / "throughput.json")], 240),
            ("e2e-4k", [*bench, "--smoke", "--benches", "e2e", "--json", str(out / "e2e-4k.json")], 240),
        ]
    return [
        ("device", [PYTHON, str(ROOT / "loadtest" / "gpu_check.py"), "--describe"], 15),
        ("tests", [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                   "tests/test_cuda.py"], 120),
        ("kernels", [*bench, "--benches", "decode", "--contexts", "4096", "16384", "32768", "65536", "--batches", "1",
                     "16", "--repeats", "10", "--json", str(out / "kernels.json")], 75),
        ("sweep", [*bench, "--benches", "sweep", "--repeats", "10", "--json", str(out / "sweep.json")], 45),
        ("step", [PYTHON, str(ROOT / "loadtest" / "bench_step.py"), "--requests", "1", "8", "32", "--steps", "3",
                  "--json", str(out / "step.json")], 60),
        ("throughput", [PYTHON, str(ROOT / "loadtest" / "bench_throughput.py"), "--interleaved", "--concurrency", "8",
                        "--new-tokens", "64", "--json", str(out / "throughput.json")], 50),
        ("e2e-4k", [*bench, "--benches", "e2e", "--e2e-layers", "4", "--e2e-batch", "16", "--e2e-context", "4096",
                    "--e2e-kv-gib", "8", "--json", str(out / "e2e-4k.json")], 45),
        ("e2e-32k", [*bench, "--benches", "e2e", "--e2e-layers", "4", "--e2e-batch", "4", "--e2e-context", "32768",
                     "--e2e-kv-gib", "16", "--json", str(out / "e2e-32k.json")], 55),
    ]


def describe() -> None:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info))


def tiny_model(folder: Path) -> str:
    """A random two-layer Llama with the default model's tokenizer, for the smoke run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.weights import default_model_dir

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((default_model_dir() / name).read_bytes())
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="folder for the JSON files and logs")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: check that everything runs")
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--describe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.describe:
        describe()
        return 0
    if args.out is None:
        parser.error("the output folder is required")
    args.out.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    if args.cpu_smoke:
        environment |= {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    model = tiny_model(args.out / "tiny-model") if args.cpu_smoke else "default"
    summary, started = {"cpu_smoke": args.cpu_smoke, "steps": {}}, time.perf_counter()
    for name, command, limit in steps(args.out, args.cpu_smoke, model):
        if args.only and name not in args.only:
            continue
        log = args.out / f"{name}.log"
        begin = time.perf_counter()
        with open(log, "w") as sink:
            try:
                code = subprocess.run(command, cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT,
                                      timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        summary["steps"][name] = {"status": "ok" if code == 0 else f"failed ({code})",
                                  "seconds": round(time.perf_counter() - begin, 1), "log": log.name}
        print(f"{name}: {summary['steps'][name]['status']} in {summary['steps'][name]['seconds']} s", flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
