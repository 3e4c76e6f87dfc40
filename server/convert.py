"""The one mapping between protobuf messages and engine types, and from engine errors to gRPC statuses."""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc

from engine.config import EngineConfig, ModelSpec
from engine.errors import CapacityExceeded, DataLoss, EngineError, EngineUnavailable, InvalidRequest, RequestFailed
from engine.kv.stats import CertificateStats
from engine.request import MAX_STOP_STRINGS, FinishReason, KVMode, RequestOutput, SamplingParams, StoppingParams
from server.pb.certkv.v1 import inference_pb2 as pb

MAX_REQUEST_ID_CHARS = 128
MAX_ROLE_CHARS = 64

STATUS_FOR_ERROR: dict[type[EngineError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
    RequestFailed: grpc.StatusCode.INTERNAL,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}

_FINISH = {
    FinishReason.STOP_SEQUENCE: pb.STOP_SEQUENCE,
    FinishReason.EOS: pb.EOS,
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.STOP_TOKEN: pb.STOP_TOKEN,
}


def status_for(error: EngineError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) for an engine error; capacity errors carry a retry hint."""
    code = next(c for cls, c in STATUS_FOR_ERROR.items() if isinstance(error, cls))
    metadata = ()
    if isinstance(error, CapacityExceeded):
        metadata = (("retry-after-ms", str(int(error.retry_after_s * 1000))),)
    return code, str(error), metadata


def request_id(message: pb.GenerateRequest) -> str:
    rid = message.request_id
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_CHARS} printable characters")
    return rid


def sampling_params(message: pb.GenerateRequest) -> SamplingParams:
    s = message.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        seed=s.seed if s.HasField("seed") else None,
        logprobs=message.logprobs,
        top_logprobs=message.top_logprobs,
    )


def stopping_params(message: pb.GenerateRequest, default_max_new: int) -> StoppingParams:
    s = message.stopping
    for name, values in (("stop", s.stop), ("stop_token_ids", s.stop_token_ids)):
        if len(values) > MAX_STOP_STRINGS:  # before copying a repeated field that may hold millions of entries
            raise InvalidRequest(f"stopping.{name}", f"at most {MAX_STOP_STRINGS} entries, got {len(values)}")
    return StoppingParams(
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else default_max_new,
        min_new_tokens=s.min_new_tokens,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )


def max_new_tokens(message: pb.GenerateRequest) -> int | None:
    """The request's own max_new_tokens, None when it leaves the server's default."""
    return message.stopping.max_new_tokens if message.stopping.HasField("max_new_tokens") else None


def chat_messages(message: pb.ChatMessages, max_messages: int, max_chars: int) -> list[dict[str, str]]:
    """The messages as the chat template takes them, after bounding their number, their roles and their size."""
    count = len(message.messages)
    if not 0 < count <= max_messages:
        raise InvalidRequest("input.messages", f"1 to {max_messages} messages (--max-chat-messages), got {count}")
    chat = [{"role": m.role, "content": m.content} for m in message.messages]
    if any(len(m["role"]) > MAX_ROLE_CHARS for m in chat):
        raise InvalidRequest("input.messages", f"a role has more than {MAX_ROLE_CHARS} characters")
    if sum(len(m["role"]) + len(m["content"]) for m in chat) > max_chars:
        raise InvalidRequest("input.messages", f"longer than {max_chars} characters in all (--max-prompt-chars)")
    return chat


_MODES = {pb.DENSE: KVMode.DENSE, pb.QUANTIZED: KVMode.QUANTIZED, pb.CERTIFIED: KVMode.CERTIFIED,
          pb.EXACT: KVMode.EXACT, pb.AUDIT: KVMode.AUDIT}
_MODE_NAMES = {mode: number for number, mode in _MODES.items()}


def kv_choice(message: pb.GenerateRequest) -> tuple[KVMode | None, float | None]:
    """The request's mode and tolerance, None where it leaves the server's default."""
    mode = message.kv.mode
    if mode != pb.KV_MODE_UNSPECIFIED and mode not in _MODES:
        raise InvalidRequest("kv.mode", f"unknown mode {mode}")
    tolerance = message.kv.tolerance if message.kv.HasField("tolerance") else None
    if tolerance is not None and not tolerance >= 0:
        raise InvalidRequest("kv.tolerance", f"must be >= 0, got {tolerance}")
    return _MODES.get(mode), tolerance


CERTIFYING = (KVMode.CERTIFIED, KVMode.EXACT, KVMode.AUDIT)


def certificate(stats: CertificateStats | None) -> pb.Certificate:
    """Dense and quantized attention certify nothing: their certificate is the mode alone. Optional fields are set
    where they mean something, so that their zeros print in JSON (audit counts only in audit mode)."""
    if stats is None or stats.mode not in CERTIFYING:
        return pb.Certificate(mode=pb.DENSE if stats is None else _MODE_NAMES[stats.mode])
    rungs = stats.rungs
    cert = pb.Certificate(
        mode=_MODE_NAMES[stats.mode], tolerance=stats.tolerance, attention_evaluations=stats.evaluations,
        certified_rung0=rungs[0], rung1_values=rungs[1], rung2_keys=rungs[2], rung3_exact_head=rungs[3],
        rung4_exact_layer=rungs[4], escalations=sum(rungs[1:]), transfer_bytes=stats.transfer_bytes,
        transfer_seconds=stats.transfer_seconds)
    if stats.evaluations:
        cert.certified_share = rungs[0] / stats.evaluations
    if sum(rungs[:3]):  # some output was accepted on a bound (rungs 0-2; rungs 3-4 are exact)
        cert.max_bound, cert.max_bound_over_tolerance = stats.max_bound, stats.max_bound_over_tolerance
    if stats.mode is KVMode.AUDIT:
        cert.audit_violations, cert.promise_violations = stats.audit_violations, stats.promise_violations
        cert.worst_actual_over_bound = stats.worst_actual_over_bound
        cert.worst_actual_over_promise = stats.worst_actual_over_promise
    return cert


def token_texts(tokenizer) -> Callable[[int], str]:
    """Each token id decoded on its own (logprobs name their tokens), cached: the same tokens come back often."""
    return functools.lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id]))


def response(out: RequestOutput, request_id: str, token_text: Callable[[int], str]) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=out.token_ids, text=out.text)
    for lp in out.logprobs:
        top = [pb.TopLogprob(token_id=t, logprob=v, token_text=token_text(t)) for t, v in lp.top]
        msg.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=top,
                                            token_text=token_text(lp.token_id)))
    if out.finished:
        msg.finish_reason = _FINISH[out.finish_reason]
        u = out.usage
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                    time_to_first_token_s=u.time_to_first_token_s, total_time_s=u.total_time_s,
                                    queue_time_s=u.queue_time_s, preemptions=u.preemptions,
                                    cached_tokens=u.cached_tokens))
        msg.seed = out.seed
        msg.certificate.CopyFrom(certificate(out.certificate))
    return msg


def model_info(spec: ModelSpec, config: EngineConfig) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=spec.model_id, architecture=spec.architecture, max_context_length=spec.max_model_len,
        vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids, dtype=spec.dtype, device=spec.device,
        default_kv_mode=_MODE_NAMES[KVMode(config.kv_mode)], default_tolerance=config.tolerance,
        block_size=spec.block_size, num_kv_blocks=spec.num_kv_blocks,
        num_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, has_chat_template=spec.has_chat_template,
        max_new_tokens_default=config.max_new_tokens_default, prefix_caching=config.enable_prefix_caching)
