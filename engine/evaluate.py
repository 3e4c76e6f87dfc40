"""`python -m engine.evaluate --text FILE`: teacher-forced quality of a KV mode against dense, through the engine.

The text is cut into windows of --window tokens. Each window runs twice in the same batch: once in dense mode (the
exact computation from the shadows) and once in the mode under test (prefix caching off: each computes its own). The
first token is the prompt; every later token is forced (teacher forcing) one decode step at a time, so every scored
position goes through decode attention over the tiered cache exactly as serving does. Reported: perplexity of both,
the mean KL(dense || mode) per position, the certificate aggregates (escalation rate per rung, audit violations, bound
tightness) and tier-1 / tier-2 bytes per token relative to an FP16 dense cache (whatever dtype the model runs in).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.quantizers import KEY_BITS, VALUE_BITS
from engine.kv.stats import RUNGS, CertificateStats
from engine.request import KVMode, KVPolicy, SamplingParams, StoppingParams


def windows_of(tokens: list[int], window: int, max_tokens: int) -> list[list[int]]:
    tokens = tokens[:max_tokens]
    return [tokens[i:i + window] for i in range(0, len(tokens) - window + 1, window)]


def evaluate(engine: LLMEngine, windows: list[list[int]], policy: KVPolicy) -> dict:
    """Scores every window in `policy` and in dense mode side by side; returns the JSON-ready summary."""
    start = time.perf_counter()
    text = {}
    for i, window in enumerate(windows):
        for kind, kv in (("dense", KVPolicy(KVMode.DENSE)), ("mode", policy)):
            rid = f"{i}:{kind}"
            text[rid] = window
            stopping = StoppingParams(max_new_tokens=len(window) - 1, ignore_eos=True)
            engine.add_request(engine.new_request(rid, window[:1], SamplingParams(), stopping, kv))
    nll = {"dense": 0.0, "mode": 0.0}
    kl_sum, scored, certificates = 0.0, 0, {}
    while engine.has_unfinished():
        forced = {rid: text[rid][request.num_tokens] for rid, request in engine.scheduler.requests.items()
                  if request.num_tokens < len(text[rid])}
        logits, finished = engine.score_step(forced)
        certificates |= finished
        logprobs = {rid: torch.log_softmax(row, dim=-1) for rid, row in logits.items()}
        for rid, lp in logprobs.items():
            nll[rid.split(":")[1]] -= float(lp[forced[rid]])
        for i in {rid.split(":")[0] for rid in logprobs}:
            dense, mode = logprobs.get(f"{i}:dense"), logprobs.get(f"{i}:mode")
            if dense is None or mode is None:
                raise RuntimeError("the dense and tested copies of a window fell out of lockstep")
            kl_sum += float((dense.exp() * (dense - mode)).sum())
            scored += 1
    stats = [c for rid, c in certificates.items() if rid.endswith(":mode") and c is not None]
    return summarize(engine, policy, windows, nll, kl_sum, scored, stats, time.perf_counter() - start)


def summarize(engine, policy, windows, nll, kl_sum, scored, stats: list[CertificateStats], seconds) -> dict:
    cache, config = engine.runner.cache, engine.config
    evaluations = sum(s.evaluations for s in stats)
    rungs = [sum(s.rungs[r] for s in stats) for r in range(RUNGS)]
    certifying = policy.mode in (KVMode.CERTIFIED, KVMode.AUDIT)
    fp16 = 2 * engine.spec.head_dim * 2
    hist = [sum(s.ratio_hist[b] for s in stats) for b in range(len(stats[0].ratio_hist))] if stats else []
    return {
        "mode": policy.mode.value, "tolerance": policy.tolerance if certifying else None,
        "quantizer": config.quantizer + (f" r{config.headq_rank}x{config.headq_bits}" if "headq" in config.quantizer
                                         else ""), "k_bits": config.k_bits, "v_bits": config.v_bits,
        "windows": len(windows), "window": len(windows[0]), "tokens_scored": scored,
        "ppl": math.exp(nll["mode"] / scored), "ppl_dense": math.exp(nll["dense"] / scored),
        "ppl_delta_pct": 100 * (math.exp((nll["mode"] - nll["dense"]) / scored) - 1),
        "kl_mean": kl_sum / scored,
        "evaluations": evaluations,
        "rung_fraction": [r / evaluations for r in rungs] if certifying and evaluations else None,
        "escalation_rate": 1 - rungs[0] / evaluations if certifying and evaluations else None,
        "audit_violations": sum(s.audit_violations for s in stats) if policy.mode is KVMode.AUDIT else None,
        "promise_violations": sum(s.promise_violations for s in stats) if policy.mode is KVMode.AUDIT else None,
        "worst_actual_over_bound": max((s.worst_actual_over_bound for s in stats), default=0.0)
        if policy.mode is KVMode.AUDIT else None,
        "worst_actual_over_promise": max((s.worst_actual_over_promise for s in stats), default=0.0)
        if policy.mode is KVMode.AUDIT else None,
        "median_actual_over_bound": CertificateStats.histogram_median(hist) if policy.mode is KVMode.AUDIT else None,
        "quantized_key_mass": sum(s.quantized_key_mass for s in stats) / evaluations if evaluations else None,
        "scratch_blocks": cache.scratch[0].capacity,
        "tier2_bytes_fetched_per_token": sum(s.transfer_bytes for s in stats) / max(scored, 1),
        "tier1_bytes_per_token_vs_fp16": cache.tier1_bytes_per_token() / fp16,
        "tier2_bytes_per_token_vs_fp16": cache.tier2_bytes_per_token() / fp16,
        "seconds": round(seconds, 1),
    }


def build_parser(prog: str = "python -m engine.evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, required=True, help="a UTF-8 text file (the corpus)")
    p.add_argument("--model", default="default")
    p.add_argument("--window", type=int, default=512, help="tokens per window (the context length scored)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens of the text used (whole windows)")
    p.add_argument("--kv-mode", default="audit", choices=["quantized", "certified", "exact", "audit"])
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--k-bits", type=int, default=8, choices=KEY_BITS)
    p.add_argument("--v-bits", type=int, default=4, choices=VALUE_BITS)
    p.add_argument("--quantizer", default="minmax")
    p.add_argument("--headq-rank", type=int, default=32)
    p.add_argument("--headq-bits", type=int, default=4)
    p.add_argument("--headq-basis", default=None)
    p.add_argument("--scratch-blocks", type=int, default=32,
                   help="scratch pieces per layer; keep it small against the windows, or everything stays exact")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m engine.evaluate") -> None:
    args = build_parser(prog).parse_args(argv)
    overrides = {} if args.tolerance is None else {"tolerance": args.tolerance}
    config = EngineConfig(model=args.model, kv_mode=args.kv_mode, k_bits=args.k_bits, v_bits=args.v_bits,
                          quantizer=args.quantizer, threads=args.threads, max_num_seqs=64,
                          headq_rank=args.headq_rank, headq_bits=args.headq_bits, headq_basis=args.headq_basis,
                          scratch_blocks=args.scratch_blocks,
                          max_num_batched_tokens=4096, enable_prefix_caching=False, **overrides)
    engine = LLMEngine(config)
    tokens = engine.tokenizer(args.text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    windows = windows_of(tokens, args.window, args.max_tokens)
    if not windows:
        sys.exit(f"--text has {len(tokens)} tokens: fewer than one window of {args.window}")
    if 2 * len(windows) > config.max_num_seqs:
        sys.exit(f"{len(windows)} windows need {2 * len(windows)} sequences; lower --max-tokens")
    result = evaluate(engine, windows, engine.kv_policy(KVMode(args.kv_mode), args.tolerance))
    if not args.json:
        for key, value in result.items():
            print(f"{key:>34}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
