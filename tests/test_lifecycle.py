"""The server as a process: SIGTERM drains (NOT_SERVING first, new calls UNAVAILABLE, the in-flight stream finishes,
exit 0, each phase logged), a model that cannot load makes the process exit non-zero without ever reporting
SERVING, and a port that is taken is a clean start-up error naming it, before the model loads. Listeners are
exclusive and local: a second server cannot share the gRPC port, /metrics listens on the server's host."""

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from server.telemetry import Telemetry, TelemetryConfig
from tests.helpers import TEST_DEVICE
from tests.serving import greedy, running_server

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
                          "-1", "--kv-mode", "dense", "--drain-delay", "1.5", "--drain-grace", "60", "--num-kv-blocks",
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
        assert await asyncio.wait_for(process.wait(), timeout=120) == 0
        log = (tmp_path / "server.log").read_text()
        for line in ("received SIGTERM: draining", "draining: NOT_SERVING", "drained in"):
            assert line in log, line
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


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--health-port"])
async def test_a_taken_port_is_a_clean_start_up_error_before_the_model_loads(tmp_path, flag):
    """The error names the port and its flag; the model (which does not exist) is never looked at."""
    ports = {"--port": free_port(), "--metrics-port": free_port(), "--health-port": free_port()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[flag]))
        taken.listen()
        process = await spawn(tmp_path / "server.log", "--model", str(tmp_path / "no-such-model"),
                              *(str(v) for item in ports.items() for v in item))
        assert await asyncio.wait_for(process.wait(), timeout=120) != 0
    log = (tmp_path / "server.log").read_text()
    assert f"cannot start: {flag} {ports[flag]}: cannot listen on 127.0.0.1:{ports[flag]}" in log, log
    assert "neither an HF model directory" not in log and "Traceback" not in log


async def test_a_second_server_cannot_share_the_port(tiny_llama):
    from server.app import CertkvServer
    from server.config import ServerConfig

    async with running_server(tiny_llama) as first:
        second = CertkvServer(ServerConfig(port=first.port), EngineConfig(model=str(tiny_llama), device=TEST_DEVICE))
        with pytest.raises(ValueError, match=f"--port {first.port}: cannot listen"):
            await second.start()


async def test_metrics_listen_on_the_servers_host(tiny_llama):
    telemetry = Telemetry(TelemetryConfig(metrics_port=0, metrics_host="127.0.0.1"), "tiny")
    async with running_server(tiny_llama, telemetry=telemetry) as server:
        assert server.telemetry.http.server_address[0] == "127.0.0.1"
        assert TelemetryConfig().metrics_host == "127.0.0.1"
