"""certkv.v1.Inference: validate and tokenize before anything is admitted, then stream the engine's outputs.

Every check (fields, sizes, lengths, chat rendering) runs before the request reaches the engine, so a bad
request costs no KV block. Engine errors become gRPC statuses through convert.status_for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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
from server.security import MALFORMED
from server.telemetry import Telemetry

log = logging.getLogger(__name__)
DEADLINE_SLACK_S = 0.5  # a client cancel this close to the deadline is counted as the deadline


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, config: ServerConfig, telemetry: Telemetry):
        self.config = config
        self.telemetry = telemetry
        self.engine: AsyncEngine | None = None  # attached once the model is loaded
        self.tokenizer = None  # the front end's own instance: the engine thread decodes with another
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certkv-tokenize")

    def attach(self, engine: AsyncEngine, tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        with self.telemetry.rpc_span("Generate", context.invocation_metadata()) as span:
            async for message in self._generate(request, context, span):
                yield message

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, span):
        admitted = finished = False
        metrics, last = self.telemetry.metrics, None
        try:
            _parsed(request)
            engine = self._ready()
            client_id = convert.request_id(request) or uuid.uuid4().hex
            prepared = await self._prepare(request, engine, client_id)
            span.set_attributes({"request_id": client_id, "kv.mode": prepared.kv.mode.value,
                                 "prompt_tokens": prepared.num_prompt_tokens})
            async with aclosing(engine.generate(prepared)) as outputs:
                admitted = True
                async for output in outputs:
                    now = time.monotonic()
                    metrics.output(output, None if last is None else now - last)
                    self.telemetry.escalations(span, output.escalations)
                    last, finished = now, output.finished
                    yield convert.response(output, client_id)
        except EngineError as exc:
            finished = True
            await self._refuse(context, span, exc)
        except Exception:
            finished = True
            log.exception("Generate failed")
            metrics.rejections.labels(metrics.model_name, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged on the server)")
        finally:
            if admitted and not finished:  # the client went away (cancel, deadline, disconnect, server stop)
                # The client's own timer fires first and its cancel can arrive just before the server's copy of
                # the deadline (started when the headers arrived) runs out: a cancel that close is the deadline.
                remaining = context.time_remaining()
                reason = "deadline" if remaining is not None and remaining <= DEADLINE_SLACK_S else "cancelled"
                metrics.aborts.labels(metrics.model_name, reason).inc()
                span.set_attribute("aborted", reason)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            _parsed(request)
            self._ready()
            which = request.WhichOneof("input")
            if which == "messages":
                ids = await self._render_chat(request.messages)
            elif which == "text":
                ids = await self._encode(request.text, "text", request.add_special_tokens)
            else:
                raise InvalidRequest("input", "one of text or messages is required")
            return pb.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))
        except EngineError as exc:
            await self._refuse(context, None, exc)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            _parsed(request)
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

    async def _prepare(self, message: pb.GenerateRequest, engine: AsyncEngine, client_id: str) -> Request:
        llm = engine.engine
        sampling = convert.sampling_params(message)
        kv = llm.kv_policy(*convert.kv_choice(message))
        prompt_ids = await self._prompt_ids(message)
        stopping = convert.stopping_params(message, llm.default_max_new_tokens(len(prompt_ids)))
        return llm.new_request(uuid.uuid4().hex, prompt_ids, sampling, stopping, kv, client_id=client_id)

    async def _prompt_ids(self, message: pb.GenerateRequest) -> list[int]:
        which = message.WhichOneof("input")
        if which == "prompt":
            return await self._encode(message.prompt, "input.prompt", add_special_tokens=True)
        if which == "prompt_token_ids":
            return list(message.prompt_token_ids.ids)
        if which == "messages":
            return await self._render_chat(message.messages)
        raise InvalidRequest("input", "one of prompt, prompt_token_ids or messages is required")

    async def _encode(self, text: str, field: str, add_special_tokens: bool) -> list[int]:
        if not text:
            raise InvalidRequest(field, "is empty")
        if len(text) > self.config.max_prompt_chars:
            raise InvalidRequest(field, f"longer than {self.config.max_prompt_chars} characters")
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(
            self._pool, lambda: self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        return list(encoded)

    async def _render_chat(self, messages: pb.ChatMessages) -> list[int]:
        chat = convert.chat_messages(messages)
        if sum(len(m["content"]) for m in chat) > self.config.max_prompt_chars:
            raise InvalidRequest("input.messages", f"longer than {self.config.max_prompt_chars} characters")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("input.messages", "the model has no chat template; send a prompt instead")

        def render() -> str:
            return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

        try:
            text = await asyncio.get_running_loop().run_in_executor(self._pool, render)
        except Exception as exc:  # template errors (unknown role, bad order) are the caller's input
            raise InvalidRequest("input.messages", f"the chat template rejected the messages: {exc}") from exc
        return await self._encode(text, "input.messages", add_special_tokens=False)



def _parsed(request) -> None:
    if request is MALFORMED:
        raise InvalidRequest("request", "not a valid message of this method's request type (wire format or UTF-8)")
