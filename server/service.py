"""certkv.v1.Inference: validate, bound and tokenize before anything is admitted, then stream the engine's outputs.

Every check (fields, sizes, lengths, chat rendering) runs before the request reaches the engine, so a bad request
costs no KV block. A text that cannot fit the context (or whose Tokenize answer cannot fit a message) is refused
before any tokenizer work, by a lower bound on its token count from its bytes (server/tokenizing.py); tokenization
and chat templating run on a bounded pool of tokenizer threads, never on the event loop, queued per peer address
so that one client's backlog never stands in front of another's request. A stream whose client
reads nothing for `slow_client_timeout_s` ends with RESOURCE_EXHAUSTED and its request is aborted. Engine errors
become gRPC statuses through convert.status_for; malformed request bytes are answered by security.LenientParsing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing

import grpc
from opentelemetry.trace import Status, StatusCode

from engine.errors import EngineError, EngineUnavailable, InvalidRequest
from engine.request import Request
from server import convert
from server.async_engine import AsyncEngine
from server.config import ServerConfig
from server.pb.certkv.v1 import inference_pb2 as pb
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from server.security import peer_address
from server.telemetry import Telemetry
from server.tokenizing import TokenCountBound, TokenizerPool

log = logging.getLogger(__name__)
DEADLINE_SLACK_S = 0.5  # a client cancel this close to the deadline is counted as the deadline
MIN_ANSWER_BYTES_PER_TOKEN = 4  # TokenizeResponse: >= 1 byte per packed id, >= 3 per token string


class SlowClient(Exception):
    """The client read nothing for slow_client_timeout_s while its stream had output waiting."""


class ClientGone(Exception):
    """A write failed because the call is already over (the client cancelled, its deadline passed, it vanished)."""


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, config: ServerConfig, telemetry: Telemetry):
        self.config = config
        self.telemetry = telemetry
        self.engine: AsyncEngine | None = None  # attached once the model is loaded
        self.tokenizer = None  # the front end's own instance (the engine thread decodes with another)
        self.token_text = None  # logprobs' token texts, decoded with that instance on the event loop
        self.bound: TokenCountBound | None = None
        self.pool: TokenizerPool | None = None

    def attach(self, engine: AsyncEngine, tokenizer) -> None:
        """Builds the token-count bound and the tokenizer pool (a second or so: call it off the event loop)."""
        self.tokenizer = tokenizer
        self.token_text = convert.token_texts(tokenizer)
        self.bound = TokenCountBound(tokenizer)
        self.pool = TokenizerPool(tokenizer, self.config.tokenizer_threads, self.config.tokenizer_queue,
                                  self.config.tokenizer_queue_per_peer)
        self.engine = engine

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        with self.telemetry.rpc_span("Generate", context.invocation_metadata()) as span:
            await self._generate(request, context, span)

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, span) -> None:
        admitted = ended = False
        metrics, last = self.telemetry.metrics, None
        try:
            engine = self._ready()
            client_id = convert.request_id(request) or uuid.uuid4().hex
            peer = peer_address(context.peer())
            prepared = await self._prepare(request, engine, client_id, peer)
            span.set_attributes({"request_id": client_id, "kv.mode": prepared.kv.mode.value,
                                 "prompt_tokens": prepared.num_prompt_tokens})
            async with aclosing(engine.generate(prepared)) as outputs:
                admitted = True
                async for output in outputs:
                    now = time.monotonic()
                    metrics.output(output, None if last is None else now - last)
                    self.telemetry.escalations(span, output.escalations)
                    last, ended = now, output.finished
                    await self._write(context, convert.response(output, client_id, self.token_text))
        except ClientGone:
            pass  # counted below as the client's cancel or deadline, like a cancellation of this task
        except SlowClient as exc:
            ended = True
            metrics.aborts.labels(metrics.model_name, "slow_client").inc()
            span.set_attribute("aborted", "slow_client")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineError as exc:
            ended = True
            await self._refuse(context, span, exc)
        except Exception:
            ended = True
            log.exception("Generate failed")
            metrics.rejections.labels(metrics.model_name, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged on the server)")
        finally:
            if admitted and not ended:  # the client went away (cancel, deadline, disconnect, server stop)
                # The client's own timer fires first and its cancel can arrive just before the server's copy of
                # the deadline (started when the headers arrived) runs out: a cancel that close is the deadline.
                remaining = context.time_remaining()
                reason = "deadline" if remaining is not None and remaining <= DEADLINE_SLACK_S else "cancelled"
                metrics.aborts.labels(metrics.model_name, reason).inc()
                span.set_attribute("aborted", reason)

    async def _write(self, context: grpc.aio.ServicerContext, message: pb.GenerateResponse) -> None:
        """Sends one message. A write that HTTP/2 flow control holds for slow_client_timeout_s means the client has
        read nothing for that long: SlowClient. A write that fails means the call is over: ClientGone."""
        timeout = self.config.slow_client_timeout_s
        try:
            await asyncio.wait_for(context.write(message), timeout)
        except TimeoutError:
            raise SlowClient(f"the client read nothing for {timeout:g} s (--slow-client-timeout); the stream was "
                             "ended to free its resources") from None
        except Exception as exc:  # grpc's ExecuteBatchError: the call ended before our cancellation arrived
            raise ClientGone(str(exc)) from None

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            self._ready()
            limit, peer = self.config.max_message_bytes, peer_address(context.peer())
            why = f"its answer would exceed the message limit of {limit} bytes (--max-message-bytes)"
            most = limit // MIN_ANSWER_BYTES_PER_TOKEN
            which = request.WhichOneof("input")
            if which == "messages":
                ids = await self._render_chat(request.messages, most, why, peer)
            elif which == "text":
                ids = await self._encode(request.text, "text", request.add_special_tokens, most, why, peer)
            else:
                raise InvalidRequest("input", "one of text or messages is required")
            answer = await self.pool.run(_tokenize_answer, ids, client=peer)
            if (size := answer.ByteSize()) > limit:
                raise InvalidRequest("input", f"the answer would be {size} bytes, over the message limit of {limit} "
                                              "bytes (--max-message-bytes)")
            return answer
        except EngineError as exc:
            await self._refuse(context, None, exc)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            engine = self._ready().engine
            return convert.model_info(engine.spec, engine.config)
        except EngineError as exc:
            await self._refuse(context, None, exc)

    async def _refuse(self, context: grpc.aio.ServicerContext, span, error: EngineError) -> None:
        code, details, metadata = convert.status_for(error)
        metrics = self.telemetry.metrics
        metrics.rejections.labels(metrics.model_name, code.name).inc()
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
        await context.abort(code, details, trailing_metadata=metadata)

    def _ready(self) -> AsyncEngine:
        if self.engine is None:
            raise EngineUnavailable("the model is still loading")
        return self.engine

    async def _prepare(self, message: pb.GenerateRequest, engine: AsyncEngine, client_id: str, peer: str) -> Request:
        """The engine request, every field checked; prompt work only once nothing else can refuse it."""
        llm = engine.engine
        sampling = convert.sampling_params(message)
        kv = llm.kv_policy(*convert.kv_choice(message))
        context_len, max_new = llm.spec.max_model_len, convert.max_new_tokens(message)
        if max_new is not None:
            llm.validate_stopping(convert.stopping_params(message, max_new))
            if max_new >= context_len:
                raise InvalidRequest("stopping.max_new_tokens", f"{max_new} leaves no room for a prompt in the "
                                                                f"context of {context_len} tokens")
        room = context_len - (max_new or 1)
        why = f"at most {room} fit the context of {context_len} tokens with max_new_tokens {max_new or 1}"
        prompt_ids = await self._prompt_ids(message, context_len, (room, why, peer))
        stopping = convert.stopping_params(message, llm.default_max_new_tokens(len(prompt_ids)))
        return llm.new_request(uuid.uuid4().hex, prompt_ids, sampling, stopping, kv, client_id=client_id, peer=peer)

    async def _prompt_ids(self, message: pb.GenerateRequest, context_len: int, limits: tuple) -> list[int]:
        """`limits`: (the most prompt tokens that fit, why, the caller's peer) for the tokenizer's work."""
        which = message.WhichOneof("input")
        if which == "prompt":
            return await self._encode(message.prompt, "input.prompt", True, *limits)
        if which == "prompt_token_ids":
            ids = message.prompt_token_ids.ids
            if len(ids) >= context_len:  # before copying a field that may hold millions of ids
                raise InvalidRequest("input", f"the prompt has {len(ids)} tokens; the context holds {context_len} "
                                              "(prompt + at least one new token)")
            return list(ids)
        if which == "messages":
            return await self._render_chat(message.messages, *limits)
        raise InvalidRequest("input", "one of prompt, prompt_token_ids or messages is required")

    async def _encode(self, text: str, field: str, add_special_tokens: bool, most: int, why: str,
                      peer: str) -> list[int]:
        if not text:
            raise InvalidRequest(field, "is empty")
        if len(text) > self.config.max_prompt_chars:
            raise InvalidRequest(field, f"longer than {self.config.max_prompt_chars} characters (--max-prompt-chars)")
        if self.bound.cheap:
            self._check_bound(text, field, most, why)
        return await self.pool.run(self._encode_job, text, field, add_special_tokens, most, why, client=peer)

    async def _render_chat(self, messages: pb.ChatMessages, most: int, why: str, peer: str) -> list[int]:
        chat = convert.chat_messages(messages, self.config.max_chat_messages, self.config.max_prompt_chars)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("input.messages", "the model has no chat template; send a prompt instead")
        return await self.pool.run(self._chat_job, chat, most, why, client=peer)

    # ---- on a tokenizer thread ----------------------------------------------------------------------------------
    def _encode_job(self, tokenizer, text: str, field: str, add_special_tokens: bool, most: int, why: str):
        if not self.bound.cheap:
            self._check_bound(text, field, most, why)
        return self._tokenize(tokenizer, text, add_special_tokens)

    def _chat_job(self, tokenizer, chat: list[dict[str, str]], most: int, why: str) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # template errors (unknown role, bad order) are the caller's input
            raise InvalidRequest("input.messages", f"the chat template rejected the messages: {exc}") from exc
        if not text:
            raise InvalidRequest("input.messages", "the chat template rendered an empty prompt")
        self._check_bound(text, "input.messages", most, why)
        return self._tokenize(tokenizer, text, False)

    def _tokenize(self, tokenizer, text: str, add_special_tokens: bool) -> list[int]:
        self.telemetry.metrics.tokenized(len(text))  # the work done: tests count it
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _check_bound(self, text: str, field: str, most: int, why: str) -> None:
        at_least = self.bound.tokens_at_least(text)
        if at_least > most:
            raise InvalidRequest(field, f"at least {at_least} tokens (a lower bound from its length); {why}")


def _tokenize_answer(tokenizer, ids: list[int]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids))
