"""`python -m engine.calibrate --text FILE`: HeadQ's query basis (engine.kv.headq), learned from the model's queries.

The model runs over windows of the text (dense attention through transformers' SDPA); a recording attention function
sums q q^T of every post-RoPE query, per layer and KV head over the heads of its group, in float64. The eigenvectors
of each sum, by decreasing eigenvalue, are written to `headq.safetensors` next to the model's weights (or --out),
with the share of query energy each rank keeps; `--quantizer headq` loads the first --headq-rank of them at start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.kv.headq import BASIS_FILE, eigenbasis, save_basis
from engine.weights import resolve_model

RECORDING = "certkv-calibrate"


def recording_attention(module, query, key, value, attention_mask, moments: torch.Tensor | None = None, **kwargs):
    """SDPA, after adding sum q q^T of query [1, H, T, D] into moments[layer] [Hkv, D, D] (the `moments` keyword
    comes down from the model's forward)."""
    kv_heads, dim = key.shape[1], query.shape[-1]
    grouped = query[0].double().reshape(kv_heads, -1, dim)  # heads of one group are adjacent
    moments[module.layer_idx] += grouped.transpose(-1, -2) @ grouped
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.inference_mode()
def query_moments(model, windows: list[list[int]]) -> torch.Tensor:
    """[L, Hkv, D, D] float64: sum over every window's positions and each group's heads of q q^T."""
    hf = model.config
    dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    moments = torch.zeros(hf.num_hidden_layers, hf.num_key_value_heads, dim, dim, dtype=torch.float64)
    for window in windows:
        model(input_ids=torch.tensor([window]), use_cache=False, moments=moments)
    return moments


def main(argv: list[str] | None = None, prog: str = "python -m engine.calibrate") -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, required=True, help="UTF-8 calibration text")
    p.add_argument("--model", default="default", help="as for the server: default, an HF directory or a .gguf file")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--skip-tokens", type=int, default=0, help="start this far into the text (hold out the rest)")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", type=Path, help=f"default: {BASIS_FILE} in the model's directory")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.window < 2 or args.max_tokens < args.window or args.skip_tokens < 0:
        p.error("need --window >= 2, --max-tokens >= --window and --skip-tokens >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    AttentionInterface.register(RECORDING, recording_attention)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=RECORDING, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = tokenizer(args.text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    tokens = tokens[args.skip_tokens:args.skip_tokens + args.max_tokens]
    windows = [tokens[i:i + args.window] for i in range(0, len(tokens) - args.window + 1, args.window)]
    if not windows:
        sys.exit(f"calibrate: {args.text} has fewer than {args.window} tokens after --skip-tokens")
    basis, energy = eigenbasis(query_moments(model, windows))
    out = args.out or path / BASIS_FILE
    meta = {"model": str(path), "text": str(args.text), "tokens": str(len(windows) * args.window)}
    save_basis(out, basis, energy, meta)
    ranks = [r for r in (4, 8, 16, 24, 32, 48) if r <= basis.shape[-1]]
    print(json.dumps({"out": str(out), "tokens": len(windows) * args.window, "shape": list(basis.shape),
                      "median_energy_kept": {r: round(float(energy[..., r - 1].median()), 4) for r in ranks}}))


if __name__ == "__main__":
    main()
