"""Logits -> tokens, one row per request. Order: penalties (repetition as in HF on prompt + output; frequency and
presence as in OpenAI on the output), suppression of EOS and stop tokens until min_new_tokens, then greedy argmax
or temperature -> top-k -> top-p -> min-p and a draw from the request's own generator. Each request draws only
from its own seeded generator, so a seed gives the same tokens whatever else shares the batch. Log-probabilities
describe the raw model distribution (before penalties and temperature)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request, TokenLogprob


@dataclass(slots=True)
class SamplerState:
    """Per-request sampler state, created on admission."""

    seed: int
    generator: torch.Generator


def new_state(seed: int, device: torch.device) -> SamplerState:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return SamplerState(seed, generator)


def sample(logits: torch.Tensor, requests: list[Request], states: list[SamplerState]) -> tuple[list[int], list]:
    """logits [S, V] float32 -> (S tokens, S TokenLogprob or None)."""
    raw = logits
    if any(r.sampling.has_penalties or r.num_output_tokens < r.stopping.min_new_tokens for r in requests):
        logits = logits.clone()
        for row, request in zip(logits, requests):
            _apply_penalties(row, request)
            _suppress_stops(row, request)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.sampling.greedy]
    if random_rows:
        probs = _filtered_probs(logits[random_rows], [requests[i].sampling for i in random_rows])
        for row_probs, i in zip(probs, random_rows):
            tokens[i] = torch.multinomial(row_probs, 1, generator=states[i].generator)[0]
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, requests, token_list)


def _apply_penalties(row: torch.Tensor, request: Request) -> None:
    params = request.sampling
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.token_ids)), device=row.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        output = torch.tensor(request.output_token_ids, device=row.device, dtype=torch.int64)
        counts = torch.bincount(output, minlength=row.numel())[: row.numel()].to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def _suppress_stops(row: torch.Tensor, request: Request) -> None:
    if request.num_output_tokens >= request.stopping.min_new_tokens:
        return
    stops = set(request.stopping.stop_token_ids)
    if not request.stopping.ignore_eos:
        stops.update(request.eos_token_ids)
    if stops:
        row[torch.tensor(sorted(stops), device=row.device)] = float("-inf")


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks, applied in that order; returns probabilities [N, V]."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        limit = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)
        sorted_logits.masked_fill_(torch.arange(vocab, device=device)[None, :] >= limit[:, None], float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_logits.masked_fill_(before >= torch.tensor(top_p, device=device)[:, None], float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p > 0).any()):
        keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _logprobs(raw: torch.Tensor, requests: list[Request], tokens: list[int]) -> list[TokenLogprob | None]:
    rows = [i for i, r in enumerate(requests) if r.sampling.logprobs or r.sampling.top_logprobs]
    result: list[TokenLogprob | None] = [None] * len(requests)
    if not rows:
        return result
    logprobs = torch.log_softmax(raw[rows], dim=-1)
    for lp, i in zip(logprobs, rows):
        n = requests[i].sampling.top_logprobs
        top = ()
        if n:
            values, ids = lp.topk(n)
            top = tuple(zip(ids.tolist(), values.tolist()))
        result[i] = TokenLogprob(tokens[i], lp[tokens[i]].item(), top)
    return result
