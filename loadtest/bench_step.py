"""What one decode step costs, dense against certified, counted operation by operation (prints JSON and a table).

For N requests decoding together (random prompts of --prompt-tokens tokens), after every request has left prefill,
each of --steps decode steps is run under a TorchDispatchMode that counts every aten operation and attributes it to
the part of certkv that issued it (the innermost frame of ours on the stack: the model's own layers, the write path,
the certified kernel or twin, the bound, the ladder, the scratch, prefetch, tier-2 traffic, accounting, planning,
sampling). It also counts host synchronisation points: operations that read device data on the host on CUDA
(`.item()`, `bool()` of a tensor, `.tolist()`, `nonzero`, boolean-mask indexing, `repeat_interleave` without an
output size, device-to-host copies, tensors built from Python lists on a device). A CPU run counts the same calls, so
it tells the CUDA story before a GPU is lent. Steps are then timed without the counter, and each part's exclusive
time measured by wrapping its entry points.

Models: the default model, and `--llama8b-layers N`: a random-weight model with Llama-3-8B's attention and MLP shapes
(hidden 4096, 32 query and 8 KV heads of 128, MLP 14336; vocabulary 32000) and N layers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# (file under the repository, function) -> part; "*" any function of the file. The innermost match on the stack wins.
PARTS = {
    ("engine/kv/tiers.py", "_write"): "write", ("engine/kv/tiers.py", "_quantize"): "write",
    ("engine/kv/tiers.py", "_keep_filled"): "write", ("engine/kv/tiers.py", "_update_spread"): "write",
    ("kernels/cpu.py", "write_layer"): "write",
    ("engine/kv/tiers.py", "verify"): "tier-2 traffic", ("engine/kv/tiers.py", "promote"): "tier-2 traffic",
    ("engine/kv/tiers.py", "exact_decode"): "tier-2 traffic", ("engine/kv/copy_engine.py", "*"): "tier-2 traffic",
    ("engine/kv/tiers.py", "prepare"): "planning", ("engine/kv/tiers.py", "_windowed"): "planning",
    ("engine/batch.py", "*"): "planning",
    ("kernels/reference.py", "decode_accumulators"): "accumulators", ("kernels/cpu.py", "certified_decode"): "kernel",
    ("kernels/certified_decode.py", "*"): "accumulators",
    ("kernels/reference.py", "finish_decode"): "bound", ("engine/kv/escalation.py", "check"): "bound",
    ("engine/kv/escalation.py", "run"): "ladder", ("engine/kv/escalation.py", "_escalate"): "ladder",
    ("engine/kv/escalation.py", "_prefetch"): "prefetch", ("engine/kv/tiers.py", "prefetch"): "prefetch",
    ("engine/kv/escalation.py", "_audit"): "audit",
    ("engine/kv/scratch.py", "*"): "scratch", ("kernels/reference.py", "touch_scratch"): "scratch",
    ("engine/kv/escalation.py", "account"): "accounting", ("engine/kv/tiers.py", "end_step"): "accounting",
    ("engine/kv/tiers.py", "_quantized_decode"): "attention", ("engine/kv/tiers.py", "forward"): "attention",
    ("engine/kv/paged.py", "*"): "attention", ("kernels/reference.py", "decode_attention"): "attention",
    ("kernels/reference.py", "paged_attention"): "attention",
    ("engine/sampler.py", "*"): "sampling", ("engine/engine.py", "*"): "engine",
}
PART_ORDER = ["model", "attention", "write", "kernel", "accumulators", "bound", "ladder", "scratch", "prefetch",
              "tier-2 traffic", "audit", "accounting", "planning", "sampling", "engine", "other"]
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
            "is_nonzero", "allclose", "equal"}


def part_of(frame) -> str:
    root = str(ROOT) + os.sep
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}transformers{os.sep}" in path:
            return "model"
        if path.startswith(root):
            relative = path[len(root):]
            for key in ((relative, frame.f_code.co_name), (relative, "*")):
                if key in PARTS:
                    return PARTS[key]
        frame = frame.f_back
    return "other"


class OpCounter(TorchDispatchMode):
    """Counts aten operations by part, and the ones that synchronise with the device on CUDA."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.names: defaultdict = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        part = part_of(sys._getframe(1))
        name = func.__name__.split(".")[0]
        self.ops[part] += 1
        self.names[part][name] += 1
        if self._syncs(name, args, kwargs):
            self.syncs[part] += 1
        return func(*args, **kwargs)

    def _syncs(self, name: str, args, kwargs) -> bool:
        if name in SYNC_OPS:
            return True
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
        if name == "repeat_interleave":  # with a tensor of repeats, the output's size is read from the device
            return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) and kwargs.get(
                "output_size") is None
        if name in ("_to_copy", "copy_"):  # device -> host copies, and host lists moved to a device
            source = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else kwargs.get("device", source.device)
            return isinstance(source, torch.Tensor) and source.device != target
        return False


class HostReads:
    """Counts Tensor.tolist on the engine's device type (a host read of device data on CUDA; on a CPU run every
    tolist counts, host-only tensors too: an upper bound), by part."""

    METHODS = ("tolist",)  # item() and bool() dispatch _local_scalar_dense, which the counter sees

    def __init__(self, counter: OpCounter):
        self.counter = counter
        self.saved = {}

    def __enter__(self):
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original

            def wrapped(tensor, *args, __original=original, **kwargs):
                if tensor.device.type == self.counter.device.type:
                    self.counter.syncs[part_of(sys._getframe(1))] += 1
                return __original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def llama8b_shaped(layers: int, directory: Path) -> Path:
    """A random-weight Llama with Llama-3-8B's layer shapes (vocabulary 32000), saved with the default tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.weights import default_model_dir

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((default_model_dir() / name).read_bytes())
    return directory


def engine_for(model: str, mode: str, threads: int, device: str):
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=model, kv_mode=mode, threads=threads, device=device, max_num_seqs=64,
                                  max_num_batched_tokens=4096, num_kv_blocks=4096))


def decoding(engine, n: int, prompt_tokens: int, steps: int, seed: int = 0):
    """Admits n requests and steps until all are decoding; returns the engine ready for `steps` decode steps."""
    from engine.request import SamplingParams, StoppingParams

    vocab = engine.spec.vocab_size
    generator = torch.Generator().manual_seed(seed)
    stopping = StoppingParams(max_new_tokens=steps * 3 + 8, ignore_eos=True)
    for i in range(n):
        prompt = torch.randint(100, vocab - 100, (prompt_tokens,), generator=generator).tolist()
        engine.add_request(engine.new_request(f"s{i}", prompt, SamplingParams(), stopping))
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    engine.step()  # the first decode step builds what later ones reuse
    return engine


def count_step(engine) -> tuple[Counter, Counter, dict]:
    counter = OpCounter(engine.runner.device)
    with counter, HostReads(counter):
        engine.step()
    return counter.ops, counter.syncs, {part: dict(names.most_common(8)) for part, names in counter.names.items()}


class PartTimer:
    """Exclusive wall time per part: each wrapped entry point's time minus that of wrapped calls inside it."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.stack: list[list] = []
        self.restore: list = []

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self.stack.append([part, 0.0])
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                _, inner = self.stack.pop()
                self.seconds[part] += elapsed - inner
                if self.stack:
                    self.stack[-1][1] += elapsed

        setattr(owner, name, timed)
        self.restore.append((owner, name, original))

    def restore_all(self) -> None:
        for owner, name, original in reversed(self.restore):
            setattr(owner, name, original)


def timed_steps(engine, steps: int) -> tuple[list[float], Counter]:
    import engine.kv.escalation as escalation
    import engine.kv.tiers as tiers
    import engine.kv.scratch as scratch
    import engine.engine as engine_module

    timer = PartTimer()
    cache = engine.runner.cache
    for owner, name, part in ((cache, "forward", "attention"), (cache, "_write", "write"),
                              (cache, "_quantized_decode", "attention"), (cache, "end_step", "accounting"),
                              (cache, "prepare", "planning"), (cache, "promote", "tier-2 traffic"),
                              (cache, "exact_decode", "tier-2 traffic"), (cache, "verify", "tier-2 traffic"),
                              (tiers, "certified_decode", "kernel"), (escalation.Ladder, "run", "ladder"),
                              (escalation.Ladder, "_prefetch", "prefetch"), (scratch.Scratch, "touch", "scratch"),
                              (engine_module, "sample", "sampling"), (engine.runner, "execute", "model")):
        if hasattr(owner, name):
            timer.wrap(owner, name, part)
    times = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    finally:
        timer.restore_all()
    total = Counter({part: seconds / steps for part, seconds in timer.seconds.items()})
    return times, total


def measure(model: str, mode: str, n: int, args) -> dict:
    engine = decoding(engine_for(model, mode, args.threads, args.device), n, args.prompt_tokens, args.steps)
    ops, syncs, names = count_step(engine)
    times, parts = timed_steps(engine, args.steps)
    layers = engine.spec.num_layers
    return {"model": Path(model).name, "mode": mode, "requests": n, "layers": layers, "device": args.device,
            "ops_per_step": sum(ops.values()), "syncs_per_step": sum(syncs.values()),
            "ops_by_part": dict(ops), "syncs_by_part": dict(syncs), "top_ops_by_part": names,
            "step_ms_median": round(1000 * statistics.median(times), 2),
            "ms_by_part": {part: round(1000 * seconds, 2) for part, seconds in parts.items()}}


def table(rows: list[dict]) -> str:
    lines = ["| model | requests | mode | ops/step | ops/layer (certkv parts) | syncs/step | syncs/layer (attention) "
             "| step ms | parts (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    ours = ("attention", "write", "kernel", "accumulators", "bound", "ladder", "scratch", "prefetch", "tier-2 traffic",
            "audit")
    for r in rows:
        layer_ops = sum(r["ops_by_part"].get(p, 0) for p in ours) / r["layers"]
        layer_syncs = sum(r["syncs_by_part"].get(p, 0) for p in ours) / r["layers"]
        parts = ", ".join(f"{p} {r['ms_by_part'][p]}" for p in PART_ORDER if r["ms_by_part"].get(p))
        lines.append(f"| {r['model']} | {r['requests']} | {r['mode']} | {r['ops_per_step']} | {layer_ops:.1f} | "
                     f"{r['syncs_per_step']} | {layer_syncs:.2f} | {r['step_ms_median']} | {parts} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", default=["dense", "certified"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed (one more is counted)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llama8b-layers", type=int, default=0, help="also a random Llama-3-8B-shaped model")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    from engine.weights import resolve_model

    models = [str(resolve_model(args.model))]
    scratch = tempfile.TemporaryDirectory() if args.llama8b_layers else None
    if scratch:
        models.append(str(llama8b_shaped(args.llama8b_layers, Path(scratch.name))))
    rows = []
    for model in models:
        for n in args.requests:
            for mode in args.modes:
                row = measure(model, mode, n, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores, {args.device}", "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
