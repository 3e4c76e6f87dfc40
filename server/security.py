"""Authentication, per-client rate limits and TLS for the gRPC server.

Bearer tokens: `--api-key-file` lists accepted tokens, one per line, as `name:token` (the name identifies the client
for rate limits and logs) or a bare token (named by its line number). Every RPC of every service needs exactly one
`authorization: Bearer <token>` metadata entry ("bearer" in any case, one space), except the allowlisted methods
(the health checks, so that Kubernetes probes work). Tokens are compared in constant time and never logged.
A refused call is answered UNAUTHENTICATED by a handler of the same streaming shape as the real one, so no
client hangs and no engine work starts.

Rate limits: `--rate-limit R` gives each client (token name, or peer IP address without auth: every connection
from one address shares its bucket) a token bucket of R requests per second with a burst of `--rate-burst`; beyond
it, RESOURCE_EXHAUSTED with a `retry-after-ms` trailer. The peer is known only inside the call, so the limit runs
in a wrapper around the method's handler, before it starts.

Malformed bytes: LenientParsing parses the requests of every method (Inference, health, reflection) without
raising, and answers bytes that are not a valid message (bad wire format, invalid UTF-8 in a string field) with
INVALID_ARGUMENT, where grpcio would answer INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import hmac
import inspect
import re
import time
from collections.abc import Awaitable, Callable
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


def peer_address(peer: str) -> str:
    """A peer without its port: 'ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7', 'ipv6:[::1]:5' -> 'ipv6:[::1]'."""
    kind, _, rest = (peer or "").partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer or "unknown"


MAX_BUCKETS = 10_000  # clients tracked at once; the least recently seen are forgotten beyond it


class TokenBuckets:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill), least recent first

    def take(self, client: str) -> float:
        """0 if the client may proceed, else the seconds until a token is available."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1 if not wait else tokens, now)
        while len(self._buckets) > MAX_BUCKETS:
            del self._buckets[next(iter(self._buckets))]
        return wait


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
        if self.buckets is None:
            return handler

        async def limit(context) -> None:
            key = client or peer_address(context.peer())
            if wait := self.buckets.take(key):
                self.on_reject("RESOURCE_EXHAUSTED")
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit for client {key!r}",
                                    trailing_metadata=(("retry-after-ms", str(int(wait * 1000) + 1)),))

        return wrap_handler(handler, before=limit)

    def _identify(self, metadata) -> str | None:
        """The client's name: the token's name with auth, else "" (the peer address names it). None: auth fails."""
        if not self.config.auth:
            return ""
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
    """Parses every method's requests without raising: bytes that are not a valid message (bad wire format, invalid
    UTF-8 in a string field) are answered INVALID_ARGUMENT before the method runs, instead of grpcio's INTERNAL
    "Exception deserializing request!" or UNKNOWN."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes):
            try:
                return parse(data)
            except Exception:  # protobuf's DecodeError and anything the parser raises on hostile bytes
                return MALFORMED

        return wrap_handler(handler._replace(request_deserializer=lenient), check=_refuse_malformed)


async def _refuse_malformed(request, context) -> None:
    if request is MALFORMED:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "request: not a valid message of this method's request type (wire format or UTF-8)")


async def _nothing(*args) -> None:
    return None


def wrap_handler(handler: grpc.RpcMethodHandler, before: Callable[..., Awaitable[None]] = _nothing,
                 check: Callable[..., Awaitable[None]] = _nothing) -> grpc.RpcMethodHandler:
    """A handler of the same shape that awaits before(context), then check(request, context) for every request,
    then runs the method. Either may abort the call. Streamed answers are written with context.write."""
    if handler.request_streaming:
        behavior = handler.stream_stream or handler.stream_unary

        async def call(requests, context):
            await before(context)
            return await _answer(behavior(_checked(requests, context, check), context), context)
    else:
        behavior = handler.unary_stream or handler.unary_unary

        async def call(request, context):
            await before(context)
            await check(request, context)
            return await _answer(behavior(request, context), context)

    kind = ("stream_" if handler.request_streaming else "unary_") + ("stream" if handler.response_streaming
                                                                     else "unary")
    return handler._replace(**{kind: call})


async def _checked(requests, context, check):
    async for request in requests:
        await check(request, context)
        yield request


async def _answer(result, context):
    """Awaits a method's result: a coroutine's value, or an async generator's messages written one by one."""
    if inspect.isasyncgen(result):
        async for message in result:
            await context.write(message)
        return None
    return await result


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
