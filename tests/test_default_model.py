"""The default model end to end over gRPC: a coherent chat answer, and the same greedy tokens as HF `generate`."""

import asyncio

import pytest

from server.pb.certkv.v1 import inference_pb2 as pb
from tests.helpers import hf_greedy
from tests.serving import channel_to, collect, running_server, wait_quiescent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def server(default_model):
    async with running_server(default_model, num_kv_blocks=256) as srv:
        yield srv


async def test_chat_answer_is_coherent(server):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")])
    async with channel_to(server) as (stub, _):
        messages = await collect(stub, pb.GenerateRequest(messages=chat,
                                                          stopping=pb.StoppingCriteria(max_new_tokens=40)))
    text = "".join(m.text for m in messages)
    assert "Paris" in text and messages[-1].finish_reason == pb.EOS, text


async def test_concurrent_requests_equal_hf_generate(server, default_model):
    tokenizer = server.engine.tokenizer
    prompts = [tokenizer(t)["input_ids"] for t in ("The meaning of life is", "In 1492, Columbus",
                                                   "def add(a, b):", "The best way to learn")]
    async with channel_to(server) as (stub, _):
        results = await asyncio.gather(*(collect(stub, pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=p), stopping=pb.StoppingCriteria(max_new_tokens=20))) for p in prompts))
    for prompt, messages in zip(prompts, results):
        assert [t for m in messages for t in m.token_ids] == hf_greedy(default_model, prompt, 20)
    await wait_quiescent(server)
