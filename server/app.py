"""The gRPC server: Inference, grpc.health.v1 and reflection on one grpc.aio server, run on uvloop.

Life cycle: start() binds every listener (gRPC, the optional health port, /metrics) before the model loads, with
health NOT_SERVING; a port that cannot be bound is a ValueError naming it and its flag. The gRPC port is exclusive
(no SO_REUSEPORT: a second server on the same port fails to start). load() builds the engine on a worker thread,
starts the engine thread, runs a one-token warm-up and only then reports SERVING. drain() (SIGTERM) flips health
to NOT_SERVING for good and ends every health Watch stream, refuses new Generate calls with UNAVAILABLE, waits
`drain_delay_s` so load balancers see it, lets in-flight streams finish within `drain_grace_s`, then stops the
engine. The signal, the start and the end of the drain are logged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model_runner import load_tokenizer
from engine.request import SamplingParams, StoppingParams
from server.async_engine import AsyncEngine
from server.config import ServerConfig
from server.health import HealthService
from server.pb.certkv.v1 import inference_pb2 as pb
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from server.security import GuardInterceptor, LenientParsing, server_credentials
from server.service import InferenceService
from server.telemetry import Telemetry, TelemetryConfig

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
WATCHERS_GONE_S = 1.0  # the most a drain waits for health Watch streams to end before it stops the server
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),  # ping idle connections to find dead clients
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),  # a second server on this port must fail to start, not share the connections
        *((("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
           ("grpc.max_connection_age_grace_ms", int(config.drain_grace_s * 1000)))
          if config.max_connection_age_s else ()),
    ]


def _bind(server: grpc.aio.Server, host: str, port: int, flag: str, credentials=None) -> int:
    """Adds a listening port; the bound port number, or a ValueError naming the port and its flag."""
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise ValueError(f"{flag} {port}: cannot listen on {address} (the port is in use, or {host} is not an "
                         "address of this host)")
    return bound


class CertkvServer:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig, engine: LLMEngine | None = None,
                 telemetry: Telemetry | None = None):
        self.config = config
        self.engine_config = engine_config
        self.engine = engine  # tests may pass a built engine
        self.async_engine: AsyncEngine | None = None
        self.telemetry = telemetry or Telemetry(TelemetryConfig(), model_name=engine_config.model)
        self.health = HealthService(config.max_watch_per_peer)
        self.service = InferenceService(config, self.telemetry)
        security = config.security
        guards = [GuardInterceptor(security, self._rejected)] if security.auth or security.rate_limit else []
        self.grpc = grpc.aio.server(options=grpc_options(config), interceptors=[*guards, LenientParsing()])
        pb_grpc.add_InferenceServicer_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        self.port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self._draining: asyncio.Future | None = None

    async def start(self) -> int:
        """Binds every listener before anything slow happens; raises ValueError naming a port that cannot be bound."""
        config = self.config
        try:
            self.port = _bind(self.grpc, config.host, config.port, "--port", server_credentials(config.security))
            if config.health_port is not None:
                self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                                                      interceptors=[LenientParsing()])
                health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
                self.health_port = _bind(self._health_server, config.host, config.health_port, "--health-port")
            self.telemetry.start_http()
        except ValueError:
            await self._close_listeners()
            raise
        await self._set_health(NOT_SERVING)
        await self.grpc.start()
        if self._health_server is not None:
            await self._health_server.start()
        log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", config.host, self.port)
        return self.port

    async def _close_listeners(self) -> None:
        await self.grpc.stop(None)
        if self._health_server is not None:
            await self._health_server.stop(None)
        self.telemetry.close()

    async def load(self) -> None:
        if self.engine is None:
            self.engine = await asyncio.to_thread(LLMEngine, self.engine_config)
        tokenizer = await asyncio.to_thread(load_tokenizer, self.engine.runner.path)
        self.async_engine = AsyncEngine(self.engine, self.config.max_pending_requests, on_fatal=self._on_fatal,
                                        step_span=self.telemetry.step_span,
                                        max_tokens_in_flight=self.config.max_tokens_in_flight,
                                        max_pending_per_peer=self.config.max_pending_per_peer)
        self.telemetry.watch(self.engine.live_stats)
        self.async_engine.start()
        await asyncio.to_thread(self.service.attach, self.async_engine, tokenizer)
        if self.config.warmup:
            await self._warmup()
        self.async_engine.accepting = True
        await self._set_health(SERVING)
        log.info("SERVING %s", self.engine.spec.model_id)

    async def drain(self) -> None:
        """Idempotent: a second call waits for the same steps."""
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        await self._draining

    async def _drain(self) -> None:
        started = time.monotonic()
        pending = self.async_engine.num_pending if self.async_engine is not None else 0
        log.info("draining: NOT_SERVING, %d health watchers ended, new calls refused; %d requests in flight may "
                 "finish within %g s", self.health.watchers, pending, self.config.drain_grace_s)
        await self.health.enter_graceful_shutdown()
        if self.async_engine is not None:
            self.async_engine.accepting = False
        # Watch streams send NOT_SERVING and end before the server stops (a watcher that does not read gets 1 s).
        await asyncio.gather(asyncio.sleep(self.config.drain_delay_s), self.health.watchers_gone(WATCHERS_GONE_S))
        await self.grpc.stop(self.config.drain_grace_s)
        if self._health_server is not None:
            await self._health_server.stop(None)
        if self.async_engine is not None:
            await self.async_engine.shutdown()
        if self.service.pool is not None:
            self.service.pool.close()
        self.telemetry.close()
        log.info("drained in %.1f s; stopped", time.monotonic() - started)

    async def _warmup(self) -> None:
        first = self.engine.spec.eos_token_ids[0] if self.engine.spec.eos_token_ids else 0
        request = self.engine.new_request("warmup", [first], SamplingParams(), StoppingParams(max_new_tokens=1))
        async for _ in self.async_engine.run(request):
            pass

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _rejected(self, code: str) -> None:
        metrics = self.telemetry.metrics
        metrics.rejections.labels(metrics.model_name, code).inc()

    def _on_fatal(self) -> None:
        self._fatal = asyncio.ensure_future(self._set_health(NOT_SERVING))


async def serve(config: ServerConfig, engine_config: EngineConfig, telemetry_config: TelemetryConfig) -> None:
    """Runs until SIGTERM or SIGINT, then drains. Raises if the model cannot be loaded."""
    server = CertkvServer(config, engine_config, telemetry=Telemetry(telemetry_config, engine_config.model))
    await server.start()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s%s", sig.name, ": draining" if not stop.is_set() else " again (already draining)")
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        await server.grpc.stop(None)
        raise loading.exception()
    await stopping
    loading.cancel()
    await server.drain()
