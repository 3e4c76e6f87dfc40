"""Quality and escalation sweep of the certified cache (prints JSON lines and a markdown table).

For each quantizer and bit setting (`QUANTIZER:K/V`), one engine evaluates (engine.evaluate) the quantized baseline
and audit mode at each tolerance on the same windows of the corpus: perplexity and KL against dense, rung-0 rate, audit violations,
bound tightness and bytes per token. Audit mode returns exactly what certified mode returns, plus the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def table(rows: list[dict]) -> str:
    head = ("| quantizer | bits K/V | mode | tolerance | PPL | vs dense | KL | rung 0 | rung 1 | rung 2 | rung 3 | "
            "bound violations | promise violations | median actual/bound | worst actual/promise | "
            "mass on quantized keys | tier-1 bytes vs FP16 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value, spec=""):
        return "-" if value is None else format(value, spec)

    lines = []
    for r in rows:
        rungs = r["rung_fraction"] or [None] * 5
        lines.append(" | ".join([
            f"| {r['quantizer']}", f"K{r['k_bits']}/V{r['v_bits']}", r["mode"], fmt(r["tolerance"]), f"{r['ppl']:.3f}",
            f"{r['ppl_delta_pct']:+.2f}%", f"{r['kl_mean']:.2e}",
            *(fmt(None if x is None else 100 * x, ".1f") + ("%" if x is not None else "") for x in rungs[:4]),
            fmt(r["audit_violations"]), fmt(r["promise_violations"]), fmt(r["median_actual_over_bound"], ".3f"),
            fmt(r["worst_actual_over_promise"], ".3f"), fmt(r["quantized_key_mass"], ".2f"),
            f"{r['tier1_bytes_per_token_vs_fp16']:.3f} |"]))
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=ROOT / ".data" / "kjv.txt")
    parser.add_argument("--model", default="default")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--configs", nargs="+", default=["minmax:8/4", "minmax:4/4", "minmax:4/2", "minmax:8/2"],
                        help="QUANTIZER:K/V[:RANKxBITS], e.g. minmax/hadamard:5/2 or headq/hadamard:4/2:32x4 "
                             "(engine/kv/quantizers.py, engine/kv/headq.py)")
    parser.add_argument("--headq-basis",
                        help="default: headq.safetensors beside the model (python -m engine.calibrate)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--scratch-blocks", type=int, default=16,
                        help="exact pieces per layer: a small fraction of the windows' blocks, as with long contexts")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.evaluate import evaluate, windows_of
    from engine.request import KVMode, KVPolicy

    rows = []
    for spec in args.configs:
        quantizer, bits, *side = spec.split(":")
        k_bits, v_bits = (int(b) for b in bits.split("/"))
        rank, side_bits = (int(x) for x in (side[0] if side else "32x4").split("x"))
        engine = LLMEngine(EngineConfig(model=args.model, kv_mode="audit", quantizer=quantizer, k_bits=k_bits,
                                        v_bits=v_bits, threads=args.threads, max_num_seqs=64, headq_rank=rank,
                                        headq_bits=side_bits, headq_basis=args.headq_basis,
                                        max_num_batched_tokens=4096, scratch_blocks=args.scratch_blocks,
                                        enable_prefix_caching=False))  # every mode computes its own windows
        tokens = engine.tokenizer(args.text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        windows = windows_of(tokens, args.window, args.max_tokens)
        policies = [KVPolicy(KVMode.QUANTIZED, 0.0)] + [KVPolicy(KVMode.AUDIT, t) for t in args.tolerances]
        for policy in policies:
            row = evaluate(engine, windows, policy)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
