"""`python -m server`: flags -> ServerConfig and EngineConfig (the only place configs are built), then serve."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
import sys

import uvloop

from engine.config import DEFAULT_TOLERANCE, DEVICES, DTYPES, KV_MODES, EngineConfig, parse_bytes
from engine.kv.quantizers import KEY_BITS, VALUE_BITS
from server.config import ServerConfig
from server.security import SecurityConfig, read_api_keys
from server.telemetry import EXPORTERS, TelemetryConfig


class _Parser(argparse.ArgumentParser):
    """Reads `@file` arguments one per line (blank lines skipped): the Helm chart's ConfigMap is such a file."""

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return [arg_line.strip()] if arg_line.strip() else []


def build_parser(prog: str = "python -m server") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="certkv gRPC inference server", fromfile_prefix_chars="@",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (_network, _model, _engine, _kv, _security, _admission, _telemetry):
        add(p)
    p.add_argument("--log-level", default="INFO")
    return p


def _network(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    net.add_argument("--port", type=int, default=50051)
    net.add_argument("--max-message-bytes", type=parse_bytes, default="4MiB", help="gRPC receive limit")
    net.add_argument("--max-connection-age", type=float, default=None,
                     help="seconds before clients are asked to reconnect (rebalancing behind L4 load balancers)")
    net.add_argument("--slow-client-timeout", type=float, default=60.0,
                     help="seconds a client may read nothing while its stream has output waiting; then the stream "
                          "ends with RESOURCE_EXHAUSTED and its request is aborted")


def _model(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), an HF directory or a .gguf")
    model.add_argument("--device", choices=DEVICES, default="auto")
    model.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    model.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _engine(p: argparse.ArgumentParser) -> None:
    engine = p.add_argument_group("engine")
    engine.add_argument("--kv-cache-memory", type=parse_bytes, default="1GiB",
                        help="device bytes of KV blocks (tier 1 with the tiered cache)")
    engine.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-memory")
    engine.add_argument("--block-size", type=int, default=16, choices=(8, 16, 32))
    engine.add_argument("--max-num-seqs", type=int, default=64, help="requests per batch")
    engine.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per forward pass")
    engine.add_argument("--max-model-len", type=int, default=None, help="context cap (default: the model's)")
    engine.add_argument("--max-new-tokens-default", type=int, default=256)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="share the KV of full blocks of prompts across requests (--no-enable-prefix-caching: "
                             "recompute every prompt, for comparisons)")


def _kv(p: argparse.ArgumentParser) -> None:
    kv = p.add_argument_group("certified KV cache")
    kv.add_argument("--kv-mode", choices=KV_MODES, default="certified",
                    help="dense: plain paged cache; others: the tiered cache, and the mode of requests that set none")
    kv.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help="relative error certified by default (requests may set their own)")
    kv.add_argument("--k-bits", type=int, choices=KEY_BITS, default=8)
    kv.add_argument("--v-bits", type=int, choices=VALUE_BITS, default=4)
    kv.add_argument("--quantizer", default="minmax",
                    help="tier-1 codes: minmax, minmax-fp8, hadamard, headq, or KEYS/VALUES such as "
                         "minmax-fp8/hadamard (engine/kv/quantizers.py, engine/kv/headq.py)")
    kv.add_argument("--headq-rank", type=int, default=32, help="headq: query-basis directions with a side code")
    kv.add_argument("--headq-bits", type=int, default=4, help="headq: bits of each side-code coordinate")
    kv.add_argument("--headq-basis", default=None,
                    help="headq: the basis `python -m engine.calibrate` wrote (default: headq.safetensors beside "
                         "the model)")
    kv.add_argument("--scratch-blocks", type=int, default=None,
                    help="exact (block, KV head) pieces kept on the device per layer, keys and values each (default: "
                         "512, or what an eighth of --kv-cache-memory holds when that is fewer)")
    kv.add_argument("--shadow-memory", type=parse_bytes, default="2GiB",
                    help="host bytes for tier-2 shadows; with --kv-cache-memory it caps the number of blocks")
    kv.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                    help="start tier-2 fetches the next step will likely need (auto: on with CUDA, off on a CPU, where "
                         "a fetch is a memcpy nothing overlaps)")
    kv.add_argument("--no-prefetch", dest="prefetch", action="store_const", const="off", help="--prefetch off")
    kv.add_argument("--prefetch-blocks", type=int, default=None,
                    help="per layer: prefetched (block, KV head) pieces held on the device until used (default: as "
                         "the scratch's default)")


def _security(p: argparse.ArgumentParser) -> None:
    sec = p.add_argument_group("security")
    sec.add_argument("--api-key-file", type=Path, help="bearer tokens, one per line as name:token (health exempt)")
    sec.add_argument("--rate-limit", type=float, default=0.0, help="requests per second per client (0: off)")
    sec.add_argument("--rate-burst", type=int, default=10)
    sec.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM); with --tls-key enables TLS")
    sec.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    sec.add_argument("--tls-client-ca", type=Path, help="CA of accepted client certificates: mutual TLS")
    sec.add_argument("--health-port", type=int, default=None,
                     help="also serve grpc.health.v1 in plaintext on this port (Kubernetes probes when TLS is on)")


def _admission(p: argparse.ArgumentParser) -> None:
    limits = p.add_argument_group("admission and lifecycle")
    limits.add_argument("--max-pending-requests", type=int, default=256, help="beyond: RESOURCE_EXHAUSTED")
    limits.add_argument("--max-pending-per-peer", type=int, default=64,
                        help="of those, one peer address's, so that one client cannot refuse every other (0: off)")
    limits.add_argument("--max-tokens-in-flight", type=int, default=0,
                        help="prompt + max_new_tokens summed over pending requests; beyond: RESOURCE_EXHAUSTED (0: off)")
    limits.add_argument("--max-prompt-chars", type=int, default=1 << 20,
                        help="characters of a text prompt, or of all chat messages together")
    limits.add_argument("--max-chat-messages", type=int, default=256, help="messages of one chat input")
    limits.add_argument("--tokenizer-threads", type=int, default=2,
                        help="threads that tokenize and render chat templates (never the event loop)")
    limits.add_argument("--tokenizer-queue", type=int, default=32,
                        help="tokenizer jobs waiting or running; beyond: RESOURCE_EXHAUSTED")
    limits.add_argument("--tokenizer-queue-per-peer", type=int, default=8,
                        help="of those, one peer address's (jobs are served fairly across peers)")
    limits.add_argument("--max-watch-per-peer", type=int, default=8,
                        help="open health Watch streams per peer address; beyond: RESOURCE_EXHAUSTED")
    limits.add_argument("--drain-delay", type=float, default=1.0, help="seconds NOT_SERVING before stopping")
    limits.add_argument("--drain-grace", type=float, default=30.0, help="seconds in-flight streams may finish")
    limits.add_argument("--no-warmup", action="store_true", help="report SERVING without a warm-up generation")


def _telemetry(p: argparse.ArgumentParser) -> None:
    obs = p.add_argument_group("telemetry")
    obs.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port; -1 disables it")
    obs.add_argument("--metrics-host", default=None,
                     help="address /metrics listens on (default: --host); /metrics has no authentication")
    obs.add_argument("--trace-exporter", choices=EXPORTERS, default=os.environ.get("OTEL_TRACES_EXPORTER", "none"),
                     help="OpenTelemetry span exporter (OTEL_* variables configure the SDK)")
    obs.add_argument("--otlp-endpoint", default=None, help="OTLP gRPC endpoint (default: OTEL_EXPORTER_OTLP_ENDPOINT)")
    obs.add_argument("--trace-step-ratio", type=float, default=0.0, help="fraction of engine steps traced")


def configs(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig, TelemetryConfig]:
    def read(path):
        return path.read_bytes() if path else None

    security = SecurityConfig(
        api_keys=read_api_keys(args.api_key_file) if args.api_key_file else (), rate_limit=args.rate_limit,
        rate_burst=args.rate_burst, tls_cert=read(args.tls_cert), tls_key=read(args.tls_key),
        tls_client_ca=read(args.tls_client_ca))
    server = ServerConfig(
        host=args.host, port=args.port, max_pending_requests=args.max_pending_requests,
        max_pending_per_peer=args.max_pending_per_peer, max_tokens_in_flight=args.max_tokens_in_flight,
        max_prompt_chars=args.max_prompt_chars, max_message_bytes=args.max_message_bytes,
        drain_delay_s=args.drain_delay, drain_grace_s=args.drain_grace, warmup=not args.no_warmup,
        max_connection_age_s=args.max_connection_age, security=security, health_port=args.health_port,
        slow_client_timeout_s=args.slow_client_timeout, tokenizer_threads=args.tokenizer_threads,
        tokenizer_queue=args.tokenizer_queue, tokenizer_queue_per_peer=args.tokenizer_queue_per_peer,
        max_chat_messages=args.max_chat_messages,
        max_watch_per_peer=args.max_watch_per_peer)
    engine = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_new_tokens_default=args.max_new_tokens_default, threads=args.threads, kv_mode=args.kv_mode,
        tolerance=args.tolerance, k_bits=args.k_bits, v_bits=args.v_bits, quantizer=args.quantizer,
        headq_rank=args.headq_rank, headq_bits=args.headq_bits, headq_basis=args.headq_basis,
        scratch_blocks=args.scratch_blocks, shadow_memory=args.shadow_memory, prefetch={"auto": None, "on": True, "off": False}[args.prefetch],
        prefetch_blocks=args.prefetch_blocks, enable_prefix_caching=args.enable_prefix_caching)
    telemetry = TelemetryConfig(trace_exporter=args.trace_exporter, otlp_endpoint=args.otlp_endpoint,
                                step_sample_ratio=args.trace_step_ratio,
                                metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                                metrics_host=args.metrics_host or args.host)
    return server, engine, telemetry


def main(argv: list[str] | None = None, prog: str = "python -m server") -> None:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server_config, engine_config, telemetry_config = configs(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    from server.app import serve  # after argument parsing: importing torch and transformers takes seconds

    try:
        uvloop.run(serve(server_config, engine_config, telemetry_config))
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("certkv").error("cannot start: %s", exc)
        sys.exit(1)
