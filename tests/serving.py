"""In-process servers for tests: a real grpc.aio server on 127.0.0.1:0 in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import grpc

from engine.config import EngineConfig
from engine.engine import LLMEngine
from server.app import CertkvServer
from server.config import ServerConfig
from server.pb.certkv.v1 import inference_pb2 as pb
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from tests.helpers import TEST_DEVICE


def slow_down(engine: LLMEngine, seconds: float) -> None:
    """Test hook: every forward pass takes at least `seconds` (deadline and cancel tests need steps to be slow)."""
    execute = engine.runner.execute

    def slowed(*args):
        time.sleep(seconds)
        return execute(*args)

    engine.runner.execute = slowed


@contextlib.asynccontextmanager
async def running_server(model: Path, step_delay: float = 0.0, server_overrides: dict | None = None,
                         telemetry=None, faults=None, **engine_overrides):
    defaults = {"model": str(model), "num_kv_blocks": 128, "kv_mode": "dense", "device": TEST_DEVICE}
    engine_config = EngineConfig(**(defaults | engine_overrides))
    engine = await asyncio.to_thread(LLMEngine, engine_config, *([faults] if faults else []))
    if step_delay:
        slow_down(engine, step_delay)
    config = ServerConfig(**({"port": 0, "drain_delay_s": 0.0, "drain_grace_s": 2.0} | (server_overrides or {})))
    server = CertkvServer(config, engine_config, engine, telemetry)
    await server.start()
    await server.load()
    try:
        yield server
    finally:
        await server.drain()


@contextlib.asynccontextmanager
async def channel_to(server: CertkvServer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.InferenceStub(channel), channel


async def collect(stub, request: pb.GenerateRequest, timeout: float = 30.0) -> list[pb.GenerateResponse]:
    return [message async for message in stub.Generate(request, timeout=timeout)]


async def wait_quiescent(server: CertkvServer, timeout: float = 3.0) -> None:
    """Every request ended and released everything: no pending RPC queue, no engine request, all blocks free."""
    engine = server.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (server.async_engine.num_pending == 0 and not engine.has_unfinished()
                and engine.scheduler.blocks.num_free == engine.spec.num_kv_blocks):
            engine.scheduler.check_invariants()
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not quiescent: pending={server.async_engine.num_pending} "
                         f"requests={list(engine.scheduler.requests)} free={engine.scheduler.blocks.num_free}")


def aborts(server: CertkvServer, reason: str) -> float:
    """certkv_aborts_total{reason} as the server's Prometheus registry holds it."""
    value = server.telemetry.registry.get_sample_value(
        "certkv_aborts_total", {"model_name": server.telemetry.model_name, "reason": reason})
    return value or 0.0


def greedy(prompt_ids, max_new: int, **stopping) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt_ids),
                              stopping=pb.StoppingCriteria(max_new_tokens=max_new, **stopping))
