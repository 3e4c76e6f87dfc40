"""A request is counters, not phases: `num_tokens - num_computed_tokens` tokens are still to run, which covers
prefill, chunked prefill, decode and recompute after preemption alike. Parameters are frozen and validated on
construction; `InvalidRequest` names the offending field by its path in the public API."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # finite logits stay finite: |logit| * 100 / GREEDY_BELOW is far below 3e38


class FinishReason(enum.Enum):
    STOP_SEQUENCE = "stop_sequence"
    EOS = "eos"
    LENGTH = "length"
    STOP_TOKEN = "stop_token"
    ABORTED = "aborted"  # cancelled, deadline passed, or server drained; never streamed to the client


class KVMode(enum.Enum):
    DENSE = "dense"  # full precision: the baseline
    QUANTIZED = "quantized"  # tier 1 only, no certificate: the naive baseline
    CERTIFIED = "certified"  # quantized attention accepted within tolerance, escalated otherwise
    EXACT = "exact"  # tolerance 0: the dense result, computed from the shadows
    AUDIT = "audit"  # certified, and the reference computed alongside to count violations


@dataclass(frozen=True, slots=True)
class KVPolicy:
    mode: KVMode = KVMode.DENSE
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        _check(_finite(self.tolerance) and self.tolerance >= 0, "kv.tolerance", f"must be >= 0, got {self.tolerance}")

    @property
    def quantized(self) -> bool:
        """Attention reads tier 1 (the quantized blocks)."""
        return self.mode in (KVMode.QUANTIZED, KVMode.CERTIFIED, KVMode.AUDIT)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


GREEDY_BELOW = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF: divides positive logits of seen tokens, multiplies negative ones; [0.01, 100]
    frequency_penalty: float = 0.0  # OpenAI: minus penalty * count of each generated token
    presence_penalty: float = 0.0  # OpenAI: minus penalty once for each generated token
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= 2.0, "sampling.temperature",
               f"must be finite and in [0, 2] (0 = greedy), got {self.temperature}")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "sampling.min_p", f"must be in [0, 1], got {self.min_p}")
        low, high = REPETITION_PENALTY_RANGE  # endpoints as a float32 field carries them (0.01 rounds down)
        _check(_finite(self.repetition_penalty) and low * (1 - 2**-23) <= self.repetition_penalty <= high,
               "sampling.repetition_penalty", f"must be in [{low:g}, {high:g}] (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2.0 <= value <= 2.0, f"sampling.{name}", f"must be in [-2, 2], got {value}")
        _check(self.seed is None or 0 <= self.seed < 2**63, "sampling.seed", "must be in [0, 2^63)")
        _check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW are greedy (as in vLLM): logits / 1e-45 would overflow to inf."""
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True, slots=True)
class StoppingParams:
    max_new_tokens: int
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "stopping.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(0 <= self.min_new_tokens <= self.max_new_tokens, "stopping.min_new_tokens",
               f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stopping.stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for text in self.stop:
            _check(0 < len(text) <= MAX_STOP_STRING_CHARS, "stopping.stop",
                   f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_STRINGS, "stopping.stop_token_ids",
               f"at most {MAX_STOP_STRINGS} stop tokens")


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    eos_token_ids: tuple[int, ...] = ()
    kv: KVPolicy = field(default_factory=KVPolicy)
    client_id: str = ""  # the caller's id (not unique): logs, spans, escalation records, fault targets
    peer: str = ""  # who sent it (the server: the peer address): admission is fair across peers
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)  # prompt + output, grows by one per sampled token
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at the first admission
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    extra: Any = None  # per-request engine state (sampler generator, detokenizer), owned by LLMEngine

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if not self.client_id:
            self.client_id = self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def stop_reason(self, token: int, max_model_len: int) -> FinishReason | None:
        """Why the request ends after `token` was appended, if it does."""
        stopping = self.stopping
        if self.num_output_tokens > stopping.min_new_tokens:  # the sampler masks stop tokens until then
            if not stopping.ignore_eos and token in self.eos_token_ids:
                return FinishReason.EOS
            if token in stopping.stop_token_ids:
                return FinishReason.STOP_TOKEN
        if self.num_output_tokens >= stopping.max_new_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_time_s: float
    queue_time_s: float
    preemptions: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not computed for this request)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one engine step produced for one request: new tokens, their text, and on the last one the outcome.
    A request that failed alone (its sampling or post-processing raised) ends with an output that carries `error`
    (an EngineError), no tokens and finish_reason ABORTED; the server turns the error into the RPC's status."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    seed: int | None = None
    certificate: Any = None  # engine.kv.stats.CertificateStats on the last output of a tiered engine
    escalations: tuple = ()  # engine.kv.stats.EscalationRecord of this step
    error: Exception | None = None  # engine.errors.EngineError: this request failed (alone) at this step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one (a client that reads slower than the engine generates)."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    return RequestOutput(
        last.request_id, tuple(t for out in outputs for t in out.token_ids), "".join(out.text for out in outputs),
        tuple(lp for out in outputs for lp in out.logprobs), last.finish_reason, last.usage, last.seed,
        last.certificate, tuple(e for out in outputs for e in out.escalations))


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(field_name, message)
