"""`certkv generate --target HOST:PORT "prompt"` (or `python -m server.client`): streams a generation to stdout.

--chat sends the prompt as a user message (the model's chat template applies); --json prints each response
message as one JSON line; --info prints the model description. Exit status 1 with the gRPC status on errors.

The human output ends, on stderr, with the usage line and one line that sums up the certificate, the largest bound
over its limit first; with --logprobs, each generated token's text and logprob (and the alternatives) follow the text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict, MessageToJson

from server.pb.certkv.v1 import inference_pb2 as pb
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc

MODES = {"dense": pb.DENSE, "quantized": pb.QUANTIZED, "certified": pb.CERTIFIED, "exact": pb.EXACT,
         "audit": pb.AUDIT}
# The certificate's JSON keys a reader needs first; the others follow in the proto's order.
SUMMARY_FIRST = ("mode", "maxBoundOverTolerance", "certifiedShare", "escalations", "auditViolations",
                 "promiseViolations", "tolerance")
RUNG_NAMES = (("rung1_values", "values"), ("rung2_keys", "keys"), ("rung3_exact_head", "exact head"),
              ("rung4_exact_layer", "exact layer"))


def build_parser(prog: str = "python -m server.client") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", help="prompt text (or token ids with --token-ids)")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--token-ids", action="store_true", help="the prompt is comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, metavar="N", help="return logprobs and the N most likely tokens")
    p.add_argument("--kv-mode", choices=sorted(MODES))
    p.add_argument("--tolerance", type=float)
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--api-key", default=os.environ.get("CERTKV_API_KEY"), help="bearer token (or CERTKV_API_KEY)")
    p.add_argument("--tls-ca", type=Path, help="trust this CA (PEM) and connect with TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client key for mutual TLS")
    p.add_argument("--json", action="store_true", help="one JSON line per response message")
    p.add_argument("--info", action="store_true", help="print GetModelInfo and exit")
    p.add_argument("--health", action="store_true",
                   help="exit 0 if grpc.health.v1 reports certkv.v1.Inference SERVING, 1 otherwise")
    return p


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    request = pb.GenerateRequest(logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0)
    if args.token_ids:
        request.prompt_token_ids.ids.extend(int(t) for t in args.prompt.split(","))
    elif args.chat:
        if args.system:
            request.messages.messages.add(role="system", content=args.system)
        request.messages.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    s = request.sampling
    s.temperature, s.top_k, s.min_p = args.temperature, args.top_k, args.min_p
    s.frequency_penalty, s.presence_penalty = args.frequency_penalty, args.presence_penalty
    for name in ("top_p", "repetition_penalty", "seed"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    stopping = request.stopping
    if args.max_new_tokens is not None:
        stopping.max_new_tokens = args.max_new_tokens
    stopping.min_new_tokens, stopping.ignore_eos = args.min_new_tokens, args.ignore_eos
    stopping.stop.extend(args.stop)
    if args.kv_mode:
        request.kv.mode = MODES[args.kv_mode]
    if args.tolerance is not None:
        request.kv.tolerance = args.tolerance
    return request


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes(),
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None)
    return grpc.secure_channel(args.target, credentials)


def health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with channel_for(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="certkv.v1.Inference"), timeout=min(args.timeout, 5.0))
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None, prog: str = "python -m server.client") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.health:
        return health(args)
    if not args.info and args.prompt is None:
        parser.error("a prompt is required")
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    with channel_for(args) as channel:
        stub = pb_grpc.InferenceStub(channel)
        try:
            if args.info:
                info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout, metadata=metadata)
                print(MessageToJson(info, always_print_fields_with_no_presence=True))  # zeros and false mean something
                return 0
            messages = []
            for message in stub.Generate(build_request(args), timeout=args.timeout, metadata=metadata):
                print(json_line(message) if args.json else message.text, end="\n" if args.json else "", flush=True)
                if not args.json:  # kept for the summary lines
                    messages.append(message)
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if not args.json and messages:
        print()
        for line in logprob_lines(messages):
            print(line)
        u, last = messages[-1].usage, messages[-1]
        cached = f" ({u.cached_tokens} from the prefix cache)" if u.cached_tokens else ""
        print(f"[{pb.FinishReason.Name(last.finish_reason)}; {u.prompt_tokens} prompt{cached} + {u.completion_tokens} "
              f"completion tokens; ttft {u.time_to_first_token_s:.3f}s; total {u.total_time_s:.3f}s]", file=sys.stderr)
        print(certificate_line(last.certificate), file=sys.stderr)
    return 0


def json_line(message: pb.GenerateResponse) -> str:
    """The message's proto3 JSON on one line, its certificate's summary keys first."""
    data = MessageToDict(message)
    if "certificate" in data:
        cert = data["certificate"]
        data["certificate"] = {key: cert[key] for key in SUMMARY_FIRST if key in cert} | cert
    return json.dumps(data, ensure_ascii=False)


def certificate_line(cert: pb.Certificate) -> str:
    """One line: the largest bound over its limit, the certified share, the escalations, the audit's result."""
    if cert.mode == pb.DENSE:
        return "[certificate: none needed, dense attention at full precision]"
    if not cert.HasField("tolerance"):
        return f"[certificate: none, {pb.KVMode.Name(cert.mode).lower()} attention is not checked]"
    if cert.mode == pb.EXACT:
        return (f"[certificate, exact: all {cert.attention_evaluations} attention outputs computed from the "
                f"full-precision shadows]")
    if cert.HasField("max_bound_over_tolerance"):
        parts = [f"bound/limit at most {cert.max_bound_over_tolerance:.3g}"]
    else:
        parts = ["no output accepted on a bound (all exact)"]
    if cert.HasField("certified_share"):
        parts.append(f"{100 * cert.certified_share:.1f}% certified at rung 0")
    rungs = ", ".join(f"{name} {getattr(cert, field)}" for field, name in RUNG_NAMES if getattr(cert, field))
    parts.append(f"{cert.escalations} escalations" + (f" ({rungs})" if rungs else ""))
    if cert.HasField("audit_violations"):
        parts.append(f"audit: {cert.audit_violations} violations of the bound, {cert.promise_violations} of the "
                     f"tolerance")
    else:
        parts.append("not audited")
    mode = pb.KVMode.Name(cert.mode).lower()
    return f"[certificate, {mode} at tolerance {cert.tolerance:g}: {'; '.join(parts)}]"


def logprob_lines(messages: list[pb.GenerateResponse]) -> list[str]:
    """Per generated token: its logprob and text, then the most likely tokens with theirs."""
    lines = []
    for lp in (lp for message in messages for lp in message.logprobs):
        top = ", ".join(f"{json.dumps(t.token_text, ensure_ascii=False)} {t.logprob:.3f}" for t in lp.top)
        lines.append(f"{lp.logprob:9.3f}  {json.dumps(lp.token_text, ensure_ascii=False)}"
                     + (f"   top: {top}" if top else ""))
    return (["logprobs (token, then the most likely):"] + lines) if lines else []


if __name__ == "__main__":
    sys.exit(main())
