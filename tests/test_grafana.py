"""The Grafana dashboard (deploy/grafana/certkv.json) queries only metrics a real server exports: every PromQL query's
metric names against the families a running server's /metrics declares (counters as NAME_total, histograms as
NAME_bucket/_sum/_count), and every label it filters or groups by against the labels the server's samples carry."""

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from server.pb.certkv.v1 import inference_pb2 as pb
from server.telemetry import Telemetry, TelemetryConfig
from tests.serving import channel_to, collect, greedy, running_server, wait_quiescent

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "certkv.json"
PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by",
                "without", "and", "or", "unless", "label_values", "clamp_min", "clamp_max"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
            "summary": ("", "_sum", "_count"), "info": ("_info",)}
# What the issue asks the dashboard to show, as the metrics that show it.
REQUIRED = {"vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
            "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc", "certkv_attention_evaluations_total", "certkv_escalations_total",
            "certkv_tier2_transfer_bytes_total", "certkv_tier2_transfer_seconds_bucket", "certkv_prefetch_total",
            "certkv_audit_violations_total"}


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets (rows' nested panels too) and query variables."""
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: what is left once strings, matchers, ranges, groupings, numbers and
    PromQL's own words are taken out (an unknown function fails the test too, as an unknown metric)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", expr)
    expr = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][-+]?\d+)?", " ", expr)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS


def label_names(expr: str) -> set[str]:
    grouped = [label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
               for label in group.split(",")]
    matched = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", expr)))
    return set(grouped + matched) - {""}


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def exported(text: str) -> tuple[set[str], set[str]]:
    """(sample names a scrape may hold, label names its samples carry) from the exposition text."""
    names, labels = set(), {"le"}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):  # a counter's TYPE line may end in _total
        names |= {name.removesuffix("_total") + suffix for suffix in SUFFIXES[kind]}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = re.match(r"([^{\s]+)(?:\{(.*)\})?\s", line)
            names.add(match.group(1))
            labels |= set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', match.group(2) or ""))
    return names, labels


@pytest.fixture(scope="module")
async def scraped(tiny_llama) -> tuple[set[str], set[str]]:
    """/metrics of a real server after a request tight enough to escalate, a refused one and a cancelled one, so
    that the labelled series exist (rung, direction, code, reason)."""
    telemetry = Telemetry(TelemetryConfig(metrics_port=0), "tiny")
    async with running_server(tiny_llama, telemetry=telemetry, kv_mode="certified", k_bits=4, v_bits=2,
                              scratch_blocks=8) as server:
        request = greedy(list(range(400, 440)), 30)
        request.kv.mode, request.kv.tolerance = pb.AUDIT, 0.02
        async with channel_to(server) as (stub, _):
            await collect(stub, request)
            with pytest.raises(grpc.aio.AioRpcError):
                await collect(stub, greedy([400], 0))  # INVALID_ARGUMENT
            call = stub.Generate(greedy([400], 300))
            await call.read()
            call.cancel()
        await wait_quiescent(server)
        text = await asyncio.to_thread(scrape, server.telemetry.metrics_port)
    return exported(text)


def test_the_query_parser():
    expr = ('histogram_quantile(0.99, sum by (le, rung) (rate(vllm:x_bucket{model_name=~"$model",a="{b}"}'
            '[$__rate_interval]))) / sum(certkv_y_total) + 1e-9')
    assert metric_names(expr) == {"vllm:x_bucket", "certkv_y_total"}
    assert label_names(expr) == {"le", "rung", "model_name", "a"}
    assert metric_names("label_values(vllm:num_requests_running, model_name)") == {"vllm:num_requests_running"}


def test_the_dashboard_shows_what_the_issue_asks():
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*map(metric_names, queries(dashboard)))
    assert REQUIRED <= used, REQUIRED - used
    ids = [p["id"] for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "certkv"


async def test_every_queried_metric_and_label_is_exported(scraped):
    names, labels = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    for expr in queries(dashboard):
        assert metric_names(expr) <= names, (expr, metric_names(expr) - names)
        assert label_names(expr) <= labels, (expr, label_names(expr) - labels)


def test_the_charts_dashboard_configmap_is_the_dashboard():
    """grafanaDashboard.enabled renders deploy/grafana/certkv.json (the chart links to it) for Grafana's sidecar."""
    import kubernetes_validate

    from tests.test_deploy import KUBE, render

    dashboards = [d for d in render({"grafanaDashboard": {"enabled": True}})
                  if d["kind"] == "ConfigMap" and "certkv.json" in d["data"]]
    (configmap,) = dashboards
    kubernetes_validate.validate(configmap, KUBE, strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["certkv.json"]) == json.loads(DASHBOARD.read_text())
    assert not [d for d in render() if d["kind"] == "ConfigMap" and "certkv.json" in d["data"]]  # off by default
