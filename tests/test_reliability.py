"""Reliability over real gRPC: backpressure on a slow reader, tokens-in-flight admission, the nothing-lost ledger
under concurrent cancels, deadlines and bad input, and the same greedy tokens alone and inside a busy batch."""

import asyncio
import random

import grpc
import pytest

from server.pb.certkv.v1 import inference_pb2 as pb
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from tests.helpers import hf_greedy
from tests.serving import aborts, channel_to, collect, greedy, running_server, wait_quiescent

PROMPT = [400, 500, 600, 700, 800]


async def test_slow_reader_is_paused_not_buffered(tiny_llama):
    async with running_server(tiny_llama) as server:
        small_window = (("grpc.http2.lookahead_bytes", 8192), ("grpc.http2.bdp_probe", 0))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=small_window) as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = greedy(PROMPT, 300)
            request.logprobs, request.top_logprobs = True, 20  # ~300-byte messages: HTTP/2's window fills
            call = stub.Generate(request)
            first = await call.read()
            await asyncio.sleep(1.0)  # the engine keeps generating; the client does not read
            engine_tokens = server.engine.scheduler.requests and next(iter(server.engine.scheduler.requests.values()))
            held = engine_tokens.num_output_tokens if engine_tokens else 300
            rest = []
            while (message := await call.read()) is not grpc.aio.EOF:
                rest.append(message)
        await wait_quiescent(server)
        assert server.async_engine.pauses >= 1
    messages = [first, *rest]
    tokens = [t for m in messages for t in m.token_ids]
    assert tokens == hf_greedy(tiny_llama, PROMPT, 300)
    assert held < 100  # paused near the high-water mark instead of running ahead
    assert len(messages) < len(tokens)  # what piled up was sent together


async def test_tokens_in_flight_limit(tiny_llama):
    overrides = {"max_tokens_in_flight": 300}
    async with running_server(tiny_llama, step_delay=0.02, server_overrides=overrides) as server:
        async with channel_to(server) as (stub, _):
            holder = stub.Generate(greedy(PROMPT, 250))
            await holder.read()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, greedy(PROMPT, 100))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens in flight" in info.value.details()
            assert len(await collect(stub, greedy(PROMPT, 20))) >= 1  # fits beside the first one
            holder.cancel()
        await wait_quiescent(server)


async def test_nothing_is_lost(tiny_llama):
    """200 requests from 24 concurrent clients: normal, cancelled midway, short deadlines, bad input. Each gets exactly
    one terminal outcome, the server's accounting agrees, and every resource returns to baseline."""
    rng = random.Random(7)
    ledger: dict[int, list[str]] = {}
    async with running_server(tiny_llama, step_delay=0.005, kv_mode="certified", k_bits=4, v_bits=2,
                              server_overrides={"max_pending_requests": 64}) as server:
        async with channel_to(server) as (stub, _):
            async def client(index: int) -> None:
                kind = rng.choice(["ok", "ok", "cancel", "deadline", "bad"])
                message = greedy([10 + index % 50] * rng.randint(1, 40), rng.randint(1, 40))
                if kind == "bad":
                    message.sampling.top_p = 2.0
                call = stub.Generate(message, timeout=0.05 if kind == "deadline" else 30)
                outcomes = ledger.setdefault(index, [])
                try:
                    async for response in call:
                        if kind == "cancel":
                            call.cancel()
                            break
                        if response.finish_reason:
                            outcomes.append("finished")
                    if kind == "cancel":
                        outcomes.append("cancelled")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(exc.code().name)

            for start in range(0, 200, 24):
                await asyncio.gather(*(client(i) for i in range(start, min(start + 24, 200))))
        await wait_quiescent(server, timeout=5)
        assert not any(server.engine.runner.cache.in_use().values())
        registry, model = server.telemetry.registry, server.telemetry.model_name
        finished = registry.get_sample_value("vllm:request_success_total", {"model_name": model,
                                                                             "finished_reason": "length"}) or 0
        finished += registry.get_sample_value("vllm:request_success_total", {"model_name": model,
                                                                              "finished_reason": "eos"}) or 0
        cancelled, expired = aborts(server, "cancelled"), aborts(server, "deadline")
    assert all(len(outcomes) == 1 for outcomes in ledger.values()) and len(ledger) == 200
    counts = {name: sum(o == [name] for o in ledger.values()) for name in
              ("finished", "cancelled", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT")}
    assert sum(counts.values()) == 200, counts
    # server side: every admitted request ended as a success or an abort (a client-side cancel after the final
    # message, or a deadline that passed before admission (while the prompt was prepared), is not an abort)
    assert finished >= counts["finished"] and expired <= counts["DEADLINE_EXCEEDED"]
    unadmitted = counts["INVALID_ARGUMENT"] + counts["DEADLINE_EXCEEDED"] - expired
    assert finished + cancelled + expired >= 200 - unadmitted


async def test_greedy_tokens_alone_and_in_a_busy_batch(tiny_llama):
    async with running_server(tiny_llama, step_delay=0.002) as server:
        async with channel_to(server) as (stub, _):
            alone = await collect(stub, greedy(PROMPT, 24))
            fillers = [collect(stub, greedy([20 + i] * (3 + 9 * i), 30)) for i in range(12)]
            busy = (await asyncio.gather(*fillers[:6], collect(stub, greedy(PROMPT, 24)), *fillers[6:]))[6]
    assert [t for m in busy for t in m.token_ids] == [t for m in alone for t in m.token_ids]
