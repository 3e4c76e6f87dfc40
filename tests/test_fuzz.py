"""Hostile input over real gRPC: hypothesis walks the GenerateRequest descriptor (extreme scalars, long repeated
fields, every oneof branch, unknown enum values) and sends raw bytes. Outcomes stay within {OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED}, never INTERNAL or UNKNOWN, and the server answers a good request afterwards."""

import asyncio
import math

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.pb.certkv.v1 import inference_pb2 as pb
from tests.serving import channel_to, collect, greedy, running_server, wait_quiescent

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SCALARS = {
    FieldDescriptor.TYPE_FLOAT: st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1e-45, 3.4e38])),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_INT32: st.integers(-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 60000)),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.text(max_size=300),
    FieldDescriptor.TYPE_ENUM: st.integers(-5, 10),
}


def message_strategy(descriptor, depth=0):
    """A strategy for any message type, walking its descriptor."""
    fields = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            value = message_strategy(field.message_type, depth + 1) if depth < 3 else st.none()
        else:
            value = SCALARS[field.type]
        if field.is_repeated:
            value = st.lists(value, max_size=40)
        fields[field.name] = st.one_of(st.none(), value)

    @st.composite
    def build(draw):
        message = message_factory.GetMessageClass(descriptor)()
        for name, strategy in fields.items():
            value = draw(strategy)
            field = descriptor.fields_by_name[name]
            if value is None or (field.containing_oneof and draw(st.booleans())):
                continue
            if field.is_repeated:
                container = getattr(message, name)
                for item in value:
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        container.add().CopyFrom(item)
                    else:
                        container.append(item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


@pytest.fixture(scope="module")
async def fuzz_server(tiny_llama):
    async with running_server(tiny_llama, kv_mode="certified", server_overrides={"max_pending_requests": 8}) as srv:
        yield srv


async def status_of(stub, request, timeout=20.0) -> grpc.StatusCode:
    try:
        call = stub.Generate(request, timeout=timeout)
        async for _ in call:
            pass
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=message_strategy(pb.GenerateRequest.DESCRIPTOR))
async def test_descriptor_fuzz(fuzz_server, request):
    if request.stopping.HasField("max_new_tokens") is False or request.stopping.max_new_tokens > 8:
        request.stopping.max_new_tokens = min(request.stopping.max_new_tokens, 8) or 4  # keep runs short
    async with channel_to(fuzz_server) as (stub, _):
        assert await status_of(stub, request) in ALLOWED


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.one_of(st.binary(max_size=200), st.sampled_from([b"\x12\x02\xff\xfe", b"\x0a\x80", b"\xff" * 10])))
async def test_raw_bytes(fuzz_server, payload):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        call = channel.unary_stream("/certkv.v1.Inference/Generate")(payload, timeout=20)
        try:
            async for _ in call:
                pass
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
    assert code in ALLOWED, code


async def test_server_still_serves_after_fuzzing(fuzz_server):
    async with channel_to(fuzz_server) as (stub, _):
        assert len(await collect(stub, greedy([5, 6, 7], 3))) >= 1
    await wait_quiescent(fuzz_server)


OTHER_METHODS = [("/grpc.health.v1.Health/Check", "none"), ("/grpc.health.v1.Health/Watch", "response"),
                 ("/grpc.health.v1.Health/List", "none"), ("/certkv.v1.Inference/Tokenize", "none"),
                 ("/certkv.v1.Inference/GetModelInfo", "none"),
                 ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "both")]


@pytest.mark.parametrize("path,streaming", OTHER_METHODS, ids=[p.rsplit("/", 1)[1] for p, _ in OTHER_METHODS])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.one_of(st.binary(max_size=100), st.sampled_from([b"\x0a\x02\xff\xfe", b"\x0a\x80", b"\xff" * 10])))
async def test_raw_bytes_on_every_other_method(fuzz_server, path, streaming, payload):
    """Health, reflection and the unary Inference methods: never UNKNOWN or INTERNAL (an unknown health service is
    NOT_FOUND, as grpc.health.v1 says)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        try:
            if streaming == "none":
                await channel.unary_unary(path)(payload, timeout=20)
            else:
                call = (channel.unary_stream(path)(payload, timeout=20) if streaming == "response"
                        else channel.stream_stream(path)(iter([payload]), timeout=20))
                await call.read()  # a Watch stays open: its first answer is enough
                call.cancel()
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
    assert code in ALLOWED | {grpc.StatusCode.NOT_FOUND}, code
