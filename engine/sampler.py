"""Logits -> tokens, one row per request. Order: penalties (repetition as in HF on prompt + output; frequency and
presence as in OpenAI on the output), suppression of EOS and stop tokens until min_new_tokens, then greedy argmax
or temperature -> top-k -> top-p -> min-p and a draw from the request's own generator. Each request draws only
from its own seeded generator, so a seed gives the same tokens whatever else shares the batch. Log-probabilities
describe the raw model distribution (before penalties and temperature).

A row fails alone: when its parameters or its logits leave no usable distribution (a NaN or +inf logit, no finite
logit, probabilities that are not finite or sum to 0) or anything raises while it is processed, `sample` reports
an error for that row (InvalidRequest when the model's logits were fine and the request's parameters broke them,
RequestFailed otherwise) and every other row keeps its token. `sample` itself never raises for one row."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.errors import EngineError, InvalidRequest, RequestFailed
from engine.request import Request, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SamplerState:
    """Per-request sampler state, created on admission."""

    seed: int
    generator: torch.Generator


@dataclass(frozen=True, slots=True)
class SampleResult:
    tokens: list[int | None]  # S: each row's token; None where the row failed
    logprobs: list[TokenLogprob | None]  # S: None where not requested or the row failed
    errors: dict[int, EngineError]  # row -> why that row's request fails; the other rows are unaffected


def new_state(seed: int, device: torch.device) -> SamplerState:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return SamplerState(seed, generator)


def sample(logits: torch.Tensor, requests: list[Request], states: list[SamplerState]) -> SampleResult:
    """logits [S, V] float32 -> one token (or one error) per row."""
    errors: dict[int, EngineError] = {}
    processed = _processed(logits, requests, errors)
    best = processed.argmax(dim=-1, keepdim=True)
    usable = _usable(processed, best)
    tokens: list[int | None] = best.squeeze(-1).tolist()
    for i, ok in enumerate(usable):
        if not ok and i not in errors:
            errors[i] = _unusable(logits[i])
    random_rows = [i for i, r in enumerate(requests) if not r.sampling.greedy and i not in errors]
    if random_rows:
        _draw(processed, requests, states, random_rows, tokens, errors)
    logprobs = _logprobs(logits, requests, tokens, errors)
    return SampleResult([None if i in errors else t for i, t in enumerate(tokens)], logprobs, errors)


def _processed(logits: torch.Tensor, requests: list[Request], errors: dict[int, EngineError]) -> torch.Tensor:
    """Penalties and stop-token suppression, row by row (a row that raises is that row's failure)."""
    if not any(r.sampling.has_penalties or r.num_output_tokens < r.stopping.min_new_tokens for r in requests):
        return logits
    logits = logits.clone()
    for i, (row, request) in enumerate(zip(logits, requests)):
        try:
            _apply_penalties(row, request)
            _suppress_stops(row, request)
        except Exception as exc:
            errors[i] = _failed(request, exc)
    return logits


def _usable(rows: torch.Tensor, best: torch.Tensor | None = None) -> list[bool]:
    """Per row: no NaN, no +inf, and at least one finite logit (-inf marks a token that cannot be drawn). argmax
    picks a NaN or a +inf where a row has one, and -inf only where all are, so the row is usable exactly when its
    argmax holds a finite value: one pass over the logits, which greedy sampling makes anyway (`best`)."""
    best = rows.argmax(dim=-1, keepdim=True) if best is None else best
    return rows.gather(-1, best).isfinite().squeeze(-1).tolist()


def _unusable(raw: torch.Tensor) -> EngineError:
    """The error of a row with no usable distribution: the model's fault if its own logits were unusable."""
    if _usable(raw[None])[0]:
        return InvalidRequest("sampling", "these sampling parameters leave no finite token probability for this "
                                          "request (lower the penalties or raise the temperature)")
    return RequestFailed("the model produced non-finite logits for this request")


def _failed(request: Request, exc: Exception) -> EngineError:
    log.error("sampling failed for request %s", request.client_id, exc_info=exc)
    return RequestFailed("sampling this request's token failed")


def _draw(logits: torch.Tensor, requests: list[Request], states: list[SamplerState], rows: list[int],
          tokens: list, errors: dict[int, EngineError]) -> None:
    """Draws each row in `rows` from its filtered distribution; a row that cannot be drawn gets an error."""
    try:
        probs = _filtered_probs(logits[rows], [requests[i].sampling for i in rows])
    except Exception:  # a row's parameters must not cost the others their draw: filter each row alone
        probs = None
    for n, i in enumerate(rows):
        try:
            row = probs[n] if probs is not None else _filtered_probs(logits[i : i + 1], [requests[i].sampling])[0]
            if not bool(torch.isfinite(row).all() & (row.sum() > 0)):
                errors[i] = _unusable(logits[i])
                continue
            tokens[i] = int(torch.multinomial(row, 1, generator=states[i].generator)[0])
        except Exception as exc:
            errors[i] = _failed(requests[i], exc)


def _apply_penalties(row: torch.Tensor, request: Request) -> None:
    params = request.sampling
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(t for t in set(request.token_ids) if 0 <= t < row.numel()), device=row.device,
                            dtype=torch.int64)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        output = torch.tensor(request.output_token_ids, device=row.device, dtype=torch.int64)
        counts = torch.bincount(output, minlength=row.numel())[: row.numel()].to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def _suppress_stops(row: torch.Tensor, request: Request) -> None:
    """EOS and stop tokens get -inf until min_new_tokens; ids outside the logits (refused at admission) are skipped."""
    if request.num_output_tokens >= request.stopping.min_new_tokens:
        return
    stops = set(request.stopping.stop_token_ids)
    if not request.stopping.ignore_eos:
        stops.update(request.eos_token_ids)
    stops = sorted(t for t in stops if 0 <= t < row.numel())
    if stops:
        row[torch.tensor(stops, device=row.device)] = float("-inf")


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks, applied in that order; returns probabilities [N, V]."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    top_k = [min(p.top_k, vocab) for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
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


def _logprobs(raw: torch.Tensor, requests: list[Request], tokens: list, errors: dict[int, EngineError]) -> list:
    """Each requesting row's TokenLogprob (of the raw distribution); a row that raises here fails alone."""
    rows = [i for i, r in enumerate(requests) if (r.sampling.logprobs or r.sampling.top_logprobs) and i not in errors]
    result: list[TokenLogprob | None] = [None] * len(requests)
    if not rows:
        return result
    logprobs = torch.log_softmax(raw[rows], dim=-1)
    for lp, i in zip(logprobs, rows):
        try:
            top = ()
            if n := min(requests[i].sampling.top_logprobs, lp.numel()):
                values, ids = lp.topk(n)
                top = tuple(zip(ids.tolist(), values.tolist()))
            result[i] = TokenLogprob(tokens[i], lp[tokens[i]].item(), top)
        except Exception as exc:
            errors[i] = _failed(requests[i], exc)
    return result
