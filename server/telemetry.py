"""OpenTelemetry and Prometheus wiring, in one place.

Traces: a `certkv.Generate` SERVER span per RPC, continuing the caller's W3C trace context (gRPC metadata
`traceparent`/`tracestate`); one `certkv.attention.escalate` child span per escalation (its duration is the tier-2
transfer time); a `certkv.engine.step` span for a sampled fraction of engine steps. Exporters: none (default),
console, or OTLP over gRPC; the SDK's OTEL_* environment variables (service name, endpoint, headers, sampler) apply.

Metrics (Prometheus, one registry per server, served on --metrics-host:--metrics-port, without authentication):
vLLM's names where one exists, so that KEDA or llm-d configurations written for vLLM work unchanged, and
certkv_-prefixed ones for the certified cache.
Counters move when requests end or escalate; live values (running, waiting, cache usage, tier bytes, prefetch
hits) are read from the engine at scrape time.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.kv.stats import CertificateStats, EscalationRecord
from engine.request import RequestOutput

EXPORTERS = ("none", "console", "otlp")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0)
TRANSFER_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
RATIO_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    trace_exporter: str = "none"
    otlp_endpoint: str | None = None  # default: OTEL_EXPORTER_OTLP_ENDPOINT or localhost:4317
    step_sample_ratio: float = 0.0  # fraction of engine steps traced
    metrics_port: int | None = None  # None: no HTTP endpoint (the registry still exists); 0: any free port
    metrics_host: str = "127.0.0.1"  # the address /metrics listens on (it has no authentication)

    def __post_init__(self) -> None:
        if self.trace_exporter not in EXPORTERS:
            raise ValueError(f"TelemetryConfig.trace_exporter: must be one of {EXPORTERS}")
        if not 0.0 <= self.step_sample_ratio <= 1.0:
            raise ValueError("TelemetryConfig.step_sample_ratio: must be in [0, 1]")


class Telemetry:
    def __init__(self, config: TelemetryConfig, model_name: str, exporter: SpanExporter | None = None):
        self.config = config
        self.model_name = model_name
        self.provider = _provider(config, exporter)
        self.tracer = (self.provider or trace.NoOpTracerProvider()).get_tracer("certkv")
        self.propagator = TraceContextTextMapPropagator()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, model_name)
        self.http = None
        self.metrics_port: int | None = None

    def start_http(self) -> None:
        """Serves /metrics on metrics_host:metrics_port; a port that cannot be bound is a ValueError naming it."""
        host, port = self.config.metrics_host, self.config.metrics_port
        if port is None:
            return
        try:
            self.http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ValueError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self.metrics_port = self.http.server_port

    def watch(self, snapshot) -> None:
        """Live values for /metrics: `snapshot()` returns the engine's LiveStats."""
        self.registry.register(_LiveCollector(snapshot, self.model_name))

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
        if self.provider is not None:
            self.provider.shutdown()

    # ---- traces ------------------------------------------------------------------------------------------------
    @contextmanager
    def rpc_span(self, method: str, metadata):
        """The RPC's SERVER span, continuing the caller's trace. It is never made the current span: RPC handlers are
        async generators, and a context attached in one resumption cannot be detached in another."""
        carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
        span = self.tracer.start_span(f"certkv.{method}", context=self.propagator.extract(carrier),
                                      kind=trace.SpanKind.SERVER, attributes={
                                          "rpc.system": "grpc", "rpc.service": "certkv.v1.Inference",
                                          "rpc.method": method})
        try:
            yield span
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                span.record_exception(exc)
            raise
        finally:
            span.end()

    def escalations(self, span, records: tuple[EscalationRecord, ...]) -> None:
        if not records or not span.is_recording():
            return
        parent = trace.set_span_in_context(span)
        for record in records:
            child = self.tracer.start_span("certkv.attention.escalate", context=parent, attributes={
                "request_id": record.request_id, "layer": record.layer, "kv_head": record.kv_head,
                "rung": record.rung, "bound_before": record.bound_before, "bound_after": record.bound_after,
                "tolerance": record.tolerance, "blocks": record.blocks, "bytes": record.bytes,
                "transfer_seconds": record.transfer_seconds, "prefetch_hit": record.prefetch_hit})
            child.end(end_time=child.start_time + int(record.transfer_seconds * 1e9))

    @contextmanager
    def step_span(self):
        """Wraps one engine step in a span for a sampled fraction of steps (nothing otherwise)."""
        if self.provider is None or random.random() >= self.config.step_sample_ratio:
            yield None
            return
        with self.tracer.start_as_current_span("certkv.engine.step", context=trace.set_span_in_context(
                trace.INVALID_SPAN)) as span:
            yield span


class Metrics:
    """The counters and histograms the request path moves."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        labels = ("model_name",)
        self.model_name = model_name

        def histogram(name, doc, buckets, extra=()):
            return Histogram(name, doc, labels + extra, registry=registry, buckets=buckets)

        def counter(name, doc, extra=()):
            return Counter(name, doc, labels + extra, registry=registry)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens.", LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduling.", LATENCY_BUCKETS)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.success = counter("vllm:request_success", "Finished requests.", ("finished_reason",))
        self.evaluations = counter("certkv_attention_evaluations", "Attention evaluations (step, layer, query head) "
                                   "by the rung that produced them.", ("rung",))
        self.escalations = counter("certkv_escalations", "KV groups escalated, by rung.", ("rung",))
        self.bound_ratio = histogram("certkv_bound_over_tolerance", "Per request, the largest accepted bound over "
                                     "its limit (tolerance times scale).", RATIO_BUCKETS)
        self.transfer_bytes = counter("certkv_tier2_transfer_bytes", "Bytes moved from tier 2 for escalations.",
                                      ("direction",))
        self.transfer_seconds = histogram("certkv_tier2_transfer_seconds", "Tier-2 transfer time of one escalation.",
                                          TRANSFER_BUCKETS, ("direction",))
        self.audit_violations = counter("certkv_audit_violations", "Accepted outputs farther from the reference than "
                                        "their bound (audit mode).")
        self.promise_violations = counter("certkv_promise_violations", "Accepted outputs farther from the reference "
                                          "than tolerance times its scale (audit mode).")
        self.aborts = counter("certkv_aborts", "Requests that ended without a final output.", ("reason",))
        self.rejections = counter("certkv_rejections", "Requests refused with a gRPC status.", ("code",))
        self.tokenizer_characters = counter("certkv_tokenizer_characters", "Characters handed to the tokenizer.")

    def tokenized(self, characters: int) -> None:
        self.tokenizer_characters.labels(self.model_name).inc(characters)

    def output(self, out: RequestOutput, gap: float | None) -> None:
        m = self.model_name
        if gap is not None:
            self.itl.labels(m).observe(gap)
        for record in out.escalations:
            self.escalations.labels(m, str(record.rung)).inc()
            if record.bytes:
                self.transfer_bytes.labels(m, "h2d").inc(record.bytes)
                self.transfer_seconds.labels(m, "h2d").observe(record.transfer_seconds)
        if out.finished:
            self._finished(out)

    def _finished(self, out: RequestOutput) -> None:
        m, usage = self.model_name, out.usage
        self.ttft.labels(m).observe(usage.time_to_first_token_s)
        self.e2e.labels(m).observe(usage.total_time_s)
        self.queue.labels(m).observe(usage.queue_time_s)
        self.prompt_tokens.labels(m).inc(usage.prompt_tokens)
        self.generation_tokens.labels(m).inc(usage.completion_tokens)
        self.success.labels(m, out.finish_reason.value).inc()
        cert: CertificateStats | None = out.certificate
        if cert is not None and cert.evaluations:
            for rung, count in enumerate(cert.rungs):
                if count:
                    self.evaluations.labels(m, str(rung)).inc(count)
            if sum(cert.rungs):
                self.bound_ratio.labels(m).observe(cert.max_bound_over_tolerance)
            self.audit_violations.labels(m).inc(cert.audit_violations)
            self.promise_violations.labels(m).inc(cert.promise_violations)


class _LiveCollector:
    """Reads the engine's live values at scrape time (vLLM gauges and certkv tier/prefetch figures)."""

    def __init__(self, snapshot, model_name: str):
        self.snapshot, self.model_name = snapshot, model_name

    def collect(self):
        s, labels = self.snapshot(), [self.model_name]
        for name, doc, value in (("vllm:num_requests_running", "Requests in the running batch.", s.running),
                                 ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.waiting),
                                 ("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use.", s.kv_usage),
                                 ("certkv_certified_fraction", "Evaluations certified at rung 0 among all certified "
                                                               "evaluations so far.", s.certified_fraction)):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        tiers = GaugeMetricFamily("certkv_tier_bytes", "Bytes held by each KV tier.", labels=["model_name", "tier"])
        for tier, value in s.tier_bytes.items():
            tiers.add_metric(labels + [tier], value)
        yield tiers
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Preemptions by recompute.", labels=["model_name"])
        preemptions.add_metric(labels, s.preemptions)
        yield preemptions
        for name, doc, value in (("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache (at "
                                                               "each admission).", s.prefix_cache_queries),
                                 ("vllm:prefix_cache_hits", "Of those, tokens found cached.", s.prefix_cache_hits)):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(labels, value)
            yield counter
        prefetch = CounterMetricFamily("certkv_prefetch", "Tier-2 pieces fetched, by whether a prefetch had them.",
                                       labels=["model_name", "result"])
        prefetch.add_metric(labels + ["hit"], s.prefetch_hits)
        prefetch.add_metric(labels + ["miss"], s.prefetch_misses)
        yield prefetch


def _provider(config: TelemetryConfig, exporter: SpanExporter | None) -> TracerProvider | None:
    if exporter is None and config.trace_exporter == "none":
        return None
    service = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "certkv"}
    provider = TracerProvider(resource=Resource.create(service))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.trace_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    return provider
