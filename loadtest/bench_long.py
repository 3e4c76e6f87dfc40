"""Long-context evidence (`make evaluate-long`): retrieval and perplexity from 1K to 8K tokens, every mode item by item
against dense, with the escalations, the tier-2 traffic and the device memory per token (prints JSON and tables).

For each context length and each configuration (bit setting, scratch), one tiered engine serves every item in dense
mode (the exact computation from the shadows), quantized mode (tier 1 only) and certified mode, with the server's
own defaults otherwise, prefix caching included: the quantized and certified runs of an item start from the blocks
its dense run wrote (quantized once, at write time), as a repeated prompt does in serving:
  passkey   a five-digit number hidden at several depths in filler text; the greedy answer (up to 12 tokens) of every
            mode is compared with dense's;
  needles   several keys of several doors in the same filler; one door asked;
  ppl       a window of the development corpus (.data/kjv.txt, `make corpus`): the prompt is its first L - N tokens,
            the last N are teacher-forced one decode step at a time, so that every scored token attends the long
            context through the tier it is read from; perplexity of each mode against dense's.
Where dense's two best logits at an answer token are within NEAR_TIE, a disagreement is reported as a near-tie.
Per length and configuration: certified head-evaluations by rung, tier-2 bytes fetched per generated token, the
prefetch hit rate, and device bytes per token of capacity (tier 1 with its annotations and partial-block buffers,
the scratch and the prefetch pool, counted from the tensors allocated) against a dense cache in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
DOORS = ("red", "blue", "green", "yellow", "white")
NEAR_TIE = 0.01
MODES = ("dense", "quantized", "certified")


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[list[int], str]:
    """A chat prompt of about `length` tokens hiding a five-digit key at `depth` of the filler; (ids, the key)."""
    key = str(random.Random(seed).randrange(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    return _haystack(tokenizer, length, [(depth, needle)], "What is the pass key? Answer with the number only."), key


def needles_prompt(tokenizer, length: int, seed: int) -> tuple[list[int], str]:
    """Several doors' keys at spread depths; the question asks for one door's key."""
    rng = random.Random(seed)
    keys = {door: str(rng.randrange(10000, 99999)) for door in DOORS}
    asked = rng.choice(DOORS)
    needles = [((i + 0.5) / len(DOORS), f" The key of the {door} door is {key}. ") for i, (door, key) in
               enumerate(keys.items())]
    return _haystack(tokenizer, length, needles, f"What is the key of the {asked} door? Answer with the number "
                                                  "only."), keys[asked]


def _haystack(tokenizer, length: int, needles: list[tuple[float, str]], question: str) -> list[int]:
    intro = "There is important information hidden in a lot of irrelevant text. Find it and remember it.\n\n"
    filler_tokens = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(intro + question + "".join(n for _, n in needles), add_special_tokens=False)["input_ids"])
    repeats = max(1, (length - fixed - 40) // filler_tokens)
    pieces, placed = [], sorted(needles)
    for i in range(repeats):
        while placed and placed[0][0] * repeats <= i:
            pieces.append(placed.pop(0)[1])
        pieces.append(FILLER)
    pieces += [n for _, n in placed]
    messages = [{"role": "user", "content": intro + "".join(pieces) + "\n\n" + question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def engine_for(args, bits: tuple[int, int], scratch: int | None, capacity_tokens: int):
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    blocks = capacity_tokens // 16 + 64
    extra = {} if scratch is None else {"scratch_blocks": scratch}
    return LLMEngine(EngineConfig(model=args.model, kv_mode="certified", k_bits=bits[0], v_bits=bits[1],
                                  num_kv_blocks=blocks, max_num_seqs=args.items + 4, threads=args.threads,
                                  max_model_len=max(args.lengths) + 64, **extra))


def answer(engine, prompts: list[list[int]], mode: str, new: int = 12) -> dict:
    """Greedy answers of every prompt in `mode`, in one batch: tokens, the top-two logprob gap at each token (a
    near-tie when below NEAR_TIE) and the certificates."""
    from engine.request import KVMode, SamplingParams, StoppingParams

    kv = engine.kv_policy(KVMode(mode), None)
    params = SamplingParams(logprobs=True, top_logprobs=2)
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.new_request(f"{mode}:{i}", prompt, params, StoppingParams(max_new_tokens=new), kv))
    tokens, gaps, certificates = ({i: [] for i in range(len(prompts))} for _ in range(3))
    while engine.has_unfinished():
        for out in engine.step():
            i = int(out.request_id.split(":")[1])
            tokens[i] += out.token_ids
            gaps[i] += [lp.top[0][1] - lp.top[1][1] for lp in out.logprobs if len(lp.top) > 1]
            if out.finished:
                certificates[i] = out.certificate
    return {"tokens": tokens, "gaps": gaps, "certificates": certificates}


def score(engine, windows: list[tuple[list[int], list[int]]], mode: str) -> dict:
    """Teacher-forced NLL of each window's scored tokens after its prompt, in `mode`, one decode step a token."""
    from engine.request import KVMode, SamplingParams, StoppingParams

    kv = engine.kv_policy(KVMode(mode), None)
    for i, (prompt, scored) in enumerate(windows):
        stopping = StoppingParams(max_new_tokens=len(scored), ignore_eos=True)
        engine.add_request(engine.new_request(f"{mode}:{i}", prompt, SamplingParams(), stopping, kv))
    nll, certificates = {i: 0.0 for i in range(len(windows))}, {}
    while engine.has_unfinished():
        forced = {}
        for rid, request in engine.scheduler.requests.items():
            prompt, scored = windows[int(rid.split(":")[1])]
            if request.num_tokens - len(prompt) < len(scored):
                forced[rid] = scored[request.num_tokens - len(prompt)]
        logits, finished = engine.score_step(forced)
        certificates |= {int(rid.split(":")[1]): c for rid, c in finished.items()}
        for rid, row in logits.items():
            nll[int(rid.split(":")[1])] -= float(torch.log_softmax(row, dim=-1)[forced[rid]])
    return {"nll": nll, "tokens": sum(len(s) for _, s in windows), "certificates": certificates}


def memory(engine) -> dict:
    """Device bytes per token of capacity, certified cache (pools included) and a dense cache in the same dtype."""
    cache, spec = engine.runner.cache, engine.spec
    total = cache.device_bytes()
    tokens = spec.num_kv_blocks * spec.block_size
    dense = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * cache.dtype.itemsize
    return {"certified_bytes_per_token": round(total / tokens, 1), "dense_bytes_per_token": dense,
            "ratio": round(total / tokens / dense, 4), "scratch_pieces_per_layer": cache.scratch[0].capacity,
            "prefetch_pieces_per_layer": cache.copy.limit if cache.copy.enabled else 0}


def rungs(certificates) -> dict:
    """Head-evaluations by rung (fractions), tier-2 bytes fetched, over the certificates of one run."""
    counts = [sum(c.rungs[r] for c in certificates) for r in range(5)]
    total = sum(counts)
    return {"rung_fraction": [round(n / total, 4) for n in counts] if total else None,
            "tier2_bytes": sum(c.transfer_bytes for c in certificates)}


def evaluate_length(args, length: int, bits: tuple[int, int], scratch, corpus: list[int]) -> dict:
    """Every item at one context length in every mode of one configuration."""
    engine = engine_for(args, bits, scratch, length * (args.items + 2))
    tokenizer = engine.tokenizer
    depths = [(d + 0.5) / args.items for d in range(args.items)]
    items = [passkey_prompt(tokenizer, length, depth, seed=length + i) for i, depth in enumerate(depths)]
    items.append(needles_prompt(tokenizer, length, seed=length))
    windows = [(corpus[:length - args.scored], corpus[length - args.scored:length])] if len(corpus) >= length else []
    row = {"length": length, "bits": f"K{bits[0]}/V{bits[1]}", "scratch": engine.runner.cache.scratch[0].capacity,
           "items": len(items), "prompt_tokens": [len(p) for p, _ in items], "memory": memory(engine)}
    started = time.perf_counter()
    results = {mode: answer(engine, [p for p, _ in items], mode) for mode in MODES}
    dense = results["dense"]
    row["keys"] = [k for _, k in items]
    for mode in MODES:
        texts = [engine.tokenizer.decode(results[mode]["tokens"][i]) for i in range(len(items))]
        same = [results[mode]["tokens"][i] == dense["tokens"][i] for i in range(len(items))]
        first_diff = [next((j for j, (a, b) in enumerate(zip(results[mode]["tokens"][i], dense["tokens"][i]))
                            if a != b), None) for i in range(len(items))]
        ties = [not same[i] and first_diff[i] is not None and dense["gaps"][i][first_diff[i]] < NEAR_TIE
                for i in range(len(items))]
        row[mode] = {"answers": texts, "correct": sum(k in t for (_, k), t in zip(items, texts)),
                     "same_as_dense": sum(same), "near_ties": sum(ties),
                     **(rungs(results[mode]["certificates"].values()) if mode == "certified" else {})}
        generated = sum(len(t) for t in results[mode]["tokens"].values())
        if mode == "certified":
            row[mode]["tier2_bytes_per_generated_token"] = round(row[mode]["tier2_bytes"] / max(generated, 1))
    if windows:
        scores = {mode: score(engine, windows, mode) for mode in MODES}
        for mode in MODES:
            ppl = math.exp(sum(scores[mode]["nll"].values()) / scores[mode]["tokens"])
            row[mode]["ppl"] = round(ppl, 4)
            row[mode]["ppl_vs_dense_pct"] = round(100 * (ppl / math.exp(
                sum(scores["dense"]["nll"].values()) / scores["dense"]["tokens"]) - 1), 3)
        row["certified"]["ppl_rungs"] = rungs(scores["certified"]["certificates"].values())["rung_fraction"]
    hits, misses = engine.runner.cache.prefetch_counts()
    row["prefetch_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
    row["seconds"] = round(time.perf_counter() - started, 1)
    del engine
    return row


def table(rows: list[dict]) -> str:
    lines = ["| context | bits | scratch | correct dense / quantized / certified | certified = dense | quantized = dense "
             "| near-ties | PPL vs dense (quantized, certified) | rung 0 | rungs 1-3 | tier-2 bytes / token | "
             "bytes/token vs dense |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, q, d = r["certified"], r["quantized"], r["dense"]
        fractions = c.get("rung_fraction") or [None] * 5
        lines.append(
            f"| {r['length']} | {r['bits']} | {r['scratch']} | {d['correct']} / {q['correct']} / {c['correct']} of "
            f"{r['items']} | {c['same_as_dense']}/{r['items']} | {q['same_as_dense']}/{r['items']} | "
            f"{c['near_ties']} | {q.get('ppl_vs_dense_pct', '-')}%, {c.get('ppl_vs_dense_pct', '-')}% | "
            f"{'-' if fractions[0] is None else f'{100 * fractions[0]:.1f}%'} | "
            f"{'-' if fractions[0] is None else ', '.join(f'{100 * x:.1f}%' for x in fractions[1:4])} | "
            f"{c.get('tier2_bytes_per_generated_token', '-')} | {r['memory']['ratio']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["bits"], r["scratch"]) for r in rows}):
        series = sorted((r for r in rows if (r["bits"], r["scratch"]) == key), key=lambda r: r["length"])
        lengths = [r["length"] for r in series]
        escalated = [100 * (1 - (r["certified"].get("rung_fraction") or [1])[0]) for r in series]
        left.plot(lengths, escalated, marker="o", label=f"{key[0]}, scratch {key[1]}")
        right.plot(lengths, [r["memory"]["ratio"] for r in series], marker="o", label=f"{key[0]}, scratch {key[1]}")
    left.set(xscale="log", xlabel="context (tokens)", ylabel="head-evaluations escalated (%)",
             title="Escalations (certified)")
    right.set(xscale="log", xlabel="context (tokens)", ylabel="device bytes per token / dense",
              title="Device memory, pools included")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--bits", nargs="+", default=["8/4", "4/2"])
    parser.add_argument("--scratch", nargs="+", default=["default", "16"],
                        help="scratch pieces per layer: the server's default, and small ones")
    parser.add_argument("--items", type=int, default=2, help="passkey depths per length (plus one needles item)")
    parser.add_argument("--scored", type=int, default=64, help="teacher-forced tokens of the perplexity window")
    parser.add_argument("--text", type=Path, default=ROOT / ".data" / "kjv.txt")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--plot", type=Path, help="also draw escalations and memory against context (PNG)")
    parser.add_argument("--smoke", action="store_true", help="one short context, two items (make test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.items, args.scored, args.scratch, args.bits = [200], 1, 8, ["16"], ["8/4"]
    from engine.model_runner import load_tokenizer
    from engine.weights import resolve_model

    args.model = str(resolve_model(args.model))
    corpus = []
    if args.text.exists():
        corpus = load_tokenizer(args.model)(args.text.read_text(encoding="utf-8"), add_special_tokens=False)[
            "input_ids"]
    rows, started = [], time.perf_counter()
    for bits in args.bits:
        for scratch in args.scratch:
            for length in args.lengths:
                row = evaluate_length(args, length, tuple(int(b) for b in bits.split("/")),
                                      None if scratch == "default" else int(scratch), corpus)
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = {"machine": f"{os.cpu_count()} CPU cores", "model": Path(args.model).name,
            "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({"meta": meta}))
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
