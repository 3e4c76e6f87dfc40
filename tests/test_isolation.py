"""One client never hurts another, over real gRPC: a request's own failure ends only that request,
clients that stop reading give way and are ended, hopeless prompts cost no tokenizer work, and the tokenizer's
queue is bounded."""

import asyncio
import logging
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.faults import FaultPlan
from server.pb.certkv.v1 import inference_pb2 as pb
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from tests.helpers import hf_greedy
from tests.serving import aborts, channel_to, collect, greedy, running_server, wait_quiescent

PROMPT = [400, 500, 600, 700, 800]
SMALL_WINDOW = (("grpc.http2.lookahead_bytes", 8192), ("grpc.http2.bdp_probe", 0))


@pytest.fixture(scope="module")
async def server(tiny_llama):
    async with running_server(tiny_llama, step_delay=0.01) as srv:
        yield srv


async def until(condition, timeout: float = 60.0) -> None:
    """Waits for a condition of the server's state (not a timing assertion: the limit only stops a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


async def outcome(stub, request) -> tuple[grpc.StatusCode, str, list[int]]:
    try:
        messages = await collect(stub, request, timeout=60)
        return grpc.StatusCode.OK, "", [t for m in messages for t in m.token_ids]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details(), []


async def rest_of(call) -> list[int]:
    """The tokens of a stream's remaining messages (after call.read(): the iterator may not be mixed in)."""
    tokens = []
    while (message := await call.read()) is not grpc.aio.EOF:
        tokens += message.token_ids
    return tokens


def sampled(**sampling) -> pb.GenerateRequest:
    request = greedy(PROMPT, 8)
    request.sampling.CopyFrom(pb.SamplingParams(**sampling))
    return request


HOSTILE = [  # each failed every stream of its step before: IndexError, or NaN probabilities in torch.multinomial
    ("stopping.stop_token_ids", greedy(PROMPT, 8, stop_token_ids=[49152 + 7], min_new_tokens=1)),
    ("sampling.repetition_penalty", sampled(repetition_penalty=1e-40, temperature=0.8)),
    ("sampling.repetition_penalty", sampled(repetition_penalty=1e-33, temperature=1.5e-5)),
]


@pytest.mark.parametrize("field,hostile", HOSTILE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HOSTILE)])
async def test_a_hostile_request_never_ends_its_neighbours(server, tiny_llama, field, hostile):
    async with channel_to(server) as (stub, _):
        bystander = stub.Generate(greedy(PROMPT, 30), timeout=60)
        tokens = list((await bystander.read()).token_ids)  # running: the hostile request joins its batch
        code, details, _ = await outcome(stub, hostile)
        tokens += await rest_of(bystander)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    assert tokens == hf_greedy(tiny_llama, PROMPT, 30)
    await wait_quiescent(server)


async def test_a_request_that_fails_in_its_step_ends_alone(tiny_llama):
    """Its logits turn NaN (the model failing on one row) or its post-processing raises: that request ends with
    INTERNAL, the requests sharing its steps run on with their tokens."""
    plan = FaultPlan({"sample.nonfinite": {"request": "nan"}, "output.raise": {"request": "raise"}}, testing=True)
    async with running_server(tiny_llama, step_delay=0.01, faults=plan) as server:
        async with channel_to(server) as (stub, _):
            requests = [greedy(PROMPT, 20) for _ in range(3)]
            requests[1].request_id, requests[2].request_id = "nan", "raise"
            bystander = stub.Generate(requests[0], timeout=60)
            tokens = list((await bystander.read()).token_ids)
            victims = await asyncio.gather(*(outcome(stub, r) for r in requests[1:]))
            tokens += await rest_of(bystander)
        await wait_quiescent(server)
    assert [code for code, _, _ in victims] == [grpc.StatusCode.INTERNAL] * 2
    assert tokens == hf_greedy(tiny_llama, PROMPT, 20)
    assert plan.fired == {"sample.nonfinite": 1, "output.raise": 1}


async def stall(stub, count: int) -> list:
    """`count` streams whose client reads one message and then nothing (large messages fill HTTP/2's window)."""
    calls = []
    for i in range(count):
        request = greedy([10 + i] * 5, 400)
        request.logprobs, request.top_logprobs = True, 20
        call = stub.Generate(request)
        await call.read()
        calls.append(call)
    return calls


async def test_clients_that_stop_reading_do_not_starve_a_reader(tiny_llama):
    """max_num_seqs streams whose clients stop reading used to keep every batch slot: a normal 8-token request was
    never scheduled. Paused requests now give their slots to it."""
    async with running_server(tiny_llama, max_num_seqs=4, server_overrides={"slow_client_timeout_s": 600.0}) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=SMALL_WINDOW) as channel:
            stalled = await stall(pb_grpc.InferenceStub(channel), 4)
            await until(lambda: len(server.engine.scheduler.paused) == 4)
            async with channel_to(server) as (stub, _):
                messages = await collect(stub, greedy(PROMPT, 8), timeout=120)
            assert server.engine.scheduler.num_preemptions >= 1  # a paused request gave its slot
            for call in stalled:
                call.cancel()
        await wait_quiescent(server)
    assert sum(len(m.token_ids) for m in messages) == 8 and messages[-1].finish_reason == pb.LENGTH


async def test_a_client_that_stops_reading_is_ended_and_freed(tiny_llama):
    async with running_server(tiny_llama, server_overrides={"slow_client_timeout_s": 0.5}) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=SMALL_WINDOW) as channel:
            (call,) = await stall(pb_grpc.InferenceStub(channel), 1)
            await until(lambda: aborts(server, "slow_client") == 1)
            await wait_quiescent(server)  # everything freed while the client still reads nothing
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while (message := await call.read()) is not grpc.aio.EOF:
                    received.append(message)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--slow-client-timeout" in info.value.details() and received  # what was sent arrives first


def tokenized(server) -> float:
    registry, model = server.telemetry.registry, server.telemetry.model_name
    return registry.get_sample_value("certkv_tokenizer_characters_total", {"model_name": model}) or 0.0


async def test_hopeless_prompts_cost_no_tokenizer_work(server):
    """8 clients with 1 Mi-character prompts against a 512-token context: refused from a lower bound on their token
    count, with no character handed to the tokenizer (they used to be tokenized in full, one after another)."""
    hopeless = [pb.GenerateRequest(prompt=text) for text in ("x" * (1 << 20), " " * (1 << 20), "Tell me. " * 100_000)]
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="word " * 100_000)] * 2)
    requests = [*hopeless * 3, pb.GenerateRequest(messages=chat)]
    before = tokenized(server)
    async with channel_to(server) as (stub, _):
        results = await asyncio.gather(*(outcome(stub, r) for r in requests))
        assert tokenized(server) == before
        for (code, details, _), request in zip(results, requests):
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least" in details, details
            assert details.startswith(f"input.{request.WhichOneof('input')}")
        messages = await collect(stub, pb.GenerateRequest(prompt="Hello there", stopping=pb.StoppingCriteria(
            max_new_tokens=2)))
    assert messages[-1].finish_reason and tokenized(server) == before + len("Hello there")


async def test_chat_input_is_bounded_before_templating(server):
    before = tokenized(server)
    many = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * 257)
    odd_role = pb.ChatMessages(messages=[pb.ChatMessage(role="r" * 65, content="hi")])
    async with channel_to(server) as (stub, _):
        for chat, expected in ((many, "256 messages"), (odd_role, "role")):
            code, details, _ = await outcome(stub, pb.GenerateRequest(messages=chat))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in details, details
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Tokenize(pb.TokenizeRequest(messages=chat))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert tokenized(server) == before


async def test_the_tokenizer_queue_is_bounded(tiny_llama):
    """Jobs beyond --tokenizer-queue are refused with RESOURCE_EXHAUSTED and a retry hint; a request that needs no
    tokenizer (token ids) is served meanwhile."""
    async with running_server(tiny_llama, server_overrides={"tokenizer_threads": 1, "tokenizer_queue": 2}) as server:
        release = threading.Event()
        held = [asyncio.ensure_future(server.service.pool.run(lambda tok: release.wait())) for _ in range(2)]
        try:
            await asyncio.sleep(0)
            async with channel_to(server) as (stub, _):
                for call in (collect(stub, pb.GenerateRequest(prompt="Hello")),
                             stub.Tokenize(pb.TokenizeRequest(text="Hello"))):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "--tokenizer-queue" in info.value.details()
                    assert int(dict(info.value.trailing_metadata())["retry-after-ms"]) > 0
                assert len(await collect(stub, greedy(PROMPT, 2))) >= 1
        finally:
            release.set()
            await asyncio.gather(*held)
        await wait_quiescent(server)


async def test_one_peer_cannot_take_the_tokenizer_from_another(tiny_llama):
    """A peer with --tokenizer-queue-per-peer jobs waiting or running is refused more; another peer's request is
    queued and served (before that peer's backlog)."""
    overrides = {"host": "localhost", "tokenizer_threads": 1, "tokenizer_queue": 8, "tokenizer_queue_per_peer": 2}
    async with running_server(tiny_llama, server_overrides=overrides) as server:
        release = threading.Event()
        pool = server.service.pool
        held = [asyncio.ensure_future(pool.run(lambda tok: release.wait(), client="ipv4:127.0.0.1")) for _ in range(2)]
        hello = pb.GenerateRequest(prompt="Hello", stopping=pb.StoppingCriteria(max_new_tokens=2))
        try:
            async with (grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as v4,
                        grpc.aio.insecure_channel(f"[::1]:{server.port}") as v6):
                code, details, _ = await outcome(pb_grpc.InferenceStub(v4), hello)
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--tokenizer-queue-per-peer" in details
                other = asyncio.ensure_future(outcome(pb_grpc.InferenceStub(v6), hello))
                await until(lambda: sum(pool.jobs.values()) == 3)  # queued behind the held ones
                release.set()
                assert (await other)[0] == grpc.StatusCode.OK
        finally:
            release.set()
            await asyncio.gather(*held)
        await wait_quiescent(server)


async def test_a_tokenize_answer_over_the_message_limit_is_invalid_argument(tiny_llama, caplog):
    """It used to fail while being sent, with a server traceback; now the cap is named and nothing is logged."""
    async with running_server(tiny_llama, server_overrides={"max_message_bytes": 1 << 16}) as server:
        text = "0 1 2 3 4 5 6 7 8 9 " * 2000  # 40,000 characters, about 20,000 tokens: an answer of > 64 KiB
        async with channel_to(server) as (stub, _):
            with caplog.at_level(logging.WARNING):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Tokenize(pb.TokenizeRequest(text=text))
            small = await stub.Tokenize(pb.TokenizeRequest(text=text[:200]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("input") and "--max-message-bytes" in info.value.details()
    assert small.token_ids and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def valid_request():
    """Any GenerateRequest whose sampling and stopping fields are individually valid (the documented ranges)."""
    sampling = st.builds(
        pb.SamplingParams, temperature=st.floats(0.0, 2.0, width=32),
        top_p=st.floats(0.0, 1.0, width=32, exclude_min=True), top_k=st.integers(0, 2**31 - 1),
        min_p=st.floats(0.0, 1.0, width=32), repetition_penalty=st.floats(0.009999999776482582, 100.0, width=32),
        frequency_penalty=st.floats(-2.0, 2.0, width=32), presence_penalty=st.floats(-2.0, 2.0, width=32),
        seed=st.integers(0, 2**63 - 1))
    stopping = st.integers(1, 6).flatmap(lambda n: st.builds(
        pb.StoppingCriteria, max_new_tokens=st.just(n), min_new_tokens=st.integers(0, n),
        stop=st.lists(st.text(min_size=1, max_size=6), max_size=16), ignore_eos=st.booleans(),
        stop_token_ids=st.lists(st.integers(0, 49151), max_size=16)))
    return st.builds(pb.GenerateRequest, prompt_token_ids=st.builds(pb.TokenIds, ids=st.lists(
        st.integers(0, 49151), min_size=1, max_size=20)), sampling=sampling, stopping=stopping,
        logprobs=st.booleans(), top_logprobs=st.integers(0, 20))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests=st.lists(valid_request(), min_size=1, max_size=5))
async def test_valid_parameters_in_a_batch_never_fail_a_bystander(server, tiny_llama, requests):
    async with channel_to(server) as (stub, _):
        results = await asyncio.gather(outcome(stub, greedy(PROMPT, 6)), *(outcome(stub, r) for r in requests))
    assert results[0] == (grpc.StatusCode.OK, "", hf_greedy(tiny_llama, PROMPT, 6))
    assert all(code == grpc.StatusCode.OK for code, _, _ in results), results  # none of them fails either


async def test_streams_that_end_under_a_write_log_no_error(server, caplog):
    """Found by the soak: a deadline passing while a message was being written failed the write, which was logged as
    a server error (and answered INTERNAL to a call already over). It is the client's deadline, counted as such."""
    async with channel_to(server) as (stub, _):
        with caplog.at_level(logging.WARNING):
            results = await asyncio.gather(*(outcome_within(stub, greedy(PROMPT, 200), 0.05 + 0.01 * i)
                                             for i in range(24)))
    assert set(results) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    await wait_quiescent(server)


async def outcome_within(stub, request, timeout: float) -> grpc.StatusCode:
    try:
        await collect(stub, request, timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
