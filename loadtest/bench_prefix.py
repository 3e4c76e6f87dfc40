"""Prefix caching on a chat workload: a shared system prompt of about --system-tokens tokens and short user
turns, caching on against off, in each --kv-modes mode (prints JSON and a table).

Each round starts a new system prompt (its first line carries the round's number, so nothing is cached from an
earlier round) and runs, on an engine with caching off and one with it on, stepped in this process:
  sequential  --users chats one after another, each alone in the engine: the first is cold, the later ones find the
              system prompt cached; time to first token (TTFT) from submission, and the total time of each;
  concurrent  --batch chats submitted at once (the system prompt already served once, as in a running service):
              output tokens per second over the wall time, and TTFT.
Greedy tokens of every chat are compared between on and off; the hit rate is the prefix cache's hit tokens over the
tokens looked up. Configurations alternate within each round, so slow phases of a shared machine hit both alike;
medians over the rounds are reported.

    python loadtest/bench_prefix.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GUIDELINES = [
    "Answer the question that was asked, and only that question, in plain and friendly language.",
    "When a question is ambiguous, state the most likely reading and answer it, then offer the other reading.",
    "Prefer short paragraphs to lists, and never use more than three sentences when one would do.",
    "Give numbers with their units, dates in full, and names as the people they belong to spell them.",
    "If you do not know something, say so plainly instead of guessing, and suggest where it could be found.",
    "Do not repeat the question back to the user, and do not begin with a compliment about the question.",
    "Keep a calm, respectful tone, even when the user is rude or the subject is difficult.",
    "Never give medical, legal or financial advice as if it were certain; recommend a professional instead.",
    "When asked for code, give a short, complete example that runs, and explain only what is not obvious.",
    "Refuse requests that would harm people, and explain briefly why, without lecturing.",
]
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Why is the sky blue?",
             "Name a prime number larger than ten.", "What is the boiling point of water?",
             "Who wrote Romeo and Juliet?", "How far is the Moon?", "What do bees make?",
             "Translate 'good morning' into Spanish.", "What is two plus two?", "Which planet is the largest?",
             "What colour are emeralds?", "How many days are in a leap year?", "What is the opposite of cold?",
             "Where do penguins live?", "What language is spoken in Brazil?"]


def system_prompt(tokenizer, tokens: int, round_index: int) -> str:
    """Guidelines repeated (numbered) until the system message alone is about `tokens` tokens."""
    lines, index = [f"You are the assistant of chat round {round_index}. Follow these rules in every answer."], 0
    while len(tokenizer(" ".join(lines))["input_ids"]) < tokens:
        lines.append(f"Rule {index + 1}: {GUIDELINES[index % len(GUIDELINES)]}")
        index += 1
    return " ".join(lines)


def chat(tokenizer, system: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def make_engine(args, mode: str, caching: bool):
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=args.model, kv_mode=mode, threads=args.threads, enable_prefix_caching=caching,
                                  max_num_seqs=max(args.batch, 8), max_num_batched_tokens=args.batched_tokens,
                                  num_kv_blocks=args.blocks))


def run(engine, prompts: list[list[int]], new: int, tag: str) -> dict:
    """Submits the prompts at once and steps to the end: per request its TTFT, tokens and last token's time."""
    from engine.request import SamplingParams, StoppingParams

    stopping = StoppingParams(max_new_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(engine.new_request(rid, prompt, SamplingParams(), stopping))
    first, last, tokens = {}, {}, {rid: [] for rid in ids}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            first.setdefault(out.request_id, now - start)
            last[out.request_id] = now - start
            tokens[out.request_id] += out.token_ids
    return {"ttft": [first[r] for r in ids], "end": [last[r] for r in ids], "tokens": [tokens[r] for r in ids],
            "wall": max(last.values())}


def one_round(engines: dict, args, tokenizer, round_index: int) -> dict:
    """Both phases on every engine, alternating; returns per engine (mode, caching) its measures and tokens."""
    system = system_prompt(tokenizer, args.system_tokens, round_index)
    users = [chat(tokenizer, system, QUESTIONS[(round_index + i) % len(QUESTIONS)]) for i in range(args.users)]
    batch = [chat(tokenizer, system, QUESTIONS[(round_index + 7 + i) % len(QUESTIONS)]) for i in range(args.batch)]
    results = {key: {"sequential": [], "tokens": []} for key in engines}
    for index, prompt in enumerate(users):
        for key, engine in engines.items():
            done = run(engine, [prompt], args.new_tokens, f"r{round_index}s{index}")
            results[key]["sequential"].append((done["ttft"][0], done["end"][0]))
            results[key]["tokens"].append(done["tokens"][0])
    for key, engine in engines.items():
        queries, hits = engine.scheduler.prefix_queries, engine.scheduler.prefix_hits
        done = run(engine, batch, args.new_tokens, f"r{round_index}c")
        results[key] |= {"concurrent": done, "batch_tokens": done["tokens"],
                         "hit_rate": (engine.scheduler.prefix_hits - hits) / max(1, engine.scheduler.prefix_queries
                                                                                 - queries)}
    results["prompt_tokens"] = [len(p) for p in users + batch]
    return results


def summarize(rounds: list[dict], mode: str, caching: bool) -> dict:
    key = (mode, caching)
    cold = [r[key]["sequential"][0][0] for r in rounds]
    warm = [t for r in rounds for t, _ in r[key]["sequential"][1:]]
    concurrent = [r[key]["concurrent"] for r in rounds]
    throughput = [sum(map(len, c["tokens"])) / c["wall"] for c in concurrent]
    return {"mode": mode, "prefix_caching": caching,
            "ttft_first_s": round(statistics.median(cold), 3),
            "ttft_later_p50_s": round(statistics.median(warm), 3),
            "ttft_later_mean_s": round(statistics.mean(warm), 3),
            "concurrent_tokens_per_s": round(statistics.median(throughput), 2),
            "concurrent_ttft_p50_s": round(statistics.median(t for c in concurrent for t in c["ttft"]), 3),
            "concurrent_wall_s": round(statistics.median(c["wall"] for c in concurrent), 3),
            "hit_rate_concurrent": round(statistics.median(r[key]["hit_rate"] for r in rounds), 3)}


def compare(rounds: list[dict], mode: str, on: dict, off: dict) -> dict:
    same = [r[(mode, True)][kind] == r[(mode, False)][kind] for r in rounds for kind in ("tokens", "batch_tokens")]
    chats = [(a, b) for r in rounds for kind in ("tokens", "batch_tokens")
             for a, b in zip(r[(mode, True)][kind], r[(mode, False)][kind])]
    return {"mode": mode, "ttft_later_speedup": round(off["ttft_later_p50_s"] / on["ttft_later_p50_s"], 2),
            "throughput_speedup": round(on["concurrent_tokens_per_s"] / off["concurrent_tokens_per_s"], 2),
            "greedy_tokens_identical": all(same),
            "chats_identical": f"{sum(a == b for a, b in chats)}/{len(chats)}"}


def table(rows: list[dict], comparisons: list[dict]) -> str:
    head = ("| mode | prefix caching | TTFT first s | TTFT later p50 s | concurrent tok/s | concurrent TTFT p50 s | "
            "hit rate |\n|---|---|---|---|---|---|---|")
    lines = [f"| {r['mode']} | {'on' if r['prefix_caching'] else 'off'} | {r['ttft_first_s']} | "
             f"{r['ttft_later_p50_s']} | {r['concurrent_tokens_per_s']} | {r['concurrent_ttft_p50_s']} | "
             f"{r['hit_rate_concurrent']} |" for r in rows]
    speed = ["", "| mode | later TTFT off/on | throughput on/off | chats with identical greedy tokens |",
             "|---|---|---|---|"] + [f"| {c['mode']} | {c['ttft_later_speedup']}x | {c['throughput_speedup']}x | "
                                     f"{c['chats_identical']} |" for c in comparisons]
    return "\n".join([head, *lines, *speed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--kv-modes", nargs="+", default=["certified", "dense"])
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--users", type=int, default=5, help="sequential chats per round (the first is cold)")
    parser.add_argument("--batch", type=int, default=8, help="concurrent chats per round")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batched-tokens", type=int, default=512, help="--max-num-batched-tokens")
    parser.add_argument("--blocks", type=int, default=640, help="KV blocks of each engine (--num-kv-blocks)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    # the compiled CPU path's threads, as many as torch's (numba reads this when the engine first imports it): more
    # threads than cores left free made decode steps 30x slower on a shared 2-core machine
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    engines = {(mode, caching): make_engine(args, mode, caching) for mode in args.kv_modes
               for caching in (False, True)}
    tokenizer = next(iter(engines.values())).tokenizer
    for engine in engines.values():  # warm-up: kernels compiled, allocator grown
        run(engine, [chat(tokenizer, "Be brief.", "Hello?")], 2, "warm")
    rounds = []
    for index in range(args.rounds):
        rounds.append(one_round(engines, args, tokenizer, index))
        print(json.dumps({"round": index, "ttft_sequential": {f"{m}-{'on' if c else 'off'}": [
            round(t, 3) for t, _ in rounds[-1][(m, c)]["sequential"]] for m, c in engines}}), flush=True)
    rows = [summarize(rounds, mode, caching) for mode, caching in engines]
    comparisons = [compare(rounds, mode, summarize(rounds, mode, True), summarize(rounds, mode, False))
                   for mode in args.kv_modes]
    prompts = rounds[0]["prompt_tokens"]
    meta = {"machine": f"{os.cpu_count()} CPU cores", "threads": args.threads,
            "numba_threads": os.environ["NUMBA_NUM_THREADS"], "model": args.model,
            "prompt_tokens_min_max": [min(prompts), max(prompts)], "system_tokens": args.system_tokens,
            "users": args.users, "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds}
    for row in rows + comparisons:
        print(json.dumps(row))
    print(json.dumps({"meta": meta}))
    print(table(rows, comparisons))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "comparisons": comparisons}, indent=2))


if __name__ == "__main__":
    main()
