"""LLMEngine: schedule, execute, sample, update; one call to step() is one forward pass.

Thread model: one thread owns the engine and calls add_request/abort/step. `validate` and `new_request` only read
frozen state, so the server calls them from its own threads before anything is handed to the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig, ModelSpec
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import DataLoss, EngineError, InvalidRequest, RequestFailed
from engine.faults import NO_FAULTS, FaultPlan, ShadowError
from engine.model_runner import ModelRunner
from engine.weights import model_id
from engine.request import (FinishReason, KVMode, KVPolicy, Request, RequestOutput, SamplingParams, StoppingParams,
                            TokenLogprob, Usage)
from engine.sampler import SampleResult, SamplerState, new_state, sample
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

log = logging.getLogger(__name__)


class StepFailed(Exception):
    """The forward pass raised. The requests in `errors` were aborted with that error; the step's other requests
    were not advanced and run again at the next step (their K/V writes are idempotent). Failures of one request's
    sampling or post-processing never raise this: that request alone ends (RequestOutput.error)."""

    def __init__(self, errors: dict[str, EngineError]):
        super().__init__(f"step failed for {len(errors)} requests")
        self.errors = errors


@dataclass(frozen=True, slots=True)
class LiveStats:
    """What the engine holds now, for metrics (read from another thread: plain numbers only)."""

    running: int
    waiting: int
    kv_usage: float  # fraction of KV blocks in use
    preemptions: int
    tier_bytes: dict  # tier name -> bytes held
    prefetch_hits: int
    prefetch_misses: int
    certified_fraction: float  # rung-0 evaluations among the certified evaluations of finished requests
    prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache, so far
    prefix_cache_hits: int = 0  # of those, tokens found cached


@dataclass(slots=True)
class RequestState:
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig, faults: FaultPlan = NO_FAULTS):
        self.config = config
        self.runner = ModelRunner(config, faults)
        # The model's id is what the operator named (a .gguf path, not its converted directory).
        self.spec: ModelSpec = dataclasses.replace(self.runner.spec, model_id=model_id(config.model, self.runner.path))
        self.tokenizer = self.runner.tokenizer
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.spec.max_model_len, num_blocks=self.spec.num_kv_blocks, block_size=config.block_size,
            enable_prefix_caching=config.enable_prefix_caching, cache_salt=config.cache_salt(self.spec)))
        self._rungs = [0, 0]  # rung-0 and all certified evaluations of finished requests

    def step(self) -> list[RequestOutput]:
        """One forward pass. A request whose forward pass (run alone after a shared pass raised), sampling or
        post-processing fails ends alone (an output carrying its error); the step's other requests keep the token of
        this step."""
        output = self.scheduler.schedule()
        for request_id in output.preempted:
            self.runner.cache.release(request_id)
        if not output.scheduled:
            return []
        requests, sampled, alone = self._execute_and_sample(output)
        failed = [self._fail(self.scheduler.requests[rid], error) for rid, error in alone.items()
                  if rid in self.scheduler.requests]
        failed += [self._fail(requests[i], error) for i, error in sampled.errors.items()]
        self.scheduler.update(output, {r.request_id: t for r, t in zip(requests, sampled.tokens) if t is not None})
        escalations = self._escalations()
        return failed + [self._emit(r, t, lp, escalations.get(r.request_id, ())) for r, t, lp in
                         zip(requests, sampled.tokens, sampled.logprobs) if t is not None]

    def live_stats(self) -> LiveStats:
        scheduler, cache = self.scheduler, self.runner.cache
        blocks = self.spec.num_kv_blocks
        hits, misses = cache.prefetch_counts()
        return LiveStats(
            running=len(scheduler.running), waiting=len(scheduler.waiting),
            kv_usage=(blocks - scheduler.blocks.num_free) / blocks, preemptions=scheduler.num_preemptions,
            tier_bytes=cache.tier_bytes(blocks - scheduler.blocks.num_free),
            prefetch_hits=hits, prefetch_misses=misses,
            certified_fraction=self._rungs[0] / self._rungs[1] if self._rungs[1] else 1.0,
            prefix_cache_queries=scheduler.prefix_queries, prefix_cache_hits=scheduler.prefix_hits)

    def _scheduled(self, output: SchedulerOutput) -> list[Request]:
        return [self.scheduler.requests[item.request_id] for item in output.scheduled]

    def _escalations(self) -> dict[str, tuple]:
        by_request: dict[str, list] = {}
        for record in self.runner.cache.drain_records():
            by_request.setdefault(record.engine_id, []).append(record)
        return {rid: tuple(records) for rid, records in by_request.items()}

    def score_step(self, forced: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """Teacher forcing for evaluation: step() with each sampled request's next token taken from `forced`
        (request id -> token) instead of the sampler. Returns the float32 logits [vocab] of every sampled request
        and the certificate aggregates of the requests that finished."""
        output = self.scheduler.schedule()
        for request_id in output.preempted:
            self.runner.cache.release(request_id)
        if not output.scheduled:
            return {}, {}
        batch, logits = self.runner.execute(output, self._scheduled(output))
        finished = self.scheduler.update(output, {rid: forced[rid] for rid in batch.sample_ids})
        return dict(zip(batch.sample_ids, logits)), {r.request_id: self._release(r.request_id) for r in finished}

    def _execute_and_sample(self, output: SchedulerOutput) -> tuple[list[Request], SampleResult, dict]:
        """Forward pass and sampling. Sampling fails row by row (SampleResult.errors). A forward pass of several
        requests that raises runs them again one by one, so that a request that makes the model fail fails alone (the
        third result: request id -> its error; K/V writes are idempotent, and an abandoned pass leaves nothing in the
        certificates). Otherwise an exception aborts the step's requests (tier-2 data lost: those it names) and
        raises StepFailed."""
        self._mark_scheduled(output.scheduled)
        try:
            try:
                parts, alone = [self.runner.execute(output, self._scheduled(output))], {}
            except ShadowError:
                raise
            except Exception:
                if len(output.scheduled) == 1:
                    raise
                log.exception("engine step failed: running its %d requests one by one", len(output.scheduled))
                self.runner.cache.drain_records()  # escalations of the abandoned pass
                parts, alone = self._one_by_one(output)
            requests, logits = self._sampled_rows(parts, alone)
            if not requests:
                return [], SampleResult([], [], {}), alone
            logits = self._inject_nonfinite(logits, requests)
            return requests, sample(logits, requests, [r.extra.sampler for r in requests]), alone
        except ShadowError as exc:  # exactness impossible for these requests only
            log.error("step abandoned: %s", exc)
            self.scheduler.blocks.forget(self.runner.cache.corrupt_blocks())  # no later request shares them
            failed = {rid: DataLoss(f"{exc.reason}: the exact fallback is impossible") for rid in exc.request_ids}
        except Exception:
            log.exception("engine step failed")
            failed = {item.request_id: RequestFailed("the engine step running this request failed")
                      for item in output.scheduled}
        self.runner.cache.drain_records()  # escalations of the abandoned pass
        for request_id in failed:
            self.abort(request_id)
        raise StepFailed(failed)

    def _sampled_rows(self, parts: list, alone: dict) -> tuple[list[Request], torch.Tensor]:
        """The requests to sample and their logits [S, vocab] from the passes' (batch, logits)."""
        if len(parts) == 1 and not alone:  # the usual step: one pass, nothing failed
            batch, logits = parts[0]
            return [self.scheduler.requests[rid] for rid in batch.sample_ids], logits
        # a lost shadow may name a request whose own pass succeeded (a sharer of the block): it fails too
        rows = [(self.scheduler.requests[rid], logits[i]) for batch, logits in parts
                for i, rid in enumerate(batch.sample_ids) if rid not in alone]
        return [request for request, _ in rows], torch.stack([row for _, row in rows]) if rows else None

    def _one_by_one(self, output: SchedulerOutput) -> tuple[list, dict]:
        """Each scheduled request's forward pass alone: the (batch, logits) of those that pass, and the errors of
        those that do not."""
        parts, alone = [], {}
        for item in output.scheduled:
            single = SchedulerOutput([item], [])
            try:
                parts.append(self.runner.execute(single, self._scheduled(single)))
            except ShadowError as exc:
                self.scheduler.blocks.forget(self.runner.cache.corrupt_blocks())
                alone |= {rid: DataLoss(f"{exc.reason}: the exact fallback is impossible") for rid in exc.request_ids}
            except Exception:
                log.exception("the forward pass of request %s failed alone", item.request_id)
                alone[item.request_id] = RequestFailed("the forward pass failed on this request alone")
        return parts, alone

    def validate(self, prompt_ids: list[int], stopping: StoppingParams) -> None:
        """Raises InvalidRequest when the request can never run on this engine. Reads only frozen state."""
        if not prompt_ids:
            raise InvalidRequest("input", "the prompt is empty")
        vocab = self.spec.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequest("input.prompt_token_ids", f"token ids must be in [0, {vocab})")
        self.validate_stopping(stopping)
        total = len(prompt_ids) + stopping.max_new_tokens
        if len(prompt_ids) >= self.spec.max_model_len:
            raise InvalidRequest("input", f"the prompt has {len(prompt_ids)} tokens; the context holds "
                                          f"{self.spec.max_model_len} (prompt + at least one new token)")
        if total > self.spec.max_model_len:
            raise InvalidRequest("stopping.max_new_tokens", f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                                                            f"({stopping.max_new_tokens}) exceeds the context of "
                                                            f"{self.spec.max_model_len} tokens")

    def validate_stopping(self, stopping: StoppingParams) -> None:
        """The checks of `stopping` that need the model: stop token ids within the vocabulary."""
        vocab = self.spec.vocab_size
        if any(not 0 <= t < vocab for t in stopping.stop_token_ids):
            raise InvalidRequest("stopping.stop_token_ids", f"token ids must be in [0, {vocab})")

    def default_max_new_tokens(self, prompt_len: int) -> int:
        return max(1, min(self.config.max_new_tokens_default, self.spec.max_model_len - prompt_len))

    def kv_policy(self, mode: KVMode | None, tolerance: float | None) -> KVPolicy:
        """A request's KV policy: its own choices, else the server's (--kv-mode, --tolerance)."""
        server_mode = KVMode(self.config.kv_mode)
        mode = mode or server_mode
        if server_mode is KVMode.DENSE and mode is not KVMode.DENSE:
            raise InvalidRequest("kv.mode", f"{mode.name} needs the tiered cache; this server runs --kv-mode dense")
        if mode is KVMode.EXACT:
            return KVPolicy(mode, 0.0)
        return KVPolicy(mode, self.config.tolerance if tolerance is None else tolerance)

    def new_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                    stopping: StoppingParams, kv: KVPolicy | None = None, client_id: str = "",
                    peer: str = "") -> Request:
        self.validate(prompt_ids, stopping)
        kv = kv or self.kv_policy(None, None)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        state = RequestState(new_state(seed, self.runner.device),
                             IncrementalDetokenizer(self.tokenizer, prompt_ids, stopping.stop))
        return Request(request_id, list(prompt_ids), sampling, stopping, eos_token_ids=self.spec.eos_token_ids,
                       kv=kv, client_id=client_id, peer=peer, extra=state)

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Ends a request without output (cancel, deadline, drain); frees everything it holds."""
        request = self.scheduler.finish(request_id, FinishReason.ABORTED)
        self._release(request_id)
        return request is not None

    def _release(self, request_id: str):
        """Frees the request's per-sequence cache state; returns its certificate aggregates (tiered cache)."""
        self.runner.cache.release(request_id)
        return self.runner.cache.pop_stats(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def pause(self, request_id: str, paused: bool) -> None:
        """Backpressure: a paused request keeps its KV blocks but is not scheduled until resumed."""
        if request_id in self.scheduler.requests:
            (self.scheduler.paused.add if paused else self.scheduler.paused.discard)(request_id)

    def _mark_scheduled(self, scheduled) -> None:
        now = time.monotonic()
        for item in scheduled:
            request = self.scheduler.requests[item.request_id]
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now

    def _fail(self, request: Request, error: EngineError) -> RequestOutput:
        """Ends one request with `error` (its own failure) and frees everything it holds."""
        log.warning("request %s failed alone: %s", request.client_id, error)
        self.abort(request.request_id)
        return RequestOutput(request.request_id, (), "", finish_reason=FinishReason.ABORTED, error=error)

    def _emit(self, request: Request, token: int, logprob: TokenLogprob | None, escalations) -> RequestOutput:
        """_output, with a failure of this request's post-processing (detokenizer, stop strings) its own."""
        try:
            return self._output(request, token, logprob, escalations)
        except Exception:
            log.exception("post-processing failed for request %s", request.client_id)
            return self._fail(request, RequestFailed("post-processing this request's output failed"))

    def _inject_nonfinite(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Fault point sample.nonfinite: the targeted requests' logits become NaN (a model failing on one row)."""
        faults = self.runner.faults
        rows = [i for i, r in enumerate(requests) if faults.targets("sample.nonfinite", r.client_id)]
        if not rows:
            return logits
        faults.hit("sample.nonfinite")
        logits = logits.clone()
        logits[rows] = float("nan")
        return logits

    def _output(self, request: Request, token: int, logprob: TokenLogprob | None, escalations=()) -> RequestOutput:
        if self.runner.faults.targets("output.raise", request.client_id):
            self.runner.faults.hit("output.raise")
            raise RuntimeError("injected failure in post-processing")
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
        detokenizer = request.extra.detokenizer
        detokenizer.add([token])
        if detokenizer.stopped and not request.finished:
            self.scheduler.finish(request.request_id, FinishReason.STOP_SEQUENCE)
        if not request.finished:
            return RequestOutput(request.request_id, (token,), detokenizer.take(), (logprob,) if logprob else (),
                                 escalations=escalations)
        certificate = self._release(request.request_id)
        if certificate is not None and sum(certificate.rungs):
            self._rungs[0] += certificate.rungs[0]
            self._rungs[1] += sum(certificate.rungs)
        usage = Usage(
            prompt_tokens=request.num_prompt_tokens, completion_tokens=request.num_output_tokens,
            time_to_first_token_s=request.first_token_time - request.arrival_time,
            total_time_s=now - request.arrival_time,
            queue_time_s=(request.first_scheduled_time or now) - request.arrival_time,
            preemptions=request.num_preemptions, cached_tokens=request.num_cached_tokens or 0)
        return RequestOutput(request.request_id, (token,), detokenizer.take(final=True),
                             (logprob,) if logprob else (), request.finish_reason, usage, request.extra.sampler.seed,
                             certificate, escalations)
