"""The certified cache over gRPC: per-request modes, the Certificate in the last message, and clean teardown."""

import grpc
import pytest

from server.pb.certkv.v1 import inference_pb2 as pb
from tests.helpers import hf_greedy
from tests.serving import channel_to, collect, greedy, running_server, wait_quiescent

PROMPT = [400, 500, 600, 700, 800, 900, 1000, 1100, 1200, 1300, 1400, 1500, 1600, 1700, 1800, 1900, 2000]


@pytest.fixture(scope="module")
async def server(tiny_llama):
    async with running_server(tiny_llama, kv_mode="certified", k_bits=4, v_bits=2, tolerance=0.1) as srv:
        yield srv


def with_kv(request: pb.GenerateRequest, mode: int, tolerance: float | None = None) -> pb.GenerateRequest:
    request.kv.mode = mode
    if tolerance is not None:
        request.kv.tolerance = tolerance
    return request


async def test_exact_mode_is_dense_over_grpc(server, tiny_llama):
    async with channel_to(server) as (stub, _):
        messages = await collect(stub, with_kv(greedy(PROMPT, 24), pb.EXACT))
    assert [t for m in messages for t in m.token_ids] == hf_greedy(tiny_llama, PROMPT, 24)
    cert = messages[-1].certificate
    assert cert.mode == pb.EXACT and cert.tolerance == 0
    steps = 23 + (messages[-1].usage.cached_tokens == len(PROMPT) - 1)  # as in the audit test below
    assert cert.rung3_exact_head == cert.attention_evaluations == steps * 2 * 4  # decode steps x layers x heads
    await wait_quiescent(server)


async def test_audit_certificate_accounts_every_evaluation(server):
    async with channel_to(server) as (stub, _):
        messages = await collect(stub, with_kv(greedy(PROMPT, 40), pb.AUDIT, 0.1))
    cert = messages[-1].certificate
    assert cert.mode == pb.AUDIT and cert.tolerance == pytest.approx(0.1)
    rungs = (cert.certified_rung0, cert.rung1_values, cert.rung2_keys, cert.rung3_exact_head, cert.rung4_exact_layer)
    # decode steps x layers x heads; when an earlier test left the prompt's first block cached, its last token runs
    # alone, through the certified decode too
    steps = 39 + (messages[-1].usage.cached_tokens == len(PROMPT) - 1)
    assert sum(rungs) == cert.attention_evaluations == steps * 2 * 4
    assert cert.audit_violations == 0 and 0 < cert.worst_actual_over_bound <= 1
    assert 0 < cert.max_bound_over_tolerance <= 1
    await wait_quiescent(server)
    assert not any(server.engine.runner.cache.in_use().values())


async def test_server_default_mode_and_dense_requests(server):
    async with channel_to(server) as (stub, _):
        default = (await collect(stub, greedy(PROMPT, 4)))[-1].certificate
        dense = (await collect(stub, with_kv(greedy(PROMPT, 4), pb.DENSE)))[-1].certificate
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert default.mode == pb.CERTIFIED and default.tolerance == pytest.approx(0.1)
    assert dense.mode == pb.DENSE and dense.attention_evaluations == 0
    assert info.default_kv_mode == pb.CERTIFIED and info.default_tolerance == pytest.approx(0.1)


async def test_bad_tolerance(server):
    async with channel_to(server) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub, with_kv(greedy(PROMPT, 4), pb.CERTIFIED, -0.5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("kv.tolerance")
