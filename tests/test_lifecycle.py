"""The server as a process: SIGTERM drains (NOT_SERVING first, new calls UNAVAILABLE, the in-flight stream finishes,
exit 0), and a model that cannot load makes the process exit non-zero without ever reporting SERVING."""

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from tests.serving import greedy

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def spawn(log: Path, *args: str):
    """`python -m server ARGS`, its output into `log`: a pipe nobody reads would block the server once it fills."""
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(sys.executable, "-m", "server", *args, cwd=ROOT,
                                                    env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT)


async def health(channel, timeout=1.0):
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return reply.status
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_sigterm_drains(tiny_llama, tmp_path):
    port = free_port()
    process = await spawn(tmp_path / "server.log", "--model", str(tiny_llama), "--port", str(port), "--metrics-port",
                          "-1", "--kv-mode", "dense", "--drain-delay", "1.5", "--drain-grace", "20", "--num-kv-blocks",
                          "64")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 120
            while await health(channel) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline and process.returncode is None, "never SERVING"
                await asyncio.sleep(0.3)
            stub = pb_grpc.InferenceStub(channel)
            in_flight = stub.Generate(greedy([5, 6, 7], 400))
            first = await in_flight.read()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # inside the drain delay
            assert await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                await stub.Generate(greedy([5, 6, 7], 2)).read()
                refused = None
            except grpc.aio.AioRpcError as exc:
                refused = exc.code()
            assert refused == grpc.StatusCode.UNAVAILABLE
            tokens = list(first.token_ids)
            while (message := await in_flight.read()) is not grpc.aio.EOF:
                tokens += message.token_ids
            assert len(tokens) == 400  # finished within the grace period
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        print((tmp_path / "server.log").read_text()[-4000:])  # shown when the test fails


async def test_startup_failure_exits_nonzero(tmp_path):
    port = free_port()
    process = await spawn(tmp_path / "server.log", "--model", str(tmp_path / "no-such-model"), "--port", str(port),
                          "--metrics-port", "-1")
    assert await asyncio.wait_for(process.wait(), timeout=120) != 0
    assert "cannot start" in (tmp_path / "server.log").read_text()
