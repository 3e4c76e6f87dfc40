"""Authentication, per-client rate limits and TLS for the gRPC server.

Bearer tokens: `--api-key-file` lists accepted tokens, one per line, as `name:token` (the name identifies the client
for rate limits and logs) or a bare token (named by its line number). Every RPC of every service needs exactly one
`authorization: Bearer <token>` metadata entry ("bearer" in any case, one space), except the allowlisted methods
(the health checks, so that Kubernetes probes work). Tokens are compared in constant time and never logged.
A refused call is answered UNAUTHENTICATED by a handler of the same streaming shape as the real one, so no
client hangs and no engine work starts.

Rate limits: `--rate-limit R` gives each client (token name, or peer address without auth) a token bucket of R
requests per second with a burst of `--rate-burst`; beyond it, RESOURCE_EXHAUSTED with a `retry-after-ms` trailer.
"""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_BEARER = re.compile(r"^bearer ([^\s]+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    api_keys: tuple[tuple[str, str], ...] = ()  # (name, token)
    exempt: frozenset[str] = HEALTH_METHODS
    rate_limit: float = 0.0  # requests per second per client; 0 = off
    rate_burst: int = 10
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # set: clients must present a certificate signed by it (mutual TLS)

    @property
    def auth(self) -> bool:
        return bool(self.api_keys)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("SecurityConfig: tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("SecurityConfig: mutual TLS needs the server's own certificate and key")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ValueError("SecurityConfig: rate_limit must be >= 0 and rate_burst >= 1")


def read_api_keys(path: Path) -> tuple[tuple[str, str], ...]:
    keys = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, token = line.rpartition(":") if ":" in line else (f"key{number}", "", line)
        if len(token) < 16:
            raise ValueError(f"--api-key-file line {number}: tokens must have at least 16 characters")
        keys.append((name or f"key{number}", token))
    if not keys:
        raise ValueError("--api-key-file holds no token")
    return tuple(keys)


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    return grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)], root_certificates=config.tls_client_ca,
                                       require_client_auth=config.tls_client_ca is not None)


class TokenBuckets:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)

    def take(self, client: str) -> float:
        """0 if the client may proceed, else the seconds until a token is available."""
        now = time.monotonic()
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authentication and rate limits in front of every method."""

    def __init__(self, config: SecurityConfig, on_reject=lambda code: None):
        self.config = config
        self.on_reject = on_reject
        self.buckets = TokenBuckets(config.rate_limit, config.rate_burst) if config.rate_limit else None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method in self.config.exempt:
            return handler
        client = self._identify(details.invocation_metadata)
        if client is None:
            self.on_reject("UNAUTHENTICATED")
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", ())
        if self.buckets is not None:
            wait = self.buckets.take(client)
            if wait:
                self.on_reject("RESOURCE_EXHAUSTED")
                return _deny(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit for client {client!r}",
                             (("retry-after-ms", str(int(wait * 1000) + 1)),))
        return handler

    def _identify(self, metadata) -> str | None:
        """The client's name: the token's name with auth, else 'anonymous'. None when auth fails."""
        if not self.config.auth:
            return "anonymous"
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return None
        match = _BEARER.match(values[0])
        if match is None:
            return None
        presented = match.group(1).encode()
        found = None
        for name, token in self.config.api_keys:  # every key compared: timing does not depend on which matched
            if hmac.compare_digest(presented, token.encode()):
                found = name
        return found


MALFORMED = object()  # what a lenient parser returns for bytes that are not a valid message


class LenientParsing(grpc.aio.ServerInterceptor):
    """Parses requests of the given service without raising: undecodable bytes (bad wire format, invalid UTF-8 in a
    string field) reach the handler as MALFORMED, which answers INVALID_ARGUMENT, instead of grpcio's INTERNAL
    "Exception deserializing request!"."""

    def __init__(self, service: str):
        self.prefix = f"/{service}/"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix) or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes):
            try:
                return parse(data)
            except Exception:  # protobuf's DecodeError and anything the parser raises on hostile bytes
                return MALFORMED

        return handler._replace(request_deserializer=lenient)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str, trailing):
    """A handler of the same streaming shape as `handler` that only aborts."""

    async def unary(request, context):
        await context.abort(code, details, trailing_metadata=trailing)

    async def stream(request, context):
        await context.abort(code, details, trailing_metadata=trailing)
        yield  # pragma: no cover  (makes this an async generator)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
