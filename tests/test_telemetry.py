"""OpenTelemetry spans (in-memory exporter) and Prometheus metrics (scraped over HTTP) from a real server."""

import asyncio
import urllib.request

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.pb.certkv.v1 import inference_pb2 as pb
from server.telemetry import Telemetry, TelemetryConfig
from tests.serving import channel_to, collect, greedy, running_server, wait_quiescent

PROMPT = list(range(400, 440))
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
ATTRIBUTES = {"layer", "kv_head", "rung", "bound_before", "bound_after", "tolerance", "blocks", "bytes",
              "transfer_seconds", "prefetch_hit", "request_id"}


@pytest.fixture(scope="module")
async def traced(tiny_llama):
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetryConfig(step_sample_ratio=1.0, metrics_port=0), "tiny", exporter=exporter)
    async with running_server(tiny_llama, telemetry=telemetry, kv_mode="certified", k_bits=4, v_bits=2,
                              scratch_blocks=8) as server:
        yield server, exporter


def tight(request: pb.GenerateRequest) -> pb.GenerateRequest:
    request.kv.mode, request.kv.tolerance = pb.CERTIFIED, 0.02  # small enough to force escalations at K4/V2
    request.request_id = "traced-1"
    return request


async def test_escalations_are_spans_under_the_callers_trace(traced):
    server, exporter = traced
    exporter.clear()
    async with channel_to(server) as (stub, _):
        messages = [m async for m in stub.Generate(tight(greedy(PROMPT, 30)), metadata=(("traceparent", PARENT),))]
    cert = messages[-1].certificate
    assert cert.rung1_values + cert.rung2_keys + cert.rung3_exact_head > 0
    spans = exporter.get_finished_spans()
    (rpc,) = [s for s in spans if s.name == "certkv.Generate"]
    assert format(rpc.context.trace_id, "032x") == TRACE_ID and rpc.attributes["request_id"] == "traced-1"
    escalations = [s for s in spans if s.name == "certkv.attention.escalate"]
    assert escalations and all(s.parent.span_id == rpc.context.span_id for s in escalations)
    assert all(ATTRIBUTES <= set(s.attributes) for s in escalations)
    assert {s.attributes["rung"] for s in escalations} <= {1, 2, 3, 4}
    assert sum(s.attributes["bytes"] for s in escalations) > 0
    steps = [s for s in spans if s.name == "certkv.engine.step"]
    assert steps and all(s.parent is None for s in steps)
    await wait_quiescent(server)
    assert not any(server.engine.runner.cache.in_use().values())


def scrape(server) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.telemetry.metrics_port}/metrics", timeout=5).read()
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


async def test_metrics_move_over_http(traced):
    server, _ = traced
    before = await asyncio.to_thread(scrape, server)
    async with channel_to(server) as (stub, _):
        await collect(stub, tight(greedy(PROMPT, 20)))
        with pytest.raises(Exception):
            await collect(stub, greedy(PROMPT, 0))  # INVALID_ARGUMENT
    after = await asyncio.to_thread(scrape, server)
    for name in ("vllm:request_success_total", "vllm:generation_tokens_total", "certkv_escalations_total",
                 "certkv_tier2_transfer_bytes_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "certkv_attention_evaluations_total",
                 'certkv_rejections_total{code="INVALID_ARGUMENT"'):
        assert total(after, name) > total(before, name), name
    assert total(after, "vllm:num_requests_running") == 0
    assert 'certkv_prefetch_total{model_name="tiny",result="hit"}' in after
    assert 0 <= total(after, "certkv_certified_fraction") <= 1
    assert total(after, 'certkv_tier_bytes{model_name="tiny",tier="tier1"}') == 0  # everything released
