"""Fault injection through the real server: lost or corrupt shadows and failed copies end only the affected request
with DATA_LOSS (never wrong tokens), non-finite tier-1 metadata is caught by the monitors, an exception inside an
engine step fails only that step's requests, a request that crashes the forward pass fails alone, and everything
is released afterwards."""

import asyncio

import grpc
import pytest

from engine.faults import FaultPlan
from server.pb.certkv.v1 import inference_pb2 as pb
from tests.helpers import hf_greedy
from tests.serving import channel_to, collect, greedy, running_server, wait_quiescent

PROMPT = list(range(400, 440))  # 40 tokens: two full blocks before the first decode


def request(rid: str, mode=pb.CERTIFIED, tolerance=0.0001, max_new=12, prompt=PROMPT) -> pb.GenerateRequest:
    message = greedy(prompt, max_new)
    message.request_id, message.kv.mode, message.kv.tolerance = rid, mode, tolerance  # tight: escalations read tier 2
    return message


async def outcome(stub, message) -> tuple[grpc.StatusCode, list[int]]:
    try:
        messages = await collect(stub, message)
        return grpc.StatusCode.OK, [t for m in messages for t in m.token_ids]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), []


def serve(tiny_llama, points: dict, scratch: int = 4):
    return running_server(tiny_llama, faults=FaultPlan(points, testing=True), kv_mode="certified", k_bits=4,
                          v_bits=2, scratch_blocks=scratch)


@pytest.mark.parametrize("point", ["shadow.corrupt", "shadow.drop"])
async def test_lost_or_corrupt_shadows_end_only_that_request_with_data_loss(tiny_llama, point):
    async with serve(tiny_llama, {point: {"request": "victim"}}) as server:
        async with channel_to(server) as (stub, _):
            # the bystander shares no block with the victim (tests/test_prefix_caching.py: sharers of a corrupt block)
            results = await asyncio.gather(outcome(stub, request("victim")),
                                           outcome(stub, request("bystander", prompt=[7] + PROMPT[1:])))
            after = await outcome(stub, request("after"))
        await wait_quiescent(server)
        assert not any(server.engine.runner.cache.in_use().values())
    assert results[0][0] == grpc.StatusCode.DATA_LOSS
    assert results[1][0] == grpc.StatusCode.OK and after[0] == grpc.StatusCode.OK


@pytest.mark.parametrize("mode,chunk", [(pb.EXACT, 512), (pb.DENSE, 512), (pb.AUDIT, 512), (pb.EXACT, 16)])
async def test_every_path_that_reads_a_corrupt_shadow_ends_with_data_loss(tiny_llama, mode, chunk):
    """Exact and dense decodes on the tiered cache, audit's reference and prefill chunks over a cached prefix (chunk
    16: the second chunk reads the first block's shadow) read tier 2 too: a corrupt shadow is DATA_LOSS there, never
    OK with tokens (and a certificate) that came from corrupt data. Each block is checked once after its write."""
    async with running_server(tiny_llama, faults=FaultPlan({"shadow.corrupt": {"request": "victim"}}, testing=True),
                              kv_mode="certified", max_num_batched_tokens=chunk) as server:
        async with channel_to(server) as (stub, _):
            victim = await outcome(stub, request("victim", mode=mode))
            bystander = await outcome(stub, request("bystander", mode=mode))
        await wait_quiescent(server)
        cache = server.engine.runner.cache
        assert not any(cache.in_use().values()) and bool(cache.verified[0].any())
    assert victim[0] == grpc.StatusCode.DATA_LOSS
    assert bystander == (grpc.StatusCode.OK, hf_greedy(tiny_llama, PROMPT, 12))


async def test_failed_copy_is_data_loss(tiny_llama):
    async with serve(tiny_llama, {"copy.fail": {}}, scratch=64) as server:
        async with channel_to(server) as (stub, _):
            code, _ = await outcome(stub, request("copy", tolerance=0.05))  # promotions: tier-2 fetches
            exact_code, tokens = await outcome(stub, request("exact", mode=pb.EXACT))
        await wait_quiescent(server)
    assert code == grpc.StatusCode.DATA_LOSS
    assert exact_code == grpc.StatusCode.OK and tokens == hf_greedy(tiny_llama, PROMPT, 12)  # no fetch needed


async def test_nonfinite_metadata_is_recomputed_exactly(tiny_llama):
    async with serve(tiny_llama, {"kv.nonfinite": {"request": "nan"}}) as server:
        async with channel_to(server) as (stub, _):
            messages = await collect(stub, request("nan", mode=pb.AUDIT, tolerance=0.1))
        await wait_quiescent(server)
        assert server.engine.runner.faults.fired["kv.nonfinite"] == 1
    cert = messages[-1].certificate  # an infinite scale makes the output non-finite: the monitor recomputes it
    assert cert.rung3_exact_head + cert.rung4_exact_layer > 0
    assert cert.audit_violations == 0 and cert.worst_actual_over_bound <= 1
    tokens = [t for m in messages for t in m.token_ids]
    assert len(tokens) == 12 and max(tokens) < 49152


async def test_exception_in_a_step_fails_that_step_only(tiny_llama):
    async with serve(tiny_llama, {"step.raise": {"after": 3, "times": 1}}) as server:
        async with channel_to(server) as (stub, _):
            first = await outcome(stub, request("a", mode=pb.EXACT, max_new=20))
            second = await outcome(stub, request("b", mode=pb.EXACT, max_new=20))
        await wait_quiescent(server)
        assert server.engine.runner.faults.fired["step.raise"] == 1
    assert first[0] == grpc.StatusCode.INTERNAL
    assert second == (grpc.StatusCode.OK, hf_greedy(tiny_llama, PROMPT, 20))


async def read_to_end(call) -> list[int]:
    tokens = []
    while (message := await call.read()) is not grpc.aio.EOF:
        tokens += message.token_ids
    return tokens


async def test_a_request_that_crashes_the_forward_pass_fails_alone(tiny_llama):
    """A request whose presence makes the forward pass raise joins a step of two running requests: the step runs
    again one request at a time, the poisoned request ends with INTERNAL, and the others stream on to HF's tokens."""
    points = {"forward.raise": {"request": "poison"}, "step.delay_ms": {"ms": 10}}
    async with serve(tiny_llama, points) as server:
        async with channel_to(server) as (stub, _):
            calls = [stub.Generate(request(rid, mode=pb.EXACT, max_new=30)) for rid in ("a", "b")]
            firsts = [await call.read() for call in calls]  # both running before the poisoned request arrives
            poisoned = await outcome(stub, request("poison", mode=pb.EXACT))
            rests = [await read_to_end(call) for call in calls]
        await wait_quiescent(server)
        fired = server.engine.runner.faults.fired["forward.raise"]
    assert poisoned[0] == grpc.StatusCode.INTERNAL
    assert fired >= 2  # the shared step, then the poisoned request alone
    expected = hf_greedy(tiny_llama, PROMPT, 30)
    assert [list(first.token_ids) + rest for first, rest in zip(firsts, rests)] == [expected, expected]


def test_fault_plans_are_refused_outside_tests(monkeypatch):
    monkeypatch.delenv("CERTKV_ENABLE_FAULTS", raising=False)
    with pytest.raises(PermissionError):
        FaultPlan({"copy.fail": {}})
    with pytest.raises(ValueError):
        FaultPlan({"no.such.point": {}}, testing=True)
    assert FaultPlan().points == {}  # the empty plan is what production runs
