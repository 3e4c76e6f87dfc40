"""The gRPC service over real loopback: streaming, validation statuses, cancel and deadline, admission, health,
drain, reflection and the CLI client."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server import client as cli
from server.pb.certkv.v1 import inference_pb2 as pb
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc
from tests.helpers import TEST_DEVICE, hf_greedy
from tests.serving import aborts, channel_to, collect, greedy, running_server, wait_quiescent

PROMPT = [400, 500, 600, 700, 800]


@pytest.fixture(scope="module")
async def server(tiny_llama):
    async with running_server(tiny_llama, step_delay=0.01) as srv:
        yield srv


async def test_stream_matches_hf_and_ends_with_the_outcome(server, tiny_llama):
    async with channel_to(server) as (stub, _):
        messages = await collect(stub, greedy(PROMPT, 12))
    tokens = [t for m in messages for t in m.token_ids]
    assert tokens == hf_greedy(tiny_llama, PROMPT, 12)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])  # outputs may coalesce
    last = messages[-1]
    assert last.finish_reason == pb.LENGTH and last.HasField("seed")
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 12)
    assert 0 < last.usage.time_to_first_token_s <= last.usage.total_time_s
    assert "".join(m.text for m in messages) == server.engine.tokenizer.decode(tokens, skip_special_tokens=True)
    await wait_quiescent(server)


async def test_text_chat_and_token_inputs(server):
    tokenizer = server.engine.tokenizer
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hello")])
    async with channel_to(server) as (stub, _):
        for request, expected in [
            (pb.GenerateRequest(prompt="Hello there"), tokenizer("Hello there")["input_ids"]),
            (pb.GenerateRequest(messages=chat), tokenizer.apply_chat_template(
                [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True, return_dict=False)),
        ]:
            request.stopping.max_new_tokens = 2
            messages = await collect(stub, request)
            assert messages[-1].usage.prompt_tokens == len(expected)
        tokenized = await stub.Tokenize(pb.TokenizeRequest(messages=chat))
        assert list(tokenized.token_ids) == expected and tokenized.tokens[0] == "<|im_start|>"


BAD = [
    ("input", pb.GenerateRequest()),
    ("input.prompt", pb.GenerateRequest(prompt="")),
    ("input.messages", pb.GenerateRequest(messages=pb.ChatMessages())),
    ("input.prompt_token_ids", greedy([1, 49152], 2)),
    ("input", greedy([], 2)),
    ("stopping.max_new_tokens", greedy(PROMPT, 0)),
    ("stopping.max_new_tokens", greedy(PROMPT, 600)),
    ("input", greedy([5] * 520, 1)),
    ("stopping.min_new_tokens", greedy(PROMPT, 2, min_new_tokens=3)),
    ("stopping.stop", greedy(PROMPT, 2, stop=[""])),
    ("sampling.temperature", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1))),
    ("sampling.temperature", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=float("inf")))),
    ("sampling.top_p", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=0))),
    ("sampling.top_k", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_k=-2))),
    ("sampling.repetition_penalty", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(repetition_penalty=0))),
    ("top_logprobs", pb.GenerateRequest(prompt="x", top_logprobs=50)),
    ("kv.mode", pb.GenerateRequest(prompt="x", kv=pb.KVPolicy(mode=42))),
    ("kv.mode", pb.GenerateRequest(prompt="x", kv=pb.KVPolicy(mode=pb.CERTIFIED))),  # the server runs dense
    ("request_id", pb.GenerateRequest(prompt="x", request_id="r" * 200)),
    ("stopping.stop_token_ids", greedy(PROMPT, 2, stop_token_ids=[49152])),
    ("stopping.stop", greedy(PROMPT, 2, stop=["a"] * 17)),
    ("sampling.repetition_penalty", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(repetition_penalty=200))),
    ("stopping.max_new_tokens", pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(max_new_tokens=512))),
]


@pytest.mark.parametrize("field,request_", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
async def test_bad_input_gets_invalid_argument_naming_the_field(server, field, request_):
    async with channel_to(server) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub, request_)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field), info.value.details()
        assert len(await collect(stub, greedy(PROMPT, 2))) == 2  # still serving
    await wait_quiescent(server)


async def test_cancel_mid_stream_frees_blocks(server):
    before = aborts(server, "cancelled")
    async with channel_to(server) as (stub, _):
        for _ in range(5):
            call = stub.Generate(greedy(PROMPT, 300))
            async for message in call:
                if server.engine.scheduler.blocks.num_free < server.engine.spec.num_kv_blocks:
                    break
            call.cancel()
            await wait_quiescent(server, timeout=1.0)
    assert aborts(server, "cancelled") - before == 5


async def test_deadline_mid_stream_frees_blocks(server):
    before = aborts(server, "deadline")
    received = []
    async with channel_to(server) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:  # 500 steps take >= 5 s at step_delay 0.01
            async for message in stub.Generate(greedy(PROMPT, 500), timeout=3.0):
                received.append(message)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received and not received[-1].finish_reason  # admitted and streaming when the deadline passed
    await wait_quiescent(server, timeout=1.0)
    assert aborts(server, "deadline") - before == 1


async def test_concurrent_streams_equal_their_solo_runs(server, tiny_llama):
    prompts = [[10 + i] * (1 + 5 * i) for i in range(8)]
    async with channel_to(server) as (stub, _):
        results = await asyncio.gather(*(collect(stub, greedy(p, 10)) for p in prompts))
    for prompt, messages in zip(prompts, results):
        assert [t for m in messages for t in m.token_ids] == hf_greedy(tiny_llama, prompt, 10)
    await wait_quiescent(server)


async def test_stop_string_over_grpc(server):
    async with channel_to(server) as (stub, _):
        full = "".join(m.text for m in await collect(stub, greedy(PROMPT, 12)))
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        messages = await collect(stub, greedy(PROMPT, 12, stop=[stop]))
    text = "".join(m.text for m in messages)
    assert messages[-1].finish_reason == pb.STOP_SEQUENCE and text == full[: full.index(stop)]


async def test_logprobs_over_grpc(server):
    async with channel_to(server) as (stub, _):
        request = greedy(PROMPT, 3)
        request.logprobs, request.top_logprobs = True, 4
        messages = await collect(stub, request)
    for message in messages:
        (lp,) = message.logprobs
        assert lp.token_id == message.token_ids[0] and len(lp.top) == 4
        assert lp.top[0].token_id == lp.token_id and lp.logprob == pytest.approx(lp.top[0].logprob)


async def test_model_info_and_reflection(server):
    async with channel_to(server) as (stub, channel):
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.num_layers, info.num_attention_heads, info.num_kv_heads, info.head_dim) == (2, 4, 2, 16)
        assert info.max_context_length == 512 and info.vocab_size == 49152 and info.has_chat_template
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"certkv.v1.Inference", "grpc.health.v1.Health"} <= names


async def test_cli_client_streams_text(server, capsys):
    code = await asyncio.to_thread(cli.main, ["--target", f"127.0.0.1:{server.port}", "Hello", "--max-new-tokens", "3",
                                              "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and 1 <= len(lines) <= 3 and '"finishReason": "LENGTH"' in lines[-1]
    code = await asyncio.to_thread(cli.main, ["--target", f"127.0.0.1:{server.port}", "x", "--top-p", "2"])
    assert code == 1 and "INVALID_ARGUMENT" in capsys.readouterr().err


async def hold(stub, n: int) -> list:
    """n long streams, each past its first message: pending requests."""
    holders = [stub.Generate(greedy(PROMPT, 200)) for _ in range(n)]
    for call in holders:
        await call.read()
    return holders


async def test_admission_limit_answers_resource_exhausted(tiny_llama):
    async with running_server(tiny_llama, step_delay=0.02, server_overrides={"max_pending_requests": 2}) as server:
        async with channel_to(server) as (stub, _):
            holders = await hold(stub, 2)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, greedy(PROMPT, 2))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(info.value.trailing_metadata())["retry-after-ms"] == "1000"
            for call in holders:
                call.cancel()
            await wait_quiescent(server)
            assert len(await collect(stub, greedy(PROMPT, 2))) == 2


async def test_one_peer_holds_at_most_its_share_of_the_pending_requests(tiny_llama):
    """--max-pending-per-peer: a peer at its limit is refused RESOURCE_EXHAUSTED by name while the server has room,
    another peer is still admitted (its request through the same AsyncEngine, as the service submits it), and the
    first peer is admitted again once its streams end."""
    from engine.request import SamplingParams, StoppingParams

    overrides = {"max_pending_requests": 8, "max_pending_per_peer": 2}
    async with running_server(tiny_llama, step_delay=0.02, server_overrides=overrides) as server:
        async with channel_to(server) as (stub, _):
            holders = await hold(stub, 2)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, greedy(PROMPT, 2))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 requests pending from ipv4:127.0.0.1" in info.value.details(), info.value.details()
            other = server.engine.new_request("other-peer", [5, 6, 7], SamplingParams(),
                                              StoppingParams(max_new_tokens=3, ignore_eos=True), peer="ipv4:10.0.0.9")
            outputs = [o async for o in server.async_engine.generate(other)]
            assert outputs[-1].finished and sum(len(o.token_ids) for o in outputs) == 3
            for call in holders:
                call.cancel()
            await wait_quiescent(server)
            assert len(await collect(stub, greedy(PROMPT, 2))) == 2


async def test_health_and_drain(tiny_llama):
    overrides = {"drain_delay_s": 0.5, "drain_grace_s": 5.0}
    async with running_server(tiny_llama, step_delay=0.02, server_overrides=overrides) as server:
        async with channel_to(server) as (stub, channel):
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(service="certkv.v1.Inference"))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            in_flight = asyncio.ensure_future(collect(stub, greedy(PROMPT, 40)))
            await asyncio.sleep(0.1)
            draining = asyncio.ensure_future(server.drain())
            await asyncio.sleep(0.05)  # inside the drain delay: NOT_SERVING, new work refused, old work running
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, greedy(PROMPT, 2))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            messages = await in_flight  # finishes within the grace period
            assert messages[-1].finish_reason == pb.LENGTH and sum(len(m.token_ids) for m in messages) == 40
            await draining
        assert not server.engine.has_unfinished()
        assert server.engine.scheduler.blocks.num_free == server.engine.spec.num_kv_blocks


async def test_not_serving_until_loaded(tiny_llama):
    from engine.config import EngineConfig
    from server.app import CertkvServer
    from server.config import ServerConfig

    engine_config = EngineConfig(model=str(tiny_llama), num_kv_blocks=16, device=TEST_DEVICE)
    server = CertkvServer(ServerConfig(port=0, drain_delay_s=0), engine_config)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service="certkv.v1.Inference"))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(pb_grpc.InferenceStub(channel), greedy(PROMPT, 2))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await server.load()
        check = await health.Check(health_pb2.HealthCheckRequest(service="certkv.v1.Inference"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    await server.drain()


# ---- health and reflection ---------------------------------------------------------------
TRUNCATED, BAD_UTF8 = b"\x0a\x80", b"\x0a\x02\xff\xfe"  # a cut length; field 1 a string of invalid UTF-8


async def raw_status(channel, path: str, streaming: str, payload: bytes) -> grpc.StatusCode:
    try:
        if streaming == "none":
            await channel.unary_unary(path)(payload, timeout=10)
        else:
            call = (channel.unary_stream(path)(payload, timeout=10) if streaming == "response"
                    else channel.stream_stream(path)(iter([payload]), timeout=10))
            await call.read()
            call.cancel()
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_malformed_bytes_on_health_and_reflection_are_invalid_argument(server):
    """They were UNKNOWN or INTERNAL (grpcio's own answer to bytes it cannot parse)."""
    methods = [("/grpc.health.v1.Health/Check", "none"), ("/grpc.health.v1.Health/Watch", "response"),
               ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "both"),
               ("/certkv.v1.Inference/Tokenize", "none"), ("/certkv.v1.Inference/Generate", "response")]
    calls = [(path, streaming, payload) for path, streaming in methods for payload in (TRUNCATED, BAD_UTF8)]
    calls.append(("/grpc.health.v1.Health/List", "none", TRUNCATED))  # its request has no string field
    async with channel_to(server) as (_, channel):
        codes = {(path, payload): await raw_status(channel, path, streaming, payload)
                 for path, streaming, payload in calls}
    assert set(codes.values()) == {grpc.StatusCode.INVALID_ARGUMENT}, codes


async def test_health_list_reports_every_service(server):
    async with channel_to(server) as (_, channel):
        listed = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING, "certkv.v1.Inference": health_pb2.HealthCheckResponse.SERVING}


async def test_watch_streams_end_when_draining_starts(tiny_llama):
    """An open Watch stream (no token needed) used to hold every drain for the whole grace period."""
    async with running_server(tiny_llama, server_overrides={"drain_grace_s": 120.0}) as server:
        async with channel_to(server) as (_, channel):
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(service=name)) for name in ("", "certkv.v1.Inference")]
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            draining = asyncio.ensure_future(server.drain())
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert await watch.read() is grpc.aio.EOF and await watch.code() == grpc.StatusCode.OK
            await asyncio.wait_for(draining, timeout=60)  # far within the 120 s grace: nothing else was running


async def test_watch_streams_are_capped_per_peer(tiny_llama):
    overrides = {"host": "localhost", "max_watch_per_peer": 3}  # localhost: 127.0.0.1 and ::1, two peers
    request = health_pb2.HealthCheckRequest()
    async with running_server(tiny_llama, server_overrides=overrides) as server:
        async with (grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as v4,
                    grpc.aio.insecure_channel(f"[::1]:{server.port}") as v6):
            held = [health_pb2_grpc.HealthStub(v4).Watch(request) for _ in range(3)]
            for watch in held:
                await watch.read()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(v4).Watch(request).read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per peer" in info.value.details()
            other = health_pb2_grpc.HealthStub(v6).Watch(request)
            assert (await other.read()).status == health_pb2.HealthCheckResponse.SERVING  # another peer is served
            for watch in (*held, other):
                watch.cancel()
            while server.health.watchers:
                await asyncio.sleep(0.01)
            again = health_pb2_grpc.HealthStub(v4).Watch(request)
            assert (await again.read()).status == health_pb2.HealthCheckResponse.SERVING
            again.cancel()
