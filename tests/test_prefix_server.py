"""Prefix caching over real gRPC: a chat template's shared system prompt is found cached by later requests
(usage.cached_tokens, vLLM's prefix-cache counters on /metrics, GetModelInfo), with the tokens of a server that
recomputes every prompt; the flag that turns it off."""

import asyncio

import pytest

from server.cli import build_parser, configs
from server.pb.certkv.v1 import inference_pb2 as pb
from server.telemetry import Telemetry, TelemetryConfig
from tests.serving import channel_to, collect, running_server, wait_quiescent
from tests.test_telemetry import scrape

SYSTEM = ("You are certkv's test assistant. You answer in one short sentence, you never use lists, and you always "
          "name the capital city of the country you are asked about before anything else.")
QUESTIONS = ["Tell me about France.", "And Japan?", "What about Peru, then?"]


def chat(question: str, mode=pb.EXACT) -> pb.GenerateRequest:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content=SYSTEM),
                                         pb.ChatMessage(role="user", content=question)])
    request = pb.GenerateRequest(messages=messages, stopping=pb.StoppingCriteria(max_new_tokens=8))
    request.kv.mode = mode
    return request


async def serve_chats(tiny_llama, caching: bool):
    """Each question in turn, then all of them at once in audit mode; returns the responses' tokens and usages,
    the prompts' token ids, GetModelInfo and how far the prefix-cache counters on /metrics moved."""
    telemetry = Telemetry(TelemetryConfig(metrics_port=0), "tiny")
    async with running_server(tiny_llama, telemetry=telemetry, kv_mode="certified",
                              enable_prefix_caching=caching) as server:
        before = await asyncio.to_thread(scrape, server)  # after the warm-up generation
        async with channel_to(server) as (stub, _):
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            prompts = [list((await stub.Tokenize(pb.TokenizeRequest(messages=chat(q).messages))).token_ids)
                       for q in QUESTIONS]
            finals = [(await collect(stub, chat(q)))[-1] for q in QUESTIONS]
            tokens = [[t for m in await collect(stub, chat(q)) for t in m.token_ids] for q in QUESTIONS]
            audited = await asyncio.gather(*(collect(stub, chat(q, pb.AUDIT)) for q in QUESTIONS))
        await wait_quiescent(server)
        assert not any(server.engine.runner.cache.in_use().values())
        after = await asyncio.to_thread(scrape, server)
    samples = {name: after[name] - before.get(name, 0.0) for name in after if name.startswith("vllm:prefix_cache")}
    return tokens, finals, prompts, info, samples, [a[-1] for a in audited]


def shared_blocks(a: list[int], b: list[int], block_size=16) -> int:
    """Tokens of b found cached after a ran: their common prefix in whole blocks, leaving b's last token to run."""
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return min(common, len(b) - 1) // block_size * block_size


async def test_the_chat_templates_shared_system_prompt_is_hit_across_requests(tiny_llama):
    tokens, finals, prompts, info, samples, audited = await serve_chats(tiny_llama, caching=True)
    assert info.prefix_caching and info.block_size == 16
    cached = [f.usage.cached_tokens for f in finals]
    assert cached[0] == 0 and cached[1:] == [shared_blocks(prompts[0], p) for p in prompts[1:]]
    assert min(cached[1:]) >= 32  # the system prompt's blocks
    queried = sum(map(len, prompts))
    hits = samples['vllm:prefix_cache_hits_total{model_name="tiny"}']
    assert samples['vllm:prefix_cache_queries_total{model_name="tiny"}'] == 3 * queried  # three rounds
    assert hits >= sum(cached) + sum((len(p) - 1) // 16 * 16 for p in prompts)  # the second round: whole prompts
    assert all(a.certificate.audit_violations == 0 for a in audited)
    off_tokens, off_finals, _, off_info, off_samples, _ = await serve_chats(tiny_llama, caching=False)
    assert tokens == off_tokens and [f.usage.completion_tokens for f in finals] == [len(t) for t in tokens]
    assert not off_info.prefix_caching and all(f.usage.cached_tokens == 0 for f in off_finals)
    assert off_samples['vllm:prefix_cache_hits_total{model_name="tiny"}'] == 0


@pytest.mark.parametrize("flag,enabled", [([], True), (["--no-enable-prefix-caching"], False),
                                          (["--enable-prefix-caching"], True)])
def test_prefix_caching_is_on_by_default_and_a_flag_turns_it_off(flag, enabled):
    _, engine, _ = configs(build_parser().parse_args(flag))
    assert engine.enable_prefix_caching is enabled
